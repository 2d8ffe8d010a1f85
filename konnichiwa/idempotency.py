"""`Idempotency-Key` on POST: a request is applied at most once per key (and API key), and a
retry gets the first answer, marked `Idempotent-Replayed: true`; the same key with another body
is a 422.

For /update the record is written by the update script itself, in the same atomic step as the
change (state.py). /user takes a short lease on its key (SET NX) before it runs, so of concurrent
requests with one key exactly one runs; the others get 409 while it runs and its answer once it
is done; a failure releases the key for a retry.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import Final, Literal, NamedTuple

import msgspec
from aiohttp import web
from redis.asyncio import Redis

from konnichiwa.auth import api_key
from konnichiwa.errors import FieldError, Problem, validation_problem
from konnichiwa.redis_store import key_prefix, redis_client
from konnichiwa.schemas import encode
from konnichiwa.settings import settings_key

HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"
REPLAYED: Final = {REPLAYED_HEADER: "true"}
LEASE_SECONDS: Final = 60  # a request still "running" after this is presumed dead
KEEP_SECONDS: Final = 24 * 3600
DIGEST_BYTES: Final = 16  # 128 bits: no two keys or bodies of a client ever collide
_SHAPE: Final = re.compile(r"[\x21-\x7e]{1,255}")  # visible ASCII, as the IETF draft suggests
_KEPT_HEADERS: Final = ("Location",)

Operation = Literal["update", "user"]  # each has its own namespace of keys

KEY_REUSED: Final = Problem(
    422,
    "Unprocessable Content",
    "This Idempotency-Key was already used with a different request body.",
    type="/problems/idempotency-key-reused",
    errors=[FieldError(HEADER, "Already used with a different body.")],
)


class IdempotencyRecord(NamedTuple):
    """Where a request's answer is kept, and the fingerprint a retry must match."""

    key: str
    fingerprint: str  # hex digest of the request body as decoded (spelling aside)


def record_for(
    request: web.Request, body: msgspec.Struct, operation: Operation
) -> IdempotencyRecord | None:
    """The record a request's Idempotency-Key names (None without one); 422 for a bad key.

    Records belong to one API key: one client's key can never replay another client's answer.
    """
    idempotency_key = request.headers.get(HEADER)
    if idempotency_key is None:
        return None
    if not _SHAPE.fullmatch(idempotency_key):
        raise validation_problem(
            [FieldError(HEADER, "Use 1 to 255 visible ASCII characters (a UUID is a good key).")]
        )
    owner = request[api_key].digest[:DIGEST_BYTES].hex()
    name = hashlib.sha256(idempotency_key.encode()).digest()[:DIGEST_BYTES].hex()
    prefix = key_prefix(request.app[settings_key].environment)
    fingerprint = hashlib.sha256(encode(body)).digest()[:DIGEST_BYTES].hex()
    return IdempotencyRecord(f"{prefix}:once:{operation}:{owner}:{name}", fingerprint)


class Record(msgspec.Struct, array_like=True):
    """What /user keeps under a key: the request's fingerprint, then (once done) its answer."""

    fingerprint: str
    status: int = 0  # 0: still running
    content_type: str = ""
    headers: dict[str, str] = {}
    body: bytes = b""


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Record).decode


async def idempotent(
    request: web.Request, body: msgspec.Struct, operation: Callable[[], Awaitable[web.Response]]
) -> web.Response:
    """Run `operation` at most once per Idempotency-Key; `body` is the request's decoded body."""
    record = record_for(request, body, "user")
    if record is None:
        return await operation()
    redis = request.app[redis_client]
    key, fingerprint = record
    while not await redis.set(key, _encode(Record(fingerprint)), nx=True, ex=LEASE_SECONDS):
        stored = await redis.get(key)
        if stored is not None:  # else it expired just now: try to take it again
            return _answer_from(
                _decode(stored.encode() if isinstance(stored, str) else stored), fingerprint
            )
    return await _run_and_keep(redis, key, fingerprint, operation)


async def _run_and_keep(
    redis: Redis, key: str, fingerprint: str, operation: Callable[[], Awaitable[web.Response]]
) -> web.Response:
    try:
        response = await operation()
    except BaseException:
        await redis.delete(key)
        raise
    if not 200 <= response.status < 300 or not isinstance(response.body, bytes):
        await redis.delete(key)
        return response
    record = Record(
        fingerprint,
        response.status,
        response.content_type,
        {name: response.headers[name] for name in _KEPT_HEADERS if name in response.headers},
        response.body,
    )
    await redis.set(key, _encode(record), ex=KEEP_SECONDS)
    return response


def _answer_from(record: Record, fingerprint: str) -> web.Response:
    if record.fingerprint != fingerprint:
        raise KEY_REUSED
    if record.status == 0:
        raise Problem(
            409,
            "Conflict",
            "A request with this Idempotency-Key is still being processed.",
            type="/problems/idempotency-key-in-use",
            headers={"Retry-After": "1"},
        )
    return web.Response(
        status=record.status,
        body=record.body,
        content_type=record.content_type,
        headers={**record.headers, **REPLAYED},
    )
