"""Users: strict names in any script, normalised unique emails, paging, the 20-way race."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg
import pytest

from konnichiwa.schemas import PageQuery
from konnichiwa.testing import grow_users
from konnichiwa.users import PAGE, list_users
from tests.support import FULL_AUTH, READ_AUTH, Client

VALID = [
    ("Taro", "taro@example.jp", "Taro", "taro@example.jp"),
    ("  José  ", "jose@example.com", "José", "jose@example.com"),
    ("山田 太郎", "yamada@example.jp", "山田 太郎", "yamada@example.jp"),
    ("Ольга Петрова", "olga@example.ru", "Ольга Петрова", "olga@example.ru"),
    ("محمد", "m@example.eg", "محمد", "m@example.eg"),
    ("देवनागरी", "d@example.in", "देवनागरी", "d@example.in"),
    ("Anne Marie", "Anne.Marie@EXAMPLE.COM", "Anne Marie", "Anne.Marie@example.com"),
    ("Kim", "kim+tag@sub.example.co.kr", "Kim", "kim+tag@sub.example.co.kr"),
    ("Ana", " ana@example.com ", "Ana", "ana@example.com"),
    ("Yuki", "yuki@例え.jp", "Yuki", "yuki@例え.jp"),
    ("x" * 100, "long@example.com", "x" * 100, "long@example.com"),
    ("Jose\u0301", "x" * 64 + "@example.com", "José", "x" * 64 + "@example.com"),  # NFC
    # U+0958 is two code points in NFC: the name stays as sent rather than pass 100.
    ("\u0958" * 100, "qa@example.in", "\u0958" * 100, "qa@example.in"),
]

INVALID = [
    ({"name": "R2D2", "email": "r2@example.com"}, "name"),
    ({"name": "Taro!", "email": "t@example.com"}, "name"),
    ({"name": "<b>Taro</b>", "email": "t@example.com"}, "name"),
    ({"name": "Anne  Marie", "email": "t@example.com"}, "name"),
    ({"name": "Tab\tName", "email": "t@example.com"}, "name"),
    ({"name": "Null\u0000Byte", "email": "t@example.com"}, "name"),
    ({"name": "", "email": "t@example.com"}, "name"),
    ({"name": "   ", "email": "t@example.com"}, "name"),
    ({"name": "x" * 101, "email": "t@example.com"}, "name"),
    ({"name": "Taro", "email": "not-an-email"}, "email"),
    ({"name": "Taro", "email": "a@b"}, "email"),
    ({"name": "Taro", "email": "a..b@example.com"}, "email"),
    ({"name": "Taro", "email": "taro@localhost"}, "email"),
    ({"name": "Taro", "email": "taro@exa mple.com"}, "email"),
    ({"name": "Taro", "email": "x" * 245 + "@example.com"}, "email"),
    ({"name": "Taro", "email": "x" * 65 + "@example.com"}, "email"),  # RFC 5321: 64 at most
    ({"name": "Taro", "email": "t@example.test"}, "email"),  # special-use (RFC 6761)
    ({"name": "\u0301Taro", "email": "t@example.com"}, "name"),  # a mark needs a letter first
    ({"name": "\tTaro", "email": "t@example.com"}, "name"),  # only spaces around are dropped
    ({"name": "Taro²", "email": "t@example.com"}, "name"),
    ({"name": " " + "x" * 100, "email": "t@example.com"}, "name"),  # 101 as sent
    ({"name": "Taro", "email": ""}, "email"),
    ({"name": "Taro"}, "email"),
    ({"email": "t@example.com"}, "name"),
    ({"name": "Taro", "email": "t@example.com", "id": 7}, "id"),
    ({"name": "Taro", "email": "t@example.com", "is_admin": True}, "is_admin"),
    ({"name": 5, "email": "t@example.com"}, "name"),
    ([], "body"),
]


async def _create(
    client: Client, body: object, path: str = "/user"
) -> tuple[int, dict[str, object], str]:
    response = await client.post(path, json=body, headers=FULL_AUTH)
    return (
        response.status,
        await response.json(content_type=None),
        response.headers.get("Location", ""),
    )


@pytest.mark.parametrize(("name", "email", "stored_name", "stored_email"), VALID)
async def test_valid_users(
    client: Client, name: str, email: str, stored_name: str, stored_email: str
) -> None:
    status, user, location = await _create(client, {"name": name, "email": email})
    assert status == 201
    assert (user["name"], user["email"]) == (stored_name, stored_email)
    assert location == f"/users/{user['id']}"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", str(user["created_at"]))
    fetched = await client.get(location, headers=READ_AUTH)
    assert fetched.status == 200
    assert await fetched.json() == user


@pytest.mark.parametrize(("body", "field"), INVALID)
async def test_invalid_users_are_refused(client: Client, body: object, field: str) -> None:
    status, problem, _ = await _create(client, body)
    assert status == 422
    assert [e["field"] for e in problem["errors"]] == [field]  # type: ignore[attr-defined]
    listing = await (await client.get("/users", headers=READ_AUTH)).json()
    assert listing["total"] == 0


@pytest.mark.parametrize("path", ["/user", "/users"])
@pytest.mark.parametrize("second", ["taro@example.jp", "TARO@EXAMPLE.JP", "Taro@Example.jp"])
async def test_duplicate_email_is_a_409(client: Client, path: str, second: str) -> None:
    assert (await _create(client, {"name": "Taro", "email": "taro@example.jp"}, path))[0] == 201
    status, problem, _ = await _create(client, {"name": "Other", "email": second}, path)
    assert status == 409
    assert problem["type"] == "/problems/duplicate-email"


async def test_twenty_clients_race_for_one_email(client: Client) -> None:
    body = {"name": "Racer", "email": "race@example.com"}
    results = await asyncio.gather(*(_create(client, body) for _ in range(20)))
    assert sorted(status for status, _, _ in results) == [201] + [409] * 19
    listing = await (await client.get("/users", headers=READ_AUTH)).json()
    assert listing["total"] == 1


@pytest.mark.parametrize(
    ("page", "limit", "names", "total_pages"),
    [
        (1, 10, ["Ten", "Nine", "Eight", "Seven", "Six", "Five", "Four", "Three", "Two", "One"], 1),
        (1, 3, ["Ten", "Nine", "Eight"], 4),
        (4, 3, ["One"], 4),
        (5, 3, [], 4),
        (2, 5, ["Five", "Four", "Three", "Two", "One"], 2),
        (10**30, 100, [], 1),
    ],
)
async def test_paging(
    client: Client, page: int, limit: int, names: list[str], total_pages: int
) -> None:
    numbers = ["One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten"]
    for number in numbers:
        await _create(client, {"name": number, "email": f"{number.lower()}@example.com"})
    await _create(client, {"name": "Dup", "email": "one@example.com"})  # refused: no gap
    response = await client.get(
        "/users", params={"page": str(page), "limit": str(limit)}, headers=READ_AUTH
    )
    body = await response.json()
    assert [u["name"] for u in body["users"]] == names
    assert (body["page"], body["limit"], body["total"], body["total_pages"]) == (
        page,
        limit,
        10,
        total_pages,
    )


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"page": "0"}, "page"),
        ({"limit": "101"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"sort": "name"}, "sort"),
        ([("limit", "10"), ("limit", "20")], "limit"),
        ([("page", "1"), ("limit", "5"), ("page", "1")], "page"),  # even with the same value
    ],
)
async def test_bad_paging(
    client: Client, params: dict[str, str] | list[tuple[str, str]], field: str
) -> None:
    response = await client.get("/users", params=params, headers=READ_AUTH)
    assert response.status == 422
    assert [error["field"] for error in (await response.json())["errors"]] == [field]


async def test_duplicate_keys_are_refused(client: Client) -> None:
    data = b'{"name": "Taro", "email": "a@example.com", "email": "b@example.com"}'
    response = await client.post(
        "/user", data=data, headers={**FULL_AUTH, "Content-Type": "application/json"}
    )
    assert response.status == 422
    assert [error["field"] for error in (await response.json())["errors"]] == ["email"]


@pytest.mark.parametrize("user_id", ["999", "abc", "-1", "99999999999999999999999"])
async def test_unknown_user_is_a_404(client: Client, user_id: str) -> None:
    response = await client.get(f"/users/{user_id}", headers=READ_AUTH)
    assert response.status == 404
    assert response.content_type == "application/problem+json"


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/users", {}, 401),
        ("GET", "/users/1", {}, 401),
        ("POST", "/user", {}, 401),
        ("POST", "/user", READ_AUTH, 403),
        ("POST", "/users", READ_AUTH, 403),
    ],
)
async def test_users_need_keys(
    client: Client, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    response = await client.request(
        method, path, json={"name": "Taro", "email": "t@example.com"}, headers=headers
    )
    assert response.status == status


async def test_idempotent_creation(client: Client) -> None:
    headers = {**FULL_AUTH, "Idempotency-Key": "user-1"}
    body = {"name": "Taro", "email": "taro@example.jp"}
    first = await client.post("/user", json=body, headers=headers)
    second = await client.post("/user", json=body, headers=headers)
    assert (first.status, second.status) == (201, 201)
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.headers["Location"] == first.headers["Location"]
    assert await second.json() == await first.json()
    other = await client.post("/user", json={**body, "name": "Jiro"}, headers=headers)
    assert other.status == 422


async def test_users_created_at_once_read_in_time_order(client: Client) -> None:
    """Each registration's time is taken with its position, not when its transaction began."""
    await asyncio.gather(
        *(_create(client, {"name": "Sato", "email": f"sato{n}@example.jp"}) for n in range(40))
    )
    response = await client.get("/users", params={"limit": "40"}, headers=READ_AUTH)
    users = (await response.json())["users"]
    ids = [user["id"] for user in users]
    times = [datetime.fromisoformat(user["created_at"]) for user in users]
    assert len(users) == 40
    assert ids == sorted(ids, reverse=True)
    assert times == sorted(times, reverse=True)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """One connection: its prepared statements are the ones pg_prepared_statements lists."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    yield pool
    await pool.close()


@pytest.mark.slow
async def test_pages_of_a_million_users_keep_one_plan(pool: asyncpg.Pool) -> None:
    """Uncached pages anywhere among many users: Postgres plans the page statement once, not
    afresh for each call's page and limit."""
    async with pool.acquire() as conn:
        await grow_users(conn, 1_000_000)
    reads = [PageQuery(page=900_000 // n, limit=n) for n in range(1, 101, 5)]  # the oldest
    for query in reads:
        listing = await list_users(pool, query)
        newest = 1_000_000 - (query.page - 1) * query.limit
        assert [user.email for user in listing.users] == [
            f"seed-{position}@example.jp" for position in range(newest, newest - query.limit, -1)
        ]
    plans = await pool.fetchrow(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1",
        PAGE,
    )
    assert plans is not None
    # The first five calls are planned for their own values; the generic plan is kept after.
    assert (plans["custom_plans"], plans["generic_plans"]) == (5, len(reads) - 5)
