"""The service's configuration: read once from the environment (and `.env`), validated, frozen."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Final, Literal, NamedTuple, TypeVar, cast, get_args

from aiohttp import web
from dotenv import dotenv_values

from konnichiwa.auth import ApiKey, parse_api_keys

Environment = Literal["dev", "qa", "prod"]
ServiceName = Literal["api", "aux"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["text", "json"]

# Every variable the service reads; deployments and docs are checked against this list.
VARIABLES: Final = (
    "PORT", "HOST", "WORKERS", "SERVICE_NAME", "ENVIRONMENT", "LOG_LEVEL", "LOG_FORMAT",
    "ACCESS_LOG", "API_KEY", "API_KEYS", "API_KEY_SECRET_ID", "REDIS_URL", "DATABASE_URL",
    "AWS_REGION", "AWS_ENDPOINT_URL", "SSM_PREFIX", "KONNICHIWA_STATE_DIR", "MAX_BODY_BYTES",
    "CONFIG_CACHE_SECONDS", "CONFIG_STALE_SECONDS", "API_KEY_REFRESH_SECONDS",
    "HEADER_TIMEOUT_SECONDS", "BODY_TIMEOUT_SECONDS", "KEEPALIVE_SECONDS", "MAX_CONNECTIONS",
    "RATE_LIMIT_READS", "RATE_LIMIT_WRITES", "RATE_LIMIT_INSPECT", "RATE_LIMIT_CONFIG",
    "RATE_LIMIT_ANONYMOUS", "RATE_LIMIT_AUTH_FAILURES", "TRUSTED_PROXIES",
)  # fmt: skip
# The AWS SDK's own variables: any of them set in dev means "use AWS", not the embedded emulator.
AWS_SDK_VARIABLES: Final = (
    "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ACCESS_KEY_ID",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)  # fmt: skip
# A server in a container listens on every interface; HOST narrows it.
ALL_INTERFACES: Final = "0.0.0.0"  # nosec B104
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})
_L = TypeVar("_L", bound=str)


class SettingsError(ValueError):
    """A setting has a value the service cannot start with; the message names the variable."""


class Rate(NamedTuple):
    """At most `quota` requests in any `window` seconds, all of them at once if need be."""

    quota: int
    window: int


class RateLimits(NamedTuple):
    """Quotas per API key by route class, and per client address for anonymous traffic and for
    failed authentication. Windows of 10 s and more let a client burst, then hold the rate."""

    reads: Rate = Rate(10_000, 10)
    writes: Rate = Rate(2_000, 10)
    inspect: Rate = Rate(600, 60)  # /metrics scrapes and monitors: a few a second at most
    config: Rate = Rate(600, 60)  # answers are cached; SSM itself allows ~40 calls a second
    anonymous: Rate = Rate(1_000, 10)
    auth_failures: Rate = Rate(20, 120)  # 10 a minute, 20 at once: typos, never a dictionary


DEFAULT_RATE_LIMITS: Final = RateLimits()


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service reads from its environment, validated."""

    port: int = 4000
    host: str = ALL_INTERFACES
    workers: int = 1
    service_name: ServiceName = "api"
    environment: Environment = "dev"
    log_level: LogLevel = "INFO"
    # Levels for other libraries' loggers, which otherwise stay at WARNING whatever LOG_LEVEL is.
    library_log_levels: tuple[tuple[str, LogLevel], ...] = ()
    log_format: LogFormat = "text"
    access_log: bool = False
    api_keys: tuple[ApiKey, ...] = ()
    api_key_secret_id: str | None = None
    redis_url: str | None = None
    database_url: str | None = None
    aws_region: str = "ap-northeast-1"
    aws_endpoint_url: str | None = None
    ssm_prefix: str = "/konnichiwa/dev/"
    # Start the embedded AWS emulator (dev without any AWS configuration).
    emulate_aws: bool = False
    # Static credentials for an emulator; AWS itself is reached with the SDK's credential chain.
    aws_credentials: tuple[str, str] | None = dataclasses.field(default=None, repr=False)
    config_cache_seconds: int = 30
    config_stale_seconds: int = 300
    api_key_refresh_seconds: int = 300
    state_dir: Path = Path(".konnichiwa")
    max_body_bytes: int = 64 * 1024
    # Slow clients: a request's headers, then its body, must arrive within these; an idle
    # keep-alive connection closes after KEEPALIVE_SECONDS (above an ALB's 60 s idle timeout).
    header_timeout_seconds: int = 10
    body_timeout_seconds: int = 30
    keepalive_seconds: int = 75
    max_connections: int = 1000  # per worker, and always below its file descriptor limit
    rate_limits: RateLimits = DEFAULT_RATE_LIMITS
    # Peers whose X-Forwarded-For names the client (the load balancer, nginx); nobody else's.
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()

    @property
    def embedded(self) -> bool:
        """Whether the dev stack must start its own servers (Valkey, Postgres, AWS emulator)."""
        return self.environment == "dev" and (
            self.redis_url is None or self.database_url is None or self.emulate_aws
        )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")
    ) -> Settings:
        """Build settings from `environ` (default: the process environment) over `env_file`."""
        values: dict[str, str] = {}
        if env_file is not None and env_file.is_file():
            values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        values.update(os.environ if environ is None else environ)
        return _parse(values)

    def require(self, field: Literal["redis_url", "database_url"]) -> str:
        """A server URL the service cannot run without (the embedded stack fills them in dev)."""
        value: str | None = getattr(self, field)
        if value is None:
            raise SettingsError(f"{field.upper()} is not set")
        return value

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (the embedded stack fills in its URLs this way)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _parse(env: Mapping[str, str]) -> Settings:
    def get(name: str) -> str | None:
        value = env.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    environment = _choice(get, "ENVIRONMENT", cast(tuple[Environment, ...], get_args(Environment)))
    environment = environment or "dev"
    api_keys = _api_keys(get)
    log_level, library_log_levels = _log_levels(get)
    settings = Settings(
        port=_integer(get, "PORT", 1, 65535) or 4000,
        host=get("HOST") or ALL_INTERFACES,
        workers=_integer(get, "WORKERS", 1, 256) or os.cpu_count() or 1,
        service_name=_choice(get, "SERVICE_NAME", get_args(ServiceName)) or "api",
        environment=environment,
        log_level=log_level,
        library_log_levels=library_log_levels,
        log_format=_choice(get, "LOG_FORMAT", get_args(LogFormat), str.lower) or "text",
        access_log=_boolean(get, "ACCESS_LOG"),
        api_keys=api_keys,
        api_key_secret_id=get("API_KEY_SECRET_ID"),
        redis_url=_url(get, "REDIS_URL", ("redis", "rediss", "unix", "valkey", "valkeys")),
        database_url=_url(get, "DATABASE_URL", ("postgres", "postgresql")),
        aws_region=_aws_region(get),
        aws_endpoint_url=_url(get, "AWS_ENDPOINT_URL", ("http", "https")),
        ssm_prefix=_ssm_prefix(get, environment),
        emulate_aws=environment == "dev" and not any(get(name) for name in AWS_SDK_VARIABLES),
        config_cache_seconds=_with_default(_integer(get, "CONFIG_CACHE_SECONDS", 0, 3600), 30),
        config_stale_seconds=_with_default(_integer(get, "CONFIG_STALE_SECONDS", 0, 86400), 300),
        api_key_refresh_seconds=_integer(get, "API_KEY_REFRESH_SECONDS", 1, 86400) or 300,
        state_dir=Path(get("KONNICHIWA_STATE_DIR") or ".konnichiwa"),
        max_body_bytes=_integer(get, "MAX_BODY_BYTES", 1024, 16 * 1024 * 1024) or 64 * 1024,
        header_timeout_seconds=_integer(get, "HEADER_TIMEOUT_SECONDS", 1, 300) or 10,
        body_timeout_seconds=_integer(get, "BODY_TIMEOUT_SECONDS", 1, 3600) or 30,
        keepalive_seconds=_integer(get, "KEEPALIVE_SECONDS", 1, 3600) or 75,
        max_connections=_integer(get, "MAX_CONNECTIONS", 16, 1_000_000) or 1000,
        rate_limits=RateLimits(
            reads=_rate(get, "RATE_LIMIT_READS") or DEFAULT_RATE_LIMITS.reads,
            writes=_rate(get, "RATE_LIMIT_WRITES") or DEFAULT_RATE_LIMITS.writes,
            inspect=_rate(get, "RATE_LIMIT_INSPECT") or DEFAULT_RATE_LIMITS.inspect,
            config=_rate(get, "RATE_LIMIT_CONFIG") or DEFAULT_RATE_LIMITS.config,
            anonymous=_rate(get, "RATE_LIMIT_ANONYMOUS") or DEFAULT_RATE_LIMITS.anonymous,
            auth_failures=(
                _rate(get, "RATE_LIMIT_AUTH_FAILURES") or DEFAULT_RATE_LIMITS.auth_failures
            ),
        ),
        trusted_proxies=_networks(get, "TRUSTED_PROXIES"),
    )
    if environment != "dev":
        for name, value in (
            ("REDIS_URL", settings.redis_url),
            ("DATABASE_URL", settings.database_url),
        ):
            if value is None:
                raise SettingsError(
                    f"{name} is required when ENVIRONMENT={environment}: embedded servers "
                    "are for development only"
                )
        if not settings.api_keys and settings.api_key_secret_id is None:
            raise SettingsError(
                f"API_KEY, API_KEYS or API_KEY_SECRET_ID is required when ENVIRONMENT={environment}"
            )
    return settings


