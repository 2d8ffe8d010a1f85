"""The users registry: validated names, unique (case-insensitive) emails, dense paging."""

from __future__ import annotations

from typing import Final

import asyncpg
from aiohttp import web
from email_validator import EmailNotValidError, validate_email

from konnichiwa.coalesce import CoalescedReads
from konnichiwa.errors import FieldError, Problem, validation_problem
from konnichiwa.idempotency import idempotent
from konnichiwa.postgres import pg_pool, reading
from konnichiwa.schemas import (
    NewUser,
    PageQuery,
    User,
    UsersPage,
    convert_query,
    decode_body,
    encode,
    json_response,
    person_name,
    rfc3339,
)

INSERT_USER: Final = """
WITH slot AS (UPDATE user_count SET total = total + 1 RETURNING total)
INSERT INTO users (position, name, email) SELECT total, $1, $2 FROM slot
RETURNING id, name, email, created_at
"""
# One statement, so one snapshot: the total and the page always agree. $1 is the number of
# newer users to skip, $2 the page size; the LEFT JOIN keeps the total when the page is empty.
PAGE: Final = """
SELECT c.total, u.id, u.name, u.email, u.created_at
FROM user_count c
LEFT JOIN users u ON u.position <= c.total - $1 AND u.position > c.total - $1 - $2
ORDER BY u.position DESC
"""
SKIP_MAX: Final = 2**62  # any page past the end is empty; this keeps the offset a bigint
BY_ID: Final = "SELECT id, name, email, created_at FROM users WHERE id = $1"


def email_address(raw: str) -> str:
    """A valid address (schemas.EMAIL_SCHEMA) without the spaces around it, domain lower-cased;
    no DNS lookup at request time. Strict: a local part over 64 characters is refused."""
    try:
        return validate_email(raw.strip(" "), check_deliverability=False, strict=True).normalized
    except EmailNotValidError as exc:
        raise validation_problem([FieldError("email", str(exc))]) from None


def _user(row: asyncpg.Record) -> User:
    return User(row["id"], row["name"], row["email"], rfc3339(row["created_at"]))


async def create_user(pool: asyncpg.Pool, new: NewUser) -> User:
    """Insert a user; a 409 problem when the email is taken, whatever its letter case."""
    name, email = person_name(new.name), email_address(new.email)
    try:
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(INSERT_USER, name, email)
    except asyncpg.UniqueViolationError:
        raise Problem(
            409,
            "Conflict",
            "A user with this email address exists already.",
            type="/problems/duplicate-email",
        ) from None
    assert row is not None  # noqa: S101  (INSERT ... RETURNING returns the row)
    return _user(row)


async def list_users(pool: asyncpg.Pool, query: PageQuery) -> UsersPage:
    skip = min((query.page - 1) * query.limit, SKIP_MAX)
    async with reading(pool) as conn:
        rows = await conn.fetch(PAGE, skip, query.limit)
    total: int = rows[0]["total"]
    users = [_user(row) for row in rows if row["id"] is not None]
    return UsersPage(users, query.page, query.limit, total, query.pages(total))


async def create(request: web.Request) -> web.Response:
    """Register a user. Duplicate email (any letter case): 409."""
    new = await decode_body(request, NewUser)
    pool = request.app[pg_pool]

    async def insert() -> web.Response:
        user = await create_user(pool, new)
        return json_response(user, status=201, headers={"Location": f"/users/{user.id}"})

    return await idempotent(request, new, insert)


# Concurrent requests for one page share a query that started after they arrived, and its
# encoded answer (see coalesce.py).
user_pages = web.AppKey("user_pages", CoalescedReads[tuple[int, int], bytes])
PAGES_KEPT: Final = 256


async def index(request: web.Request) -> web.Response:
    """Users, newest first."""
    query = convert_query(request.query, PageQuery)
    return json_response(await request.app[user_pages].get((query.page, query.limit)))


def setup_users(app: web.Application) -> None:
    async def render(page: tuple[int, int]) -> bytes:
        return encode(await list_users(app[pg_pool], PageQuery(*page)))

    app[user_pages] = CoalescedReads(render, PAGES_KEPT)


async def show(request: web.Request) -> web.Response:
    """One user by id."""
    raw = request.match_info["id"]
    row = None
    if raw.isascii() and raw.isdigit() and len(raw) < 19:
        async with reading(request.app[pg_pool]) as conn:
            row = await conn.fetchrow(BY_ID, int(raw))
    if row is None:
        raise Problem(404, "Not Found", f"There is no user {raw!r}.")
    return json_response(_user(row))
