"""Cloud config and storage against moto's AWS emulator over real HTTP: paging, names, scopes,
AWS errors, the cache, both roles, and API keys rotated in Secrets Manager."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import ClientSession, web
from aiohttp.typedefs import Handler
from moto.server import ThreadedMotoServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from konnichiwa.app import create_app
from konnichiwa.auth import ApiKey
from konnichiwa.aws import client_args, s3_client
from konnichiwa.cloud import parameter_name
from konnichiwa.errors import Problem
from konnichiwa.settings import ServiceName, Settings
from tests.support import FULL_AUTH, Client, free_port, running_service

if TYPE_CHECKING:
    from types_aiobotocore_ssm import SSMClient

PREFIX = "/konnichiwa/dev/"
CREDENTIALS = ("testing", "testing")
REGION = "us-east-1"
CONFIG_KEY = "test-key-config-only-0123456789"
CONFIG_AUTH = {"X-API-Key": CONFIG_KEY}

PATIENT = AioConfig(read_timeout=60, retries={"max_attempts": 1})
MakeClient = Callable[..., Awaitable[Client]]


def emulator_args(url: str) -> dict[str, Any]:
    """Arguments for a client that sets up the emulator: one patient try per call."""
    settings = Settings(aws_endpoint_url=url, aws_credentials=CREDENTIALS, aws_region=REGION)
    return {**client_args(settings), "config": PATIENT}


@pytest.fixture
async def ssm(aws_url: str) -> AsyncIterator[SSMClient]:
    async with get_session().create_client("ssm", **emulator_args(aws_url)) as client:
        await client.put_parameter(Name=PREFIX + "db/host", Type="String", Value="localhost")
        await client.put_parameter(Name=PREFIX + "db/password", Type="SecureString", Value="s3")
        await client.put_parameter(Name=PREFIX + "hosts", Type="StringList", Value="a,b")
        await client.put_parameter(Name="/konnichiwa/prod/db/host", Type="String", Value="prod")
        yield client


@pytest.fixture
def aws_settings(settings: Settings, aws_url: str) -> Settings:
    return settings.replace(
        aws_endpoint_url=aws_url,
        aws_credentials=CREDENTIALS,
        aws_region=REGION,
        api_keys=(*settings.api_keys, ApiKey(CONFIG_KEY, ["config"])),
    )


@pytest.fixture
def make_client(aws_settings: Settings, aiohttp_client: AiohttpClient) -> MakeClient:
    # (aiohttp_client after the settings: its apps close before the test database is dropped)
    """A test client for the app on the emulator (or `aws_endpoint_url`), settings changed."""

    async def make(**changes: Any) -> Client:
        return await aiohttp_client(create_app(aws_settings.replace(**changes)))

    return make


class CountingProxy:
    """A real HTTP server in front of the emulator: counts the AWS operations it forwards, and
    holds them while `gate` is clear."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.url = ""  # known once it serves
        self.calls: Counter[str] = Counter()
        self.gate = asyncio.Event()
        self.gate.set()
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.forward)

    async def forward(self, request: web.Request) -> web.Response:
        target = request.headers.get("X-Amz-Target", f"{request.method} {request.path}")
        self.calls[target.rpartition(".")[2]] += 1
        await self.gate.wait()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with (
            ClientSession() as session,
            session.request(
                request.method,
                self.upstream + request.path_qs,
                headers=headers,
                data=await request.read(),
            ) as answer,
        ):
            body = await answer.read()
            kept = {"content-type", "x-amzn-requestid", "x-amz-request-id"}
            return web.Response(
                status=answer.status,
                body=body,
                headers={k: v for k, v in answer.headers.items() if k.lower() in kept},
            )


@pytest.fixture
async def proxy(aiohttp_server: AiohttpServer, aws_url: str) -> CountingProxy:
    counting = CountingProxy(aws_url)
    server = await aiohttp_server(counting.app)
    counting.url = str(server.make_url("")).rstrip("/")
    return counting


