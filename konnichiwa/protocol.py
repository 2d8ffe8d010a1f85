"""HTTP connections: deadlines for slow clients, a cap per worker, and answers for malformed input.

aiohttp's only timer is keep-alive, it has no cap on connections and answers requests it cannot
parse itself (text/plain, echoing the offending bytes, an ERROR traceback in the log). Its
request handler and server are subclassed here, as aiohttp has no public hook for either: the
tests in tests/test_protocol.py hold the internals used (`_messages`, `_request_in_progress`).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import dataclasses
import gc
import logging
import resource
import time
from collections.abc import Coroutine
from typing import Any, Final

from aiohttp import streams, web, web_protocol
from aiohttp.streams import EMPTY_PAYLOAD
from multidict import istr

from konnichiwa.errors import (
    PROBLEM_CONTENT_TYPE,
    REQUEST_ID_HEADER,
    Problem,
    new_request_id,
)
from konnichiwa.metrics import route_labels
from konnichiwa.scoreboard import worker_slot
from konnichiwa.settings import Settings

log = logging.getLogger("konnichiwa.protocol")

# An ALB refuses more than 64 KiB of request headers; so does this, without keeping more.
MAX_HEADER_BYTES: Final = 64 * 1024
# File descriptors a worker needs besides its clients': the Redis (64), Postgres (10) and AWS
# (3 x 32) pools, the listening socket, logs, pipes and the event loop's own.
FD_RESERVE: Final = 224
MIN_CONNECTIONS: Final = 16
# Once this many connections were open at once and three quarters have gone, freed memory is
# handed back to the system.
RELEASE_AFTER_PEAK: Final = 64
_libc = ctypes.util.find_library("c")
_malloc_trim = getattr(ctypes.CDLL(_libc), "malloc_trim", None) if _libc else None  # glibc only
# On every answer: no browser may guess a type other than the one declared.
NOSNIFF: Final = istr("X-Content-Type-Options")
SECURITY_HEADERS: Final = {NOSNIFF: "nosniff"}


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionPolicy:
    """How long a client may take, and how many connections a worker keeps open."""

    header_seconds: float
    body_seconds: float
    keepalive_seconds: float
    max_connections: int

    @classmethod
    def for_worker(cls, settings: Settings) -> ConnectionPolicy:
        """The settings' policy, its connection cap kept below this process's descriptor limit
        (raised to the hard limit first, as servers do)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        fds = settings.max_connections if soft == resource.RLIM_INFINITY else soft - FD_RESERVE
        return cls(
            header_seconds=settings.header_timeout_seconds,
            body_seconds=settings.body_timeout_seconds,
            keepalive_seconds=settings.keepalive_seconds,
            max_connections=max(MIN_CONNECTIONS, min(settings.max_connections, fds)),
        )


class SlowBody(TimeoutError):
    """A request body that did not arrive within the policy's time (the handler answers 408)."""


SLOW_BODY: Final = Problem(
    408,
    "Request Timeout",
    "The request body did not arrive in time; the connection is closed.",
    type="/problems/request-timeout",
    headers={"Connection": "close"},
)


class BurstLog:
    """One WARNING for a burst of like events, then at most one a minute saying how many came."""

    def __init__(self, message: str, interval: float = 60.0) -> None:
        self.message, self.interval = message, interval
        self._quiet_until = 0.0
        self._unreported = 0

    def warning(self, *args: object) -> None:
        self._unreported += 1
        now = time.monotonic()
        if now < self._quiet_until:
            return
        self._quiet_until = now + self.interval
        log.warning(self.message + " (%d in the last minute)", *args, self._unreported)
        self._unreported = 0


_malformed = BurstLog("refused a malformed request from %s: %s")
_slow = BurstLog("closed a connection from %s: %s")
_over_cap = BurstLog("connections over this worker's cap of %d: closed the longest waiting")


