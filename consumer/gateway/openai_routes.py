"""OpenAI's REST routes, on the queue: what the `openai` SDK, LangChain, LlamaIndex and curl call.

    POST /v1/chat/completions   messages -> the job's `messages` (the worker applies the base
                                model's chat template); text content parts are joined
    POST /v1/completions        prompt -> the job's `inputs`; `echo` -> return_full_text
    GET  /v1/models             the base model and the adapters under --adapter-root
    GET  /v1/models/{model}

`model` names an adapter id, or the base model (its --model name, or ""). Parameters:
max_tokens / max_completion_tokens -> max_new_tokens; temperature (OpenAI's default 1 samples,
0 is greedy), top_p, seed, stop (a string or a list); LoRAX's extras top_k, repetition_penalty,
adapter_source, api_token. `logprobs` asks the job for per-token details; `top_logprobs` (chat) and
`logprobs` > 0 (completions) need alternatives the wire does not carry yet, and `n` > 1, `tools`,
`logit_bias`, `suffix` are refused with a 400 naming the field; `response_format` (text,
json_object, json_schema) becomes LoRAX's and is refused the same way until the wire carries it.
finish_reason: eos_token and stop_sequence -> "stop", length -> "length" (LoRAX's router says
"content_filter" for a stop sequence; OpenAI says "stop"). `usage` counts the job's prompt and
generated tokens; streams send it in a last chunk when `stream_options.include_usage` is set.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from consumer import protocol
from consumer.gateway import wire
from consumer.gateway.catalog import Catalog
from consumer.gateway.errors import GatewayError
from consumer.gateway.lorax_routes import loraq_version
from consumer.gateway.settings import GatewaySettings
from consumer.gateway.sse import EventStream
from consumer.gateway.tracker import JobTracker

CHAT = "chat"
COMPLETION = "completion"
FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
DONE = "[DONE]"


@dataclass(frozen=True)
class Call:
    """One OpenAI request, read: the job to publish and how to shape its answer."""

    kind: str  # CHAT | COMPLETION
    model: str
    body: dict  # the job body
    adapter_id: str | None
    logprobs: bool
    top_logprobs: int
    include_usage: bool
    echo: str  # the prompt, when a completion echoes it

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(protocol.VALIDATION, message, param=param)


class OpenAIRoutes:
    def __init__(self, tracker: JobTracker, settings: GatewaySettings, catalog: Catalog) -> None:
        self.tracker = tracker
        self.settings = settings
        self.catalog = catalog
        self.fingerprint = f"loraq-{loraq_version()}"

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)

    # ---- models ----------------------------------------------------------------------------------

    def _model_list(self) -> list[dict]:
        base = self.settings.model
        out = [{"id": base, "object": "model", "created": 0, "owned_by": "loraq", "root": base,
                "parent": None}]
        out += [{"id": a, "object": "model", "created": 0, "owned_by": "loraq", "root": a,
                 "parent": base} for a in self.catalog.adapters()]
        return out

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self._model_list()})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for m in self._model_list():
            if m["id"] == name:
                return web.json_response(m)
        raise GatewayError(protocol.ADAPTER_NOT_FOUND, f"model {name!r} is neither the base model "
                                                       f"nor an adapter under the adapter root",
                           param="model")

    # ---- completions -----------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._read(await wire.read_json(request), CHAT))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._read(await wire.read_json(request), COMPLETION))

    def _read(self, data: dict[str, Any], kind: str) -> Call:
        model = data.get("model")
        if not isinstance(model, str):
            raise invalid("`model` is required: the base model's name or an adapter id", "model")
        if data.get("n") not in (None, 1):
            raise wire.unsupported("n", "one choice per request")
        if data.get("logit_bias"):
            raise wire.unsupported("logit_bias")
        stream = data.get("stream") or False
        if not isinstance(stream, bool):
            raise invalid("`stream` must be a boolean", "stream")
        options = data.get("stream_options") or {}
        if not isinstance(options, dict):
            raise invalid("`stream_options` must be an object", "stream_options")
        params = self._parameters(data, model)
        inputs: str | None = None
        messages: list[dict] | None = None
        echo = ""
        if kind == CHAT:
            messages = chat_messages(data.get("messages"))
            if data.get("tools"):
                raise wire.unsupported("tools")
            if data.get("tool_choice") not in (None, "none", "auto"):
                raise wire.unsupported("tool_choice")
            logprobs = bool(data.get("logprobs"))
            top = data.get("top_logprobs") or 0
            params["response_format"] = response_format(data.get("response_format"))
        else:
            inputs = completion_prompt(data.get("prompt"))
            if data.get("suffix"):
                raise wire.unsupported("suffix")
            if data.get("echo"):
                if stream:
                    raise wire.unsupported("echo with stream", "the prompt is echoed in the result only")
                params["return_full_text"] = True
                echo = inputs
            params["best_of"] = data.get("best_of")
            logprobs = data.get("logprobs") is not None
            top = data.get("logprobs") or 0
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            raise invalid("top_logprobs / logprobs must be an integer >= 0", "top_logprobs")
        if logprobs:
            params["details"] = True
        if top:
            if not wire.supports("return_k_alternatives"):
                raise wire.unsupported("top_logprobs" if kind == CHAT else "logprobs",
                                       "the wire carries each token's own logprob only: use 0")
            params["return_k_alternatives"] = top
        adapter_id = self.catalog.adapter_id(model)
        params["adapter_id"] = adapter_id
        body = wire.job_body(inputs=inputs, messages=messages,
                             parameters=wire.job_parameters(params, where=""), stream=stream)
        return Call(kind, model, body, adapter_id, logprobs, top,
                    bool(options.get("include_usage")), echo)

    def _parameters(self, data: dict[str, Any], model: str) -> dict[str, Any]:
        """Sampling and limits, as LoRAX-named parameters (wire.job_parameters filters them)."""
        temperature = data.get("temperature")
        greedy = wire.number(temperature) == 0.0
        stop = data.get("stop")
        max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
        return {
            "max_new_tokens": max_tokens if max_tokens is not None else self.settings.default_max_new_tokens,
            "do_sample": not greedy,  # OpenAI samples by default (temperature 1); 0 is greedy
            "temperature": None if greedy else temperature,
            "top_p": data.get("top_p"), "top_k": data.get("top_k"), "seed": data.get("seed"),
            "repetition_penalty": data.get("repetition_penalty"),
            "stop": [stop] if isinstance(stop, str) else stop,
            "frequency_penalty": data.get("frequency_penalty"),
            "presence_penalty": data.get("presence_penalty"),
            "ignore_eos_token": data.get("ignore_eos_token"),
            "adapter_source": data.get("adapter_source"), "api_token": data.get("api_token"),
        }

    async def _answer(self, request: web.Request, call: Call) -> web.StreamResponse:
        job = await self.tracker.submit(call.body, adapter_id=call.adapter_id,
                                        timeout_s=self.settings.request_timeout_s)
        try:
            if not call.stream:
                result = await self.tracker.result(job)
                return web.json_response(self._response(call, job.job_id, result),
                                         headers={"x-loraq-job-id": job.job_id})
            reply = await self.tracker.next(job)  # an error before any token: an HTTP error
            events = EventStream(request, {"x-loraq-job-id": job.job_id})
            await events.open()
            chunks = Chunks(call, job.job_id, self.fingerprint)
            streamed = ""
            try:
                if call.kind == CHAT:
                    await events.send(chunks.chat({"role": "assistant", "content": ""}))
                while isinstance(reply, protocol.TokenReply):
                    await events.send(chunks.token(reply.token))
                    streamed += reply.token.text
                    reply = await self.tracker.next(job)
                assert isinstance(reply, protocol.GenerationResult)
                rest = wire.unstreamed(reply.generated_text, streamed)
                if rest:
                    await events.send(chunks.text(rest))
                await events.send(chunks.finish(reply))
                if call.include_usage:
                    await events.send(chunks.usage(reply))
                await events.send(DONE)
            except GatewayError as e:  # after the status line: an error event (the SDK raises it)
                await events.send(e.openai_body())
            await events.close()
            return events.response
        finally:
            self.tracker.forget(job)

    def _response(self, call: Call, job_id: str, result: protocol.GenerationResult) -> dict:
        choice: dict[str, Any] = {"index": 0, "logprobs": None,
                                  "finish_reason": finish_reason(result.details.finish_reason)}
        tokens = result.details.tokens or ()
        if call.kind == CHAT:
            choice["message"] = {"role": "assistant", "content": result.generated_text}
            if call.logprobs:
                choice["logprobs"] = {"content": [chat_logprob(t, call.top_logprobs) for t in tokens],
                                      "refusal": None}
            obj, prefix = "chat.completion", "chatcmpl-"
        else:
            choice["text"] = result.generated_text
            if call.logprobs:
                choice["logprobs"] = completion_logprobs(tokens, call.top_logprobs, call.echo)
            obj, prefix = "text_completion", "cmpl-"
        return {"id": prefix + job_id, "object": obj, "created": int(time.time()),
                "model": call.model, "system_fingerprint": self.fingerprint,
                "choices": [choice], "usage": usage(result)}


class Chunks:
    """The stream chunks of one call (chat.completion.chunk or text_completion)."""

    def __init__(self, call: Call, job_id: str, fingerprint: str) -> None:
        self.call = call
        chat = call.kind == CHAT
        self._head = {"id": ("chatcmpl-" if chat else "cmpl-") + job_id,
                      "object": "chat.completion.chunk" if chat else "text_completion",
                      "created": int(time.time()), "model": call.model,
                      "system_fingerprint": fingerprint}
        self._offset = 0  # completions' text_offset

    def _chunk(self, choice: dict | None, usage: dict | None = None) -> dict:
        out: dict[str, Any] = {**self._head, "choices": [] if choice is None else [choice]}
        if self.call.include_usage:
            out["usage"] = usage
        return out

    def chat(self, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return self._chunk({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})

    def token(self, token: protocol.Token) -> dict:
        if not self.call.logprobs:
            return self.text(token.text)
        if self.call.kind == CHAT:
            logprobs = {"content": [chat_logprob(token, self.call.top_logprobs)], "refusal": None}
            return self.chat({"content": token.text}, logprobs=logprobs)
        return self.text(token.text, completion_logprobs([token], self.call.top_logprobs, "", self._offset))

    def text(self, text: str, logprobs: dict | None = None) -> dict:
        """A chunk of text (with its tokens' logprobs, when asked and known)."""
        if self.call.kind == CHAT:
            return self.chat({"content": text}, logprobs=logprobs)
        self._offset += len(text)
        return self._chunk({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": None})

    def finish(self, result: protocol.GenerationResult) -> dict:
        reason = finish_reason(result.details.finish_reason)
        if self.call.kind == CHAT:
            return self.chat({}, finish=reason)
        return self._chunk({"index": 0, "text": "", "logprobs": None, "finish_reason": reason})

    def usage(self, result: protocol.GenerationResult) -> dict:
        return self._chunk(None, usage(result))


# ---- request and response pieces -----------------------------------------------------------------

def chat_messages(raw: Any) -> list[dict]:
    """OpenAI messages -> the wire's {role, content} strings. Text content parts are joined (as
    LoRAX does); other parts are refused. Roles are the wire's to check."""
    if not isinstance(raw, list) or not raw:
        raise invalid("`messages` must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object", "messages")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" \
                        or not isinstance(part.get("text"), str):
                    raise invalid(f"messages[{i}].content: only text parts are supported",
                                  "messages")
                parts.append(part["text"])
            content = "".join(parts)
        out.append({"role": m.get("role"), "content": "" if content is None else content})
    return out


def completion_prompt(raw: Any) -> str:
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    if not isinstance(raw, str) or not raw:
        raise invalid("`prompt` must be a non-empty string (one prompt per request)", "prompt")
    return raw


def response_format(raw: Any) -> dict | None:
    """OpenAI's response_format -> LoRAX's {"type", "schema"} (None for plain text), as LoRAX's
    router converts it: json_object keeps a `schema` if given, json_schema takes json_schema.schema."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid("`response_format.type` must be text, json_object or json_schema",
                      "response_format")
    if raw["type"] == "text":
        return None
    if raw["type"] == "json_object":
        return {"type": "json_object", "schema": raw.get("schema")}
    spec = raw.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid("`response_format.json_schema` must be an object", "response_format")
    return {"type": "json_schema", "schema": spec.get("schema")}


def finish_reason(reason: str | None) -> str | None:
    """The wire's finish reason in OpenAI's words (an unknown one passes as it is)."""
    return FINISH_REASONS.get(reason, reason) if reason is not None else None


def usage(result: protocol.GenerationResult) -> dict:
    d = result.details
    return {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.generated_tokens,
            "total_tokens": d.prompt_tokens + d.generated_tokens}


def _alternatives(token: protocol.Token, k: int) -> list[Any]:
    """The token's k best alternatives, once the wire carries them (LoRAX's alternative_tokens)."""
    return list(getattr(token, "alternative_tokens", None) or ())[:k]


def chat_logprob(token: protocol.Token, k: int) -> dict:
    return {"token": token.text, "logprob": token.logprob, "bytes": list(token.text.encode()),
            "top_logprobs": [{"token": a.text, "logprob": a.logprob, "bytes": list(a.text.encode())}
                             for a in _alternatives(token, k)]}


def completion_logprobs(tokens: Sequence[protocol.Token], k: int, echo: str, offset: int = 0) -> dict:
    """Completions' logprobs: parallel lists; offsets count from the start of the choice's text
    (after an echoed prompt, whose own tokens the wire does not return)."""
    offsets, at = [], offset + len(echo)
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{a.text: a.logprob for a in _alternatives(t, k)} for t in tokens]
            if k else None,
            "text_offset": offsets}
