"""Background tasks end when their cleanup context does, even if a cancellation is swallowed."""

from __future__ import annotations

import asyncio

import pytest

from konnichiwa.background import running


async def test_a_swallowed_cancellation_does_not_keep_the_task_alive() -> None:
    swallowed = 0

    async def carries_on() -> None:
        nonlocal swallowed
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:  # as Python 3.11's wait_for can do inside a library
            swallowed += 1
        await asyncio.sleep(60)

    async with asyncio.timeout(5) as limit:
        async with running(carries_on(), "carries-on"):
            await asyncio.sleep(0)
    assert not limit.expired()  # it ended on its own, not cut off by the time limit
    assert swallowed == 1


async def test_a_failure_of_the_work_is_raised_on_exit() -> None:
    async def fails() -> None:
        raise RuntimeError("broken")

    with pytest.raises(RuntimeError, match="broken"):
        async with running(fails(), "fails"):
            await asyncio.sleep(0.01)
