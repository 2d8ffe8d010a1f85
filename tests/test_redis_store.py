"""The batcher that sends concurrent calls together, and the connection it pipelines them on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from konnichiwa.redis_store import Batcher, LuaScript, PipelinedConnection, never_sent
from tests.support import free_port


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


async def test_up_to_depth_batches_are_on_the_wire_at_once_started_in_order() -> None:
    started: list[list[int]] = []
    release = asyncio.Event()

    async def send(items: list[int]) -> list[int]:
        started.append(items)
        await release.wait()
        return items

    batcher = Batcher(send, limit=2, depth=3)
    calls = [asyncio.ensure_future(batcher(n)) for n in range(8)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert started == [[0, 1], [2, 3], [4, 5]]  # the fourth waits for room
    release.set()
    assert await asyncio.gather(*calls) == list(range(8))
    assert started[3:] == [[6, 7]]


@pytest.fixture
async def pipelined(redis_url: str) -> AsyncIterator[PipelinedConnection]:
    connection = PipelinedConnection(redis_url, timeout=0.3)
    yield connection
    await connection.aclose()


async def test_pipelined_commands_run_in_the_order_they_were_asked_for(
    pipelined: PipelinedConnection,
) -> None:
    lengths = await asyncio.gather(*(pipelined("RPUSH", "order", n) for n in range(300)))
    assert lengths == list(range(1, 301))
    assert await pipelined("LRANGE", "order", 0, -1) == [str(n).encode() for n in range(300)]


async def test_an_error_reply_fails_only_its_own_command(pipelined: PipelinedConnection) -> None:
    outcomes = await asyncio.gather(
        pipelined("SET", "word", "konnichiwa"),
        pipelined("INCR", "word"),
        pipelined("GET", "word"),
        return_exceptions=True,
    )
    assert outcomes[0] == b"OK"
    assert isinstance(outcomes[1], ResponseError)
    assert outcomes[2] == b"konnichiwa"


async def test_a_late_reply_fails_every_unanswered_command_and_the_next_gets_a_new_connection(
    pipelined: PipelinedConnection,
) -> None:
    before = await pipelined("CLIENT", "ID")
    blocked = pipelined("BLPOP", "nothing-comes", 1)  # Redis answers after 1 s, past the 0.3
    behind = pipelined("PING")
    outcomes = await asyncio.gather(blocked, behind, return_exceptions=True)
    assert all(isinstance(outcome, RedisTimeoutError) for outcome in outcomes)
    assert not any(never_sent(outcome) for outcome in outcomes)  # each may have run
    assert await pipelined("CLIENT", "ID") != before


async def test_commands_that_found_no_server_were_never_sent() -> None:
    connection = PipelinedConnection(f"redis://127.0.0.1:{free_port()}")
    with pytest.raises(RedisConnectionError) as refused:
        await connection("PING")
    assert never_sent(refused.value)


async def test_a_new_connection_loads_its_scripts_before_any_command(redis_url: str) -> None:
    script = LuaScript("return 'loaded'")
    connection = PipelinedConnection(redis_url, scripts=(script,))
    admin = Redis.from_url(redis_url)
    try:
        await connection("PING")
        await admin.script_flush()  # as a Redis that restarted: no script, no connection
        await admin.client_kill_filter(_type="normal", skipme=True)
        with pytest.raises(RedisConnectionError):
            await connection("PING")  # the old connection is gone: it may have run
        assert await connection("EVALSHA", script.sha, 0) == b"loaded"  # no NOSCRIPT
    finally:
        await connection.aclose()
        await admin.aclose()
