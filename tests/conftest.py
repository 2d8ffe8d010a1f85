"""Fixtures: real Valkey, Postgres and AWS emulator for the session; fresh state per test."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from moto.server import ThreadedMotoServer
from pytest_aiohttp import AiohttpClient

import konnichiwa.aws
from konnichiwa.app import create_app
from konnichiwa.auth import SCOPES, ApiKey
from konnichiwa.embedded import embedded_stack, postgres_server, valkey_server
from konnichiwa.postgres import migrate
from konnichiwa.settings import Settings
from tests.support import (
    CHECKOV_HOME,
    FULL_KEY,
    READ_KEY,
    Client,
    Servers,
    create_database,
    database_url_for,
    debian_program,
    free_port,
    install_tools,
    pid_from_file,
    terraform_binary,
)

TEMPLATE_DATABASE = "konnichiwa_template"
_database_numbers = itertools.count()


def pytest_collection_finish(session: pytest.Session) -> None:
    """The suite's one set-up step: install the tools the selected tests ask for by fixture."""
    if not session.config.option.collectonly:
        install_tools(
            {name for item in session.items for name in getattr(item, "fixturenames", ())}
        )


# --- The tools, each installed by the set-up above ----------------------------------------------


@pytest.fixture(scope="session")
def nginx() -> Path:
    return Path(debian_program("nginx"))


@pytest.fixture(scope="session")
def chromium() -> str:
    return debian_program("chromium")


@pytest.fixture(scope="session")
def curl() -> str:
    return debian_program("curl")


@pytest.fixture(scope="session")
def promtool() -> str:
    return debian_program("promtool")


@pytest.fixture(scope="session")
def prometheus() -> str:
    return debian_program("prometheus")


@pytest.fixture(scope="session")
def terraform() -> Path:
    return terraform_binary()


@pytest.fixture(scope="session")
def checkov_binary() -> Path:
    return CHECKOV_HOME / "bin" / "checkov"


# --- The servers --------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _aws_models_loaded_once() -> Iterator[None]:
    """Every app of the session reads AWS service models through one botocore loader, as a
    worker's clients do all its life: opening them then costs milliseconds, not a parse each."""
    loader = get_session().get_component("data_loader")

    def session_sharing_the_loader() -> AioSession:
        session = get_session()
        session.register_component("data_loader", loader)
        return session

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(konnichiwa.aws, "get_session", session_sharing_the_loader)
        yield


@contextlib.contextmanager
def _server_directory() -> Iterator[Path]:
    """A directory for server data outside pytest's own temporary tree.

    PostgreSQL runs as an unprivileged user there (the tests run as root); every pytest session
    tightens its temporary root to mode 700, which would lock out a server another session runs.
    """
    path = Path(tempfile.mkdtemp(prefix="konnichiwa-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server_dir() -> Iterator[Path]:
    with _server_directory() as path:
        yield path


@pytest.fixture
def own_postgres(server_dir: Path) -> Iterator[tuple[str, int]]:
    """A PostgreSQL server of this test's own, to pause without disturbing other tests: its
    service database's URL and the postmaster's pid."""
    pgdata = server_dir / "postgres"
    with postgres_server(pgdata) as url:
        yield url, pid_from_file(pgdata / "postmaster.pid")


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    """REDIS_URL and DATABASE_URL when given, else embedded servers started for this session."""
    given = Settings(
        redis_url=os.environ.get("REDIS_URL"), database_url=os.environ.get("DATABASE_URL")
    )
    with (
        _server_directory() as state_dir,
        embedded_stack(given.replace(state_dir=state_dir)) as running,
    ):
        servers = Servers(running.require("redis_url"), running.require("database_url"), state_dir)
        asyncio.run(_create_template(servers.database_url))
        yield servers


async def _create_template(admin_url: str) -> None:
    await create_database(admin_url, TEMPLATE_DATABASE)
    template = await asyncpg.connect(database_url_for(admin_url, TEMPLATE_DATABASE))
    try:
        await migrate(template)
    finally:
        await template.close()


@pytest.fixture
async def database_url(servers: Servers) -> AsyncIterator[str]:
    """A database of its own for each test, already migrated (copied from a template)."""
    name = f"test_{os.getpid()}_{next(_database_numbers)}"
    admin = await asyncpg.connect(servers.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DATABASE}"')
        yield database_url_for(servers.database_url, name)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Valkey of this test's own, to pause: its URL and pidfile."""
    with valkey_server(tmp_path / "valkey") as url:
        yield url, tmp_path / "valkey" / "valkey.pid"


@pytest.fixture
async def redis_url(servers: Servers) -> str:
    """The session's Redis, emptied before each test."""
    client = redis.asyncio.Redis.from_url(servers.redis_url)
    await client.flushdb()
    await client.aclose()
    return servers.redis_url


@pytest.fixture
def settings(redis_url: str, database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=redis_url,
        database_url=database_url,
        state_dir=tmp_path,
        api_keys=(ApiKey(FULL_KEY, SCOPES), ApiKey(READ_KEY, ["read"])),
    )


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, settings: Settings) -> Client:
    return await aiohttp_client(create_app(settings))


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's AWS emulator, over real HTTP on a local port, for the whole session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        asyncio.run(_load_emulated_services(url))
        yield url
    finally:
        server.stop()


async def _load_emulated_services(url: str) -> None:
    """moto loads a service on its first call, which can take seconds: not in a test's time."""
    args: dict[str, Any] = {
        "endpoint_url": url,
        "region_name": "us-east-1",
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "config": AioConfig(read_timeout=120, retries={"max_attempts": 1}),
    }
    session = get_session()
    async with session.create_client("ssm", **args) as ssm:
        await ssm.describe_parameters()
    async with session.create_client("s3", **args) as s3:
        await s3.list_buckets()
    async with session.create_client("secretsmanager", **args) as secretsmanager:
        await secretsmanager.list_secrets()
    async with session.create_client("iam", **args) as iam:
        await iam.list_users()


@pytest.fixture
def aws_url(moto_server: str) -> str:
    """The emulator with every service emptied (moto's reset API) before the test."""
    reset = urllib.request.Request(moto_server + "/moto-api/reset", method="POST")  # noqa: S310
    with urllib.request.urlopen(reset, timeout=10) as answer:  # noqa: S310  (local emulator)
        assert answer.status == 200
    return moto_server
