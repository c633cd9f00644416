"""The circuit and the rate limit on their own, with a fake clock where time matters."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.forwarder.circuit import Circuit
from sidecar.forwarder.ratelimit import TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("rpm", "burst"), [(100, 200), (1000, 2000), (5000, 10000), (60, 1)])
def test_bucket_never_grants_more_than_burst_plus_rate(rpm: int, burst: int) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rpm, burst, clock)
    granted = 0
    for _ in range(10 * burst + 100):  # far more demand than supply, one simulated minute
        wait = bucket.wait_time()
        if wait == 0:
            granted += 1
        else:
            clock.now += wait / 2  # callers come back early; that must not help them
        if clock.now > 60:
            break
    assert granted <= burst + rpm * clock.now / 60 + 1


def test_bucket_paces_at_the_rate_after_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60, 2, clock)  # one a second, two saved
    assert [bucket.wait_time() for _ in range(2)] == [0.0, 0.0]
    assert bucket.wait_time() == pytest.approx(1.0)
    clock.now += 1.0
    assert bucket.wait_time() == 0.0
    clock.now += 10.0  # a quiet spell refills only up to the burst
    assert [bucket.wait_time() for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]


async def test_unlimited_bucket_never_waits() -> None:
    bucket = TokenBucket(0, 0)
    assert [await bucket.take() for _ in range(1000)] == [0.0] * 1000


async def test_bucket_counts_the_wait_behind_other_callers() -> None:
    """With concurrency > 1 the time queued for the lock was not counted: the rate-limit
    wait read about half of the truth."""
    clock = FakeClock()

    async def sleep(seconds: float) -> None:
        await asyncio.sleep(0)  # the others run at the time the sleep began
        clock.now += seconds

    bucket = TokenBucket(60, 1, clock, sleep)  # one a second, none saved beyond the first
    held = await asyncio.gather(*(bucket.take() for _ in range(3)))
    assert held == [0.0, 1.0, 2.0]  # the third waited a second for the lock, then one more


async def test_closed_circuit_admits_everyone_at_once() -> None:
    circuit = Circuit()
    inside = 0
    most = 0

    async def request() -> None:
        nonlocal inside, most
        async with circuit.admit():
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0)
            inside -= 1

    await asyncio.gather(*(request() for _ in range(5)))
    assert most == 5


async def test_open_circuit_holds_then_admits_one_at_a_time() -> None:
    clock = FakeClock()
    circuit = Circuit(clock)
    circuit.record_failure(30.0)
    order: list[str] = []

    async def request(name: str) -> None:
        async with circuit.admit():
            order.append(f"{name} in")
            await asyncio.sleep(0)
            order.append(f"{name} out")

    tasks = [asyncio.create_task(request(n)) for n in "abc"]
    await asyncio.sleep(0)
    assert order == []  # held: the hold has not passed
    clock.now = 31.0
    circuit.cut_short()  # wake the waiter to look at the clock again
    await asyncio.gather(*tasks)
    assert order == ["a in", "a out", "b in", "b out", "c in", "c out"]


async def test_only_a_request_sent_after_the_failure_closes_the_circuit() -> None:
    clock = FakeClock()
    circuit = Circuit(clock)
    async with circuit.admit() as on_its_way:
        pass
    circuit.record_failure(5.0)  # a 429 for another request, say
    circuit.record_success(on_its_way)
    assert circuit.is_open  # its success says nothing against the hold
    clock.now = 6.0
    async with circuit.admit() as probe:
        pass
    circuit.record_success(probe)
    assert circuit.failures == 0
