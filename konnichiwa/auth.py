"""API keys: the scopes they carry, how requests present them, and constant-time checking."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Final, Literal, get_args

from aiohttp import web

from konnichiwa.errors import Problem

Scope = Literal["read", "write", "inspect", "config", "secrets"]
SCOPES: Final[tuple[Scope, ...]] = get_args(Scope)
# A key listed without scopes gets these; decrypting SecureString parameters is never implied.
DEFAULT_SCOPES: Final[frozenset[Scope]] = frozenset({"read", "write", "inspect", "config"})
MIN_KEY_LENGTH: Final = 16


class ApiKey:
    """One accepted key, held as a SHA-256 digest so the raw key never sits in a log or repr."""

    __slots__ = ("digest", "scopes")

    def __init__(self, key: str, scopes: Iterable[Scope] = DEFAULT_SCOPES) -> None:
        self.digest = _digest(key)
        self.scopes = frozenset(scopes)

    def __repr__(self) -> str:
        return f"ApiKey(scopes={sorted(self.scopes)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ApiKey) and (self.digest, self.scopes) == (
            other.digest,
            other.scopes,
        )

    def __hash__(self) -> int:
        return hash(self.digest)


def parse_api_keys(raw: str | None, variable: str) -> tuple[ApiKey, ...]:
    """Parse `key[:scope+scope],key2,...`; raise ValueError naming `variable` when malformed."""
    if raw is None:
        return ()
    keys = []
    for entry in raw.split(","):
        key, sep, scope_list = entry.strip().partition(":")
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(
                f"{variable} is not valid: each key must be at least {MIN_KEY_LENGTH} characters"
            )
        if not sep:
            keys.append(ApiKey(key))
            continue
        scopes = [s.strip() for s in scope_list.split("+")]
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown or not scopes:
            raise ValueError(
                f"{variable} is not valid: unknown scope {unknown[0] if unknown else '(none)'!r}, "
                f"expected key:scope+scope with scopes from {', '.join(SCOPES)}"
            )
        keys.append(ApiKey(key, (s for s in SCOPES if s in scopes)))
    return tuple(keys)


class KeyRing:
    """The keys a worker accepts right now; replaced as a whole when keys rotate."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._keys = tuple(keys)

    def replace(self, keys: Iterable[ApiKey]) -> None:
        self._keys = tuple(keys)

    def lookup(self, presented: str) -> ApiKey | None:
        digest = _digest(presented)
        found = None
        # Compare against every key so the time taken does not say which one nearly matched.
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


keyring = web.AppKey("keyring", KeyRing)
api_key = web.RequestKey("api_key", ApiKey)  # the key a protected request was admitted with

UNAUTHORIZED: Final = Problem(
    401,
    "Unauthorized",
    "A valid API key is required: send it as 'Authorization: Bearer <key>', "
    "'X-API-Key: <key>' or 'API-Key: <key>'.",
    headers={"WWW-Authenticate": 'Bearer realm="konnichiwa"'},
)


def presented_key(request: web.Request) -> str | None:
    """The key a request carries in any of the three accepted headers (never the query string)."""
    headers = request.headers
    authorization = headers.get("Authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return headers.get("X-API-Key") or headers.get("API-Key")


def authorize(request: web.Request, scope: Scope) -> ApiKey:
    """The request's key if valid and carrying `scope`; raise a 401 or 403 problem otherwise."""
    presented = presented_key(request)
    key = None if presented is None else request.app[keyring].lookup(presented)
    if key is None:
        raise UNAUTHORIZED
    if scope not in key.scopes:
        raise Problem(403, "Forbidden", f"This API key lacks the '{scope}' scope.")
    return key


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
