"""`Idempotency-Key` for POST requests: the first success is kept 24 h per API key and replayed.

A request takes a short lease on its key (SET NX) before it runs, so of concurrent requests with
one key exactly one runs; the others get 409 while it runs and its answer once it is done. The
same key with another body is a client error (422). Failures release the key for a retry.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import Final

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
LEASE_SECONDS: Final = 60  # a request still "running" after this is presumed dead
KEEP_SECONDS: Final = 24 * 3600
_SHAPE: Final = re.compile(r"[\x21-\x7e]{1,255}")  # visible ASCII, as the IETF draft suggests
_KEPT_HEADERS: Final = ("Location",)


class Record(msgspec.Struct, array_like=True):
    """What is stored under a key: the request's fingerprint, then (once done) its answer."""

    fingerprint: bytes
    status: int = 0  # 0: still running
    content_type: str = ""
    headers: dict[str, str] = {}
    body: bytes = b""


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Record).decode


def storage_key(request: web.Request, idempotency_key: str) -> str:
    """Keys are per API key: one client's key can never replay another client's answer."""
    owner = request[api_key].digest.hex()
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
    return f"{key_prefix(request.app[settings_key].environment)}:idem:{owner}:{digest}"


async def idempotent(
    request: web.Request, body: msgspec.Struct, operation: Callable[[], Awaitable[web.Response]]
) -> web.Response:
    """Run `operation` at most once per Idempotency-Key; `body` is the request's decoded body."""
    idempotency_key = request.headers.get(HEADER)
    if idempotency_key is None:
        return await operation()
    if not _SHAPE.fullmatch(idempotency_key):
        raise validation_problem(
            [FieldError(HEADER, "Use 1 to 255 visible ASCII characters (a UUID is a good key).")]
        )
    redis = request.app[redis_client]
    key = storage_key(request, idempotency_key)
    payload = f"{request.method} {request.path} ".encode() + encode(body)
    fingerprint = hashlib.sha256(payload).digest()
    while not await redis.set(key, _encode(Record(fingerprint)), nx=True, ex=LEASE_SECONDS):
        stored = await redis.get(key)
        if stored is not None:  # else it expired just now: try to take it again
            return _answer_from(
                _decode(stored.encode() if isinstance(stored, str) else stored), fingerprint
            )
    return await _run_and_keep(redis, key, fingerprint, operation)


async def _run_and_keep(
    redis: Redis, key: str, fingerprint: bytes, operation: Callable[[], Awaitable[web.Response]]
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


def _answer_from(record: Record, fingerprint: bytes) -> web.Response:
    if record.fingerprint != fingerprint:
        raise Problem(
            422,
            "Unprocessable Content",
            "This Idempotency-Key was already used with a different request body.",
            type="/problems/idempotency-key-reused",
            errors=[FieldError(HEADER, "Already used with a different body.")],
        )
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
        headers={**record.headers, REPLAYED_HEADER: "true"},
    )
