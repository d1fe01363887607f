"""LoRAX's REST routes (predibase/lorax router/src/server.rs), on the queue.

    POST /                  `{"inputs", "parameters", "stream"}` as lorax-client sends it: a JSON
                            list of one response, or server-sent events when stream is true
    POST /generate          one response object
    POST /generate_stream   server-sent events, one per token, TGI's event shape
    GET  /info              the served model (what the gateway knows of it)
    GET  /health, GET /     200 while the broker is connected and a worker consumes the jobs queue

Request parameters keep LoRAX's names and meaning; `wire.job_parameters` passes the ones the wire
carries and refuses the others unless they are off. LoRAX's sampling rule is applied here (sample
when `do_sample` or any warper is set: temperature other than 0 and 1, top_k, top_p < 1,
typical_p < 1; temperature 0 is greedy), because the wire's v1 rule is `do_sample` alone.

Streams: each event is `{"token": {...}, "generated_text": null, "details": null}`; the last one
carries the last token with `generated_text` and (with `details`) `details`. The wire's token
replies do not say which one is last: the max_new_tokens-th is, and any other waits up to
`stream_linger_ms` for the next reply (the worker publishes the result right after the last
token); when the result comes later than that, a closing event carries the rest of the text in
an extra token (empty, and marked special, when all of it was streamed). Streamed jobs always ask
the wire for details, since every LoRAX token has a logprob. An error before the first token is
an HTTP error; after it, an error event.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web

from consumer import protocol
from consumer.gateway import wire
from consumer.gateway.errors import GatewayError
from consumer.gateway.settings import GatewaySettings
from consumer.gateway.sse import EventStream
from consumer.gateway.tracker import JobTracker, PendingJob


def loraq_version() -> str:
    try:
        return version("loraq")
    except PackageNotFoundError:
        return "unknown"


class LoraxRoutes:
    def __init__(self, tracker: JobTracker, settings: GatewaySettings) -> None:
        self.tracker = tracker
        self.settings = settings

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/", self.compat_generate)
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/generate_stream", self.generate_stream)
        app.router.add_get("/info", self.info)
        app.router.add_get("/health", self.health)
        app.router.add_get("/", self.health)  # LoRAX answers GET / as /health

    # ---- routes ----------------------------------------------------------------------------------

    async def compat_generate(self, request: web.Request) -> web.StreamResponse:
        data = await wire.read_json(request)
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise GatewayError(protocol.VALIDATION, "`stream` must be a boolean", param="stream")
        if stream:
            return await self._stream(request, data)
        body, headers = await self._generate(data)
        return web.json_response([body], headers=headers)  # a list of one, as LoRAX answers

    async def generate(self, request: web.Request) -> web.Response:
        body, headers = await self._generate(await wire.read_json(request))
        return web.json_response(body, headers=headers)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, await wire.read_json(request))

    async def info(self, request: web.Request) -> web.Response:
        """LoRAX's Info. The gateway does not see the workers' engine limits: those are null."""
        unknown = ("model_sha", "model_dtype", "model_device_type", "max_concurrent_requests",
                   "max_input_length", "max_total_tokens", "waiting_served_ratio",
                   "max_batch_total_tokens", "max_waiting_tokens", "validation_workers",
                   "eager_prefill", "sha", "docker_label", "request_logger_url")
        return web.json_response({
            "model_id": self.settings.model, "model_pipeline_tag": "lorax", "max_best_of": 1,
            "max_stop_sequences": protocol.Limits.max_stop_sequences,
            "version": loraq_version(), **dict.fromkeys(unknown)})

    async def health(self, request: web.Request) -> web.Response:
        if not self.tracker.connected:
            problem = "no broker connection"
        elif not await self.tracker.workers():
            problem = f"no worker is consuming queue {self.settings.queue!r}"
        else:
            return web.Response(status=200)
        return web.json_response({"error": f"unhealthy: {problem}", "error_type": "healthcheck"},
                                 status=503)

    # ---- generate --------------------------------------------------------------------------------

    def _job(self, data: dict[str, Any], stream: bool) -> tuple[dict, dict[str, Any]]:
        """(job body, the request's parameters) from a LoRAX request body."""
        inputs = data.get("inputs")
        if not isinstance(inputs, str) or not inputs:
            raise GatewayError(protocol.VALIDATION, "`inputs` cannot be empty", param="inputs")
        params = data.get("parameters")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise GatewayError(protocol.VALIDATION, "`parameters` must be an object",
                               param="parameters")
        if stream and params.get("best_of") not in (None, 1):
            raise GatewayError(protocol.VALIDATION, "`best_of` != 1 is not supported when "
                                                    "streaming tokens", param="best_of")
        if stream and params.get("decoder_input_details"):
            raise GatewayError(protocol.VALIDATION, "`decoder_input_details` == true is not "
                                                    "supported when streaming tokens",
                               param="decoder_input_details")
        job_params = wire.job_parameters(self._sampling(params))
        if "max_new_tokens" not in job_params and self.settings.default_max_new_tokens:
            job_params["max_new_tokens"] = self.settings.default_max_new_tokens
        if stream:  # every streamed token needs its logprob: LoRAX always sends one
            job_params["details"] = True
        return wire.job_body(inputs=inputs, parameters=job_params, stream=stream), params

    @staticmethod
    def _sampling(params: dict[str, Any]) -> dict[str, Any]:
        """LoRAX's sampling rule (server/lorax_server/utils/tokens.py) as wire v1 parameters."""
        temperature = wire.number(params.get("temperature"))
        top_k, top_p, typical_p = (wire.number(params.get(k)) for k in ("top_k", "top_p", "typical_p"))
        warpers = ((temperature is not None and temperature not in (0.0, 1.0))
                   or (top_k is not None and top_k != 0)
                   or (top_p is not None and top_p < 1.0)
                   or (typical_p is not None and typical_p < 1.0))
        out = dict(params)
        do_sample = params.get("do_sample")
        if do_sample is None or isinstance(do_sample, bool):  # a wrong type is left to validation
            out["do_sample"] = (bool(do_sample) or warpers) and temperature != 0.0
        if temperature == 0.0:
            out["temperature"] = None  # greedy; wire v1 refuses temperature 0
        return out

    async def _generate(self, data: dict[str, Any]) -> tuple[dict, dict[str, str]]:
        body, params = self._job(data, stream=False)
        adapter_id = body.get("parameters", {}).get("adapter_id")
        job = await self.tracker.submit(body, adapter_id=adapter_id,
                                        timeout_s=self.settings.request_timeout_s)
        try:
            result = await self.tracker.result(job)
        finally:
            self.tracker.forget(job)
        details = params.get("details") or params.get("decoder_input_details")
        return generate_response(result, bool(details)), self._headers(job, adapter_id, result)

    def _headers(self, job: PendingJob, adapter_id: str | None,
                 result: protocol.GenerationResult | None) -> dict[str, str]:
        """LoRAX's response headers, those the gateway can fill (times in ms)."""
        headers = {"x-model-id": self.settings.model, "x-loraq-job-id": job.job_id}
        if adapter_id:
            headers["x-adapter-id"] = adapter_id
        if result is not None:
            d, t = result.details, result.timings
            headers.update({
                "x-prompt-tokens": str(d.prompt_tokens), "x-generated-tokens": str(d.generated_tokens),
                "x-total-tokens": str(d.prompt_tokens + d.generated_tokens),
                "x-queue-time": str(round(t.queue_ms)), "x-time-to-first-token": str(round(t.ttft_ms)),
                "x-inference-time": str(round(t.total_ms))})
        return headers

    # ---- generate_stream -------------------------------------------------------------------------

    async def _stream(self, request: web.Request, data: dict[str, Any]) -> web.StreamResponse:
        body, params = self._job(data, stream=True)
        adapter_id = body.get("parameters", {}).get("adapter_id")
        prefix = body["inputs"] if params.get("return_full_text") else ""
        last_index = body["parameters"].get("max_new_tokens", wire.DEFAULT_MAX_NEW_TOKENS) - 1
        linger = self.settings.stream_linger_ms / 1000.0
        job = await self.tracker.submit(body, adapter_id=adapter_id,
                                        timeout_s=self.settings.request_timeout_s)
        try:
            reply = await self.tracker.next(job)  # an error before any token: an HTTP error
            events = EventStream(request, self._headers(job, adapter_id, None))
            await events.open()
            held: dict | None = None  # the newest token, not sent until we know it is not the last
            wait: float | None = None  # how long the held token waits for the result
            streamed = ""
            try:
                while True:
                    if reply is None:  # the linger passed: the held token is not the last one
                        assert held is not None
                        await events.send(token_event(held))
                        streamed, held = streamed + held["text"], None
                    elif isinstance(reply, protocol.TokenReply):
                        if held is not None:
                            await events.send(token_event(held))
                            streamed += held["text"]
                        held = lorax_token(reply.token)
                        # the max_new_tokens-th token is the last for sure: wait for the result
                        wait = None if reply.token.index >= last_index else linger
                    else:
                        result = reply
                        text = result.generated_text[len(prefix):]
                        last = held or closing_token(wire.unstreamed(text, streamed))
                        await events.send(final_event(last, result, bool(params.get("details"))))
                        break
                    reply = await self.tracker.next(job, wait if held is not None else None)
            except GatewayError as e:  # after the status line: an error event, as LoRAX sends
                if held is not None:
                    await events.send(token_event(held))
                await events.send(e.lorax_body())
            await events.close()
            return events.response
        finally:
            self.tracker.forget(job)


# ---- response shapes (lorax-client's types.py) ---------------------------------------------------
# Fields LoRAX has and the wire does not carry yet are read with getattr and a LoRAX default, so
# they appear once the protocol's reply models grow them (special, skipped, alternative_tokens,
# skipped_tokens, prefill); best_of_sequences needs its shape first.

def lorax_token(token: protocol.Token) -> dict:
    out = {"id": token.id, "text": token.text, "logprob": token.logprob,
           "special": bool(getattr(token, "special", False)),
           "skipped": bool(getattr(token, "skipped", False))}
    alternatives = getattr(token, "alternative_tokens", None)
    if alternatives is not None:
        out["alternative_tokens"] = [plain_token(a) for a in alternatives]
    return out


def plain_token(token: Any) -> dict:
    """{id, text, logprob} of a token-like value (a prefill or alternative token)."""
    return {"id": getattr(token, "id", 0), "text": getattr(token, "text", ""),
            "logprob": getattr(token, "logprob", None)}


def closing_token(text: str) -> dict:
    """The token of a closing event after every token was sent: the text not streamed (none,
    usually: then it is marked special). lorax-client 0.6 needs a number as its logprob."""
    return {"id": 0, "text": text, "logprob": 0.0, "special": not text, "skipped": False}


def token_event(token: dict) -> dict:
    return {"token": token, "generated_text": None, "details": None}


def final_event(token: dict, result: protocol.GenerationResult, details: bool) -> dict:
    d = result.details
    stream_details = None
    if details:
        stream_details = {"finish_reason": d.finish_reason, "prompt_tokens": d.prompt_tokens,
                          "generated_tokens": d.generated_tokens, "seed": d.seed}
    return {"token": token, "generated_text": result.generated_text, "details": stream_details}


def generate_response(result: protocol.GenerationResult, details: bool) -> dict:
    """A result as LoRAX's GenerateResponse; `details` only when the request asked."""
    out: dict[str, Any] = {"generated_text": result.generated_text}
    if details:
        d = result.details
        out["details"] = {
            "finish_reason": d.finish_reason, "prompt_tokens": d.prompt_tokens,
            "generated_tokens": d.generated_tokens,
            "skipped_tokens": getattr(d, "skipped_tokens", 0), "seed": d.seed,
            "prefill": [plain_token(t) for t in getattr(d, "prefill", None) or ()],
            "tokens": [lorax_token(t) for t in d.tokens or ()]}
    return out
