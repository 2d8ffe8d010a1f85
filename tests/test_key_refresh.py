"""The API key secret's formats (rotation itself is tested against the emulator in test_cloud)."""

from __future__ import annotations

import pytest

from konnichiwa.auth import DEFAULT_SCOPES, ApiKey
from konnichiwa.key_refresh import SecretFormatError, keys_from_secret

KEY_A = "secret-key-a-0123456789"
KEY_B = "secret-key-b-0123456789"


@pytest.mark.parametrize(
    ("secret", "keys"),
    [
        (f'{{"API_KEY": "{KEY_A}"}}', (ApiKey(KEY_A),)),
        (f'{{"API_KEYS": "{KEY_A},{KEY_B}:read"}}', (ApiKey(KEY_A), ApiKey(KEY_B, ["read"]))),
        (f'{{"API_KEY": "{KEY_A}", "API_KEYS": "{KEY_B}"}}', (ApiKey(KEY_A), ApiKey(KEY_B))),
        (f'["{KEY_A}", "{KEY_B}:config+secrets"]',
         (ApiKey(KEY_A), ApiKey(KEY_B, ["config", "secrets"]))),
    ],
)  # fmt: skip
def test_secret_formats(secret: str, keys: tuple[ApiKey, ...]) -> None:
    assert keys_from_secret(secret) == keys
    assert keys[0].scopes == DEFAULT_SCOPES


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("not json", "not JSON"),
        ("{}", "holds no keys"),
        ('"a-string-0123456789"', "holds no keys"),
        ('{"API_KEY": 12345678901234567890}', "must be a string"),
        ('["short"]', "at least 16 characters"),
        (f'["{KEY_A}:admin"]', "unknown scope 'admin'"),
    ],
)
def test_bad_secrets_are_refused(secret: str, message: str) -> None:
    with pytest.raises(SecretFormatError, match=message):
        keys_from_secret(secret)
