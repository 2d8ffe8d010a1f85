"""Rate limits: leases from Redis, 429s with RateLimit headers, one quota for all, fail-open."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
import redis.asyncio
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from konnichiwa.app import create_app
from konnichiwa.embedded import valkey_server
from konnichiwa.ratelimit import (
    LEASE_TIMEOUT,
    POLICIES,
    Lease,
    Policy,
    lease_tokens,
)
from konnichiwa.scoreboard import RATE_LIMITED, WORKER_CELLS
from konnichiwa.settings import Rate, Settings
from tests.support import (
    FULL_AUTH,
    FULL_KEY,
    READ_AUTH,
    Client,
    http_get,
    paused,
    pid_from_file,
    running_service,
)

WRONG_KEYS = [{"X-API-Key": f"not-a-key-of-ours-{n:04}"} for n in range(200)]


def limited(settings: Settings, **rates: Rate) -> Settings:
    """`settings` with some of the default quotas replaced."""
    return settings.replace(rate_limits=settings.rate_limits._replace(**rates))


async def _metrics(client: Client) -> dict[str, float]:
    """Every sample of /metrics by its name and labels, written `name{label=value,...}`."""
    response = await client.get("/metrics", headers=FULL_AUTH)
    assert response.status == 200
    return {
        sample.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())) + "}":
        sample.value
        for family in text_string_to_metric_families(await response.text())
        for sample in family.samples
    }  # fmt: skip


def test_every_policy_has_a_counter_on_the_scoreboard() -> None:
    assert RATE_LIMITED + len(POLICIES) <= WORKER_CELLS
    assert POLICIES == ("reads", "writes", "inspect", "config", "anonymous", "auth-failures")


async def test_leases_shrink_near_the_limit_and_never_exceed_it(redis_url: str) -> None:
    policy = Policy("reads", Rate(40, 60), RATE_LIMITED)
    assert policy.lease == 2  # a twentieth of the quota
    wide = Policy("reads", Rate(40, 60), RATE_LIMITED)
    wide.lease = 16  # more than half of what is left, from the start
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        granted = []
        for _ in range(7):
            (grant,) = await lease_tokens(client.execute_command, [Lease("rate:test", wide)])
            granted.append(grant.tokens)
        (refused,) = await lease_tokens(client.execute_command, [Lease("rate:test", policy)])
        both = await lease_tokens(
            client.execute_command, [Lease("rate:other", policy), Lease("rate:test", policy)]
        )
    finally:
        await client.aclose()
    assert granted == [16, 12, 6, 3, 2, 1, 0], "half of what is left (rounded up), at most 16"
    assert sum(granted) == 40
    # The next token is one emission interval (60 s / 40) away, less the few ms the test took.
    assert (refused.tokens, 1.4e6 < refused.wait_us <= 1.5e6) == (0, True)
    assert [grant.tokens for grant in both] == [2, 0], "one script, each key on its own"


async def test_a_burst_past_the_quota_is_refused_with_ratelimit_headers(
    aiohttp_client: AiohttpClient, settings: Settings
) -> None:
    client = await aiohttp_client(create_app(limited(settings, reads=Rate(5, 1))))
    statuses = [(await client.get("/users", headers=READ_AUTH)).status for _ in range(5)]
    refused = await client.get("/users", headers=READ_AUTH)
    assert (statuses, refused.status) == ([200] * 5, 429)
    assert refused.content_type == "application/problem+json"
    body = await refused.json(content_type=None)
    assert (body["status"], body["type"]) == (429, "/problems/rate-limited")
    retry = int(refused.headers["Retry-After"])
    assert retry == 1  # the next token is 0.2 s away, rounded up to whole seconds
    assert refused.headers["RateLimit-Policy"] == '"reads";q=5;w=1'
    assert refused.headers["RateLimit"] == f'"reads";r=0;t={retry}'
    assert (await client.get("/users", headers=FULL_AUTH)).status == 200, "another key is not"
    assert (await _metrics(client))["konnichiwa_rate_limited_total{policy=reads}"] == 1
    await asyncio.sleep(1)  # the whole window: the full quota again
    statuses = [(await client.get("/users", headers=READ_AUTH)).status for _ in range(6)]
    assert statuses == [200] * 5 + [429]


@pytest.mark.parametrize(
    ("method", "path", "headers", "policy"),
    [
        ("GET", "/", {}, "anonymous"),  # public routes: per client address
        ("GET", "/status", {}, "anonymous"),
        ("GET", "/nowhere", {}, "anonymous"),  # even a 404: scanners are limited too
        ("GET", "/users", READ_AUTH, "reads"),
        ("POST", "/update", FULL_AUTH, "writes"),
        ("GET", "/inspect", FULL_AUTH, "inspect"),
    ],
)
async def test_each_route_class_has_its_own_quota(
    aiohttp_client: AiohttpClient, settings: Settings, *, method: str, path: str,
    headers: dict[str, str], policy: str,
) -> None:  # fmt: skip
    one = Rate(1, 60)
    quotas = limited(settings, reads=one, writes=one, inspect=one, config=one, anonymous=one)
    client = await aiohttp_client(create_app(quotas))
    body = {"increment": 1} if method == "POST" else None
    first = await client.request(method, path, headers=headers, json=body)
    second = await client.request(method, path, headers=headers, json=body)
    assert first.status != 429
    assert second.status == 429
    assert second.headers["RateLimit-Policy"] == f'"{policy}";q=1;w=60'


async def test_health_probes_are_never_limited(
    aiohttp_client: AiohttpClient, settings: Settings
) -> None:
    client = await aiohttp_client(create_app(limited(settings, anonymous=Rate(1, 60))))
    assert (await client.get("/")).status == 200
    assert (await client.get("/")).status == 429
    probes = [(await client.get(path)).status for path in ("/health", "/health/ready") * 20]
    assert probes == [200] * 40


@pytest.mark.parametrize(
    ("trusted", "forwarded", "client"),
    [
        ((), "203.0.113.7", "127.0.0.1"),  # nobody is trusted: the header is the client's word
        (("127.0.0.0/8",), "203.0.113.7", "203.0.113.7"),
        (("127.0.0.0/8",), None, "127.0.0.1"),
        (("127.0.0.0/8",), "198.51.100.1, 203.0.113.7", "203.0.113.7"),  # a forged first hop
        (("127.0.0.0/8", "10.0.0.0/8"), "203.0.113.7, 10.1.2.3", "203.0.113.7"),  # two proxies
        (("127.0.0.0/8",), "2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),  # one host's share
        (("127.0.0.0/8",), "::ffff:203.0.113.7", "203.0.113.7"),
        (("127.0.0.0/8",), "not-an-address", "127.0.0.1"),
    ],
)
async def test_the_client_address_is_forwarded_only_by_trusted_proxies(
    aiohttp_client: AiohttpClient, settings: Settings, redis_url: str, *,
    trusted: tuple[str, ...], forwarded: str | None, client: str,
) -> None:  # fmt: skip
    proxies = Settings.from_env({"TRUSTED_PROXIES": ",".join(trusted)}, env_file=None)
    app = create_app(settings.replace(trusted_proxies=proxies.trusted_proxies))
    http = await aiohttp_client(app)
    headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
    assert (await http.get("/", headers=headers)).status == 200
    store = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = [str(key) for key in await store.keys("*:rate:anonymous:*")]
    finally:
        await store.aclose()
    assert [key.split(":rate:anonymous:", 1)[1] for key in keys] == [client]


async def test_failed_authentication_blocks_an_address_long_before_its_quota(
    aiohttp_client: AiohttpClient, settings: Settings
) -> None:
    proxied = settings.replace(trusted_proxies=Settings.from_env(
        {"TRUSTED_PROXIES": "127.0.0.1"}, env_file=None).trusted_proxies)  # fmt: skip
    client = await aiohttp_client(create_app(proxied))
    attacker = {"X-Forwarded-For": "203.0.113.66"}
    answers = []
    for wrong in WRONG_KEYS:
        response = await client.get("/users", headers={**attacker, **wrong})
        answers.append((response.status, await response.read()))
    statuses = [status for status, _ in answers]
    allowed = settings.rate_limits.auth_failures.quota
    assert allowed < settings.rate_limits.anonymous.quota / 10
    assert statuses == [401] * allowed + [429] * (len(WRONG_KEYS) - allowed)
    assert len({body for status, body in answers if status == 401}) == 1, "identical 401s"
    blocked = await client.get("/users", headers={**attacker, **READ_AUTH})
    assert blocked.status == 429, "a blocked address is refused before its key is looked at"
    assert blocked.headers["RateLimit-Policy"] == f'"auth-failures";q={allowed};w=120'
    other = {"X-Forwarded-For": "198.51.100.5", **READ_AUTH}
    assert (await client.get("/users", headers=other)).status == 200
    refused = (await _metrics(client))["konnichiwa_rate_limited_total{policy=auth-failures}"]
    assert refused == len(WRONG_KEYS) - allowed + 1


@pytest.mark.slow
def test_two_processes_on_one_redis_share_one_quota(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    environment = {
        "REDIS_URL": redis_url, "DATABASE_URL": database_url, "API_KEY": FULL_KEY,
        "RATE_LIMIT_ANONYMOUS": "20/min",
    }  # fmt: skip
    with (
        running_service(tmp_path / "first.log", environment, "--workers", "2") as first,
        running_service(tmp_path / "second.log", environment, "--workers", "2") as second,
    ):
        alternating = [first.url, second.url] * 15
        statuses = [http_get(url + "/")[0] for url in alternating]
    assert statuses.count(200) == 20
    assert statuses.count(429) == 10


@pytest.mark.slow
async def test_redis_down_reads_fail_open_and_writes_closed_with_one_log_line(
    aiohttp_client: AiohttpClient, settings: Settings, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    with valkey_server(tmp_path / "stopped") as url:
        client = await aiohttp_client(create_app(settings.replace(redis_url=url)))
    with caplog.at_level(logging.INFO, logger="konnichiwa.ratelimit"):
        reads = [(await client.get("/")).status for _ in range(50)]
        write = await client.post(
            "/user", headers=FULL_AUTH, json={"name": "Yamada", "email": "yamada@example.jp"}
        )
        metrics = await _metrics(client)
    assert reads == [200] * 50
    assert write.status == 503
    assert (await write.json(content_type=None))["type"] == "/problems/rate-limiter-unavailable"
    unchecked = "konnichiwa_rate_limit_unchecked_total{decision=%s}"
    assert metrics[unchecked % "admitted"] == 51  # the reads, and the scrape itself
    assert metrics[unchecked % "refused"] == 1
    assert metrics["konnichiwa_worker_rate_limiter_down{worker=0}"] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "konnichiwa.ratelimit"]
    assert len(lines) == 1
    assert lines[0].startswith("rate limiter cannot reach Redis")


@pytest.mark.slow
async def test_a_hung_redis_delays_a_request_by_the_lease_timeout_at_most(
    aiohttp_client: AiohttpClient, settings: Settings, tmp_path: Path
) -> None:
    with valkey_server(tmp_path / "valkey") as url:
        client = await aiohttp_client(create_app(settings.replace(redis_url=url)))
        with paused(pid_from_file(tmp_path / "valkey" / "valkey.pid")):
            started = time.monotonic()
            first = await client.get("/")
            waited = time.monotonic() - started
            started = time.monotonic()
            second = await client.get("/")
            after = time.monotonic() - started
    assert (first.status, second.status) == (200, 200)
    assert LEASE_TIMEOUT <= waited < LEASE_TIMEOUT + 0.5
    assert after < LEASE_TIMEOUT / 2, "known down: decided at once"
