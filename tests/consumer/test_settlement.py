"""The settlement decision (consumer.settlement), without a broker: the worker's reliability promise."""

from __future__ import annotations

import pytest

from consumer.settlement import REQUEUE_METHOD, Action, Decision, Failure, decide

LIMIT = 5
FLAKY = Failure("internal", "CUDA out of memory", retryable=True)
BAD = Failure("adapter_invalid", "adapter_config.json: use_dora is set")


@pytest.mark.parametrize("count", [0, 3, LIMIT, LIMIT + 7])
def test_an_answered_job_is_acked_whatever_its_deliveries(count: int) -> None:
    assert decide(None, count, LIMIT) == Decision(Action.ACK)


@pytest.mark.parametrize("count", range(LIMIT))
def test_retryable_failure_is_retried_while_deliveries_remain(count: int) -> None:
    assert decide(FLAKY, count, LIMIT) == Decision(Action.RETRY, FLAKY)


@pytest.mark.parametrize("count", [LIMIT, LIMIT + 1])
def test_retryable_failure_on_the_last_delivery_is_dead_lettered_with_the_count(count: int) -> None:
    d = decide(FLAKY, count, LIMIT)
    assert d.action is Action.DEAD_LETTER
    assert d.failure == Failure("internal", f"CUDA out of memory (gave up after {count + 1} deliveries)")
    assert not d.failure.retryable  # its error reply tells the client not to retry either


@pytest.mark.parametrize("count", [0, LIMIT - 1, LIMIT])
def test_other_failures_are_dead_lettered_at_once_with_their_reason(count: int) -> None:
    assert decide(BAD, count, LIMIT) == Decision(Action.DEAD_LETTER, BAD)


def test_a_limit_of_one_retries_once() -> None:
    assert [decide(FLAKY, n, 1).action for n in range(3)] == [Action.RETRY, Action.DEAD_LETTER,
                                                            Action.DEAD_LETTER]


def test_every_requeueing_action_has_a_broker_method() -> None:
    """Before RabbitMQ 4.3 both count towards x-delivery-count; see REQUEUE_METHOD for 4.3."""
    assert set(REQUEUE_METHOD) == {Action.RETRY, Action.RETURN}
    assert set(REQUEUE_METHOD.values()) <= {"nack", "reject"}
