"""A fake of the engine's public surface for consumer tests (never for end-to-end tests).

Like the real engine it runs steps on its own thread and calls back from there; each step gives
every running request one token. The output is a pure function of (adapter, prompt), so a test
knows every reply in advance: `expected_text`. Per-adapter knobs: a slow first step (`slow`), a
failure instead of a run (`fail`, for the first `fail_times[adapter]` runs only when given; its
message quotes the job's api_token, as a careless hub client's error would). Like the
engine it reports `heartbeat_age_s` (seconds since its step loop last went round) and ends a running
request whose deadline passed with `deadline_exceeded`, freeing its row."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from engine.lease import Lease
from engine.request import (
    AdapterRef,
    Completion,
    EngineError,
    ErrorType,
    GenerationFailure,
    GenerationRequest,
    OnFinish,
    OnToken,
    Timings,
    TokenEvent,
)

EOS = "."  # the fake's output ends here: finish_reason eos_token


def prompt_text(request: GenerationRequest) -> str:
    if request.prompt is not None:
        return request.prompt
    return "|".join(m["content"] for m in request.messages)


def full_output(adapter_id: str | None, prompt: str) -> str:
    return f"<{adapter_id or 'base'}>{prompt[::-1]}{EOS}"


def expected_text(prompt: str, adapter_id: str | None = None, max_new_tokens: int = 64) -> str:
    """The text the fake generates (one char per token), stop sequences aside."""
    return full_output(adapter_id, prompt)[:max_new_tokens]


@dataclass
class _Run:
    request: GenerationRequest
    on_token: OnToken | None
    on_finish: OnFinish
    output: str
    admitted: float = 0.0
    first_token: float = 0.0
    tokens: list[TokenEvent] = field(default_factory=list)


class FakeEngine:
    def __init__(self, *, step_s: float = 0.001, max_batch: int = 32,
                 slow: dict[str | None, float] | None = None,
                 fail: dict[str | None, EngineError] | None = None,
                 fail_times: dict[str | None, int] | None = None) -> None:
        self.step_s = step_s
        self.max_batch = max_batch
        self.slow = dict(slow or {})  # adapter id -> seconds its first step takes
        self.fail = dict(fail or {})  # adapter id -> error instead of a run
        self.fail_times = dict(fail_times or {})  # adapter id -> runs that fail (absent: all)
        self.submitted: list[str] = []  # request ids, in submission order
        self.submitted_at: list[tuple[str, float]] = []  # (request id, time.monotonic())
        self.requests: list[GenerationRequest] = []  # every request, as submitted
        self.prefetched: list[str] = []  # AdapterRef.key
        self.released_prefetches: list[str] = []  # AdapterRef.key
        self.batches: list[tuple[str | None, ...]] = []  # adapters of every step with rows
        self.cancelled: list[str] = []  # request ids, in cancel order
        self._cancelling: set[str] = set()  # running requests to end before the next step
        self._waiting: deque[_Run] = deque()
        self._running: list[_Run] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._steps = 0
        self._seen: set[str] = set()  # adapters used so far: their first use is a cache miss
        self._hits = 0
        self._beat = time.monotonic()  # the step loop's last time round
        self._thread = threading.Thread(target=self._loop, name="fake-engine", daemon=True)
        self._thread.start()

    # ---- the engine surface ----
    def submit_many(self, jobs: list[tuple[GenerationRequest, OnToken | None, OnFinish]]) -> None:
        runs = [_Run(request, on_token, on_finish,
                     full_output(request.adapter.id if request.adapter else None, prompt_text(request)))
                for request, on_token, on_finish in jobs]
        now = time.monotonic()
        with self._lock:
            self.submitted.extend(run.request.id for run in runs)
            self.submitted_at.extend((run.request.id, now) for run in runs)
            self.requests.extend(run.request for run in runs)
            self._waiting.extend(runs)
        self._wake.set()

    def prefetch(self, adapter: AdapterRef) -> Lease:
        def release() -> None:
            with self._lock:
                self.released_prefetches.append(adapter.key)

        with self._lock:
            self.prefetched.append(adapter.key)
        return Lease(release)

    def cancel(self, request_id: str) -> bool:
        """Like the engine's: a waiting request ends at once, a running one before the next step."""
        with self._lock:
            self.cancelled.append(request_id)
            if any(run.request.id == request_id for run in self._running):
                self._cancelling.add(request_id)
                return True
            for run in list(self._waiting):
                if run.request.id == request_id:
                    self._waiting.remove(run)
                    break
            else:
                return False
        run.on_finish(GenerationFailure(request_id, EngineError(ErrorType.INTERNAL, "cancelled")))
        return True

    def stats(self) -> dict:
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting),
                    "steps": self._steps, "heartbeat_age_s": time.monotonic() - self._beat,
                    "adapters": {"device": {"hits": self._hits, "misses": len(self._seen)}}}

    def shutdown(self, timeout: float | None = None) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for run in waiting:
            run.on_finish(GenerationFailure(run.request.id, EngineError(
                ErrorType.OVERLOADED, "engine shutting down", retryable=True)))

    # ---- the step thread ----
    def _loop(self) -> None:
        while not self._stop:
            self._beat = time.monotonic()
            admitted = self._admit()
            if not self._running:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            delay = max([self.slow.get(self._adapter(r), 0.0) for r in admitted] + [self.step_s])
            time.sleep(delay)
            self._step()

    @staticmethod
    def _leaky(run: _Run, error: EngineError) -> EngineError:
        """The error as a careless hub client would word it: quoting the job's api_token."""
        token = run.request.adapter.api_token if run.request.adapter else None
        if not token:
            return error
        return EngineError(error.type, f"{error.message} (token {token})", error.retryable)

    def _fails(self, adapter: str | None) -> bool:
        """Under the lock: whether this run of `adapter` fails (counting down fail_times)."""
        if adapter not in self.fail:
            return False
        if adapter not in self.fail_times:
            return True
        self.fail_times[adapter] -= 1
        return self.fail_times[adapter] >= 0

    @staticmethod
    def _adapter(run: _Run) -> str | None:
        return run.request.adapter.id if run.request.adapter else None

    def _admit(self) -> list[_Run]:
        admitted, failed = [], []
        now = time.time()
        with self._lock:
            while self._waiting and len(self._running) < self.max_batch:
                run = self._waiting.popleft()
                req = run.request
                if req.deadline is not None and now >= req.deadline:
                    failed.append((run, EngineError(ErrorType.DEADLINE_EXCEEDED, "past its deadline")))
                elif self._fails(self._adapter(run)):
                    failed.append((run, self._leaky(run, self.fail[self._adapter(run)])))
                else:
                    key = self._adapter(run)
                    if key is not None:
                        self._hits += key in self._seen
                        self._seen.add(key)
                    run.admitted = now
                    self._running.append(run)
                    admitted.append(run)
        for run, error in failed:
            run.on_finish(GenerationFailure(run.request.id, error))
        return admitted

    def _step(self) -> None:
        with self._lock:
            cancelled = [r for r in self._running if r.request.id in self._cancelling]
            self._cancelling.clear()
        for run in cancelled:
            self._running.remove(run)
            run.on_finish(GenerationFailure(run.request.id, EngineError(ErrorType.INTERNAL, "cancelled")))
        wall = time.time()
        for run in [r for r in self._running if r.request.deadline is not None and wall >= r.request.deadline]:
            self._running.remove(run)  # its row is free before this step
            run.on_finish(GenerationFailure(run.request.id, EngineError(
                ErrorType.DEADLINE_EXCEEDED, "passed its deadline while running")))
        self._steps += 1
        self.batches.append(tuple(self._adapter(r) for r in self._running))
        now = time.time()
        done = []
        for run in self._running:
            i = len(run.tokens)
            if i == 0:
                run.first_token = now
            ch = run.output[i]
            ev = TokenEvent(run.request.id, i, ord(ch), ch,
                            -0.5 if run.request.params.logprobs else None)
            run.tokens.append(ev)
            if run.on_token is not None:
                run.on_token(ev)
            text = "".join(t.text for t in run.tokens)
            stop = next((s for s in run.request.params.stop if s in text), None)
            if stop is not None:
                done.append((run, text[:text.index(stop)], "stop_sequence"))
            elif ch == EOS:
                done.append((run, text, "eos_token"))
            elif len(run.tokens) >= run.request.params.max_new_tokens:
                done.append((run, text, "length"))
        for run, text, reason in done:
            self._running.remove(run)
            req = run.request
            end = time.time()
            run.on_finish(Completion(
                request_id=req.id, text=text, finish_reason=reason,
                prompt_tokens=len(prompt_text(req)), generated_tokens=len(run.tokens),
                timings=Timings(queue_ms=(run.admitted - req.arrival_time) * 1000,
                                adapter_load_ms=0.0,
                                ttft_ms=(run.first_token - req.arrival_time) * 1000,
                                total_ms=(end - req.arrival_time) * 1000),
                adapter_id=self._adapter(run), seed=req.params.seed,
                tokens=tuple(run.tokens) if req.params.logprobs else (),
                token_ids=tuple(t.token_id for t in run.tokens)))
