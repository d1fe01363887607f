"""The settlement decision: what becomes of one delivery of a job once its outcome is known.

This is the worker's reliability promise, kept as data (no broker here; the worker carries the
decision out, tests/consumer/test_settlement.py checks it):

    answered (a result, or a cached final reply)        ──▶ ACK after the reply is confirmed
    failure, retryable, deliveries left                 ──▶ RETRY: back to the queue
    failure, retryable, delivery limit reached          ──▶ DEAD_LETTER, "gave up after N deliveries"
    failure, not retryable (bad input, bad adapter, past its deadline, ...)
                                                        ──▶ DEAD_LETTER with its reason
    the reply could not be published (not the job's fault)  ──▶ RETURN: back to the queue

A dead-lettered job is copied to the dead-letter exchange with the reason in its headers, answered
with an error reply, then acked. `delivery_count` is the quorum queue's `x-delivery-count`: the
deliveries of this job that ended without an ack. RETRY and RETURN both requeue; they differ in
whether the return should count towards the delivery limit, which only matters once the broker
tells them apart (see REQUEUE_METHOD).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Action(enum.Enum):
    ACK = "ack"  # the job is answered
    RETRY = "retry"  # processing failed: requeue, counted towards the delivery limit
    RETURN = "return"  # not processed through no fault of the job: requeue
    DEAD_LETTER = "dead_letter"  # dead-letter copy with the reason, error reply, then ack


# How each requeueing action is sent to the broker. Before RabbitMQ 4.3 every requeue advances a
# quorum queue's x-delivery-count. From 4.3 on, basic.nack(requeue) does not ("not processed")
# and basic.reject(requeue) does ("processing failed"): under that regime RETRY must be "reject",
# or a retryable failure would be retried forever.
REQUEUE_METHOD: dict[Action, str] = {Action.RETRY: "nack", Action.RETURN: "nack"}


@dataclass(frozen=True)
class Failure:
    """Why a job was not answered with a result. `error_type` is a protocol v1 error_type."""

    error_type: str
    message: str
    retryable: bool = False


@dataclass(frozen=True)
class Decision:
    action: Action
    failure: Failure | None = None  # DEAD_LETTER: the reason its headers and error reply carry


def decide(failure: Failure | None, delivery_count: int, delivery_limit: int) -> Decision:
    """The settlement of one delivery. `failure` None: the job is answered (result or cached
    reply). A retryable failure is retried while `delivery_count < delivery_limit`; on the last
    delivery it is dead-lettered (never left to the broker's own limit, which drops the reason)."""
    if failure is None:
        return Decision(Action.ACK)
    if not failure.retryable:
        return Decision(Action.DEAD_LETTER, failure)
    if delivery_count < delivery_limit:
        return Decision(Action.RETRY, failure)
    gave_up = f"{failure.message} (gave up after {delivery_count + 1} deliveries)"
    return Decision(Action.DEAD_LETTER, Failure(failure.error_type, gave_up, retryable=False))
