"""The settlement decision (consumer.settlement), without a broker: the worker's reliability promise,
checked against a model of how a quorum queue counts deliveries on RabbitMQ 3.x and on 4.3+."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from consumer.settlement import (
    HEADER_DELIVERY_COUNT,
    HEADER_RETRIES,
    REQUEUE_METHOD,
    Action,
    Backoff,
    Decision,
    Failure,
    attempts,
    decide,
)

LIMIT = 5
FLAKY = Failure("internal", "CUDA out of memory", retryable=True)
BAD = Failure("adapter_invalid", "adapter_config.json: use_dora is set")
BUSY = Failure("overloaded", "engine shutting down", retryable=True)
BACKOFF = Backoff(first_s=1.0, max_s=30.0)


# ---- the decision ------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [0, 3, LIMIT, LIMIT + 7])
def test_an_answered_job_is_acked_whatever_its_attempts(count: int) -> None:
    assert decide(None, count, LIMIT) == Decision(Action.ACK)


@pytest.mark.parametrize("count", range(LIMIT))
def test_retryable_failure_is_retried_with_a_growing_delay_while_attempts_remain(count: int) -> None:
    d = decide(FLAKY, count, LIMIT, BACKOFF)
    assert d == Decision(Action.RETRY, FLAKY, retry=count + 1, delay_s=2.0 ** count)


@pytest.mark.parametrize("count", [LIMIT, LIMIT + 1])
def test_retryable_failure_on_the_last_attempt_is_dead_lettered_with_the_count(count: int) -> None:
    d = decide(FLAKY, count, LIMIT)
    assert d.action is Action.DEAD_LETTER
    assert d.failure == Failure("internal", f"CUDA out of memory (gave up after {count + 1} deliveries)")
    assert not d.failure.retryable  # its error reply tells the client not to retry either


@pytest.mark.parametrize("count", [0, LIMIT - 1, LIMIT])
def test_other_failures_are_dead_lettered_at_once_with_their_reason(count: int) -> None:
    assert decide(BAD, count, LIMIT) == Decision(Action.DEAD_LETTER, BAD)


@pytest.mark.parametrize("count", [0, LIMIT, LIMIT + 3])
def test_overload_is_not_the_jobs_fault_it_is_returned(count: int) -> None:
    assert decide(BUSY, count, LIMIT) == Decision(Action.RETURN, BUSY)


def test_a_limit_of_one_retries_once() -> None:
    assert [decide(FLAKY, n, 1).action for n in range(3)] == [Action.RETRY, Action.DEAD_LETTER,
                                                            Action.DEAD_LETTER]


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [Backoff(0.5, 3.0).delay_s(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    with pytest.raises(ValueError):
        Backoff(5.0, 1.0)


def test_attempts_add_the_retry_header_and_the_brokers_count() -> None:
    assert attempts(None) == attempts({}) == 0
    assert attempts({HEADER_RETRIES: 2}) == 2
    assert attempts({HEADER_RETRIES: 2, HEADER_DELIVERY_COUNT: 1}) == 3
    assert attempts({HEADER_RETRIES: b"3", HEADER_DELIVERY_COUNT: "x"}) == 3  # unreadable: 0
    assert attempts({HEADER_RETRIES: True, HEADER_DELIVERY_COUNT: -4}) == 0
    assert attempts({"x-acquired-count": 9}) == 0  # 4.3+ counts every assignment: not attempts


def test_requeue_methods() -> None:
    """A return must not count where the broker allows it (nack, uncounted from 4.3); a handling
    bug must (reject counts on every version)."""
    assert REQUEUE_METHOD == {Action.RETURN: "nack", Action.REJECT: "reject"}


# ---- both counting regimes, end to end -----------------------------------------------------------

@dataclass
class Message:
    headers: dict = field(default_factory=dict)
    delivery_count: int = 0  # the quorum queue's count for this message
    acquired_count: int = 0  # 4.3+: every assignment to a consumer


class QuorumQueue:
    """How a quorum queue counts one message's deliveries. `regime` "3.x": every return advances
    x-delivery-count (nack, reject, channel close). "4.3": nack(requeue) does not ("unlimited
    returns"); reject, channel close and consumer cancel do; x-acquired-count counts every
    assignment. Past `limit` counted returns the broker dead-letters the message itself."""

    def __init__(self, regime: str, limit: int) -> None:
        assert regime in ("3.x", "4.3")
        self.regime, self.limit = regime, limit
        self.dead_by_broker = 0

    def deliver(self, m: Message) -> dict:
        m.acquired_count += 1
        headers = dict(m.headers)
        if m.delivery_count:
            headers[HEADER_DELIVERY_COUNT] = m.delivery_count
        if self.regime == "4.3":
            headers["x-acquired-count"] = m.acquired_count - 1
        return headers

    def settle(self, m: Message, how: str) -> bool:
        """`how`: ack | nack | reject | close. True when the message is back in the queue."""
        if how == "ack":
            return False
        if how != "nack" or self.regime == "3.x":
            m.delivery_count += 1
        if m.delivery_count > self.limit:
            self.dead_by_broker += 1
            return False
        return True


@dataclass
class Run:
    """What happened to one job: the worker's runs and failures, and how it ended."""

    runs: int = 0
    failures: int = 0
    returns: int = 0
    end: Decision | None = None


def serve(queue: QuorumQueue, outcomes: list[str], limit: int = LIMIT) -> Run:
    """Deliver one job until it is settled for good, the worker deciding as consumer.settlement
    says. `outcomes`, one per delivery (the last repeats): "fail" a retryable failure, "busy" an
    overloaded engine (a return), "crash" the worker dies holding it, "ok" a result."""
    run, message = Run(), Message()
    while True:
        headers = queue.deliver(message)
        outcome = outcomes[min(run.runs, len(outcomes) - 1)]
        run.runs += 1
        if outcome == "crash":
            if not queue.settle(message, "close"):
                return run
            continue
        failure = {"ok": None, "fail": FLAKY, "busy": BUSY}[outcome]
        decision = decide(failure, attempts(headers), limit, BACKOFF)
        if decision.action is Action.RETRY:  # a new copy carrying the count; the delivery is acked
            run.failures += 1
            queue.settle(message, "ack")
            message = Message(headers={HEADER_RETRIES: decision.retry})
        elif decision.action is Action.RETURN:
            run.returns += 1
            if not queue.settle(message, REQUEUE_METHOD[Action.RETURN]):
                return run
        else:
            run.failures += decision.action is Action.DEAD_LETTER
            queue.settle(message, "ack")
            run.end = decision
            return run


@pytest.mark.parametrize("regime", ["3.x", "4.3"])
def test_a_persistent_failure_is_dead_lettered_after_exactly_the_limit_on_both(regime: str) -> None:
    queue = QuorumQueue(regime, LIMIT)
    run = serve(queue, ["fail"])
    assert run.runs == run.failures == LIMIT + 1
    assert run.end is not None and run.end.action is Action.DEAD_LETTER
    assert run.end.failure is not None and "gave up after 6 deliveries" in run.end.failure.message
    assert queue.dead_by_broker == 0  # the worker's own dead letter, with its reason


@pytest.mark.parametrize("regime", ["3.x", "4.3"])
def test_a_transient_failure_is_answered_once_it_clears(regime: str) -> None:
    run = serve(QuorumQueue(regime, LIMIT), ["fail", "fail", "fail", "ok"])
    assert (run.runs, run.failures) == (4, 3)
    assert run.end == Decision(Action.ACK)


@pytest.mark.parametrize("regime,failures", [("3.x", 3), ("4.3", LIMIT + 1)])
def test_returns_count_only_where_the_broker_counts_them(regime: str, failures: int) -> None:
    """Three overloaded returns of the first copy, then failures: on 4.3 the returns (nack) are
    free and the job still gets all its attempts; on 3.x each return used one up."""
    run = serve(QuorumQueue(regime, LIMIT), ["busy", "busy", "busy", "fail"])
    assert run.returns == 3
    assert run.failures == failures
    assert run.end is not None and run.end.action is Action.DEAD_LETTER


@pytest.mark.parametrize("regime", ["3.x", "4.3"])
def test_crashes_count_on_both(regime: str) -> None:
    """A worker that dies holding the job (its channel closes) uses an attempt on every version."""
    run = serve(QuorumQueue(regime, LIMIT), ["crash", "crash", "fail"])
    assert run.failures == LIMIT - 1  # 2 crashes + 4 failures = the limit + 1 attempts
    assert run.runs == LIMIT + 1


@pytest.mark.parametrize("regime", ["3.x", "4.3"])
def test_a_job_that_always_crashes_is_stopped_by_the_brokers_limit(regime: str) -> None:
    queue = QuorumQueue(regime, LIMIT)
    run = serve(queue, ["crash"])
    assert run.runs == LIMIT + 1 and queue.dead_by_broker == 1


def test_a_nack_only_retry_path_would_never_stop_on_4_3() -> None:
    """Why RETRY is not a nack: on 4.3 a job requeued by nack keeps x-delivery-count at 0, so a
    count read from it never reaches the limit (the bug of the 3.x-only design)."""
    queue, message = QuorumQueue("4.3", LIMIT), Message()
    for _ in range(3 * LIMIT):
        headers = queue.deliver(message)
        assert queue.settle(message, "nack")
    assert attempts(headers) == 0 and headers["x-acquired-count"] == 3 * LIMIT - 1
