"""The application factory: settings in, a ready-to-run aiohttp application out."""

from __future__ import annotations

import msgspec
from aiohttp import web, web_response

from konnichiwa.audit import audit_writer_ctx
from konnichiwa.auth import KeyRing, keyring
from konnichiwa.errors import problem_middleware
from konnichiwa.openapi import build_spec, openapi_document
from konnichiwa.postgres import pg_ctx
from konnichiwa.redis_store import redis_ctx
from konnichiwa.routes import routes_for, setup_routes
from konnichiwa.settings import Settings, settings_key
from konnichiwa.state import setup_state

# aiohttp names itself and its version in every Server header, including the ones it writes for
# requests it cannot parse; one neutral name everywhere says nothing an attacker can use.
setattr(web_response, "SERVER_SOFTWARE", "konnichiwa")  # noqa: B010


def create_app(settings: Settings) -> web.Application:
    """Assemble the application for `settings`; resources open when it starts."""
    app = web.Application(middlewares=[problem_middleware], client_max_size=settings.max_body_bytes)
    app[settings_key] = settings
    app[keyring] = KeyRing(settings.api_keys)
    app[openapi_document] = msgspec.json.encode(
        build_spec(routes_for(settings.service_name), settings.service_name)
    )
    setup_state(app)
    app.cleanup_ctx.extend([redis_ctx, pg_ctx, audit_writer_ctx])
    setup_routes(app, settings.service_name)
    return app
