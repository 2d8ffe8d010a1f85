"""API keys: the scopes they carry, how requests present them, and constant-time checking."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import Final, Literal, get_args

from aiohttp import hdrs, web
from multidict import istr

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


def new_api_key() -> str:
    """A random key of 256 bits, in hex: a base64url key starts with '-' one time in 64, and a
    command line then takes it for an option."""
    return secrets.token_hex(32)


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


_KEY_HEADERS: Final = (istr("X-API-Key"), istr("API-Key"))
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
    """The one key a request carries in the three accepted headers (never the query string).

    None when it carries none, or carries anything ambiguous: keys that differ, an empty one, or
    credentials of another scheme (`Authorization: Basic ...`) beside a key. The same key sent
    twice (say as both `Authorization: Bearer` and `X-API-Key`) is unambiguous and passes.
    """
    headers = request.headers
    presented = {value.strip() for name in _KEY_HEADERS for value in headers.getall(name, ())}
    for authorization in headers.getall(hdrs.AUTHORIZATION, ()):
        scheme, _, credentials = authorization.strip().partition(" ")
        presented.add(credentials.strip() if scheme.lower() == "bearer" else "")
    if len(presented) != 1:
        return None
    return presented.pop() or None


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
    # aiohttp decodes header bytes that are not UTF-8 to lone surrogates; "surrogatepass" encodes
    # any str, and no valid key's UTF-8 can contain the bytes it gives them.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
