"""API keys from AWS Secrets Manager: read at start-up, then re-read periodically, so a rotated
key takes effect on every worker without a restart."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from konnichiwa.auth import ApiKey, keyring, parse_api_keys
from konnichiwa.aws import aws_errors, secrets_client
from konnichiwa.background import running
from konnichiwa.errors import Problem
from konnichiwa.settings import settings_key

if TYPE_CHECKING:
    from types_aiobotocore_secretsmanager import SecretsManagerClient

log = logging.getLogger("konnichiwa.keys")


class SecretFormatError(ValueError):
    """The secret's value is not a key list the service understands."""


def keys_from_secret(text: str) -> tuple[ApiKey, ...]:
    """Keys from a secret holding `{"API_KEY": "...", "API_KEYS": "k1,k2:read"}` (either field)
    or a JSON list of entries (`["k1", "k2:read+config"]`), in the syntax of `API_KEYS`."""
    try:
        value = json.loads(text)
    except ValueError:
        raise SecretFormatError("the secret is not JSON") from None
    if isinstance(value, dict):
        entries = [value.get("API_KEY"), value.get("API_KEYS")]
    elif isinstance(value, list):
        entries = value
    else:
        entries = []
    if not all(entry is None or isinstance(entry, str) for entry in entries):
        raise SecretFormatError("every key in the secret must be a string")
    try:
        keys = tuple(key for entry in entries for key in parse_api_keys(entry, "the secret"))
    except ValueError as exc:
        raise SecretFormatError(str(exc)) from None
    if not keys:
        raise SecretFormatError(
            'the secret holds no keys: expected {"API_KEY": "..."}, {"API_KEYS": "..."} '
            "or a JSON list of keys"
        )
    return keys


async def read_secret_keys(client: SecretsManagerClient, secret_id: str) -> tuple[ApiKey, ...]:
    with aws_errors("secretsmanager:GetSecretValue", f"secret {secret_id}"):
        answer = await client.get_secret_value(SecretId=secret_id)
    return keys_from_secret(answer.get("SecretString", ""))


async def api_key_refresh_ctx(app: web.Application) -> AsyncIterator[None]:
    """Load the keys before the worker serves (start-up fails if it cannot), then keep them
    current in the background."""
    settings = app[settings_key]
    secret_id = settings.api_key_secret_id
    assert secret_id is not None  # noqa: S101  (registered only when it is set)
    client = app[secrets_client]
    try:
        from_secret = await read_secret_keys(client, secret_id)
    except (Problem, SecretFormatError) as exc:
        raise RuntimeError(f"API_KEY_SECRET_ID={secret_id}: {exc}") from None
    app[keyring].replace(settings.api_keys + from_secret)
    async with running(_refresh(app, client, secret_id), "api-key-refresh"):
        yield


async def _refresh(app: web.Application, client: SecretsManagerClient, secret_id: str) -> None:
    settings = app[settings_key]
    while True:
        await asyncio.sleep(settings.api_key_refresh_seconds)
        try:
            from_secret = await read_secret_keys(client, secret_id)
        except (Problem, SecretFormatError) as exc:
            log.warning("keeping the current API keys: cannot refresh from %s: %s", secret_id, exc)
            continue
        app[keyring].replace(settings.api_keys + from_secret)
