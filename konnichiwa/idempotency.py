"""`Idempotency-Key` on POST: a request is applied at most once per key (and API key), and a
retry gets the first answer, marked `Idempotent-Replayed: true`; the same key with another body
is a 422.

The answer is recorded in the same atomic step as the change, so no crash or stall can part
them: for /update by the update script itself (state.py), for /user in the transaction that
inserts the user (users.py). A failure records nothing: a retry runs again.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final, Literal, NamedTuple

import msgspec
from aiohttp import web

from konnichiwa.auth import api_key
from konnichiwa.errors import FieldError, Problem, validation_problem
from konnichiwa.redis_store import key_prefix
from konnichiwa.schemas import encode
from konnichiwa.settings import settings_key

HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"
REPLAYED: Final = {REPLAYED_HEADER: "true"}
KEEP_SECONDS: Final = 24 * 3600
DIGEST_BYTES: Final = 16  # 128 bits: no two keys or bodies of a client ever collide
_SHAPE: Final = re.compile(r"[\x21-\x7e]{1,255}")  # visible ASCII, as the IETF draft suggests

Operation = Literal["update", "user"]  # each has its own namespace of keys

KEY_REUSED: Final = Problem(
    422,
    "Unprocessable Content",
    "This Idempotency-Key was already used with a different request body.",
    type="/problems/idempotency-key-reused",
    errors=[FieldError(HEADER, "Already used with a different body.")],
)


def outcome_unknown(store: str, change: str, keyed: bool) -> Problem:
    """The answer when `store` may have made `change` but did not confirm it in time."""
    retry = (
        "A retry with the same Idempotency-Key is safe: it is applied at most once."
        if keyed
        else "Send it with an Idempotency-Key to retry it safely."
    )
    return Problem(
        503,
        "Service Unavailable",
        f"{store} did not confirm {change} in time; it may have been made. {retry}",
        type="/problems/outcome-unknown",
        headers={"Retry-After": "1"},
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
