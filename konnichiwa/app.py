"""The application factory: settings in, a ready-to-run aiohttp application out."""

from __future__ import annotations

import msgspec
from aiohttp import web, web_response

from konnichiwa.audit import audit_writer_ctx
from konnichiwa.auth import KeyRing, keyring
from konnichiwa.aws import AwsService, aws_ctx
from konnichiwa.capacity import capacity_ctx
from konnichiwa.cloud import setup_cloud
from konnichiwa.health import setup_health
from konnichiwa.key_refresh import api_key_refresh_ctx
from konnichiwa.metrics import route_labels
from konnichiwa.openapi import build_spec, openapi_document
from konnichiwa.postgres import pg_ctx
from konnichiwa.ratelimit import setup_rate_limits
from konnichiwa.redis_store import redis_ctx
from konnichiwa.routes import aws_services, routes_for, setup_routes
from konnichiwa.scoreboard import Scoreboard, scoreboard, worker_slot
from konnichiwa.settings import Settings, settings_key
from konnichiwa.state import setup_state
from konnichiwa.users import setup_users, users_ctx

# aiohttp names itself and its version in every Server header, including the ones it writes for
# requests it cannot parse; one neutral name everywhere says nothing an attacker can use.
setattr(web_response, "SERVER_SOFTWARE", "konnichiwa")  # noqa: B010


def counted_routes(settings: Settings) -> int:
    """How many routes the scoreboard counts: the role's own, and one for everything else."""
    return len(routes_for(settings.service_name)) + 1


def create_app(
    settings: Settings, board: Scoreboard | None = None, slot: int = 0
) -> web.Application:
    """Assemble the application for `settings`; resources open when it starts.

    `board` is the supervisor's scoreboard shared by every worker and `slot` this worker's place
    in it; without one the application counts its traffic on a private board of its own.
    """
    routes = routes_for(settings.service_name)
    board = board or Scoreboard.private(counted_routes(settings))
    counter = board.slot(slot)
    counter.claim()
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[settings_key] = settings
    app[scoreboard] = board
    app[worker_slot] = counter
    app[route_labels] = (*((r.method, r.path) for r in routes), ("", "other"))
    app[keyring] = KeyRing(settings.api_keys)
    app[openapi_document] = msgspec.json.encode(build_spec(routes, settings.service_name))
    setup_health(app)
    setup_state(app)
    setup_users(app)
    setup_cloud(app)
    setup_rate_limits(app)
    services: set[AwsService] = set(aws_services(routes))
    if settings.api_key_secret_id is not None:
        services.add("secretsmanager")
    app.cleanup_ctx.extend(
        [redis_ctx, pg_ctx, users_ctx, audit_writer_ctx, capacity_ctx, aws_ctx(services)]
    )
    if settings.api_key_secret_id is not None:
        app.cleanup_ctx.append(api_key_refresh_ctx)
    setup_routes(app, settings.service_name)
    return app