@pytest.mark.slow
async def test_listing_has_every_page_nested_names_and_no_secure_value(
    ssm: SSMClient, make_client: MakeClient, proxy: CountingProxy
) -> None:
    for number in range(60):
        await ssm.put_parameter(
            Name=f"{PREFIX}app/{number // 10}/item-{number:02d}", Type="String", Value=str(number)
        )
    client = await make_client(aws_endpoint_url=proxy.url)
    response = await client.get("/config", headers=CONFIG_AUTH)
    assert response.status == 200
    body = await response.json()
    names = [p["name"] for p in body["parameters"]]
    assert len(names) == 63  # 60 nested + db/host, db/password, hosts; not the prod one
    assert names == sorted(names)
    assert f"{PREFIX}app/5/item-59" in names
    assert "/konnichiwa/prod/db/host" not in names
    by_name = {p["name"]: p for p in body["parameters"]}
    assert by_name[PREFIX + "db/password"]["value"] is None
    assert by_name[PREFIX + "db/password"]["type"] == "SecureString"
    assert by_name[PREFIX + "hosts"]["value"] == "a,b"
    assert by_name[PREFIX + "db/host"]["version"] == 1
    assert by_name[PREFIX + "db/host"]["last_modified"].endswith("Z")
    assert proxy.calls["GetParametersByPath"] == 7  # SSM answers at most 10 per page


@pytest.mark.parametrize(
    ("path", "auth", "value"),
    [
        ("/config/db/host", CONFIG_AUTH, "localhost"),
        ("/config//konnichiwa/dev/db/host", CONFIG_AUTH, "localhost"),
        ("/config/hosts", CONFIG_AUTH, "a,b"),
        ("/config/db/password", CONFIG_AUTH, None),
        ("/config//konnichiwa/dev/db/password", FULL_AUTH, "s3"),
    ],
)
async def test_one_parameter(
    ssm: SSMClient, make_client: MakeClient, path: str, auth: dict[str, str], value: str | None
) -> None:
    client = await make_client()
    response = await client.get(path, headers=auth)
    assert response.status == 200
    body = await response.json()
    assert body["name"].startswith(PREFIX)
    assert body["value"] == value


BAD_NAMES = [
    ("/config//konnichiwa/prod/db/host", 404),
    ("/config//konnichiwa/development/x", 404),
    ("/config/db/%2E%2E/%2E%2E/prod/db/host", 404),  # the URL resolves to /prod/db/host
    ("/config/db//host", 400),
    ("/config/db/host/", 400),
    ("/config/db/ho%20st", 400),
    ("/config/db/host$", 400),
    ("/config/db%2Fhost%3F", 400),
    ("/config/", 400),
    ("/config/j%C2%B6y", 400),
    ("/config/db/.hidden/..", 400),  # a '..' segment climbs (sent as it is, unresolved)
    # Past SSM's limits (15 levels, 1,011 characters): no such parameter can exist.
    ("/config/" + "a/" * 15 + "b", 404),
    ("/config/" + "a" * 1000, 404),
]


async def test_bad_names_never_reach_aws(make_client: MakeClient) -> None:
    # Nothing listens at this endpoint: any AWS call would make the answer a 503.
    client = await make_client(aws_endpoint_url=f"http://127.0.0.1:{free_port()}")
    for path, status in BAD_NAMES:
        response = await client.get(path, headers=CONFIG_AUTH)
        assert (path, response.status) == (path, status)
        assert response.content_type == "application/problem+json"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("db/host", PREFIX + "db/host"),
        (PREFIX + "db/host", PREFIX + "db/host"),
        ("db/../../prod/db/host", 400),
        ("/konnichiwa/dev/../prod/x", 400),
        ("./db/host", 400),
        ("/konnichiwa/prod/db/host", 404),
        ("/konnichiwa/dev", 404),
    ],
)
def test_parameter_name(raw: str, expected: str | int) -> None:
    if isinstance(expected, str):
        assert parameter_name(raw, PREFIX) == expected
        return
    with pytest.raises(Problem) as raised:
        parameter_name(raw, PREFIX)
    assert raised.value.status == expected


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/config", {}, 401),
        ("/config/db/host", {"X-API-Key": "test-key-read-only-0123456789"}, 403),
        ("/config/nothing/here", CONFIG_AUTH, 404),
    ],
)
async def test_refusals(
    ssm: SSMClient, make_client: MakeClient, path: str, headers: dict[str, str], status: int
) -> None:
    client = await make_client()
    response = await client.get(path, headers=headers)
    assert response.status == status
    assert response.content_type == "application/problem+json"


