"""OpenAI's REST routes, on the queue: what the `openai` SDK, LangChain, LlamaIndex and curl call.

    POST /v1/chat/completions   messages -> the job's `messages` (the worker applies the base
                                model's chat template); text content parts are joined
    POST /v1/completions        prompt -> the job's `inputs`; `echo` -> return_full_text
    GET  /v1/models             the base model and the adapters under --adapter-root
    GET  /v1/models/{model}

`model` names an adapter id, or the base model (its --model name, or ""). Each request is a v1 job
(or n of them): max_tokens / max_completion_tokens -> max_new_tokens; neither set (and no
--default-max-new-tokens) -> the wire's `fill_context`: up to the model's context within the
worker's --max-new-tokens, as OpenAI and vLLM. OpenAI samples by default (temperature 1) and
temperature 0 is greedy, as on the wire; top_p, seed, stop (a string or a list), presence_penalty
and frequency_penalty (the same [-2, 2] and meaning as LoRAX's) pass as they are; LoRAX's extras
top_k, repetition_penalty, ignore_eos_token, adapter_source, api_token too.

- response_format: {"type": "json_object"} (any JSON object: LoRAX's default schema) and
  {"type": "json_schema", "json_schema": {"schema": ...}} are the wire's own `response_format`
  (it reads OpenAI's shape, as LoRAX's OpenAI route does); "text" is unconstrained.
- logprobs: per-token details; chat's `top_logprobs` / completions' `logprobs` = k ask each token's
  k best alternatives (return_k_alternatives). Completions with `echo` and `logprobs` list the
  prompt's tokens first (decoder_input_details; the first has no logprob).
- n: n choices, each a job of its own (OpenAI's choices are independent samples, which LoRAX's
  best_of is not: it keeps one), at most MAX_CHOICES; with a seed, choice i runs with seed + i, so
  the same request gives the same choices. Completions' `best_of` is the wire's (the most likely
  of best_of samples), with n = 1 only.
- Refused with a 400 naming the field: `tools`, `logit_bias`, `suffix`, `echo` with `stream`.

finish_reason: eos_token and stop_sequence -> "stop", length -> "length" (LoRAX's router says
"content_filter" for a stop sequence; OpenAI says "stop"). `usage` counts the prompt once and the
tokens of every choice; streams send it in a last chunk when `stream_options.include_usage` is set.
"""

from __future__ import annotations

import asyncio
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
from consumer.gateway.tracker import JobTracker, PendingJob
from engine.request import ScoredToken

CHAT = "chat"
COMPLETION = "completion"
FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
DONE = "[DONE]"
MAX_CHOICES = 8  # n: each choice is a whole job
SEEDS = 2**64  # the wire's seeds are 0 .. 2^64 - 1
# wire parameter -> the OpenAI field a request sets it with (for an error's `param`)
OPENAI_FIELDS = {"max_new_tokens": "max_tokens", "details": "logprobs", "return_full_text": "echo",
                 "decoder_input_details": "logprobs"}


@dataclass(frozen=True)
class Call:
    """One OpenAI request, read: the jobs to publish (one per choice) and how to shape the answer."""

    kind: str  # CHAT | COMPLETION
    model: str
    bodies: tuple[dict, ...]  # the job bodies, choice i's at i
    adapter_id: str | None
    logprobs: bool
    top_logprobs: int
    include_usage: bool
    echo: str  # the prompt, when a completion echoes it

    @property
    def stream(self) -> bool:
        return bool(self.bodies[0].get("stream"))


def invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(protocol.VALIDATION, message, param=param)