def raw_problem(status: int, title: str, detail: str) -> bytes:
    """A whole HTTP/1.1 problem+json answer that closes the connection, for moments when aiohttp
    has no request to answer (its headers never completed)."""
    body = Problem(status, title, detail).body
    head = (
        f"HTTP/1.1 {status} {title}\r\nContent-Type: {PROBLEM_CONTENT_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
        f"{REQUEST_ID_HEADER}: {new_request_id()}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in SECURITY_HEADERS.items())
        + "\r\n"
    )
    return head.encode() + body


class GuardedRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler with a deadline on headers and on bodies."""

    __slots__ = ("_body", "_deadline", "_draining", "_guard", "_header_bytes")

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._body: streams.StreamReader | None = None  # a body still arriving
        self._draining = False  # shutting down: answer the request in hand, then close

    def waiting_on_client(self) -> bool:
        """Idle or reading headers: nothing of the service's is lost by closing it."""
        return self._body is None and not self._request_in_progress and not self._messages

    def data_received(self, data: bytes) -> None:
        reading_headers = self._body is None
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:  # headers complete (or refused as malformed)
            if self._deadline is not None:  # (inline: this runs for every request)
                self._deadline.cancel()
                self._deadline = None
                self._header_bytes = 0
            payload = self._messages[-1][1] if self._messages else EMPTY_PAYLOAD
            if payload is not EMPTY_PAYLOAD and not payload.is_eof():  # a GET has none
                self._body = payload
                payload.on_eof(self._body_arrived)
                self._set_deadline(self._guard.policy.body_seconds, self._body_too_slow)
        elif reading_headers and data and not self._force_close:
            if self._deadline is None:
                self._set_deadline(self._guard.policy.header_seconds, self._headers_too_slow)
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._refuse(
                    431,
                    "Request Header Fields Too Large",
                    f"The request headers exceed {MAX_HEADER_BYTES // 1024} KiB.",
                )

    def connection_lost(self, exc: BaseException | None) -> None:
        self._set_deadline(None)
        self._body = None
        super().connection_lost(exc)

    def _set_deadline(self, seconds: float | None, expire: Any = None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None if seconds is None else self._loop.call_later(seconds, expire)

    def _body_arrived(self) -> None:
        self._body = None
        self._set_deadline(None)
        if self._draining:
            super().close()

    def close(self) -> None:
        """Close once the request in hand is answered (at once when idle) — but only after its
        body has arrived: aiohttp reads nothing more once a connection is closing."""
        self._draining = True
        if self._body is None:
            super().close()

    def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        """aiohttp's, saying "Connection: close" while draining (a plain function returning its
        coroutine: no coroutine of its own per request)."""
        if self._draining:
            resp.force_close()  # the client hears "Connection: close", not a dropped socket
        return super().finish_response(request, resp, start_time)

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109  (aiohttp's)
        """Let the request in hand finish, its body read to the end and its answer written,
        before aiohttp's own shutdown, which stops reading at once."""
        deadline = None if timeout is None else self._loop.time() + timeout
        if self._request_in_progress:
            self._handler_waiter = self._loop.create_future()  # aiohttp resolves it
            try:
                async with asyncio.timeout_at(deadline):
                    await self._handler_waiter
            except TimeoutError:
                self._handler_waiter = None
        remaining = None if deadline is None else max(0.0, deadline - self._loop.time())
        await super().shutdown(remaining)

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self._request_in_progress or self._messages:  # answer those first, then close
            self.close()
        else:
            self._refuse(408, "Request Timeout", "The request headers did not arrive in time.")

    def _body_too_slow(self) -> None:
        self._deadline = None
        body, self._body = self._body, None
        if body is not None and not body.is_eof():
            _slow.warning(self._peer(), "body not complete in time")
            body.set_exception(SlowBody())  # its reader answers 408; aiohttp then closes

    def _refuse(self, status: int, title: str, detail: str) -> None:
        self._set_deadline(None)
        self._guard.count(status)
        _slow.warning(self._peer(), detail)
        if self.transport is not None:
            self.transport.write(raw_problem(status, title, detail))
        self.force_close()

    def _peer(self) -> str:
        peer = self.peername
        return str(peer[0]) if isinstance(peer, tuple) else "-"

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse: problem+json that echoes nothing of it, counted,
        logged without a traceback and at most once a minute."""
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had begun; the connection is closed instead")
        self._guard.count(status)
        _malformed.warning(request.remote, type(exc).__name__)
        if status == 400:
            problem = Problem(
                400,
                "Bad Request",
                "The request is not valid HTTP/1.1.",
                type="/problems/malformed-request",
                headers={"Connection": "close"},
            )
        else:
            problem = Problem(
                status,
                "Internal Server Error",
                "The server failed to answer.",
                headers={"Connection": "close"},
            )
        response = problem.response()
        response.headers.update(SECURITY_HEADERS)
        response.headers[REQUEST_ID_HEADER] = new_request_id()
        response.force_close()
        return response


class GuardedServer(web.Server):
    """aiohttp's protocol factory, making guarded handlers and keeping their number capped."""

    def __init__(
        self,
        plain: web.Server,
        policy: ConnectionPolicy,
        count: Any,
        loop: asyncio.AbstractEventLoop,
        **handler_options: Any,
    ) -> None:
        super().__init__(plain.request_handler, request_factory=plain.request_factory, loop=loop)
        self.policy = policy
        self.count = count  # count(status): an answer given outside any route
        self._handler_options = handler_options
        self._open: dict[GuardedRequestHandler, None] = {}  # oldest first
        self._peak = 0  # the most connections open at once since memory was last released
        self._release: asyncio.TimerHandle | None = None

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(
            self,
            loop=self._loop,
            keepalive_timeout=self.policy.keepalive_seconds,
            **self._handler_options,
        )

    def connection_made(self, handler: web_protocol.RequestHandler, transport: Any) -> None:
        super().connection_made(handler, transport)
        assert isinstance(handler, GuardedRequestHandler)  # noqa: S101  (made by __call__)
        self._open[handler] = None
        self._peak = max(self._peak, len(self._open))
        if len(self._open) > self.policy.max_connections:
            self._close_longest_waiting(handler)

    def connection_lost(
        self, handler: web_protocol.RequestHandler, exc: BaseException | None = None
    ) -> None:
        self._open.pop(handler, None)  # type: ignore[call-overload]
        super().connection_lost(handler, exc)
        crowd_gone = self._peak >= RELEASE_AFTER_PEAK and len(self._open) <= self._peak // 4
        if crowd_gone and self._release is None:
            self._release = self._loop.call_later(1.0, self._release_memory)

    def _release_memory(self) -> None:
        """After a crowd of connections has gone: collect their handlers, which sit in reference
        cycles with their buffers until a full collection, and hand the freed memory back to the
        system (the C allocator keeps it for reuse; nothing else asks it to)."""
        self._release = None
        self._peak = len(self._open)
        gc.collect()
        if _malloc_trim is not None:
            _malloc_trim(0)

    def _close_longest_waiting(self, newest: GuardedRequestHandler) -> None:
        """Make room: the oldest connection that is idle or still sending headers, else the
        newest one."""
        _over_cap.warning(self.policy.max_connections)
        victim = next((h for h in self._open if h.waiting_on_client()), newest)
        self._open.pop(victim, None)
        victim.force_close()


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose connections follow `policy`; answers given outside any route are
    counted on the application's scoreboard under "other"."""

    def __init__(
        self,
        app: web.Application,
        policy: ConnectionPolicy,
        *,
        access_log: logging.Logger | None,
        shutdown_timeout: float,
    ) -> None:
        super().__init__(app, access_log=access_log, shutdown_timeout=shutdown_timeout)
        self.policy = policy
        self._handler_options = {"access_log": access_log}

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        slot, other = self.app[worker_slot], len(self.app[route_labels]) - 1

        def count(status: int) -> None:
            slot.finish(other, status, slot.begin())

        return GuardedServer(
            plain, self.policy, count, asyncio.get_running_loop(), **self._handler_options
        )
