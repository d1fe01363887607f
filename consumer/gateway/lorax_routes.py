"""LoRAX's REST routes (predibase/lorax router/src/server.rs), on the queue.

    POST /                  `{"inputs", "parameters", "stream"}` as lorax-client sends it: a JSON
                            list of one response, or server-sent events when stream is true
    POST /generate          one response object
    POST /generate_stream   server-sent events, one per token, TGI's event shape
    GET  /info              the served model (what the gateway knows of it)
    GET  /health, GET /     200 while the broker is connected and a worker consumes the jobs queue

Request parameters keep LoRAX's names, defaults and meaning: the job is a LoRAX-dialect body (no
`v`), so the worker applies LoRAX's sampling rule and max_new_tokens default, and every field
LoRAX defines is carried (watermark true is the worker's to refuse). Responses follow LoRAX's
shapes (lorax-client's types.py): details with prefill, tokens with special and alternative_tokens,
skipped_tokens, seed and best_of_sequences, from the wire's typed result.

Streams: each event is `{"token": {...}, "generated_text": null, "details": null}`; the last one
carries the last token with `generated_text` and (with `details`) `details`. The wire's token
replies do not say which one is last: the max_new_tokens-th is (when the request sets it), and
any other waits up to `stream_linger_ms` for the next reply (the worker publishes the result right
after the last token); when the result comes later than that, a closing event carries the rest of
the text in an extra token (empty, and marked special, when all of it was streamed). Streamed jobs
always ask the wire for details, since every LoRAX token has a logprob. An error before the first
token is an HTTP error; after it, an error event. `best_of` > 1 and `decoder_input_details` are
refused with stream, as LoRAX refuses them.
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
from engine.request import ScoredToken


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
            "model_id": self.settings.model, "model_pipeline_tag": "lorax",
            "max_best_of": protocol.MAX_BEST_OF,
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
        if stream and params.get("decoder_input_details"):  # LoRAX's own check
            raise GatewayError(protocol.VALIDATION, "`decoder_input_details` == true is not "
                                                    "supported when streaming tokens",
                               param="decoder_input_details")
        job_params = wire.job_parameters(params)
        if "max_new_tokens" not in job_params and self.settings.default_max_new_tokens:
            job_params["max_new_tokens"] = self.settings.default_max_new_tokens
        if stream:  # every streamed token needs its logprob: LoRAX always sends one
            job_params["details"] = True
        return wire.lorax_job_body(inputs=inputs, parameters=job_params, stream=stream), params

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
        max_new_tokens = body["parameters"].get("max_new_tokens")  # None: the worker's limit
        last_index = None if max_new_tokens is None else max_new_tokens - 1
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
                        last = last_index is not None and reply.token.index >= last_index
                        wait = None if last else linger
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

def lorax_token(token: protocol.Token) -> dict:
    out = {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special,
           "skipped": False}  # skipped: speculative decoding, which loraq has not
    if token.alternative_tokens is not None:
        out["alternative_tokens"] = [input_token(a) for a in token.alternative_tokens]
    return out


def input_token(token: ScoredToken) -> dict:
    """LoRAX's InputToken / AlternativeToken: a prompt token or a generated token's alternative."""
    return {"id": token.token_id, "text": token.text, "logprob": token.logprob}


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
            "generated_tokens": d.generated_tokens, "skipped_tokens": 0, "seed": d.seed,
            "prefill": [input_token(t) for t in d.prefill],
            "tokens": [lorax_token(t) for t in d.tokens]}
        if d.best_of_sequences is not None:  # absent otherwise, as LoRAX leaves it out
            out["details"]["best_of_sequences"] = [
                {"generated_text": b.generated_text, "finish_reason": b.finish_reason,
                 "generated_tokens": b.generated_tokens, "seed": b.seed,
                 "prefill": [input_token(t) for t in b.prefill],
                 "tokens": [lorax_token(t) for t in b.tokens]}
                for b in d.best_of_sequences]
    return out