Getter = Callable[[str], str | None]


def _choice(
    get: Getter, name: str, allowed: tuple[_L, ...], normalise: Callable[[str], str] = str.lower
) -> _L | None:
    raw = get(name)
    if raw is None:
        return None
    for option in allowed:
        if normalise(raw) == option:
            return option
    raise SettingsError(f"{name}={raw!r} is not valid: expected one of {', '.join(allowed)}")


def _log_levels(get: Getter) -> tuple[LogLevel, tuple[tuple[str, LogLevel], ...]]:
    """LOG_LEVEL: the service's level, then any `logger=LEVEL` for other libraries, comma
    separated (`DEBUG,botocore=DEBUG`)."""
    raw = get("LOG_LEVEL") or "INFO"
    own, *named = (part.strip() for part in raw.split(","))
    allowed: tuple[LogLevel, ...] = get_args(LogLevel)
    pairs = [part.partition("=") for part in named]
    levels = [own.upper(), *(level.strip().upper() for _, _, level in pairs)]
    if not all(level in allowed for level in levels) or any(
        not name.strip() or not equals for name, equals, _ in pairs
    ):
        raise SettingsError(
            f"LOG_LEVEL={raw!r} is not valid: expected one of {', '.join(allowed)}, optionally "
            "followed by logger=LEVEL pairs for other libraries (DEBUG,botocore=DEBUG)"
        )
    overrides = tuple(
        (name.strip(), cast(LogLevel, level.strip().upper())) for name, _, level in pairs
    )
    return cast(LogLevel, own.upper()), overrides


