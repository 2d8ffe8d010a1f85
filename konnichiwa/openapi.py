"""OpenAPI 3.1 generated from the URL table and its msgspec structs; Swagger UI served locally."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
from aiohttp import web

from konnichiwa import __version__
from konnichiwa.errors import PROBLEM_CONTENT_TYPE, ProblemDetails
from konnichiwa.schemas import JSON_CONTENT_TYPE

if TYPE_CHECKING:
    from konnichiwa.routes import Route

openapi_document = web.AppKey("openapi_document", bytes)

STATIC_PREFIX: Final = "/docs/static"
SECURITY_SCHEMES: Final = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
    "xApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "API-Key"},
}
_PATH_PARAM: Final = re.compile(r"\{(\w+)(?::[^}]*)?\}")

DOCS_PAGE: Final = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Konnichiwa API</title>
  <link rel="stylesheet" href="{STATIC_PREFIX}/swagger-ui.css">
  <link rel="icon" type="image/png" href="{STATIC_PREFIX}/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{STATIC_PREFIX}/swagger-ui-bundle.js"></script>
  <script src="{STATIC_PREFIX}/docs.js"></script>
</body>
</html>
"""
# Only this service's own files run. Swagger UI's React sets style attributes, which a policy
# without 'unsafe-inline' for styles would refuse; its icons are data: URLs.
DOCS_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATIC_DIR: Final = Path(__file__).parent / "static"  # the page's own script


def swagger_ui_static_dir() -> Path:
    """Swagger UI 5's files as the swagger-ui-py package ships them: no CDN at run time."""
    from swagger_ui.utils import SWAGGER_UI_PY_ROOT  # noqa: PLC0415  (untyped package)

    return Path(SWAGGER_UI_PY_ROOT) / "static"


@functools.cache
def swagger_ui_files() -> dict[str, Path]:
    """Swagger UI's files and the page's own by name: only these are served, so no path can
    reach anything else."""
    return {
        path.name: path
        for directory in (swagger_ui_static_dir(), STATIC_DIR)
        for path in directory.iterdir()
        if path.is_file()
    }


def build_spec(routes: Iterable[Route], role: str) -> dict[str, Any]:
    """The OpenAPI document of one service role."""
    routes = list(routes)
    types = {t for r in routes for t in _types_of(r)} | {ProblemDetails}
    (_, components) = msgspec.json.schema_components(
        sorted(types, key=lambda t: t.__name__), ref_template="#/components/schemas/{name}"
    )
    for struct in types:  # what msgspec cannot say of a whole struct (see UpdateRequest)
        components[struct.__name__].update(getattr(struct, "extra_json_schema", {}))
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        path = _PATH_PARAM.sub(r"{\1}", route.path)
        paths.setdefault(path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"Konnichiwa ({role})",
            "version": __version__,
            "description": "Errors are application/problem+json (RFC 9457).",
        },
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": SECURITY_SCHEMES},
    }


def _types_of(route: Route) -> Iterable[type]:
    for candidate in (route.query, route.body, *route.responses.values()):
        if isinstance(candidate, type):
            yield candidate


def _ref(struct: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{struct.__name__}"}


def _operation(route: Route) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": route.summary,
        "description": (route.handler.__doc__ or route.summary).strip(),
        "operationId": _operation_id(route),
        "tags": [route.tag],
        "responses": {
            str(status): _response(answer, route.media_type, status)
            for status, answer in route.responses.items()
        },
    }
    operation["responses"]["default"] = _problem("Error (problem+json)")
    if route.path_params is not None:
        parameters = _parameters(route.path_params, "path")
    else:
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PATH_PARAM.findall(route.path)
        ]
    if route.query is not None:
        parameters += _parameters(route.query, "query")
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {JSON_CONTENT_TYPE: {"schema": _ref(route.body)}},
        }
    if route.query is not None or route.body is not None:
        operation["responses"]["422"] = _problem("Invalid input; `errors` names each field")
    if route.scope is not None:
        operation["security"] = [{scheme: [route.scope]} for scheme in SECURITY_SCHEMES]
        operation["x-required-scope"] = route.scope
        operation["responses"]["401"] = _problem("Missing or unknown API key")
        operation["responses"]["403"] = _problem(f"The key lacks the '{route.scope}' scope")
    return operation


def _operation_id(route: Route) -> str:
    name = re.sub(r"\W+", "_", _PATH_PARAM.sub(r"\1", route.path)).strip("_") or "root"
    return f"{route.method.lower()}_{name}"


def _response(answer: type | str, media_type: str, status: int) -> dict[str, Any]:
    if isinstance(answer, str):
        if status >= 400:
            return _problem(answer)
        schema = {"type": "object" if media_type == JSON_CONTENT_TYPE else "string"}
        return {"description": answer, "content": {media_type: {"schema": schema}}}
    return {"description": answer.__name__, "content": {media_type: {"schema": _ref(answer)}}}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {PROBLEM_CONTENT_TYPE: {"schema": _ref(ProblemDetails)}},
    }


def _parameters(struct: type, location: str) -> list[dict[str, Any]]:
    """The fields of `struct` as path or query parameters."""
    schema = msgspec.json.schema(struct)
    definition = schema["$defs"][struct.__name__]
    required = set(definition.get("required", []))
    return [
        {"name": name, "in": location, "required": name in required, "schema": _value(prop)}
        for name, prop in definition["properties"].items()
    ]


def _value(prop: dict[str, Any]) -> dict[str, Any]:
    """A parameter's schema: a field `X | None = None` is X, as a parameter is absent or a string,
    never null."""
    variants = [variant for variant in prop.get("anyOf", ()) if variant != {"type": "null"}]
    if len(variants) == 1 and prop.get("default", ...) is None:
        return variants[0]  # type: ignore[no-any-return]
    return prop


async def spec(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this service role, generated from the URL table."""
    return web.Response(body=request.app[openapi_document], content_type=JSON_CONTENT_TYPE)


async def docs(request: web.Request) -> web.Response:
    """Swagger UI for the OpenAPI document, served from this service (no CDN)."""
    return web.Response(
        text=DOCS_PAGE, content_type="text/html", headers={"Content-Security-Policy": DOCS_CSP}
    )


async def docs_asset(request: web.Request) -> web.FileResponse:
    """One of Swagger UI's files (with ETag, Last-Modified and ranges, as static files have)."""
    path = swagger_ui_files().get(request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound
    return web.FileResponse(path)
