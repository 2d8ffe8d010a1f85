"""The batcher that sends concurrent calls together."""

from __future__ import annotations

import asyncio

import pytest

from konnichiwa.redis_store import Batcher


class Doubler:
    """Doubles numbers in batches, refusing negatives one by one; records every batch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    async def send(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(items)
        await asyncio.sleep(0)  # on the wire: later calls queue for the next batch
        if 13 in items:
            raise ConnectionError("lost the connection")
        return [ValueError(n) if n < 0 else n * 2 for n in items]


async def test_concurrent_calls_share_a_batch_in_arrival_order() -> None:
    doubler = Doubler()
    batcher = Batcher(doubler.send, limit=3)
    results = await asyncio.gather(*(batcher(n) for n in range(7)))
    assert results == [0, 2, 4, 6, 8, 10, 12]
    assert doubler.batches == [[0, 1, 2], [3, 4, 5], [6]]


async def test_outcomes_and_failures_reach_their_own_callers() -> None:
    batcher = Batcher(Doubler().send, limit=10)
    outcomes = await asyncio.gather(batcher(1), batcher(-1), batcher(2), return_exceptions=True)
    assert outcomes[0] == 2
    assert isinstance(outcomes[1], ValueError)
    assert outcomes[2] == 4


async def test_a_failed_round_trip_fails_every_call_in_it() -> None:
    doubler = Doubler()
    batcher = Batcher(doubler.send, limit=10)
    first = asyncio.ensure_future(batcher(1))
    await asyncio.sleep(0)
    together = [asyncio.ensure_future(batcher(n)) for n in (13, 5)]
    assert await first == 2
    for call in together:
        with pytest.raises(ConnectionError):
            await call
    assert await batcher(4) == 8  # the next batch is sent again
