"""The retry policy and the retrying stream, on their own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from service.engines.retry import RetryPolicy, retrying, stall_guard
from service.errors import LLMError

POLICY = RetryPolicy(attempts=3, base_delay_s=0.1, max_delay_s=1.0)


@pytest.mark.parametrize(
    ("failures", "retry_after_s", "low", "high"),
    [
        (1, None, 0.05, 0.1),  # base delay, jittered down to half
        (2, None, 0.1, 0.2),  # doubled
        (1, 0.5, 0.5, 0.5),  # the provider's Retry-After, when longer than the backoff
        (1, 0.01, 0.05, 0.1),  # ... never shorter than the backoff
    ],
)
def test_delays_back_off_with_jitter_and_honour_retry_after(
    failures: int, retry_after_s: float | None, low: float, high: float
) -> None:
    for _ in range(50):
        delay = POLICY.delay_s(failures, retry_after_s)
        assert delay is not None and low <= delay <= high


def test_it_gives_up_after_its_attempts_or_a_retry_after_beyond_its_patience() -> None:
    assert POLICY.delay_s(3, None) is None
    assert POLICY.delay_s(1, 5.0) is None
    assert RetryPolicy(attempts=1).delay_s(1, None) is None


class Flaky:
    """Streams that fail (retryably or not) before or after their first item, as planned."""

    def __init__(self, plans: list[str]) -> None:
        self.plans = plans
        self.opened = 0
        self.closed = 0

    async def stream(self) -> AsyncGenerator[str, None]:
        plan = self.plans[self.opened]
        self.opened += 1
        try:
            if plan == "fail":
                raise LLMError("busy", retryable=True)
            if plan == "refuse":
                raise LLMError("bad request")
            yield "a"
            if plan == "fail-after":
                raise LLMError("dropped", retryable=True)
            yield "b"
        finally:
            self.closed += 1


async def collect(flaky: Flaky) -> list[str]:
    return [item async for item in retrying(flaky.stream, POLICY, "test", "llm")]


async def test_a_retryable_failure_before_the_first_item_is_retried() -> None:
    flaky = Flaky(["fail", "fail", "ok"])
    assert await collect(flaky) == ["a", "b"]
    assert flaky.opened == flaky.closed == 3


async def test_retries_are_bounded_and_say_so() -> None:
    flaky = Flaky(["fail", "fail", "fail", "ok"])
    with pytest.raises(LLMError, match="gave up after 3 tries"):
        await collect(flaky)
    assert flaky.opened == flaky.closed == 3


async def test_no_retry_once_an_item_went_out_or_for_a_request_that_cannot_succeed() -> None:
    after = Flaky(["fail-after", "ok"])
    with pytest.raises(LLMError, match="dropped"):
        await collect(after)
    refused = Flaky(["refuse", "ok"])
    with pytest.raises(LLMError, match="bad request"):
        await collect(refused)
    assert (after.opened, refused.opened) == (1, 1)


async def test_a_stall_is_reported() -> None:
    async def slow() -> AsyncGenerator[str, None]:
        yield "a"
        await asyncio.sleep(10)
        yield "b"

    items = []
    with pytest.raises(LLMError, match="stalled"):
        async for item in stall_guard(slow(), 0.05, lambda: LLMError("stalled")):
            items.append(item)
    assert items == ["a"]