def _integer(get: Getter, name: str, low: int, high: int) -> int | None:
    raw = get(name)
    if raw is None:
        return None
    if not re.fullmatch(r"[0-9]+", raw) or not low <= int(raw) <= high:
        raise SettingsError(
            f"{name}={raw!r} is not valid: expected an integer from {low} to {high}"
        )
    return int(raw)


def _with_default(value: int | None, default: int) -> int:
    return default if value is None else value  # unlike `or`, keeps an explicit 0


def _boolean(get: Getter, name: str) -> bool:
    raw = (get(name) or "").lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise SettingsError(f"{name}={raw!r} is not valid: expected true or false")


def _url(get: Getter, name: str, schemes: tuple[str, ...]) -> str | None:
    raw = get(name)
    if raw is None:
        return None
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme.lower() not in schemes or not rest:
        expected = " or ".join(f"{s}://..." for s in schemes)
        raise SettingsError(f"{name} is not valid: expected a URL of the form {expected}")
    return raw


_RATE: Final = re.compile(r"([0-9]+)/([0-9]*)(s|min|h)")
_WINDOW_UNITS: Final = {"s": 1, "min": 60, "h": 3600}


def _rate(get: Getter, name: str) -> Rate | None:
    raw = get(name)
    if raw is None:
        return None
    found = _RATE.fullmatch(raw)
    if found is not None:
        quota, window = int(found[1]), int(found[2] or 1) * _WINDOW_UNITS[found[3]]
        if 1 <= quota <= 10**9 and 1 <= window <= 86400:
            return Rate(quota, window)
    raise SettingsError(
        f"{name}={raw!r} is not valid: expected requests per window like 1000/10s, 20/2min or "
        "5000/h (1 to 10^9 requests in 1 s to 24 h)"
    )


def _networks(get: Getter, name: str) -> tuple[IPv4Network | IPv6Network, ...]:
    networks = []
    for part in filter(None, (part.strip() for part in (get(name) or "").split(","))):
        try:
            networks.append(ip_network(part))
        except ValueError:
            raise SettingsError(
                f"{name} is not valid: {part!r} is not an address or a network like 10.0.0.0/8"
            ) from None
    return tuple(networks)


def _api_keys(get: Getter) -> tuple[ApiKey, ...]:
    single, several = get("API_KEY"), get("API_KEYS")
    try:
        keys = parse_api_keys(single, "API_KEY") + parse_api_keys(several, "API_KEYS")
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    return keys


def _aws_region(get: Getter) -> str:
    raw = get("AWS_REGION") or get("AWS_DEFAULT_REGION") or "ap-northeast-1"
    if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-[0-9]", raw):
        raise SettingsError(f"AWS_REGION={raw!r} is not valid: expected a region like us-east-1")
    return raw


def _ssm_prefix(get: Getter, environment: str) -> str:
    raw = get("SSM_PREFIX") or f"/konnichiwa/{environment}/"
    if not re.fullmatch(r"(/[A-Za-z0-9_.\-]+)+/?", raw):
        raise SettingsError(
            f"SSM_PREFIX={raw!r} is not valid: expected a path like /konnichiwa/{environment}/"
        )
    return raw if raw.endswith("/") else raw + "/"


settings_key = web.AppKey("settings", Settings)
