"""`konnichiwa serve` as a real process: embedded stack, start-up errors, workers, graceful stop."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
import psutil
import pytest
import redis

from konnichiwa.health import FRESH_FOR
from tests.support import ServiceProcess, http_get, paused, pid_from_file, running_service

pytestmark = pytest.mark.slow


def _printed_url(output: str, label: str) -> str:
    match = re.search(rf"{label}:\s+(\S+)", output)
    assert match, f"{label} URL not printed:\n{output}"
    return match[1]


async def _store_marker(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("CREATE TABLE restart_marker (value text)")
        await connection.execute("INSERT INTO restart_marker VALUES ('kept')")
    finally:
        await connection.close()


async def _read_marker(database_url: str) -> str:
    connection = await asyncpg.connect(database_url)
    try:
        value: str = await connection.fetchval("SELECT value FROM restart_marker")
        return value
    finally:
        await connection.close()


def test_embedded_stack_keeps_data_across_restarts(tmp_path: Path, server_dir: Path) -> None:
    environment = {"ENVIRONMENT": "dev", "KONNICHIWA_STATE_DIR": str(server_dir / "state")}
    with running_service(tmp_path / "first.log", environment, "--workers", "1") as first:
        assert http_get(first.url + "/health") == (200, b"ok")
        redis_url = _printed_url(first.output, r"Redis \(Valkey\)")
        database_url = _printed_url(first.output, "PostgreSQL")
        redis.Redis.from_url(redis_url).set("restart-marker", "kept")
        asyncio.run(_store_marker(database_url))
        valkey_pid = pid_from_file(server_dir / "state" / "valkey" / "valkey.pid")
        assert first.stop() == 0
    assert not psutil.pid_exists(valkey_pid), "Valkey left running after exit"
    assert not (server_dir / "state" / "postgres" / "postmaster.pid").exists()

    with running_service(tmp_path / "second.log", environment, "--workers", "1") as second:
        redis_url = _printed_url(second.output, r"Redis \(Valkey\)")
        database_url = _printed_url(second.output, "PostgreSQL")
        assert redis.Redis.from_url(redis_url).get("restart-marker") == b"kept"
        assert asyncio.run(_read_marker(database_url)) == "kept"
        assert second.stop() == 0
    assert (server_dir / "state" / "api-key").stat().st_mode & 0o077 == 0


def _serve(environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`konnichiwa serve` run to its end, with `environment` alone."""
    return subprocess.run(
        [sys.executable, "-m", "konnichiwa", "serve"],
        env={"PATH": "/usr/bin:/bin", **environment},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_prod_without_redis_url_refuses_to_start() -> None:
    result = _serve({"ENVIRONMENT": "prod", "DATABASE_URL": "postgresql://db/x"})
    assert result.returncode != 0
    assert "REDIS_URL is required when ENVIRONMENT=prod" in result.stderr


def test_bad_setting_refuses_to_start() -> None:
    result = _serve({"PORT": "http"})
    assert result.returncode == 2
    assert "PORT='http' is not valid: expected an integer from 1 to 65535" in result.stderr


def _in_use(port: int) -> str:
    return (
        f"konnichiwa: configuration error: 127.0.0.1:{port} is in use, by another konnichiwa or "
        "any other program: stop it, or choose another port with PORT or --port\n"
    )


def test_a_port_another_program_holds_refuses_to_start(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as held:  # listening, without SO_REUSEPORT
        port = held.getsockname()[1]
        result = _serve({
            "REDIS_URL": redis_url, "DATABASE_URL": database_url, "HOST": "127.0.0.1",
            "PORT": str(port), "KONNICHIWA_STATE_DIR": str(tmp_path / "state"),
        })  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == _in_use(port)
    assert "Serving on" not in result.stdout


def test_a_port_another_konnichiwa_serves_refuses_to_start(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    environment = {"REDIS_URL": redis_url, "DATABASE_URL": database_url}
    (tmp_path / "first").mkdir()
    with running_service(tmp_path / "first" / "serve.log", environment, "--workers", "2") as first:
        workers = first.workers()
        result = _serve({
            **environment, "HOST": "127.0.0.1", "PORT": str(first.port),
            "KONNICHIWA_STATE_DIR": str(tmp_path / "second"),
        })  # fmt: skip
        assert first.workers() == workers
        assert _serving(first)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == _in_use(first.port)


async def _ready_status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url + "/health/ready") as response:
        await response.read()
        return response.status


async def _steady_load(session: aiohttp.ClientSession, url: str, until: float) -> list[object]:
    outcomes: list[object] = []
    while time.monotonic() < until:
        try:
            async with session.get(url + "/") as response:
                await response.read()
                outcomes.append(response.status)
        except aiohttp.ClientError as error:
            outcomes.append(type(error).__name__)
            await asyncio.sleep(0.01)
    return outcomes


async def test_sigterm_drains_in_flight_requests(
    tmp_path: Path, database_url: str, servers: object
) -> None:
    from konnichiwa.embedded import valkey_server  # noqa: PLC0415

    with valkey_server(tmp_path / "valkey") as redis_url:
        environment = {"REDIS_URL": redis_url, "DATABASE_URL": database_url}
        with running_service(tmp_path / "serve.log", environment, "--workers", "2") as service:
            assert len(service.workers()) == 2
            # Readiness checks to a frozen Redis take 0.8 s: they are in flight at SIGTERM.
            with paused(pid_from_file(tmp_path / "valkey" / "valkey.pid")):
                await asyncio.sleep(FRESH_FOR)  # no answer of a check from before the freeze
                connector = aiohttp.TCPConnector(limit=0, force_close=True)
                async with aiohttp.ClientSession(connector=connector) as session:
                    in_flight = [
                        asyncio.create_task(_ready_status(session, service.url)) for _ in range(40)
                    ]
                    load = asyncio.create_task(
                        _steady_load(session, service.url, time.monotonic() + 3)
                    )
                    await asyncio.sleep(0.3)
                    stopped_at = time.monotonic()
                    service.process.send_signal(signal.SIGTERM)
                    statuses = await asyncio.gather(*in_flight)
                    outcomes = await load
                exit_code = await asyncio.to_thread(service.process.wait, 30)
            assert time.monotonic() - stopped_at < 25
    assert statuses == [503] * 40
    assert exit_code == 0
    # Requests that had not reached a worker when it stopped accepting fail to connect; every
    # request that got an answer got a whole one.
    assert 200 in outcomes
    assert {o for o in outcomes if isinstance(o, int)} == {200}, outcomes


def test_a_crashed_worker_is_replaced(tmp_path: Path, redis_url: str, database_url: str) -> None:
    environment = {"REDIS_URL": redis_url, "DATABASE_URL": database_url}
    with running_service(tmp_path / "serve.log", environment, "--workers", "2") as service:
        before = {worker.pid for worker in service.workers()}
        victim = psutil.Process(min(before))
        victim.kill()
        victim.wait(5)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = {worker.pid for worker in service.workers() if worker.is_running()}
            if len(now) == 2 and victim.pid not in now and _serving(service):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"worker not replaced:\n{service.output}")
        assert "exited with code -9" in service.output
        assert service.stop() == 0


def _serving(service: ServiceProcess) -> bool:
    return all(http_get(service.url + "/health")[0] == 200 for _ in range(10))


def test_workers_never_outlive_the_supervisor(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    environment = {"REDIS_URL": redis_url, "DATABASE_URL": database_url}
    with running_service(tmp_path / "serve.log", environment, "--workers", "2") as service:
        workers = service.workers()
        (scoreboard,) = {m.path for m in workers[0].memory_maps() if m.path.endswith("scoreboard")}
        service.process.kill()  # SIGKILL: the supervisor gets no chance to stop anyone
        service.process.wait()
        gone, alive = psutil.wait_procs(workers, timeout=25)
    assert alive == []
    assert len(gone) == 2
    assert not Path(scoreboard).parent.exists(), "the workers remove the shared scoreboard"
