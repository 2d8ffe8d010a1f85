"""Settings: defaults, validation that names the variable, `.env`, production rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from konnichiwa.auth import DEFAULT_SCOPES, ApiKey
from konnichiwa.settings import VARIABLES, Rate, RateLimits, Settings, SettingsError

PROD = {
    "ENVIRONMENT": "prod",
    "REDIS_URL": "rediss://cache:6379/0",
    "DATABASE_URL": "postgresql://app@db/konnichiwa",
    "API_KEY": "a-production-key-0123456789",
}


def test_defaults() -> None:
    settings = Settings.from_env({}, env_file=None)
    assert (settings.port, settings.service_name, settings.environment) == (4000, "api", "dev")
    assert settings.workers >= 1
    assert settings.access_log is False
    assert settings.ssm_prefix == "/konnichiwa/dev/"
    assert settings.aws_region == "ap-northeast-1"
    assert settings.embedded


@pytest.mark.parametrize(
    ("environ", "named", "expected"),
    [
        ({"PORT": "http"}, "PORT", "an integer from 1 to 65535"),
        ({"PORT": "0"}, "PORT", "an integer from 1 to 65535"),
        ({"PORT": "70000"}, "PORT", "an integer from 1 to 65535"),
        ({"WORKERS": "-1"}, "WORKERS", "an integer from 1"),
        ({"SERVICE_NAME": "web"}, "SERVICE_NAME", "api, aux"),
        ({"ENVIRONMENT": "staging"}, "ENVIRONMENT", "dev, qa, prod"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL", "DEBUG, INFO, WARNING, ERROR"),
        ({"LOG_LEVEL": "DEBUG,botocore"}, "LOG_LEVEL", "logger=LEVEL pairs"),
        ({"LOG_LEVEL": "INFO,=DEBUG"}, "LOG_LEVEL", "logger=LEVEL pairs"),
        ({"LOG_LEVEL": "INFO,botocore=loud"}, "LOG_LEVEL", "DEBUG, INFO, WARNING, ERROR"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT", "text, json"),
        ({"ACCESS_LOG": "maybe"}, "ACCESS_LOG", "true or false"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL", "redis://"),
        ({"DATABASE_URL": "mysql://db/x"}, "DATABASE_URL", "postgresql://"),
        ({"AWS_REGION": "Tokyo"}, "AWS_REGION", "a region like"),
        ({"AWS_ENDPOINT_URL": "moto:5000"}, "AWS_ENDPOINT_URL", "http://"),
        ({"SSM_PREFIX": "no-leading-slash"}, "SSM_PREFIX", "a path like"),
        ({"API_KEY": "short"}, "API_KEY", "at least 16 characters"),
        ({"API_KEYS": "a-long-enough-key-123:read+admin"}, "API_KEYS", "unknown scope 'admin'"),
        ({"MAX_BODY_BYTES": "1"}, "MAX_BODY_BYTES", "an integer from 1024"),
        ({"CONFIG_CACHE_SECONDS": "-1"}, "CONFIG_CACHE_SECONDS", "an integer from 0 to 3600"),
        ({"CONFIG_STALE_SECONDS": "a"}, "CONFIG_STALE_SECONDS", "an integer from 0 to 86400"),
        ({"API_KEY_REFRESH_SECONDS": "0"}, "API_KEY_REFRESH_SECONDS", "an integer from 1"),
        ({"RATE_LIMIT_READS": "1000"}, "RATE_LIMIT_READS", "like 1000/10s, 20/2min or 5000/h"),
        ({"RATE_LIMIT_WRITES": "0/s"}, "RATE_LIMIT_WRITES", "1 to 10^9 requests"),
        ({"RATE_LIMIT_AUTH_FAILURES": "20/2d"}, "RATE_LIMIT_AUTH_FAILURES", "like 1000/10s"),
        ({"RATE_LIMIT_ANONYMOUS": "5/25h"}, "RATE_LIMIT_ANONYMOUS", "in 1 s to 24 h"),
        ({"TRUSTED_PROXIES": "10.0.0.1/8"}, "TRUSTED_PROXIES", "'10.0.0.1/8' is not an address"),
        ({"TRUSTED_PROXIES": "nginx"}, "TRUSTED_PROXIES", "a network like 10.0.0.0/8"),
    ],
)
def test_bad_values_name_the_variable(environ: dict[str, str], named: str, expected: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(environ, env_file=None)
    assert str(raised.value).startswith(named)
    assert expected in str(raised.value)


@pytest.mark.parametrize("missing", ["REDIS_URL", "DATABASE_URL"])
@pytest.mark.parametrize("environment", ["prod", "qa"])
def test_outside_dev_servers_are_required(missing: str, environment: str) -> None:
    environ = {**PROD, "ENVIRONMENT": environment}
    del environ[missing]
    with pytest.raises(
        SettingsError, match=f"^{missing} is required when ENVIRONMENT={environment}"
    ):
        Settings.from_env(environ, env_file=None)


def test_prod_requires_an_api_key_source() -> None:
    environ = {k: v for k, v in PROD.items() if k != "API_KEY"}
    with pytest.raises(SettingsError, match="API_KEY, API_KEYS or API_KEY_SECRET_ID"):
        Settings.from_env(environ, env_file=None)
    assert Settings.from_env({**environ, "API_KEY_SECRET_ID": "konnichiwa/keys"}, env_file=None)


@pytest.mark.parametrize(
    ("environ", "emulated"),
    [
        ({}, True),
        ({"AWS_REGION": "us-west-2"}, False),
        ({"AWS_ENDPOINT_URL": "http://localhost:4566"}, False),
        ({"AWS_PROFILE": "dev"}, False),
        ({**PROD, "API_KEY": "a-production-key-0123456789"}, False),
    ],
)
def test_aws_is_emulated_only_in_dev_without_aws_configuration(
    environ: dict[str, str], emulated: bool
) -> None:
    settings = Settings.from_env(environ, env_file=None)
    assert settings.emulate_aws is emulated


def test_cache_settings() -> None:
    defaults = Settings.from_env({}, env_file=None)
    assert (defaults.config_cache_seconds, defaults.config_stale_seconds) == (30, 300)
    assert defaults.api_key_refresh_seconds == 300
    off = Settings.from_env({"CONFIG_CACHE_SECONDS": "0", "CONFIG_STALE_SECONDS": "0"}, None)
    assert (off.config_cache_seconds, off.config_stale_seconds) == (0, 0)


def test_rate_limits() -> None:
    defaults = Settings.from_env({}, env_file=None)
    assert defaults.rate_limits == Settings().rate_limits == RateLimits(
        reads=Rate(10_000, 10), writes=Rate(2_000, 10), inspect=Rate(600, 60),
        config=Rate(600, 60), anonymous=Rate(1_000, 10), auth_failures=Rate(20, 120),
    )  # fmt: skip
    assert defaults.trusted_proxies == ()
    given = Settings.from_env(
        {"RATE_LIMIT_READS": "50/s", "RATE_LIMIT_WRITES": "5000/h", "RATE_LIMIT_CONFIG": "9/2min",
         "TRUSTED_PROXIES": " 10.0.0.0/8, fd00::/8 ,192.0.2.1"},
        env_file=None,
    )  # fmt: skip
    assert given.rate_limits[:4] == (Rate(50, 1), Rate(5000, 3600), Rate(600, 60), Rate(9, 120))
    assert [str(network) for network in given.trusted_proxies] == [
        "10.0.0.0/8", "fd00::/8", "192.0.2.1/32"
    ]  # fmt: skip


def test_prod_never_embeds() -> None:
    settings = Settings.from_env(PROD, env_file=None)
    assert not settings.embedded
    assert settings.ssm_prefix == "/konnichiwa/prod/"


def test_api_keys_with_scopes() -> None:
    settings = Settings.from_env(
        {
            "API_KEY": "single-key-0123456789",
            "API_KEYS": "reader-key-0123456789:read,all-key-0123456789",
        },
        env_file=None,
    )
    assert settings.api_keys == (
        ApiKey("single-key-0123456789"),
        ApiKey("reader-key-0123456789", ["read"]),
        ApiKey("all-key-0123456789"),
    )
    assert settings.api_keys[0].scopes == DEFAULT_SCOPES
    assert "secrets" not in DEFAULT_SCOPES
    assert "0123456789" not in repr(settings)


def test_dotenv_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("# local settings\nPORT=4100\nSERVICE_NAME=aux\nexport LOG_FORMAT=json\n")
    settings = Settings.from_env({"PORT": "4200"}, env_file=env_file)
    assert (settings.port, settings.service_name, settings.log_format) == (4200, "aux", "json")


def test_every_variable_is_listed() -> None:
    source = (Path(__file__).parents[1] / "konnichiwa" / "settings.py").read_text()
    read = {name for name in VARIABLES if f'"{name}"' in source.split("def _parse", 1)[1]}
    assert read == set(VARIABLES)
