"""The users registry: validated names, unique (case-insensitive) emails, dense paging."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Final, NamedTuple

import asyncpg
from aiohttp import web
from email_validator import EmailNotValidError, validate_email

from konnichiwa.background import running
from konnichiwa.coalesce import CoalescedReads
from konnichiwa.errors import DEPENDENCY_ERRORS, FieldError, Problem, validation_problem
from konnichiwa.idempotency import (
    KEEP_SECONDS,
    KEY_REUSED,
    REPLAYED,
    IdempotencyRecord,
    outcome_unknown,
    record_for,
)
from konnichiwa.postgres import bounded_connection, pg_pool
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

log = logging.getLogger("konnichiwa.users")

# The position and the creation time are both taken holding user_count's row lock, so users read
# in time order by position (now() is when the transaction began: a registration that began
# first may take its position second).
INSERT_USER: Final = """
WITH slot AS (UPDATE user_count SET total = total + 1 RETURNING total, clock_timestamp() AS at)
INSERT INTO users (position, name, email, created_at) SELECT total, $1, $2, at FROM slot
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
# Take an Idempotency-Key (or one kept longer than $3 seconds): true if taken. A request holding
# the same key in an open transaction makes this wait until it ends.
CLAIM_KEY: Final = """
INSERT INTO idempotency_records AS r (key, fingerprint) VALUES ($1, $2)
ON CONFLICT (key) DO UPDATE
    SET fingerprint = EXCLUDED.fingerprint, body = '', location = '', created_at = now()
    WHERE r.created_at < now() - make_interval(secs => $3)
RETURNING true
"""
KEPT_ANSWER: Final = "SELECT fingerprint, body, location FROM idempotency_records WHERE key = $1"
KEEP_ANSWER: Final = "UPDATE idempotency_records SET body = $2, location = $3 WHERE key = $1"
FORGET_EXPIRED: Final = """
DELETE FROM idempotency_records WHERE key IN (
    SELECT key FROM idempotency_records
    WHERE created_at < now() - make_interval(secs => $1) LIMIT 10000)
"""
FORGET_EVERY: Final = 60.0
# A registration from asking for a connection to the commit: a stalled Postgres is a 503 soon.
WRITE_TIMEOUT: Final = 2.0


def email_address(raw: str) -> str:
    """A valid address (schemas.EMAIL_SCHEMA) without the spaces around it, domain lower-cased;
    no DNS lookup at request time. Strict: a local part over 64 characters is refused."""
    try:
        return validate_email(raw.strip(" "), check_deliverability=False, strict=True).normalized
    except EmailNotValidError as exc:
        raise validation_problem([FieldError("email", str(exc))]) from None


def _user(row: asyncpg.Record) -> User:
    return User(row["id"], row["name"], row["email"], rfc3339(row["created_at"]))


class Created(NamedTuple):
    """A new user's answer: its JSON and URL; `replayed` when it is a retry's first answer."""

    body: bytes
    location: str
    replayed: bool = False


async def create_user(
    pool: asyncpg.Pool, new: NewUser, record: IdempotencyRecord | None = None
) -> Created:
    """Insert a user; a 409 problem when the email is taken, whatever its letter case.

    With an Idempotency-Key's `record`, the answer is kept in the same transaction as the user,
    and a request whose key was used before gets the first answer (or a 422 for another body).
    """
    name, email = person_name(new.name), email_address(new.email)
    committing = False
    try:
        async with bounded_connection(pool, WRITE_TIMEOUT) as conn, conn.transaction():
            if record is not None and not await conn.fetchval(
                CLAIM_KEY, record.key, record.fingerprint, KEEP_SECONDS
            ):
                kept = await conn.fetchrow(KEPT_ANSWER, record.key)
                assert kept is not None  # noqa: S101  (the claim found it, locked)
                if kept["fingerprint"] != record.fingerprint:
                    raise KEY_REUSED
                return Created(kept["body"], kept["location"], replayed=True)
            row = await conn.fetchrow(INSERT_USER, name, email)
            assert row is not None  # noqa: S101  (INSERT ... RETURNING returns the row)
            user = _user(row)
            created = Created(encode(user), f"/users/{user.id}")
            if record is not None:
                await conn.execute(KEEP_ANSWER, record.key, created.body, created.location)
            committing = True  # leaving the block commits
    except DEPENDENCY_ERRORS as exc:
        if committing:  # Postgres may have committed without saying so
            raise outcome_unknown("Postgres", "the new user", record is not None) from exc
        raise  # rolled back: a plain 503
    except asyncpg.UniqueViolationError:
        raise Problem(
            409,
            "Conflict",
            "A user with this email address exists already.",
            type="/problems/duplicate-email",
        ) from None
    return created


async def list_users(pool: asyncpg.Pool, query: PageQuery) -> UsersPage:
    skip = min((query.page - 1) * query.limit, SKIP_MAX)
    async with bounded_connection(pool) as conn:
        rows = await conn.fetch(PAGE, skip, query.limit)
    total: int = rows[0]["total"]
    users = [_user(row) for row in rows if row["id"] is not None]
    return UsersPage(users, query.page, query.limit, total, query.pages(total))


async def create(request: web.Request) -> web.Response:
    """Register a user. Duplicate email (any letter case): 409."""
    new = await decode_body(request, NewUser)
    record = record_for(request, new, "user")
    created = await create_user(request.app[pg_pool], new, record)
    headers = {"Location": created.location, **(REPLAYED if created.replayed else {})}
    return json_response(created.body, status=201, headers=headers)


# Concurrent requests for one page share a query that started after they arrived, and its
# encoded answer (see coalesce.py).
user_pages = web.AppKey("user_pages", CoalescedReads[tuple[int, int], bytes])
PAGES_KEPT: Final = 256


async def index(request: web.Request) -> web.Response:
    """Users, newest first."""
    query = convert_query(request.query, PageQuery)
    return json_response(await request.app[user_pages].get((query.page, query.limit)))


async def forget_expired_answers(pool: asyncpg.Pool) -> None:
    """Delete kept answers older than KEEP_SECONDS, a bounded batch a minute, for ever."""
    while True:
        await asyncio.sleep(FORGET_EVERY)
        try:
            await pool.execute(FORGET_EXPIRED, KEEP_SECONDS)
        except DEPENDENCY_ERRORS as exc:  # Postgres is down: next time
            log.info("expired Idempotency-Key answers not deleted: %r", exc)


async def users_ctx(app: web.Application) -> AsyncIterator[None]:
    """Keep the kept answers of POST /user within their time while the worker serves."""
    async with running(forget_expired_answers(app[pg_pool]), "forget-expired-answers"):
        yield


def setup_users(app: web.Application) -> None:
    async def render(page: tuple[int, int]) -> bytes:
        return encode(await list_users(app[pg_pool], PageQuery(*page)))

    app[user_pages] = CoalescedReads(render, PAGES_KEPT)


async def show(request: web.Request) -> web.Response:
    """One user by id."""
    raw = request.match_info["id"]
    row = None
    if raw.isascii() and raw.isdigit() and len(raw) < 19:
        async with bounded_connection(request.app[pg_pool]) as conn:
            row = await conn.fetchrow(BY_ID, int(raw))
    if row is None:
        raise Problem(404, "Not Found", f"There is no user {raw!r}.")
    return json_response(_user(row))
