"""A worker's background tasks: started in a cleanup context, cancelled and awaited with it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Final

# How long one cancellation may take before the task is cancelled again.
CANCEL_AGAIN_AFTER: Final = 0.1


@contextlib.asynccontextmanager
async def running(work: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """Run `work` as a task for the duration of the block; cancel it and wait for it on exit.

    The task is cancelled again until it has ended: on Python 3.11 `asyncio.wait_for` returns
    its result, swallowing the cancellation, when both arrive together — redis-py wraps every
    socket write in it — and a single cancel() could then leave shutdown waiting forever.
    """
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=CANCEL_AGAIN_AFTER)
        with contextlib.suppress(asyncio.CancelledError):
            await task  # raises what the work failed with, if anything