async def test_access_denied_names_the_permission(
    ssm: SSMClient, make_client: MakeClient, aws_url: str
) -> None:
    async with get_session().create_client("iam", **emulator_args(aws_url)) as iam:
        await iam.create_user(UserName="lister")
        await iam.put_user_policy(
            UserName="lister",
            PolicyName="list-only",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {"Effect": "Allow", "Action": "ssm:GetParametersByPath", "Resource": "*"}
                    ],
                }
            ),
        )
        key = (await iam.create_access_key(UserName="lister"))["AccessKey"]
    client = await make_client(aws_credentials=(key["AccessKeyId"], key["SecretAccessKey"]))
    _set_iam_enforcement(aws_url, "0")  # from now on every call is checked against IAM
    try:
        listed = await client.get("/config", headers=CONFIG_AUTH)
        denied = await client.get("/config/db/host", headers=CONFIG_AUTH)
    finally:
        _set_iam_enforcement(aws_url, "inf")
    assert listed.status == 200
    assert denied.status == 403
    problem = await denied.json()
    assert problem["permission"] == "ssm:GetParameter"
    assert "'ssm:GetParameter'" in problem["detail"]


def _set_iam_enforcement(url: str, unchecked_calls: str) -> None:
    """moto checks IAM permissions after this many more calls ("inf": never)."""
    request = urllib.request.Request(  # noqa: S310  (the local emulator)
        url + "/moto-api/reset-auth",
        data=unchecked_calls.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},  # a form body would be parsed away
    )
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
        assert answer.status == 200


@pytest.mark.parametrize(
    ("cache_seconds", "statuses", "calls"),
    [(30, ["miss", "hit", "hit"], 1), (0, ["miss", "miss", "miss"], 3)],
)
async def test_cache(  # noqa: PLR0917
    ssm: SSMClient,
    make_client: MakeClient,
    proxy: CountingProxy,
    cache_seconds: int,
    statuses: list[str],
    calls: int,
) -> None:
    client = await make_client(aws_endpoint_url=proxy.url, config_cache_seconds=cache_seconds)
    seen = []
    for _ in statuses:
        response = await client.get("/config/db/host", headers=CONFIG_AUTH)
        assert (await response.json())["value"] == "localhost"
        seen.append(response.headers["X-Cache"])
    assert seen == statuses
    assert proxy.calls["GetParameter"] == calls


@pytest.mark.parametrize(("cache_seconds", "calls"), [(30, 1), (0, 5)])
async def test_a_missing_parameter_is_remembered_like_a_found_one(
    ssm: SSMClient, make_client: MakeClient, proxy: CountingProxy, cache_seconds: int, calls: int
) -> None:
    """A name nobody defined costs one SSM call, not one per request (for NOT_FOUND_SECONDS,
    never longer than answers are cached)."""
    client = await make_client(aws_endpoint_url=proxy.url, config_cache_seconds=cache_seconds)
    for _ in range(5):
        response = await client.get("/config/not/yet", headers=CONFIG_AUTH)
        assert response.status == 404
        assert (await response.json())["type"] == "/problems/not-found"
    assert proxy.calls["GetParameter"] == calls


async def test_decrypted_values_are_cached_apart(ssm: SSMClient, make_client: MakeClient) -> None:
    client = await make_client()
    secret = await client.get("/config/db/password", headers=FULL_AUTH)
    plain = await client.get("/config/db/password", headers=CONFIG_AUTH)
    assert (await secret.json())["value"] == "s3"
    assert (await plain.json())["value"] is None
    assert plain.headers["X-Cache"] == "miss"