class Replies:
    """The replies of several jobs as one sequence, each with its job's index, until every job has
    its result. An error reply (or a deadline) of any job raises GatewayError. `close()` stops."""

    def __init__(self, tracker: JobTracker, jobs: Sequence[PendingJob]) -> None:
        self._tracker = tracker
        self._queue: asyncio.Queue[tuple[int, protocol.TokenReply | protocol.GenerationResult
                                         | Exception]] = asyncio.Queue()
        self._open = len(jobs)
        self._tasks = [asyncio.ensure_future(self._pump(i, job)) for i, job in enumerate(jobs)]

    async def _pump(self, index: int, job: PendingJob) -> None:
        try:
            while True:
                reply = await self._tracker.next(job)
                assert reply is not None  # no wait_s: None never comes
                self._queue.put_nowait((index, reply))
                if isinstance(reply, protocol.GenerationResult):
                    return
        except Exception as e:  # a GatewayError, or a bug: the request fails either way, never hangs
            self._queue.put_nowait((index, e))

    async def next(self) -> tuple[int, protocol.TokenReply | protocol.GenerationResult] | None:
        """The next reply of any job; None once every job has its result."""
        if self._open == 0:
            return None
        index, reply = await self._queue.get()
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, protocol.GenerationResult):
            self._open -= 1
        return index, reply

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

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
        return await self._handle(request, CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, COMPLETION)

    async def _handle(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            return await self._answer(request, self._read(await wire.read_json(request), kind))
        except GatewayError as e:  # name the field as the request did
            e.param = openai_field(e.param, kind)
            raise

    def _read(self, data: dict[str, Any], kind: str) -> Call:
        model = data.get("model")
        if not isinstance(model, str):
            raise invalid("`model` is required: the base model's name or an adapter id", "model")
        n = data.get("n")
        n = 1 if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
            raise invalid(f"`n` must be an integer in 1..{MAX_CHOICES}", "n")
        if data.get("logit_bias"):
            raise wire.unsupported("logit_bias", "no logits processor for it")
        stream = data.get("stream") or False
        if not isinstance(stream, bool):
            raise invalid("`stream` must be a boolean", "stream")
        options = data.get("stream_options") or {}
        if not isinstance(options, dict):
            raise invalid("`stream_options` must be an object", "stream_options")
        params = self._parameters(data)
        inputs: str | None = None
        messages: list[dict] | None = None
        echo = ""
        if kind == CHAT:
            messages = chat_messages(data.get("messages"))
            if data.get("tools"):
                raise wire.unsupported("tools", "no tool calling")
            if data.get("tool_choice") not in (None, "none", "auto"):
                raise wire.unsupported("tool_choice", "no tool calling")
            logprobs = bool(data.get("logprobs"))
            top = data.get("top_logprobs") or 0
            if top and not logprobs:
                raise invalid("`top_logprobs` needs `logprobs: true`", "top_logprobs")
        else:
            inputs = completion_prompt(data.get("prompt"))
            if data.get("suffix"):
                raise wire.unsupported("suffix", "no fill-in-the-middle")
            logprobs = data.get("logprobs") is not None
            top = data.get("logprobs") or 0
            if data.get("echo"):
                if stream:
                    raise wire.unsupported("echo with stream", "the prompt is echoed in the result only")
                params["return_full_text"] = True
                params["decoder_input_details"] = logprobs  # the echoed prompt's logprobs
                echo = inputs
            if data.get("best_of") not in (None, 1) and n > 1:
                raise wire.unsupported("best_of", "with n > 1: each choice is a job of its own")
            params["best_of"] = data.get("best_of")
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            raise invalid("top_logprobs / logprobs must be an integer >= 0",
                          "top_logprobs" if kind == CHAT else "logprobs")
        params["details"] = logprobs
        params["return_k_alternatives"] = top or None
        params["response_format"] = data.get("response_format")  # the wire reads OpenAI's shape
        adapter_id = self.catalog.adapter_id(model)
        params["adapter_id"] = adapter_id
        bodies = tuple(wire.job_body(inputs=inputs, messages=messages, stream=stream,
                                     parameters=wire.job_parameters(choice_parameters(params, i, n)))
                       for i in range(n))
        return Call(kind, model, bodies, adapter_id, logprobs, top,
                    bool(options.get("include_usage")), echo)

    def _parameters(self, data: dict[str, Any]) -> dict[str, Any]:
        """Sampling and limits, as wire parameters (wire.job_parameters drops the unset ones)."""
        stop = data.get("stop")
        max_tokens = data.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = data.get("max_tokens")
        if max_tokens is None:
            max_tokens = self.settings.default_max_new_tokens
        return {
            "max_new_tokens": max_tokens,
            "fill_context": True if max_tokens is None else None,  # unset: to the context's end, as vLLM
            "do_sample": True,  # OpenAI samples by default (temperature 1); temperature 0 is greedy
            "temperature": data.get("temperature"),
            "top_p": data.get("top_p"), "top_k": data.get("top_k"), "seed": data.get("seed"),
            "repetition_penalty": data.get("repetition_penalty"),
            "stop": [stop] if isinstance(stop, str) else stop,
            "frequency_penalty": data.get("frequency_penalty"),
            "presence_penalty": data.get("presence_penalty"),
            "ignore_eos_token": data.get("ignore_eos_token"),
            "adapter_source": data.get("adapter_source"), "api_token": data.get("api_token"),
        }

    async def _submit(self, call: Call) -> list[PendingJob]:
        jobs: list[PendingJob] = []
        try:
            for body in call.bodies:
                jobs.append(await self.tracker.submit(body, adapter_id=call.adapter_id,
                                                      timeout_s=self.settings.request_timeout_s))
        except BaseException:
            for job in jobs:
                self.tracker.forget(job)
            raise
        return jobs

    async def _answer(self, request: web.Request, call: Call) -> web.StreamResponse:
        jobs = await self._submit(call)
        replies = Replies(self.tracker, jobs)
        headers = {"x-loraq-job-id": ",".join(job.job_id for job in jobs)}
        try:
            if not call.stream:  # only results come: the tracker drops tokens of unstreamed jobs
                results: dict[int, protocol.GenerationResult] = {}
                while (item := await replies.next()) is not None:
                    index, reply = item
                    assert isinstance(reply, protocol.GenerationResult)
                    results[index] = reply
                body = self._response(call, jobs[0].job_id, [results[i] for i in range(len(jobs))])
                return web.json_response(body, headers=headers)
            return await self._stream(request, call, jobs[0].job_id, replies, headers)
        finally:
            replies.close()
            for job in jobs:
                self.tracker.forget(job)

    async def _stream(self, request: web.Request, call: Call, job_id: str, replies: Replies,
                      headers: dict[str, str]) -> web.StreamResponse:
        item = await replies.next()  # an error before any token: an HTTP error
        events = EventStream(request, headers)
        await events.open()
        chunks = Chunks(call, job_id, self.fingerprint)
        n = len(call.bodies)
        streamed = [""] * n
        results: list[protocol.GenerationResult] = []
        try:
            if call.kind == CHAT:
                for i in range(n):
                    await events.send(chunks.chat(i, {"role": "assistant", "content": ""}))
            while item is not None:
                index, reply = item
                if isinstance(reply, protocol.TokenReply):
                    await events.send(chunks.token(index, reply.token))
                    streamed[index] += reply.token.text
                else:
                    rest = wire.unstreamed(reply.generated_text, streamed[index])
                    if rest:
                        await events.send(chunks.text(index, rest))
                    await events.send(chunks.finish(index, reply))
                    results.append(reply)
                item = await replies.next()
            if call.include_usage:
                await events.send(chunks.usage(results))
            await events.send(DONE)
        except GatewayError as e:  # after the status line: an error event (the SDK raises it)
            await events.send(e.openai_body())
        await events.close()
        return events.response

    def _response(self, call: Call, job_id: str, results: Sequence[protocol.GenerationResult]) -> dict:
        choices = []
        for index, result in enumerate(results):
            choice: dict[str, Any] = {"index": index, "logprobs": None,
                                      "finish_reason": finish_reason(result.details.finish_reason)}
            tokens = result.details.tokens
            if call.kind == CHAT:
                choice["message"] = {"role": "assistant", "content": result.generated_text}
                if call.logprobs:
                    choice["logprobs"] = {"content": [chat_logprob(t, call.top_logprobs) for t in tokens],
                                          "refusal": None}
            else:
                choice["text"] = result.generated_text
                if call.logprobs:
                    choice["logprobs"] = completion_logprobs(tokens, call.top_logprobs, echo=call.echo,
                                                             prefill=result.details.prefill)
            choices.append(choice)
        obj, prefix = ("chat.completion", "chatcmpl-") if call.kind == CHAT else ("text_completion", "cmpl-")
        return {"id": prefix + job_id, "object": obj, "created": int(time.time()),
                "model": call.model, "system_fingerprint": self.fingerprint,
                "choices": choices, "usage": usage(results)}


class Chunks:
    """The stream chunks of one call (chat.completion.chunk or text_completion), choice by index."""

    def __init__(self, call: Call, job_id: str, fingerprint: str) -> None:
        self.call = call
        chat = call.kind == CHAT
        self._head = {"id": ("chatcmpl-" if chat else "cmpl-") + job_id,
                      "object": "chat.completion.chunk" if chat else "text_completion",
                      "created": int(time.time()), "model": call.model,
                      "system_fingerprint": fingerprint}
        self._offsets = [0] * len(call.bodies)  # completions' text_offset, per choice

    def _chunk(self, choice: dict | None, usage: dict | None = None) -> dict:
        out: dict[str, Any] = {**self._head, "choices": [] if choice is None else [choice]}
        if self.call.include_usage:
            out["usage"] = usage
        return out

    def chat(self, index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return self._chunk({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})

    def token(self, index: int, token: protocol.Token) -> dict:
        if not self.call.logprobs:
            return self.text(index, token.text)
        if self.call.kind == CHAT:
            logprobs = {"content": [chat_logprob(token, self.call.top_logprobs)], "refusal": None}
            return self.chat(index, {"content": token.text}, logprobs=logprobs)
        return self.text(index, token.text, completion_logprobs([token], self.call.top_logprobs,
                                                                offset=self._offsets[index]))

    def text(self, index: int, text: str, logprobs: dict | None = None) -> dict:
        """A chunk of choice `index`'s text (with its tokens' logprobs, when asked and known)."""
        if self.call.kind == CHAT:
            return self.chat(index, {"content": text}, logprobs=logprobs)
        self._offsets[index] += len(text)
        return self._chunk({"index": index, "text": text, "logprobs": logprobs, "finish_reason": None})

    def finish(self, index: int, result: protocol.GenerationResult) -> dict:
        reason = finish_reason(result.details.finish_reason)
        if self.call.kind == CHAT:
            return self.chat(index, {}, finish=reason)
        return self._chunk({"index": index, "text": "", "logprobs": None, "finish_reason": reason})

    def usage(self, results: Sequence[protocol.GenerationResult]) -> dict:
        return self._chunk(None, usage(results))


# ---- request and response pieces -----------------------------------------------------------------

def openai_field(param: str | None, kind: str) -> str | None:
    """The OpenAI request field behind a wire parameter's name."""
    if param == "return_k_alternatives":
        return "top_logprobs" if kind == CHAT else "logprobs"
    return OPENAI_FIELDS.get(param, param) if param else param


def choice_parameters(params: dict[str, Any], index: int, n: int) -> dict[str, Any]:
    """Choice `index` of n: its own seed (seed + index) when a seed is given, so that choices differ
    and the same request still gives the same choices."""
    seed = params.get("seed")
    if n == 1 or isinstance(seed, bool) or not isinstance(seed, int):
        return params
    return {**params, "seed": (seed + index) % SEEDS}

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


def finish_reason(reason: str | None) -> str | None:
    """The wire's finish reason in OpenAI's words (an unknown one passes as it is)."""
    return FINISH_REASONS.get(reason, reason) if reason is not None else None


def usage(results: Sequence[protocol.GenerationResult]) -> dict:
    """The prompt once (every choice has the same), the generated tokens of every choice."""
    prompt = results[0].details.prompt_tokens if results else 0
    completion = sum(r.details.generated_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_logprob(token: protocol.Token, k: int) -> dict:
    return {"token": token.text, "logprob": token.logprob, "bytes": list(token.text.encode()),
            "top_logprobs": [{"token": a.text, "logprob": a.logprob, "bytes": list(a.text.encode())}
                             for a in (token.alternative_tokens or ())[:k]]}


def completion_logprobs(tokens: Sequence[protocol.Token], k: int, *, echo: str = "",
                        prefill: Sequence[ScoredToken] = (), offset: int = 0) -> dict:
    """Completions' logprobs: parallel lists over the echoed prompt's tokens (`prefill`, with echo;
    the first has no logprob, and their alternatives are not known) then the generated ones.
    text_offset counts from the start of the choice's text (`offset`: text already streamed)."""
    texts: list[str] = []
    logprobs: list[float | None] = []
    tops: list[dict[str, float | None] | None] = []
    offsets: list[int] = []
    at = 0
    for t in prefill:
        found = echo.find(t.text, at)  # a special token (BOS) is not in the prompt's text
        offsets.append(found if found >= 0 else at)
        at = found + len(t.text) if found >= 0 else at
        texts.append(t.text)
        logprobs.append(t.logprob)
        tops.append(None if t.logprob is None else {})
    at = offset + len(echo)
    for token in tokens:
        offsets.append(at)
        at += len(token.text)
        texts.append(token.text)
        logprobs.append(token.logprob)
        tops.append({a.text: a.logprob for a in (token.alternative_tokens or ())[:k]})
    return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops if k else None,
            "text_offset": offsets}
