"""`loraq gateway`: an HTTP front door that speaks LoRAX's REST API and OpenAI's, on top of the queue.

Each HTTP request becomes a job on the jobs exchange (the wire contract any backend app uses:
docs/protocol.md; OpenAI's `n` makes n jobs) and its replies become the HTTP response, so
`lorax-client`, the `openai` SDK or curl work unchanged against loraq by changing a base URL. The
gateway keeps no state beyond its in-flight requests: run as many as you like behind a load
balancer. Never imports torch.

    settings.py       GatewaySettings: flags with LORAQ_* env twins
    tracker.py        JobTracker: one robust connection, one reply queue, in-flight jobs by id
    wire.py           the job bodies (LoRAX dialect for LoRAX routes, v1 for OpenAI), request readers
    errors.py         GatewayError and its mapping to LoRAX's and OpenAI's status codes and bodies
    auth.py           optional bearer tokens (env or file)
    metrics.py        Prometheus request / latency / status metrics
    catalog.py        the models /v1/models lists: the base model and the adapters under a root
    sse.py            EventStream: server-sent events on an aiohttp response
    lorax_routes.py   POST / /generate /generate_stream, GET /info /health
    openai_routes.py  POST /v1/chat/completions /v1/completions, GET /v1/models
    app.py            the aiohttp application, `run_gateway`, `main` (`loraq gateway`)
"""