async def test_concurrent_misses_make_one_call(
    ssm: SSMClient, aws_settings: Settings, aiohttp_client: AiohttpClient, proxy: CountingProxy
) -> None:
    concurrent = 20
    arrived = 0
    everyone_waits = asyncio.Event()

    @web.middleware
    async def count_arrivals(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal arrived
        arrived += 1
        if arrived == concurrent:
            everyone_waits.set()
        return await handler(request)

    app = create_app(aws_settings.replace(aws_endpoint_url=proxy.url))
    app.middlewares.insert(0, count_arrivals)
    client = await aiohttp_client(app)
    proxy.gate.clear()
    requests = [
        asyncio.ensure_future(client.get("/config/db/host", headers=CONFIG_AUTH))
        for _ in range(concurrent)
    ]
    await asyncio.wait_for(everyone_waits.wait(), timeout=30)
    proxy.gate.set()
    responses = await asyncio.gather(*requests)
    assert [r.status for r in responses] == [200] * concurrent
    assert proxy.calls["GetParameter"] == 1


@pytest.mark.slow
@pytest.mark.parametrize(("stale_seconds", "status"), [(300, 200), (0, 503)])
async def test_stale_on_error_with_the_emulator_stopped(
    ssm: SSMClient, make_client: MakeClient, stale_seconds: int, status: int
) -> None:
    # A second server over the same emulated account, which this test may stop.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = await make_client(
        aws_endpoint_url=f"http://{host}:{port}",
        config_cache_seconds=0,
        config_stale_seconds=stale_seconds,
    )
    fresh = await client.get("/config/db/host", headers=CONFIG_AUTH)
    assert fresh.status == 200
    await asyncio.to_thread(server.stop)
    again = await client.get("/config/db/host", headers=CONFIG_AUTH)
    never_read = await client.get("/config", headers=CONFIG_AUTH)
    assert again.status == status
    if status == 200:
        assert again.headers["X-Cache"] == "stale"
        assert await again.json() == await fresh.json()
    for unavailable in [never_read] if status == 200 else [again, never_read]:
        assert unavailable.status == 503
        assert unavailable.headers["Retry-After"].isdigit()
        assert (await unavailable.json())["type"] == "/problems/aws-unavailable"


@pytest.mark.parametrize("role", ["api", "aux"])
async def test_storage_only_in_the_api_role(
    make_client: MakeClient, aws_url: str, role: ServiceName
) -> None:
    async with get_session().create_client("s3", **emulator_args(aws_url)) as s3:
        await s3.create_bucket(Bucket="konnichiwa-assets")
    client = await make_client(service_name=role)
    response = await client.get("/storage", headers=CONFIG_AUTH)
    spec = await (await client.get("/openapi.json")).json()
    if role == "api":
        assert response.status == 200
        buckets = (await response.json())["buckets"]
        assert [b["name"] for b in buckets] == ["konnichiwa-assets"]
        assert buckets[0]["creation_date"].endswith("Z")
        assert "/storage" in spec["paths"]
        assert s3_client in client.app
    else:
        assert response.status == 404
        assert "/storage" not in spec["paths"]
        assert s3_client not in client.app
    assert "/config" in spec["paths"]


async def test_api_keys_rotate_from_secrets_manager(make_client: MakeClient, aws_url: str) -> None:
    old, new = "rotating-key-old-0123456789", "rotating-key-new-0123456789"
    async with get_session().create_client("secretsmanager", **emulator_args(aws_url)) as sm:
        await sm.create_secret(Name="konnichiwa/keys", SecretString=json.dumps({"API_KEY": old}))
        client = await make_client(
            api_key_secret_id="konnichiwa/keys",  # noqa: S106  (a name, not a password)
            api_key_refresh_seconds=1,
        )
        assert (await client.get("/config", headers={"X-API-Key": old})).status == 200
        assert (await client.get("/config", headers={"X-API-Key": new})).status == 401
        await sm.put_secret_value(SecretId="konnichiwa/keys", SecretString=json.dumps([new]))
    deadline = time.monotonic() + 20
    while (await client.get("/config", headers={"X-API-Key": new})).status != 200:
        assert time.monotonic() < deadline, "the rotated key was not picked up"
        await asyncio.sleep(0.2)
    assert (await client.get("/config", headers={"X-API-Key": old})).status == 401
    assert (await client.get("/config", headers=FULL_AUTH)).status == 200  # static keys stay


@pytest.mark.slow
def test_dev_stack_emulates_aws_out_of_the_box(tmp_path: Path) -> None:
    with running_service(tmp_path / "service.log", {"WORKERS": "1"}) as service:
        key = (service.state_dir / "api-key").read_text().strip()
        answers = {
            path: _get_json(service.url + path, key)
            for path in ("/config", "/config/db/password", "/storage")
        }
    names = [p["name"] for p in answers["/config"]["parameters"]]
    assert {"/konnichiwa/dev/db/host", "/konnichiwa/dev/features/enabled"} <= set(names)
    assert answers["/config/db/password"]["value"] == "dev-only-password"
    assert [b["name"] for b in answers["/storage"]["buckets"]] == ["konnichiwa-dev-assets"]


def _get_json(url: str, key: str) -> Any:
    request = urllib.request.Request(url, headers={"X-API-Key": key})  # noqa: S310  (test URL)
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
        return json.loads(answer.read())
