"""The whole URL map in one table: path, handler, required scope, roles, and what the docs say."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from konnichiwa import audit, capacity, greeting, health, metrics, openapi, state, users
from konnichiwa.auth import Scope, requires
from konnichiwa.schemas import (
    Greeting,
    GreetingQuery,
    Inspection,
    LogsPage,
    NewUser,
    PageQuery,
    Readiness,
    Status,
    UpdateRequest,
    UpdateResult,
    User,
    UsersPage,
)
from konnichiwa.settings import ServiceName

BOTH_ROLES: Final[frozenset[ServiceName]] = frozenset({"api", "aux"})


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    scope: Scope | None = None  # None: public
    query: type | None = None  # msgspec struct the query string is validated into
    body: type | None = None  # msgspec struct the JSON body is validated into
    responses: Mapping[int, type | str] = dataclasses.field(default_factory=dict)
    roles: frozenset[ServiceName] = BOTH_ROLES
    # Responses in another media type than JSON (text/plain, text/html).
    media_type: str = "application/json"


ROUTES: Final[tuple[Route, ...]] = (
    Route("GET", "/", greeting.greet, "Greeting in Japanese", "greeting",
          query=GreetingQuery, responses={200: Greeting}),
    Route("GET", "/health", health.health, "Liveness probe", "probes",
          responses={200: "ok"}, media_type="text/plain"),
    Route("GET", "/health/ready", health.ready, "Readiness probe", "probes",
          responses={200: Readiness, 503: "A dependency is down"}),
    Route("GET", "/status", state.status, "Current counter and message", "state",
          responses={200: Status}),
    Route("POST", "/update", state.update, "Change the counter and/or the message", "state",
          scope="write", body=UpdateRequest,
          responses={200: UpdateResult, 409: "The increment would overflow the counter"}),
    Route("GET", "/logs", audit.logs, "Audit log of state changes, newest first", "state",
          query=PageQuery,
          responses={200: LogsPage, 503: "The audit log could not catch up in time"}),
    Route("POST", "/user", users.create, "Register a user", "users",
          scope="write", body=NewUser,
          responses={201: User, 409: "A user with this email exists"}),
    Route("POST", "/users", users.create, "Register a user (same as POST /user)", "users",
          scope="write", body=NewUser,
          responses={201: User, 409: "A user with this email exists"}),
    Route("GET", "/users", users.index, "List users, newest first", "users",
          scope="read", query=PageQuery, responses={200: UsersPage}),
    Route("GET", "/users/{id}", users.show, "One user", "users",
          scope="read", responses={200: User, 404: "No such user"}),
    Route("GET", "/inspect", capacity.inspect, "Is there capacity left?", "capacity",
          scope="inspect", responses={200: Inspection}),
    Route("GET", "/metrics", metrics.metrics, "Prometheus metrics", "capacity",
          scope="inspect", responses={200: "Prometheus text exposition 0.0.4"},
          media_type="text/plain"),
    Route("GET", "/openapi.json", openapi.spec, "This OpenAPI document", "docs",
          responses={200: "OpenAPI 3.1 document"}),
    Route("GET", "/docs", openapi.docs, "Swagger UI", "docs",
          responses={200: "HTML page"}, media_type="text/html"),
)  # fmt: skip


def routes_for(role: ServiceName) -> tuple[Route, ...]:
    """The routes a service role serves."""
    return tuple(route for route in ROUTES if role in route.roles)


def setup_routes(app: web.Application, role: ServiceName) -> dict[object, int]:
    """Add the role's routes; return each aiohttp route's number in `routes_for(role)`."""
    numbers: dict[object, int] = {}
    for number, route in enumerate(routes_for(role)):
        handler = route.handler if route.scope is None else requires(route.scope)(route.handler)
        if route.method == "GET":
            added = app.router.add_get(route.path, handler)  # answers HEAD too
        else:
            added = app.router.add_route(route.method, route.path, handler)
        for sibling in added.resource or ():
            if sibling.handler is handler:  # this route, and the HEAD route beside a GET
                numbers[sibling] = number
    app.router.add_static(openapi.STATIC_PREFIX, openapi.swagger_ui_static_dir())
    return numbers
