"""`best_of`: one request run as several sampled sequences and answered by the most likely one.

LoRAX's router does it the same way (router/src/infer.rs, `generate_best_of`): it queues n copies of
the request, each validated on its own and so given its own random seed, and keeps the one whose
generated tokens have the highest mean logprob. Here the engine fans the request out on `submit`
and gathers the n outcomes back into one.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from functools import partial

from engine.request import Completion, GenerationFailure, GenerationRequest, OnFinish, Outcome


class BestOf:
    """A request with params.best_of = n > 1, run as n requests `<id>/best_of/<i>` (params best_of 1,
    logprobs on, no seed: each draws a fresh one). When all n have finished, the request's single
    `on_finish` gets the sequence with the highest mean token logprob (ties: the first), with the
    others in `best_of_sequences`; every Completion carries the request's id, and its tokens only
    when the request asked for logprobs. The first failure fails the request once and cancels the
    parts still running. Token events are not forwarded: one stream cannot carry n sequences."""

    def __init__(self, request: GenerationRequest, on_finish: OnFinish, cancel: Callable[[str], bool],
                 on_done: Callable[[str], None]) -> None:
        params = dataclasses.replace(request.params, best_of=1, logprobs=True)
        self.request = request
        self.requests = [dataclasses.replace(request, id=f"{request.id}/best_of/{i}", params=params)
                         for i in range(request.params.best_of)]
        self._on_finish = on_finish
        self._cancel = cancel
        self._on_done = on_done
        self._outcomes: list[Outcome | None] = [None] * len(self.requests)
        self._answered = False
        # parts finish on the engine thread, or on the submitter's when the engine is already closed
        self._lock = threading.Lock()

    def parts(self) -> list[tuple[GenerationRequest, OnFinish]]:
        """The n requests to submit, each with its own on_finish."""
        return [(r, partial(self._finish, i)) for i, r in enumerate(self.requests)]

    def _finish(self, i: int, outcome: Outcome) -> None:
        with self._lock:
            self._outcomes[i] = outcome
            if self._answered:
                return
            if isinstance(outcome, GenerationFailure):
                answer: Outcome = GenerationFailure(self.request.id, outcome.error)
            elif all(isinstance(o, Completion) for o in self._outcomes):
                answer = self._best()
            else:
                return
            self._answered = True
            running = [r.id for r, o in zip(self.requests, self._outcomes, strict=True) if o is None]
        for request_id in running:
            self._cancel(request_id)
        self._on_done(self.request.id)
        self._on_finish(answer)

    def _best(self) -> Completion:
        done = [o for o in self._outcomes if isinstance(o, Completion)]
        best = max(range(len(done)), key=lambda i: mean_logprob(done[i]))  # max keeps the first of ties
        keep_tokens = self.request.params.logprobs

        def own(c: Completion) -> Completion:
            return dataclasses.replace(c, request_id=self.request.id, tokens=c.tokens if keep_tokens else ())

        others = tuple(own(c) for i, c in enumerate(done) if i != best)
        return dataclasses.replace(own(done[best]), best_of_sequences=others)


def mean_logprob(c: Completion) -> float:
    """Sum of the generated tokens' logprobs over their number: LoRAX's ranking of best_of sequences."""
    logprobs = [t.logprob for t in c.tokens if t.logprob is not None]
    return sum(logprobs) / len(logprobs) if logprobs else float("-inf")
