"""The engine's public surface: build from one config, `warmup`, `submit` requests with callbacks,
`cancel`, `stats`, `shutdown`. One daemon thread owns every tensor and runs the step loop; other threads
only put commands into its inbox. Callbacks run on the engine thread (callers hop threads).

A step: answer what the scheduler failed, run one packed forward (decode rows and prompt chunks),
sample one token per row that reached its end, stream it, retire finished sequences. An exception
inside a step fails only that step's requests (INTERNAL, retryable) and frees what they held; the
loop goes on.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from engine.adapter_store import AdapterStore
from engine.best_of import BestOf
from engine.chat_template import render_chat
from engine.config import EngineConfig
from engine.detokenizer import Detokenizer
from engine.grammar import Grammar
from engine.kv_cache import BlockManager, KVCache
from engine.lease import Lease
from engine.lora_op import build_lora_op
from engine.lora_slots import LoraSlots
from engine.model_loader import LoadedModel, ModelSpec, load_model
from engine.model_runner import ModelRunner
from engine.request import (
    AdapterRef,
    Completion,
    EngineError,
    ErrorType,
    GenerationFailure,
    GenerationRequest,
    OnFinish,
    OnToken,
    Outcome,
    ScoredToken,
    Timings,
    TokenEvent,
)
from engine.sampler import Sampler, SamplingState
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from engine.warmup import warm_up

if TYPE_CHECKING:
    from torch import Tensor

log = structlog.get_logger(__name__)

IDLE_WAIT_S = 0.5  # nothing queued: sleep until a command arrives (or this long); keeps the heartbeat fresh
BLOCKED_WAIT_S = 0.005  # work queued but nothing runnable: poll again soon (a finished load wakes us sooner)
DEADLINE_SWEEP_S = 0.1  # how often waiting requests are checked against their deadline


@dataclass(frozen=True)
class _Job:
    """A submitted request, with what `submit` took for it on the caller's thread."""

    request: GenerationRequest
    on_token: OnToken | None
    on_finish: OnFinish
    prefetch: Lease | None  # holds its adapter from arrival until its first admission (or its end)
    adapter_generation: int  # the adapter version the store held at arrival (see Sequence)


# The inbox: commands other threads put for the step thread, taken in order before each step.
@dataclass(frozen=True)
class _Submit:
    jobs: tuple[_Job, ...]  # a group: taken in together, before the next step


@dataclass(frozen=True)
class _Cancel:
    request_id: str


@dataclass(frozen=True)
class _Warmup:
    done: Future[None]


@dataclass(frozen=True)
class _Shutdown:
    stop_at: float | None  # monotonic time running requests are failed at; None: they finish


