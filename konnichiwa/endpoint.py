"""One layer around every route's handler: request ID, API key, problem+json, counting.

Not aiohttp middlewares: with any middleware at all aiohttp adds one of its own and builds and
runs a chain of coroutines per request. One coroutine made once per route, which knows the
route's number and scope up front, does the same work with none of that. Requests no route
matches reach a catch-all route, so a 404 or 405 is problem+json and counted like any other
answer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import OutOfMemoryError

from konnichiwa.auth import Scope, api_key, authorize
from konnichiwa.errors import (
    DEPENDENCY_ERRORS,
    REDIS_FULL,
    REQUEST_ID_HEADER,
    Problem,
    assign_request_id,
    from_http_exception,
    internal_error,
    unavailable,
)
from konnichiwa.protocol import NOSNIFF, SLOW_BODY, SlowBody
from konnichiwa.scoreboard import WorkerSlot

if TYPE_CHECKING:
    from konnichiwa.ratelimit import RouteLimit

log = logging.getLogger("konnichiwa")


def endpoint(
    handler: Handler,
    slot: WorkerSlot,
    route: int,
    scope: Scope | None = None,
    limit: RouteLimit | None = None,
) -> Handler:
    """`handler` as route number `route` on the scoreboard, for keys with `scope` (None: public),
    within the rate `limit` (None: never limited).

    Every answer carries the request ID; every failure becomes problem+json: a `Problem` as it
    says, a store that is down a 503, anything unexpected a logged 500.
    """
    begin, finish = slot.begin, slot.finish

    async def answer(request: web.Request) -> web.StreamResponse:
        started = begin()
        rid = assign_request_id(request)
        status = 500
        try:
            try:
                if scope is not None:
                    if limit is not None:
                        limit.refuse_blocked(request)  # before the key is even looked at
                    request[api_key] = authorize(request, scope)
                if limit is not None and (waiting := limit.admit(request)) is not None:
                    await waiting
                response = await handler(request)
            except Problem as problem:
                # Many problems are shared constants (UNAUTHORIZED): each raise would add this
                # request's frames to the one traceback they keep, for ever.
                problem.__traceback__ = None
                if limit is not None and problem.status == 401:
                    response = await limit.failed_authentication(request, problem)
                else:
                    response = problem.response()
            except (*DEPENDENCY_ERRORS, OutOfMemoryError) as exc:
                response = _failure(request, exc, rid)
            except web.HTTPException as exc:
                if exc.status < 400:  # a redirect: aiohttp sends it as it is
                    exc.headers[REQUEST_ID_HEADER] = rid
                    status = exc.status
                    raise
                response = from_http_exception(exc)
            except Exception:
                log.exception("unhandled error on %s %s [%s]", request.method, request.path, rid)
                response = internal_error()
            headers = response.headers
            headers[REQUEST_ID_HEADER] = rid
            headers[NOSNIFF] = "nosniff"
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away first (nginx's name for it)
            raise
        finally:
            finish(route, status, started)

    answer.__doc__ = handler.__doc__
    return answer


def _failure(request: web.Request, exc: BaseException, rid: str) -> web.Response:
    """What a failed read or call means: a body too slow (408), a client that went away (499,
    nothing can be sent), or else a dependency that failed or is full (503)."""
    if isinstance(exc, SlowBody):
        return SLOW_BODY.response()
    if request.transport is None:
        return web.Response(status=499)  # nginx's name for it; aiohttp's write of it is dropped
    if isinstance(exc, OutOfMemoryError):  # an operator must act: free memory or raise maxmemory
        log.error("Redis is out of memory: refused %s %s [%s]", request.method, request.path, rid)
        return REDIS_FULL.response()
    log.warning("dependency failure on %s %s [%s]: %r", request.method, request.path, rid, exc)
    return unavailable()


async def no_route(request: web.Request) -> web.StreamResponse:
    """What no route matches: a 405 naming the methods the path takes, or else a 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound
