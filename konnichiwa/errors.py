"""Every error as RFC 9457 problem+json, and the request ID tying a response to its logs."""

from __future__ import annotations

import contextvars
import itertools
import os
import re
from collections.abc import Mapping, Sequence
from typing import Final

import asyncpg
import msgspec
from aiohttp import web
from multidict import istr
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
# An istr, as aiohttp's own header names: a header lookup or store skips case-folding the name.
REQUEST_ID_HEADER: Final = istr("X-Request-ID")
_SANE_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_encode = msgspec.json.Encoder().encode

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# Generated IDs: a random prefix per process (fixed length) and a decimal counter: unique without
# a syscall per request, and cheaper to format than hexadecimal.
_ID_PREFIX: Final = os.urandom(8).hex()
_id_numbers: Final = itertools.count(1)


class FieldError(msgspec.Struct, frozen=True):
    """What is wrong with one field of the input."""

    field: str
    message: str


class ProblemDetails(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details; `errors` lists each invalid field of a 422."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] = []


class Problem(Exception):
    """An error answer: raise it anywhere below a handler and the client gets problem+json."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        type: str = "about:blank",
        errors: Sequence[FieldError] = (),
        headers: Mapping[str, str] | None = None,
        extensions: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        details = ProblemDetails(type, title, status, detail, list(errors))
        if extensions:
            self.body = _encode({**msgspec.to_builtins(details), **extensions})
        else:
            self.body = _encode(details)
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=self.body,
            headers={"Content-Type": PROBLEM_CONTENT_TYPE, **self.headers},
        )


def validation_problem(errors: Sequence[FieldError]) -> Problem:
    """The 422 answer for input that is well-formed but breaks the contract."""
    fields = ", ".join(e.field for e in errors)
    return Problem(
        422,
        "Unprocessable Content",
        f"The request is not valid: check {fields}.",
        type="/problems/validation",
        errors=errors,
    )


_HTTP_DETAILS: Final[Mapping[int, str]] = {
    404: "There is nothing at this URL.",
    405: "This URL does not accept this method.",
    413: "The request body is too large.",
}


def from_http_exception(exc: web.HTTPException) -> web.Response:
    detail = _HTTP_DETAILS.get(exc.status, exc.reason)
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return Problem(exc.status, exc.reason, detail, headers=headers).response()


# A store that is down, refuses, or does not answer in time: the request fails fast with a 503.
DEPENDENCY_ERRORS: Final = (
    RedisConnectionError,
    RedisTimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    ConnectionError,
    TimeoutError,
)


# Redis refusing a write for lack of memory (maxmemory reached; the policy is noeviction, so it
# never drops state to make room): definite, nothing of the request was written.
REDIS_FULL: Final = Problem(
    503,
    "Service Unavailable",
    "Redis is out of memory (maxmemory reached), so the change was not applied. Reads still "
    "work; try the change again later.",
    type="/problems/store-full",
    headers={"Retry-After": "30"},
)


def unavailable() -> web.Response:
    return Problem(
        503,
        "Service Unavailable",
        "A backing store is unavailable; nothing acknowledged was lost. Try again shortly.",
        type="/problems/dependency-unavailable",
        headers={"Retry-After": "2"},
    ).response()


def internal_error() -> web.Response:
    return Problem(
        500,
        "Internal Server Error",
        "The server failed to answer; the request ID in the X-Request-ID header identifies it.",
    ).response()


def assign_request_id(request: web.Request) -> str:
    """The request's ID: the client's X-Request-ID when it is sane, else a fresh one; log lines
    written while answering it carry it."""
    sent = request.headers.get(REQUEST_ID_HEADER)
    rid = sent if sent is not None and _SANE_REQUEST_ID.fullmatch(sent) else new_request_id()
    request_id.set(rid)
    return rid


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_numbers)}"