class Engine:
    def __init__(self, config: EngineConfig, model: LoadedModel | None = None) -> None:
        """Start the step thread and wait while it loads the model (or takes an already loaded one:
        tests and benchmarks share it), sizes the KV cache from its byte budget and builds the rest;
        a build error is raised here. The step thread makes every tensor, not just runs the steps,
        so the caller's thread never starts an OpenMP pool of its own (see README, "CPU threads")."""
        self.config = config
        self._inbox: queue.SimpleQueue[_Submit | _Cancel | _Warmup | _Shutdown] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._live: set[str] = set()  # request ids submitted and not yet finished
        self._best_of: dict[str, BestOf] = {}  # best_of > 1 requests by id, until answered (guarded by _lock)
        self._inbox_requests = 0  # requests submitted, not yet taken from the inbox (guarded by _lock)
        self._seqs: dict[str, Sequence] = {}  # engine thread only
        self._stopping = False  # shutdown begun: admit nothing new
        self._closed = False  # the step thread has ended (guarded by _lock)
        self._last_sweep = 0.0
        self._heartbeat = time.monotonic()  # the step thread's latest turn of its loop
        self.num_steps = 0
        self.num_prefill_tokens = 0
        self.num_generated_tokens = 0
        self.num_step_failures = 0
        built: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(model, built), name="loraq-engine", daemon=True)
        self._thread.start()
        built.result()
        log.info("engine_ready", kv_blocks=self.kv_cache.num_blocks, block_size=config.kv_block_size,
                 max_model_len=self._max_model_len, max_batch=config.max_batch)

    def _build(self, model: LoadedModel | None) -> None:
        """On the step thread: the model, KV cache, adapter slots and store, runner, scheduler."""
        config = self.config
        self.model = model or load_model(config)
        spec = self.model.spec
        hf_config = self.model.hf_model.config
        attn = self.model.hf_model.model.layers[0].self_attn
        self.kv_cache = KVCache(spec.num_layers, hf_config.num_key_value_heads, attn.head_dim,
                                config.kv_block_size, config.kv_cache_bytes, self.model.device, self.model.dtype)
        self.blocks = BlockManager(self.kv_cache.num_blocks, config.kv_block_size)
        # A sequence never outgrows the cache: longer than its capacity it could not run even alone.
        model_len = config.max_model_len or self.model.max_model_len
        self._max_model_len = min(model_len, self.kv_cache.capacity_tokens)
        if self._max_model_len < model_len:
            log.warning("max_model_len_capped_by_kv_cache", max_model_len=self._max_model_len,
                        model_max_len=model_len, kv_cache_bytes=config.kv_cache_bytes)
        self.slots = LoraSlots(spec, config.adapter_slots, config.max_lora_rank,
                               self.model.device, self.model.dtype)
        self.runner = ModelRunner(self.model, self.kv_cache, build_lora_op(config.lora_backend, self.slots),
                                  pack_weights=config.pack_weights, batch_hint=config.max_batch)
        self.adapter_store = AdapterStore(config, spec, self.slots,  # starts loader threads: last to fail
                                          on_settled=lambda: self._wake.set())  # loads end: poll again
        self.scheduler = Scheduler(config, self.blocks, self.adapter_store)
        self.sampler = Sampler()
        self._special_ids = frozenset(self.model.tokenizer.all_special_ids)
        self.grammar = Grammar(self.model.tokenizer, self.runner.lm_head.out_features, self.model.eos_token_ids,
                               self.model.device)

    # ---- public surface (any thread) ------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def submit(self, request: GenerationRequest, on_token: OnToken | None, on_finish: OnFinish) -> None:
        """Thread-safe, returns at once. Exactly one `on_finish` follows, on the engine thread (for a
        best_of > 1 request too, which runs as several sequences and calls no `on_token`)."""
        self.submit_many([(request, on_token, on_finish)])

    def submit_many(self, jobs: list[tuple[GenerationRequest, OnToken | None, OnFinish]]) -> None:
        """`submit` for a group that arrived together: the step thread takes in all of it before
        its next step, so the group shares one prefill instead of racing the loop job by job."""
        taken = tuple(self._job(*job) for job in self._fan_out(jobs))
        with self._lock:
            closed = self._closed
            if not closed:
                self._live.update(job.request.id for job in taken)
                self._inbox_requests += len(taken)
                self._inbox.put(_Submit(taken))
        if closed:  # no engine thread any more to call back from
            for job in taken:
                if job.prefetch is not None:
                    job.prefetch.release()
                self._callback(job.request.id, job.on_finish, GenerationFailure(job.request.id, _shut_down()))
        self._wake.set()

    def _fan_out(self, jobs: list[tuple[GenerationRequest, OnToken | None, OnFinish]]
                 ) -> list[tuple[GenerationRequest, OnToken | None, OnFinish]]:
        """A best_of > 1 request becomes its n sampled requests, answered as one (engine/best_of.py)."""
        out: list[tuple[GenerationRequest, OnToken | None, OnFinish]] = []
        for request, on_token, on_finish in jobs:
            if request.params.best_of == 1:
                out.append((request, on_token, on_finish))
                continue
            group = BestOf(request, on_finish, cancel=self.cancel, on_done=self._best_of_done)
            with self._lock:
                self._best_of[request.id] = group
            out += [(part, None, finish) for part, finish in group.parts()]
        return out

    def _best_of_done(self, request_id: str) -> None:
        with self._lock:
            self._best_of.pop(request_id, None)

    def _job(self, request: GenerationRequest, on_token: OnToken | None, on_finish: OnFinish) -> _Job:
        if request.adapter is None:
            return _Job(request, on_token, on_finish, None, 0)
        adapter = self.adapter_store.scoped(request.adapter)  # a hub token's entries are its own
        if adapter is not request.adapter:
            request = dataclasses.replace(request, adapter=adapter)
        generation, _ = self.adapter_store.last_load(adapter)
        lease = self.adapter_store.prefetch(adapter)  # the load overlaps queueing and tokenization
        return _Job(request, on_token, on_finish, lease, generation)

    def prefetch(self, adapter: AdapterRef) -> Lease:
        """Start loading `adapter` ahead of a request (`submit` does this itself); the loaded adapter
        is held against eviction until the lease is released. Release it once its request is
        submitted (submit holds the adapter on its own) or will not be; a second release does nothing."""
        return self.adapter_store.prefetch(adapter)

    def cancel(self, request_id: str) -> bool:
        """True if the request was still live; it then ends with a GenerationFailure (INTERNAL,
        "cancelled") and its KV blocks and adapter pin are freed before the next step."""
        with self._lock:
            group = self._best_of.get(request_id)
            if group is None and request_id not in self._live:
                return False
        if group is not None:  # every part: a list, not any() over a generator that stops early
            return any([self.cancel(part.id) for part in group.requests])
        self._inbox.put(_Cancel(request_id))
        self._wake.set()
        return True

    def stats(self) -> dict:
        """Live counters (plain ints and lengths: safe to read from any thread) and the adapter
        store's tiers. `heartbeat_age_s`: seconds since the step thread last went round its loop
        (at least every IDLE_WAIT_S when idle; a step's length when busy); it only grows once the
        thread hangs or has stopped, which is what a readiness probe looks for."""
        sched = self.scheduler
        return {
            "heartbeat_age_s": round(time.monotonic() - self._heartbeat, 3),
            "running": len(sched.running), "waiting": sched.num_waiting + self._inbox_requests,
            "steps": self.num_steps, "prefill_tokens": self.num_prefill_tokens,
            "generated_tokens": self.num_generated_tokens, "step_failures": self.num_step_failures,
            "preemptions": sched.num_preemptions, "active_adapters": len(sched.active),
            "kv_blocks_total": self.blocks.num_blocks, "kv_blocks_used": self.blocks.num_used,
            "kv_blocks_free": self.blocks.num_free, "adapters": self.adapter_store.stats(),
        }

    def warmup(self, timeout: float | None = None) -> None:
        """Run a few throwaway steps on the step thread (engine/warmup.py), with and without an
        adapter, so the first jobs do not pay one-time costs; returns when they are done. Call it
        before taking jobs (the worker does, before it consumes): it leaves KV blocks, adapter
        slots and tiers, counters and later outputs as they were. Raises what the warm-up raised."""
        done: Future[None] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            self._inbox.put(_Warmup(done))
        self._wake.set()
        done.result(timeout)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop admitting: waiting requests (and any submitted later) fail OVERLOADED, retryable;
        running ones finish, or fail the same way when `timeout` seconds pass first."""
        self._inbox.put(_Shutdown(None if timeout is None else time.monotonic() + timeout))
        self._wake.set()
        self._thread.join(None if timeout is None else timeout + 5.0)

    # ---- the step thread ------------------------------------------------------------------------

    def _run(self, model: LoadedModel | None, built: Future[None]) -> None:
        try:
            self._build(model)
        except BaseException as exc:
            built.set_exception(exc)
            return
        built.set_result(None)
        self._loop()

    def _loop(self) -> None:
        stop_at: float | None = None
        while True:
            self._heartbeat = time.monotonic()
            stop_at = self._drain_inbox(stop_at)
            if self._stopping and (not self.scheduler.running or (stop_at is not None and time.monotonic() >= stop_at)):
                break
            try:
                ran = self._step()
            except Exception:  # a bug outside the forward: never kill the thread
                log.exception("engine_loop_error")
                ran = False
            if not ran:
                idle = not self.scheduler.running and not self.scheduler.num_waiting
                self._wake.wait(IDLE_WAIT_S if idle else BLOCKED_WAIT_S)
                self._wake.clear()
        for seq in [*self.scheduler.running, *self.scheduler.waiting()]:  # waiting: preempted late
            self._release(seq)
            self._fail(seq, _shut_down())
        with self._lock:
            self._closed = True
        self._drain_inbox(stop_at)  # submitted before _closed was set: fail them
        self.adapter_store.close()
        self.grammar.close()
        log.info("engine_stopped", steps=self.num_steps)

    def _drain_inbox(self, stop_at: float | None) -> float | None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return stop_at
            match command:
                case _Submit(jobs):
                    for job in jobs:
                        self._accept(job)
                    with self._lock:
                        self._inbox_requests -= len(jobs)
                case _Cancel(request_id):
                    self._cancel(request_id)
                case _Warmup(done):
                    self._warm_up(done)
                case _Shutdown(stop_at=stop_at):
                    self._begin_shutdown()

    def _warm_up(self, done: Future[None]) -> None:
        if self._stopping:
            done.set_result(None)
            return
        log.info("engine_warmup_started")
        t0 = time.perf_counter()
        try:
            warm_up(self.runner, self.sampler, self.blocks, self.slots, self.adapter_store.scratch_slot(),
                    self.tokenizer, self._tokenize, self._max_model_len)
        except Exception as exc:
            log.exception("engine_warmup_failed")
            done.set_exception(exc)
            return
        log.info("engine_warmup_done", ms=round((time.perf_counter() - t0) * 1e3, 1))
        done.set_result(None)

    def _begin_shutdown(self) -> None:
        self._stopping = True
        for seq in self.scheduler.waiting():
            self._release(seq)
            self._fail(seq, _shut_down())

    def _accept(self, job: _Job) -> None:
        """Validate and tokenize on the engine thread (the tokenizer is not shared across threads)."""
        request = job.request
        bound = log.bind(request_id=request.id)
        try:
            if self._stopping:
                raise _shut_down()
            if request.id in self._seqs:
                raise EngineError(ErrorType.VALIDATION, f"request id {request.id!r} is already running")
            if self.scheduler.num_waiting >= self.config.max_waiting:
                raise EngineError(ErrorType.OVERLOADED, f"{self.config.max_waiting} requests already waiting",
                                  retryable=True)
            if request.deadline is not None and time.time() >= request.deadline:
                raise EngineError(ErrorType.DEADLINE_EXCEEDED, "past its deadline before it was queued")
            self._check_params(request)
            prompt_ids = self._tokenize(request)
            grammar = None if request.response_format is None else self.grammar.matcher(request.response_format)
        except EngineError as error:
            bound.info("request_rejected", error_type=error.type.value, error=error.message)
            if job.prefetch is not None:
                job.prefetch.release()
            self._finish_callback(request.id, job.on_finish, GenerationFailure(request.id, error))
            return
        params = request.params
        seq = Sequence(
            request=request, token_ids=list(prompt_ids), num_prompt_tokens=len(prompt_ids),
            sampling=SamplingState.create(params, self.model.device),
            detokenizer=Detokenizer(self.tokenizer, prompt_ids, params.stop), grammar=grammar,
            on_token=job.on_token, on_finish=job.on_finish,
            prefetch=job.prefetch, adapter_generation=job.adapter_generation,
        )
        self._seqs[request.id] = seq
        self.scheduler.add(seq)
        bound.info("request_queued", prompt_tokens=len(prompt_ids), max_new_tokens=params.max_new_tokens,
                   adapter=request.adapter.key if request.adapter else None)

    def _check_params(self, request: GenerationRequest) -> None:
        params, config = request.params, self.config
        if params.max_new_tokens > config.max_new_tokens_limit:
            raise EngineError(ErrorType.VALIDATION,
                              f"max_new_tokens {params.max_new_tokens} exceeds the limit {config.max_new_tokens_limit}")
        if len(params.stop) > config.max_stop_sequences:
            raise EngineError(ErrorType.VALIDATION, f"more than {config.max_stop_sequences} stop sequences")
        if any(len(s) > config.max_stop_length for s in params.stop):
            raise EngineError(ErrorType.VALIDATION, f"a stop sequence is longer than {config.max_stop_length} chars")

    def _tokenize(self, request: GenerationRequest) -> list[int]:
        tok = self.tokenizer
        try:
            if request.prompt_token_ids is not None:
                ids = list(request.prompt_token_ids)
                vocab = self.model.hf_model.config.vocab_size
                if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                    raise EngineError(ErrorType.VALIDATION, f"prompt_token_ids must be ints in [0, {vocab})")
            elif request.messages is not None:
                ids = tok(render_chat(tok, request.messages), add_special_tokens=False)["input_ids"]
            else:
                ids = tok(request.prompt)["input_ids"]
        except EngineError:
            raise
        except Exception as exc:  # a template that rejects the messages, odd content types
            raise EngineError(ErrorType.VALIDATION, f"cannot tokenize the request: {exc}") from exc
        if not ids:
            raise EngineError(ErrorType.VALIDATION, "empty prompt")
        if request.truncate is not None:  # LoRAX: keep the last `truncate` tokens, at most its input length
            if request.truncate > self._max_model_len - 1:
                raise EngineError(ErrorType.VALIDATION,
                                  f"truncate must be at most {self._max_model_len - 1} (the model's context "
                                  f"less one new token), got {request.truncate}")
            ids = ids[-request.truncate:]
        if len(ids) + 1 > self._max_model_len:
            raise EngineError(ErrorType.PROMPT_TOO_LONG,
                              f"prompt has {len(ids)} tokens; the model's context is {self._max_model_len} "
                              f"(prompt + at least one new token)")
        return ids

    def _cancel(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return
        self._release(seq)
        self._fail(seq, EngineError(ErrorType.INTERNAL, "cancelled"))

    def _release(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.scheduler.finish(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.scheduler.remove_waiting(seq)
        self._end_prefetch(seq)
        seq.status = SequenceStatus.FINISHED

    @staticmethod
    def _end_prefetch(seq: Sequence) -> None:
        if seq.prefetch is not None:
            seq.prefetch.release()
            seq.prefetch = None

    def _admitted(self, seq: Sequence) -> None:
        """On its first admission a request's adapter is pinned in a slot, so its prefetch hold
        ends; it waited for a load if the version it runs on is newer than the one at arrival."""
        if seq.prefetch is None:  # the base model, or admitted before (preempted, now recomputed)
            return
        self._end_prefetch(seq)
        assert seq.request.adapter is not None
        generation, load_ms = self.adapter_store.last_load(seq.request.adapter)
        if generation != seq.adapter_generation:
            seq.adapter_load_ms = load_ms

    def _sweep_deadlines(self) -> None:
        """Fail the requests past their deadline and free what they hold (KV blocks, adapter pin):
        running rows before every step, so a client that stopped waiting stops the work at once;
        waiting ones every DEADLINE_SWEEP_S (there may be thousands)."""
        now = time.time()
        for seq in [s for s in self.scheduler.running if _expired(s, now)]:
            self._release(seq)
            self._fail(seq, EngineError(ErrorType.DEADLINE_EXCEEDED,
                                        f"past its deadline after {seq.num_output_tokens} generated tokens"))
        if now - self._last_sweep < DEADLINE_SWEEP_S:
            return
        self._last_sweep = now
        for seq in self.scheduler.waiting():
            if _expired(seq, now):
                self._release(seq)
                self._fail(seq, EngineError(ErrorType.DEADLINE_EXCEEDED, "past its deadline while queued"))

    def _step(self) -> bool:
        """One scheduling decision and (at most) one forward. False when nothing could run."""
        self._sweep_deadlines()
        outcome = self.scheduler.schedule()
        for seq, error in outcome.failed:
            seq.status = SequenceStatus.FINISHED
            self._end_prefetch(seq)
            self._fail(seq, error)
        batch = outcome.batch
        if batch is None:
            return False
        admitted = batch.admitted
        for seq in admitted:
            self._admitted(seq)
        now = time.time()
        for seq in [s for s in admitted if _expired(s, now)]:  # never compute a request that expired before it ran
            self._release(seq)
            self._fail(seq, EngineError(ErrorType.DEADLINE_EXCEEDED, "past its deadline before it ran"))
        rows = [(s, n) for s, n in batch.rows if s.status is SequenceStatus.RUNNING]
        if not rows:
            return True
        seqs, num_new = [s for s, _ in rows], [n for _, n in rows]
        complete = [s for s, n in rows if s.num_computed_tokens + n == s.num_tokens]  # a chunk short of it: no token
        prefill_tokens = sum(n for s, n in batch.chunks if s.status is SequenceStatus.RUNNING)
        try:
            masks = self.grammar.fill([s.grammar for s in complete])  # filled on the grammar thread during the forward
            logits = self._forward(seqs, num_new)  # [len(complete), V] fp32
            bias = None if masks is None else self.grammar.bias(masks.result())
            sampled = self.sampler.sample(logits, [_sampling(s) for s in complete], [s.token_ids for s in complete],
                                          bias) if complete else ([], [], [])
        except Exception as exc:
            self.num_step_failures += 1
            log.exception("step_failed", rows=len(seqs), prefill_tokens=prefill_tokens,
                          request_ids=[s.request_id for s in seqs])
            for seq in seqs:
                self._release(seq)
                self._fail(seq, EngineError(ErrorType.INTERNAL, f"step failed: {type(exc).__name__}: {exc}",
                                            retryable=True))
            return True
        self.num_steps += 1
        self.num_prefill_tokens += prefill_tokens
        self.num_generated_tokens += len(complete)
        for seq, token_id, logprob, alternatives in zip(complete, *sampled, strict=True):
            try:
                self._append_token(seq, token_id, logprob, alternatives)
            except Exception as exc:  # detokenizer or bookkeeping bug: this request only
                log.exception("token_failed", request_id=seq.request_id)
                if seq.status is not SequenceStatus.FINISHED:
                    self._release(seq)
                    self._fail(seq, EngineError(ErrorType.INTERNAL, f"{type(exc).__name__}: {exc}", retryable=True))
        return True

    def _forward(self, seqs: list[Sequence], num_new: list[int]) -> Tensor:
        """The logits [N, V] of the rows that reach their end. The prompts of rows that asked for
        decoder_input_details are scored chunk by chunk until computed (a row preempted before that
        scores its prompt again; one preempted after keeps what it had)."""
        scored = [i for i, s in enumerate(seqs) if s.request.params.prompt_logprobs and s.prefill is None]
        if not scored:
            return self.runner.run(seqs, num_new)
        for i in scored:
            del seqs[i].prompt_scores[seqs[i].num_computed_tokens:]
        logits, scores = self.runner.run_scored(seqs, num_new, scored)
        for i in scored:
            seq = seqs[i]
            seq.prompt_scores += scores[i]
            if seq.num_computed_tokens >= seq.num_prompt_tokens:
                seq.prefill = self._prefill_tokens(seq, seq.prompt_scores)
        return logits

    def _prefill_tokens(self, seq: Sequence, logprobs: list[float]) -> tuple[ScoredToken, ...]:
        """LoRAX's details.prefill: each prompt token decoded alone (special tokens spelled out) with
        its logprob; the first has none."""
        ids = seq.token_ids[:seq.num_prompt_tokens]
        texts = self.tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False)
        return tuple(ScoredToken(t, text, lp) for t, text, lp in zip(ids, texts, [None, *logprobs], strict=True))

    def _append_token(self, seq: Sequence, token_id: int, logprob: float | None,
                      alternatives: list[tuple[int, float]] | None = None) -> None:
        params, detokenizer = seq.request.params, _detokenizer(seq)
        scored = None
        if alternatives is not None:  # decoded where the chosen token now goes
            texts = detokenizer.peek([t for t, _ in alternatives])
            scored = tuple(ScoredToken(t, text, lp) for (t, lp), text in zip(alternatives, texts, strict=True))
        seq.token_ids.append(token_id)
        if seq.first_token_at is None:
            seq.first_token_at = time.time()
        reason = None
        # A constrained row ends once its grammar is complete: no step is spent on a forced EOS.
        complete = seq.grammar is not None and seq.grammar.advance(token_id)
        if token_id in self.model.eos_token_ids and (not params.ignore_eos or complete):
            text, reason = detokenizer.flush(), "eos_token"
        else:
            text, stopped = detokenizer.add(token_id)
            if stopped:
                reason = "stop_sequence"
            elif complete:
                text, reason = text + detokenizer.flush(), "eos_token"
            elif seq.num_output_tokens >= params.max_new_tokens or seq.num_tokens >= self._max_model_len:
                text, reason = text + detokenizer.flush(), "length"
        event = TokenEvent(seq.request_id, seq.num_output_tokens - 1, token_id, text, logprob,
                           token_id in self._special_ids, scored)
        if params.logprobs:
            seq.events.append(event)
        if seq.on_token is not None:
            self._callback(seq.request_id, seq.on_token, event)
        if reason is not None:
            self._release(seq)
            self._complete(seq, reason)

    def _complete(self, seq: Sequence, finish_reason: str) -> None:
        seq.finish_reason = finish_reason
        request = seq.request
        now = time.time()
        arrival = request.arrival_time
        timings = Timings(
            queue_ms=((seq.admitted_at or now) - arrival) * 1000, adapter_load_ms=seq.adapter_load_ms,
            ttft_ms=((seq.first_token_at or now) - arrival) * 1000, total_ms=(now - arrival) * 1000,
        )
        result = Completion(
            request_id=request.id, text=_detokenizer(seq).text, finish_reason=finish_reason,
            prompt_tokens=seq.num_prompt_tokens, generated_tokens=seq.num_output_tokens, timings=timings,
            adapter_id=request.adapter.id if request.adapter else None, seed=_sampling(seq).seed,
            tokens=tuple(seq.events), token_ids=tuple(seq.output_ids), prefill=seq.prefill or (),
        )
        log.info("request_done", request_id=request.id, finish_reason=finish_reason,
                 prompt_tokens=seq.num_prompt_tokens, generated_tokens=seq.num_output_tokens,
                 preemptions=seq.num_preemptions, ttft_ms=round(timings.ttft_ms, 1),
                 total_ms=round(timings.total_ms, 1))
        self._forget(seq)
        self._finish_callback(request.id, seq.on_finish, result)

    def _fail(self, seq: Sequence, error: EngineError) -> None:
        log.info("request_failed", request_id=seq.request_id, error_type=error.type.value, error=error.message)
        self._forget(seq)
        self._finish_callback(seq.request_id, seq.on_finish, GenerationFailure(seq.request_id, error))

    def _forget(self, seq: Sequence) -> None:
        if self._seqs.get(seq.request_id) is seq:
            del self._seqs[seq.request_id]

    def _finish_callback(self, request_id: str, on_finish: OnFinish | None, outcome: Outcome) -> None:
        if request_id not in self._seqs:  # else a rejected duplicate id: the original still runs
            with self._lock:
                self._live.discard(request_id)
        if on_finish is not None:  # None only for sequences built outside the engine (tests)
            self._callback(request_id, on_finish, outcome)

    @staticmethod
    def _callback(request_id: str, fn: Callable, arg) -> None:
        try:
            fn(arg)
        except Exception:  # a caller's bug must not take the engine down
            log.exception("callback_failed", request_id=request_id)


def _shut_down() -> EngineError:
    return EngineError(ErrorType.OVERLOADED, "engine shutting down", retryable=True)


def _expired(seq: Sequence, now: float) -> bool:
    return seq.request.deadline is not None and now >= seq.request.deadline


def _sampling(seq: Sequence) -> SamplingState:
    assert seq.sampling is not None, "the engine gives every sequence one"
    return seq.sampling


def _detokenizer(seq: Sequence) -> Detokenizer:
    assert seq.detokenizer is not None, "the engine gives every sequence one"
    return seq.detokenizer
