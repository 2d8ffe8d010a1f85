"""API keys: three headers, never the query string, one 401 for every failure, 403 for scope."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from konnichiwa.app import create_app
from konnichiwa.auth import (
    SCOPES,
    UNAUTHORIZED,
    ApiKey,
    KeyRing,
    keyring,
    new_api_key,
    parse_api_keys,
)
from konnichiwa.routes import ROUTES
from konnichiwa.settings import Settings
from tests.support import FULL_KEY, READ_KEY, Client, add_route


async def _guarded(request: web.Request) -> web.Response:
    return web.Response(text="inside")


@pytest.fixture
async def guarded_client(aiohttp_client: AiohttpClient, settings: Settings) -> Client:
    """The real app plus one route behind the `write` scope, to exercise the mechanism alone."""
    app = create_app(settings)
    add_route(app, "POST", "/guarded", _guarded, "write")
    return await aiohttp_client(app)


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {FULL_KEY}"},
        {"Authorization": f"bearer {FULL_KEY}"},
        {"X-API-Key": FULL_KEY},
        {"API-Key": FULL_KEY},
    ],
)
async def test_accepted_headers(guarded_client: Client, headers: dict[str, str]) -> None:
    response = await guarded_client.post("/guarded", headers=headers)
    assert response.status == 200
    assert await response.text() == "inside"


Headers = list[tuple[str, str]]


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ([], {}),
        ([("Authorization", "Bearer wrong-key-0123456789")], {}),
        ([("Authorization", f"Basic {FULL_KEY}")], {}),
        ([("Authorization", "Bearer ")], {}),
        ([("X-API-Key", FULL_KEY[:-1])], {}),
        ([("API-Key", "")], {}),
        ([], {"api_key": FULL_KEY}),
        ([], {"apikey": FULL_KEY}),
        # Conflicting credentials: a valid key beside anything else is ambiguous.
        ([("X-API-Key", FULL_KEY), ("API-Key", "wrong-key-0123456789")], {}),
        ([("X-API-Key", FULL_KEY), ("Authorization", "Basic dXNlcjpwYXNz")], {}),
        ([("Authorization", f"Bearer {FULL_KEY}"), ("X-API-Key", READ_KEY)], {}),
        ([("X-API-Key", FULL_KEY), ("X-API-Key", READ_KEY)], {}),
        ([("API-Key", FULL_KEY), ("API-Key", "")], {}),
        ([("Authorization", f"Bearer {FULL_KEY}"), ("Authorization", f"Bearer {READ_KEY}")], {}),
    ],
)
async def test_every_failure_gets_the_same_401(
    guarded_client: Client, headers: Headers, params: dict[str, str]
) -> None:
    reference = await guarded_client.post("/guarded")
    response = await guarded_client.post("/guarded", headers=headers, params=params)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.content_type == "application/problem+json"
    assert await response.read() == await reference.read()


@pytest.mark.parametrize(
    "headers",
    [
        [("X-API-Key", FULL_KEY), ("X-API-Key", FULL_KEY)],
        [("Authorization", f"Bearer {FULL_KEY}"), ("X-API-Key", FULL_KEY), ("API-Key", FULL_KEY)],
    ],
)
async def test_the_same_key_twice_is_not_a_conflict(
    guarded_client: Client, headers: Headers
) -> None:
    response = await guarded_client.post("/guarded", headers=headers)
    assert response.status == 200


async def _raw_post(client: Client, header: bytes) -> tuple[bytes, bytes]:
    """(status line, body) of a POST /guarded carrying one header line exactly as given: bytes
    no HTTP client library would send."""
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(
        b"POST /guarded HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n"
        + header
        + b"\r\n\r\n"
    )
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


@pytest.mark.parametrize("name", [b"Authorization: Bearer ", b"X-API-Key: ", b"API-Key: "])
@pytest.mark.parametrize(
    "value",
    [
        b"\xff",
        FULL_KEY.encode() + b"\xff",
        b"\xed\xa0\x80" + FULL_KEY.encode(),  # UTF-8 of a surrogate: never valid text
        b"\xc3\xa9" * 20,  # valid UTF-8, not a key
        bytes(range(0x80, 0x100)),
    ],  # (control bytes never get this far: the HTTP parser refuses them with a 400)
)
async def test_any_byte_in_a_key_header_is_a_401(
    guarded_client: Client, name: bytes, value: bytes
) -> None:
    reference = await guarded_client.post("/guarded")
    status_line, body = await _raw_post(guarded_client, name + value)
    assert status_line == b"HTTP/1.1 401 Unauthorized"
    assert body == await reference.read()


async def test_key_without_the_scope_gets_403(guarded_client: Client) -> None:
    response = await guarded_client.post("/guarded", headers={"X-API-Key": READ_KEY})
    assert response.status == 403
    body = await response.json()
    assert "'write'" in body["detail"]


async def test_rotated_keys_take_effect(guarded_client: Client) -> None:
    guarded_client.app[keyring].replace([ApiKey("the-next-key-0123456789", SCOPES)])
    old = await guarded_client.post("/guarded", headers={"X-API-Key": FULL_KEY})
    new = await guarded_client.post("/guarded", headers={"X-API-Key": "the-next-key-0123456789"})
    assert (old.status, new.status) == (401, 200)


def test_keyring_lookup() -> None:
    ring = KeyRing(parse_api_keys("first-key-0123456789:read,second-key-0123456789", "API_KEYS"))
    found = ring.lookup("first-key-0123456789")
    assert found is not None
    assert found.scopes == {"read"}
    assert ring.lookup("first-key-012345678") is None
    assert ring.lookup("") is None


def test_new_keys_are_unique_and_never_look_like_an_option() -> None:
    keys = [new_api_key() for _ in range(2000)]  # a base64url key starts with "-" 1 time in 64
    assert len(set(keys)) == len(keys)
    assert [key for key in keys if key.startswith("-")] == []
    ring = KeyRing(parse_api_keys(",".join(keys), "API_KEYS"))
    assert all(ring.lookup(key) is not None for key in keys)


def test_protected_routes_name_a_known_scope() -> None:
    for route in ROUTES:
        assert route.scope is None or route.scope in SCOPES


async def test_refusals_keep_no_request_alive(guarded_client: Client) -> None:
    """The one 401 is a shared constant: raising it must not pile up the frames of every
    request refused (a leak of their memory)."""
    wrong = {"X-API-Key": "x" * 20}
    for _ in range(10):
        assert (await guarded_client.post("/guarded", headers=wrong)).status == 401
    assert UNAUTHORIZED.__traceback__ is None
