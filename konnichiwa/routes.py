"""The whole URL map in one table: path, handler, required scope, roles, and what the docs say."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from konnichiwa import audit, capacity, cloud, greeting, health, metrics, openapi, state, users
from konnichiwa.auth import Scope
from konnichiwa.aws import AwsService
from konnichiwa.endpoint import endpoint, no_route
from konnichiwa.ratelimit import rate_limiter
from konnichiwa.schemas import (
    BucketList,
    Greeting,
    GreetingQuery,
    Inspection,
    LogsPage,
    NewUser,
    PageQuery,
    Parameter,
    ParameterList,
    ParameterPath,
    Readiness,
    Status,
    UpdateRequest,
    UpdateResult,
    User,
    UsersPage,
)
from konnichiwa.scoreboard import worker_slot
from konnichiwa.settings import ServiceName

BOTH_ROLES: Final[frozenset[ServiceName]] = frozenset({"api", "aux"})
AWS_UNAVAILABLE: Final = "AWS is throttling, failing or unreachable and no cached answer is left"


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    scope: Scope | None = None  # None: public
    query: type | None = None  # msgspec struct the query string is validated into
    path_params: type | None = None  # msgspec struct stating the path parameters' shape
    body: type | None = None  # msgspec struct the JSON body is validated into
    responses: Mapping[int, type | str] = dataclasses.field(default_factory=dict)
    roles: frozenset[ServiceName] = BOTH_ROLES
    # The AWS services the handler calls: a worker opens clients only for those its routes use.
    aws: frozenset[AwsService] = frozenset()
    # Responses in another media type than JSON (text/plain, text/html).
    media_type: str = "application/json"
    # False: never rate limited (the probes, which load balancers and orchestrators poll).
    limited: bool = True


ROUTES: Final[tuple[Route, ...]] = (
    Route("GET", "/", greeting.greet, "Greeting in Japanese", "greeting",
          query=GreetingQuery, responses={200: Greeting}),
    Route("GET", "/health", health.health, "Liveness probe", "probes",
          responses={200: "ok"}, media_type="text/plain", limited=False),
    Route("GET", "/health/ready", health.ready, "Readiness probe", "probes",
          responses={200: Readiness, 503: "A dependency is down"}, limited=False),
    Route("GET", "/status", state.status, "Current counter and message", "state",
          responses={200: Status}),
    Route("POST", "/update", state.update, "Change the counter and/or the message", "state",
          scope="write", body=UpdateRequest,
          responses={200: UpdateResult, 409: "The increment would overflow the counter"}),
    Route("GET", "/logs", audit.logs, "Audit log of state changes, newest first", "state",
          query=PageQuery,
          responses={200: LogsPage, 503: "Postgres (older rows) is down, or the page has a hole"}),
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
    Route("GET", "/config", cloud.config_index, "Parameters under this service's SSM prefix",
          "cloud", scope="config", aws=frozenset({"ssm"}),
          responses={200: ParameterList, 503: AWS_UNAVAILABLE}),
    Route("GET", "/config/{name:.*}", cloud.config_show, "One SSM parameter with its value",
          "cloud", scope="config", aws=frozenset({"ssm"}), path_params=ParameterPath,
          responses={200: Parameter, 400: "The name is not a valid parameter name",
                     404: "No such parameter under the prefix", 503: AWS_UNAVAILABLE}),
    Route("GET", "/storage", cloud.storage, "The account's S3 buckets", "cloud",
          scope="config", aws=frozenset({"s3"}), roles=frozenset({"api"}),
          responses={200: BucketList, 503: AWS_UNAVAILABLE}),
    Route("GET", "/openapi.json", openapi.spec, "This OpenAPI document", "docs",
          responses={200: "OpenAPI 3.1 document"}),
    Route("GET", "/docs", openapi.docs, "Swagger UI", "docs",
          responses={200: "HTML page"}, media_type="text/html"),
    Route("GET", f"{openapi.STATIC_PREFIX}/{{name}}", openapi.docs_asset,
          "Swagger UI's scripts, styles and icons", "docs",
          responses={200: "The file", 404: "No such file"}, media_type="application/octet-stream"),
)  # fmt: skip


def routes_for(role: ServiceName) -> tuple[Route, ...]:
    """The routes a service role serves."""
    return tuple(route for route in ROUTES if role in route.roles)


def aws_services(routes: tuple[Route, ...]) -> frozenset[AwsService]:
    """The AWS services `routes` call."""
    return frozenset(service for route in routes for service in route.aws)


def setup_routes(app: web.Application, role: ServiceName) -> None:
    """Add the role's routes, each counted under its number in `routes_for(role)`; whatever
    none of them matches is counted under the number after the last."""
    slot, limiter = app[worker_slot], app[rate_limiter]
    routes = routes_for(role)
    for number, route in enumerate(routes):
        limit = limiter.route(route.scope) if route.limited else None
        handler = endpoint(route.handler, slot, number, route.scope, limit)
        if route.method == "GET":
            app.router.add_get(route.path, handler)  # answers HEAD too
        else:
            app.router.add_route(route.method, route.path, handler)
    # [\s\S], not `.`: a path with a newline (%0a) is a 404 of ours too.
    anything = endpoint(no_route, slot, len(routes), limit=limiter.route(None))
    app.router.add_route("*", r"/{path:[\s\S]*}", anything)
