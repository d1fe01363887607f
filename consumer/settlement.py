"""The settlement decision: what becomes of one delivery of a job once its outcome is known.

This is the worker's reliability promise, kept as data (no broker here; the worker carries the
decision out, tests/consumer/test_settlement.py checks it against both broker counting regimes):

    answered (a result, or a cached final reply)        ──▶ ACK after the reply is confirmed
    failure, retryable, attempts left                   ──▶ RETRY: a delayed copy to the retry queue
                                                            (its attempt header + 1), then ack
    failure, retryable, the last attempt                ──▶ DEAD_LETTER, "gave up after N deliveries"
    failure, not retryable (bad input, bad adapter, past its deadline, ...)
                                                        ──▶ DEAD_LETTER with its reason
    not processed, not the job's fault (overloaded, shutdown, a reply not published)
                                                        ──▶ RETURN: back to the queue, uncounted
                                                            where the broker allows it

Counting attempts. A quorum queue counts the deliveries of one message in `x-delivery-count`, but
which returns advance it depends on the broker: up to RabbitMQ 4.2 every return does (nack, reject,
a closed channel); from 4.3 on `basic.nack(requeue)` does not ("not processed": unlimited returns),
while reject, channel closes and consumer cancels still do (`x-acquired-count` counts every
assignment, returns included, so it is no attempt count either). A retry therefore never relies on
the broker's count: it republishes the job to the retry queue with its own header
`x-loraq-retries` (failed attempts so far) and acks the delivery. Each copy is a new message, so
its `x-delivery-count` counts only what happened to that copy without an ack (a crash, a dropped
connection, a return). The attempts before a delivery are the sum of both (`attempts`): exact on
both regimes for failures, and a return counts only where the broker counts it (3.x).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from consumer.protocol import HEADER_DELIVERY_COUNT, HEADER_RETRIES, OVERLOADED

NOT_THE_JOBS_FAULT = frozenset({OVERLOADED})  # error_types that return the job uncounted


class Action(enum.Enum):
    ACK = "ack"  # the job is answered
    RETRY = "retry"  # failed, transient: a delayed copy to the retry queue (attempt + 1), then ack
    DEAD_LETTER = "dead_letter"  # dead-letter copy with the reason, error reply, then ack
    RETURN = "return"  # not processed through no fault of the job: nack(requeue)
    REJECT = "reject"  # handling failed without an outcome (a bug): reject(requeue), always counted


# How each requeueing action is sent to the broker. basic.reject(requeue) advances x-delivery-count
# on every version, basic.nack(requeue) only before RabbitMQ 4.3.
REQUEUE_METHOD: dict[Action, str] = {Action.RETURN: "nack", Action.REJECT: "reject"}


@dataclass(frozen=True)
class Failure:
    """Why a job was not answered with a result. `error_type` is a protocol v1 error_type."""

    error_type: str
    message: str
    retryable: bool = False


@dataclass(frozen=True)
class Backoff:
    """Delay before retry number n (1, 2, ...): `first_s * 2**(n-1)`, at most `max_s`."""

    first_s: float = 1.0
    max_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.first_s <= self.max_s:
            raise ValueError("retry delays must satisfy 0 <= first <= max")

    def delay_s(self, retry: int) -> float:
        return min(self.max_s, self.first_s * 2.0 ** max(0, retry - 1))


@dataclass(frozen=True)
class Decision:
    action: Action
    failure: Failure | None = None  # DEAD_LETTER: the reason its headers and error reply carry
    retry: int = 0  # RETRY: the copy's x-loraq-retries (failed attempts including this one)
    delay_s: float = 0.0  # RETRY: how long the copy waits in the retry queue


def _count(raw: Any) -> int:
    try:
        return max(0, int(raw)) if isinstance(raw, int | str | bytes) and not isinstance(raw, bool) else 0
    except ValueError:
        return 0


def attempts(headers: Mapping[str, Any] | None) -> int:
    """Attempts at this job before this delivery: the retries its copy carries plus the returns of
    this copy that the broker counted (`x-delivery-count`). Unreadable headers count as 0."""
    h = headers or {}
    return _count(h.get(HEADER_RETRIES)) + _count(h.get(HEADER_DELIVERY_COUNT))


def decide(failure: Failure | None, attempts: int, delivery_limit: int,
           backoff: Backoff = Backoff()) -> Decision:
    """The settlement of one delivery after `attempts` earlier ones. `failure` None: the job is
    answered (result or cached reply). A retryable failure is retried while `attempts <
    delivery_limit`, so a job that always fails runs `delivery_limit + 1` times, then it is
    dead-lettered by the worker with its reason (never left to the broker's own limit, which
    drops the reason)."""
    if failure is None:
        return Decision(Action.ACK)
    if failure.error_type in NOT_THE_JOBS_FAULT:
        return Decision(Action.RETURN, failure)
    if not failure.retryable:
        return Decision(Action.DEAD_LETTER, failure)
    if attempts < delivery_limit:
        retry = attempts + 1
        return Decision(Action.RETRY, failure, retry=retry, delay_s=backoff.delay_s(retry))
    gave_up = f"{failure.message} (gave up after {attempts + 1} deliveries)"
    return Decision(Action.DEAD_LETTER, Failure(failure.error_type, gave_up, retryable=False))
