"""Liveness and readiness probes: the first touches nothing, the second asks every dependency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import asyncpg
from aiohttp import web

from konnichiwa.audit import audit_backlog
from konnichiwa.errors import Problem
from konnichiwa.postgres import bounded_connection, pg_pool
from konnichiwa.redis_store import redis_client
from konnichiwa.schemas import AuditBacklog, DependencyCheck, Readiness, json_response
from konnichiwa.state import state_keys

# Both checks run at once, so the probe answers within about this long even if a server hangs.
CHECK_TIMEOUT: Final = 0.8
# A probe gets the answer of a check started at most this long before it: a burst of probes (load
# balancers, orchestrators, monitors, the capacity sampler) costs one check per worker, never a
# Postgres connection each.
FRESH_FOR: Final = 0.5
# Postgres lagging this far behind is worth an operator's look, not a reason to stop traffic:
# updates keep succeeding into the outbox while it catches up.
DEGRADED_AFTER: Final = 10.0

_T = TypeVar("_T")
Report = tuple[dict[str, DependencyCheck], AuditBacklog | None]


class SharedCheck:
    """A dependency check shared by every probe that arrives within FRESH_FOR of its start."""

    __slots__ = ("_check", "_latest", "_started")

    def __init__(self, check: Callable[[], Awaitable[Report]]) -> None:
        self._check = check
        self._started = 0.0
        self._latest: asyncio.Future[Report] | None = None

    async def get(self) -> Report:
        now = time.monotonic()
        if self._latest is None or now - self._started >= FRESH_FOR:
            self._started, self._latest = now, asyncio.ensure_future(self._check())
        return await asyncio.shield(self._latest)  # a probe that gives up leaves it running


dependency_checks = web.AppKey("dependency_checks", SharedCheck)


async def health(request: web.Request) -> web.Response:
    """Liveness: the process serves requests. Never calls a dependency."""
    return web.Response(text="ok")


async def check_dependency(
    probe: Callable[[], Awaitable[_T]],
) -> tuple[DependencyCheck, _T | None]:
    """Run one probe within CHECK_TIMEOUT: how it went and how long it took, and its result.

    A probe still running then is left behind, not cancelled (the Redis client's own time-out
    ends it); the Postgres probe ends itself (postgres.bounded_connection).
    """
    started = time.perf_counter()
    task = asyncio.ensure_future(probe())
    done, _ = await asyncio.wait({task}, timeout=CHECK_TIMEOUT)
    detail: str | None = None
    if not done or isinstance(task.exception(), TimeoutError):
        if not done:
            task.add_done_callback(_forget)
        detail = f"no answer within {CHECK_TIMEOUT} s"
    elif (exc := task.exception()) is not None:
        reachable = not isinstance(exc, OSError | ConnectionError)
        detail = f"{'error' if reachable else 'unreachable'} ({type(exc).__name__})"
    latency_ms = round((time.perf_counter() - started) * 1000, 3)
    check = DependencyCheck("up" if detail is None else "down", latency_ms, detail)
    return check, task.result() if detail is None else None


def _forget(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


async def check_dependencies(app: web.Application) -> Report:
    """Redis's and Postgres's status and round-trip latency, and the audit backlog (None when
    Redis does not answer), as a check started at most FRESH_FOR seconds ago found them."""
    return await app[dependency_checks].get()


async def _ask_dependencies(app: web.Application) -> Report:
    """Ask Redis and Postgres at once (the Redis probe reads the backlog)."""
    (redis, backlog), (postgres, _) = await asyncio.gather(
        check_dependency(lambda: audit_backlog(app[redis_client], app[state_keys])),
        check_dependency(lambda: _select_one(app[pg_pool])),
    )
    return {"redis": redis, "postgres": postgres}, backlog


async def _select_one(pool: asyncpg.Pool) -> None:
    async with bounded_connection(pool, CHECK_TIMEOUT) as conn:
        await conn.fetchval("SELECT 1")


def setup_health(app: web.Application) -> None:
    app[dependency_checks] = SharedCheck(lambda: _ask_dependencies(app))


async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 when Redis and Postgres answer, 503 naming the one that does not."""
    checks, backlog = await check_dependencies(request.app)
    down = [f"{name}: {check.detail}" for name, check in checks.items() if check.status == "down"]
    if down or backlog is None:
        raise Problem(
            503,
            "Service Unavailable",
            f"A dependency is down ({'; '.join(down)}).",
            type="/problems/dependency-unavailable",
            headers={"Retry-After": "5"},
            extensions={"checks": checks},
        )
    degraded = backlog.oldest_age_seconds > DEGRADED_AFTER
    return json_response(Readiness("degraded" if degraded else "ready", checks, backlog))
