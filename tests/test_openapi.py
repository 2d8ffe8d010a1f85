"""OpenAPI: generated from the URL table, valid 3.1, complete both ways; Swagger UI renders it."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import jsonschema_rs
import pytest
from aiohttp import web
from openapi_schema_validator import oas31_format_checker
from openapi_spec_validator import validate
from pytest_aiohttp import AiohttpClient

from konnichiwa.app import create_app
from konnichiwa.routes import routes_for
from konnichiwa.settings import ServiceName, Settings
from tests.support import Client

ROLES: list[ServiceName] = ["api", "aux"]


def _served_operations(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, less HEAD twins and the catch-all."""
    operations = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method not in ("HEAD", "*") and path is not None:
            operations.add((route.method.lower(), re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)))
    return operations


def _ecma_regex(pattern: object) -> bool:
    """JSON Schema's patterns are ECMA-262 (\\p{L} and all), which Python's re, the spec
    validator's own check, cannot read: judge them with jsonschema-rs, as schemathesis does."""
    try:
        jsonschema_rs.validator_for({"pattern": pattern})
    except jsonschema_rs.ValidationError:
        return False
    return True


@pytest.mark.parametrize("role", ROLES)
async def test_spec_lists_exactly_what_is_served(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    role: ServiceName,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = await aiohttp_client(create_app(settings.replace(service_name=role)))
    spec = await (await client.get("/openapi.json")).json()
    documented = {(method, path) for path, item in spec["paths"].items() for method in item}
    assert documented == _served_operations(client.app)
    assert len(documented) == len(routes_for(role))
    monkeypatch.setitem(oas31_format_checker.checkers, "regex", (_ecma_regex, ()))
    validate(spec)


def test_ecma_regex_check_refuses_a_broken_pattern() -> None:
    assert (_ecma_regex(r"^\p{L}+$"), _ecma_regex("[")) == (True, False)


async def test_spec_states_the_validators_constraints(client: Client) -> None:
    spec = await (await client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    update = schemas["UpdateRequest"]
    assert update["minProperties"] == 1
    assert update["not"] == {"required": ["counter", "increment"]}
    assert update["properties"]["message"]["pattern"] == r"^[^\u0000]*$"
    name = schemas["NewUser"]["properties"]["name"]
    (greeting_name,) = spec["paths"]["/"]["get"]["parameters"]
    assert greeting_name["schema"] == name  # a string, never null: absent is the default
    assert (name["maxLength"], name["pattern"][:4]) == (100, "^ *\\")
    email = schemas["NewUser"]["properties"]["email"]
    assert email["allOf"] == [{"pattern": "^ *[^@]{1,64}@"}]
    (config_name,) = spec["paths"]["/config/{name}"]["get"]["parameters"]
    assert config_name["schema"]["pattern"].startswith("^/?")


async def test_spec_describes_security_and_errors(client: Client) -> None:
    spec = await (await client.get("/openapi.json")).json()
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "xApiKey", "apiKey"}
    assert spec["openapi"].startswith("3.1")
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            assert "default" in operation["responses"], (method, path)
            scope = operation.get("x-required-scope")
            if scope is not None:
                assert all(list(req.values()) == [[scope]] for req in operation["security"])
                assert {"401", "403"} <= operation["responses"].keys()


async def test_greeting_query_is_documented(client: Client) -> None:
    spec = await (await client.get("/openapi.json")).json()
    parameters = spec["paths"]["/"]["get"]["parameters"]
    assert [p["name"] for p in parameters] == ["name"]
    assert "422" in spec["paths"]["/"]["get"]["responses"]


async def test_docs_page_and_assets_are_served_locally(client: Client) -> None:
    page = await client.get("/docs")
    assert page.status == 200
    html = await page.text()
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy  # no inline script may run: the page has none
    assert re.findall(r"<script(?![^>]*\bsrc=)", html) == []
    assert "swagger-ui-bundle.js" in html
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', html), "an asset from another host"
    for asset in re.findall(r'(?:src|href)="(/docs/static/[^"]+)"', html):
        response = await client.get(asset)
        assert response.status == 200, asset


@pytest.mark.slow
async def test_swagger_ui_lists_the_operations(
    client: Client, chromium: str, tmp_path: Path
) -> None:
    process = await asyncio.create_subprocess_exec(
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path}",
        "--virtual-time-budget=15000",
        "--enable-logging=stderr",  # the page's console, where the browser reports what CSP blocks
        "--dump-dom",
        str(client.make_url("/docs")),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    dom, console = await asyncio.wait_for(process.communicate(), timeout=90)
    assert "Content Security Policy" not in console.decode(errors="replace")
    rendered = dom.decode()
    paths = set(re.findall(r'data-path="([^"]+)"', rendered))
    assert {"/", "/health", "/health/ready", "/openapi.json", "/docs"} <= paths
    assert "Konnichiwa (api)" in rendered
