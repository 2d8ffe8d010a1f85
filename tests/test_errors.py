"""Errors: problem+json for every status, request IDs, nothing about our internals leaks."""

from __future__ import annotations

import logging

import pytest
from aiohttp import ClientResponse, web
from pytest_aiohttp import AiohttpClient

from konnichiwa.app import create_app
from konnichiwa.settings import Settings
from tests.support import Client, add_route


async def _read_body(request: web.Request) -> web.Response:
    return web.Response(text=str(len(await request.read())))


async def _fail(request: web.Request) -> web.Response:
    raise RuntimeError("secret internal detail")


@pytest.fixture
async def faulty_client(aiohttp_client: AiohttpClient, settings: Settings) -> Client:
    """The real app with a route that reads its body and one that fails."""
    app = create_app(settings)
    add_route(app, "POST", "/body", _read_body)
    add_route(app, "GET", "/fail", _fail)
    return await aiohttp_client(app)


async def _problem(response: ClientResponse, status: int) -> dict[str, object]:
    assert response.status == status
    assert response.content_type == "application/problem+json"
    body: dict[str, object] = await response.json(content_type=None)
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    return body


async def test_not_found(client: Client) -> None:
    await _problem(await client.get("/no/such/thing"), 404)


async def test_method_not_allowed_lists_allowed(client: Client) -> None:
    response = await client.delete("/health")
    await _problem(response, 405)
    assert "GET" in response.headers["Allow"]


async def test_body_too_large(faulty_client: Client, settings: Settings) -> None:
    response = await faulty_client.post("/body", data=b"x" * (settings.max_body_bytes + 1))
    await _problem(response, 413)
    small = await faulty_client.post("/body", data=b"x" * 100)
    assert await small.text() == "100"


async def test_unexpected_error_is_a_500_logged_with_the_request_id(
    faulty_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        response = await faulty_client.get("/fail", headers={"X-Request-ID": "trace-42"})
    body = await _problem(response, 500)
    text = str(body)
    assert "secret internal detail" not in text
    assert "Traceback" not in text
    assert response.headers["X-Request-ID"] == "trace-42"
    logged = [r.getMessage() for r in caplog.records if r.exc_info]
    assert logged == ["unhandled error on GET /fail [trace-42]"]


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [
        ("abc-123", True),
        ("0f8fad5b-d9cb-469f-a165-70867728950e", True),
        ("bad id with spaces", False),
        ("x" * 129, False),
        ("<script>", False),
    ],
)
async def test_request_id_echoed_only_when_sane(client: Client, sent: str, echoed: bool) -> None:
    response = await client.get("/health", headers={"X-Request-ID": sent})
    request_id = response.headers["X-Request-ID"]
    assert (request_id == sent) is echoed
    assert 1 <= len(request_id) <= 128


async def test_every_response_has_a_fresh_request_id(client: Client) -> None:
    ids = {(await client.get("/health")).headers["X-Request-ID"] for _ in range(5)}
    assert len(ids) == 5


@pytest.mark.parametrize("path", ["/", "/health", "/no/such/thing", "/openapi.json"])
async def test_server_header_names_no_version(client: Client, path: str) -> None:
    response = await client.get(path)
    assert response.headers["Server"] == "konnichiwa"
    assert "aiohttp" not in str(response.headers).lower()
    assert "python" not in str(response.headers).lower()
