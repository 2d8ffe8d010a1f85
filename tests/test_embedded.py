"""The dev stack: one live owner per state directory; other commands share it or refuse, and
only a dead owner's servers count as left over."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support import ServiceProcess, free_port, http_get, pid_from_file, running_service

pytestmark = pytest.mark.slow


def _dev(state_dir: Path) -> dict[str, str]:
    return {"ENVIRONMENT": "dev", "KONNICHIWA_STATE_DIR": str(state_dir)}


def _server_pids(state_dir: Path) -> tuple[int, int]:
    """Valkey's and PostgreSQL's pids, from the files the servers write."""
    return (
        pid_from_file(state_dir / "valkey" / "valkey.pid"),
        pid_from_file(state_dir / "postgres" / "postmaster.pid"),
    )


def _stopped(pid: int) -> bool:
    """Whether the process has exited (a zombie that its new parent has yet to reap has)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def konnichiwa(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A `konnichiwa` command run to its end on the dev stack in `state_dir`."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    return subprocess.run(
        [sys.executable, "-m", "konnichiwa", *args],
        env={**inherited, "HOST": "127.0.0.1", **_dev(state_dir)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    # Outside pytest's temporary tree (mode 700): PostgreSQL runs as a user of its own.
    with tempfile.TemporaryDirectory(prefix="konnichiwa-test-") as folder:
        yield Path(folder) / "state"


@pytest.fixture(scope="module")
def dev_stack(state_dir: Path) -> Iterator[ServiceProcess]:
    """`konnichiwa serve` on an embedded Valkey, PostgreSQL and AWS emulator of its own."""
    log = state_dir.parent / "serve.log"
    with running_service(log, _dev(state_dir), "--workers", "1") as service:
        yield service


def _printed_url(output: str, label: str) -> str:
    found = re.search(rf"^  {label}:\s+(\S+)$", output, re.MULTILINE)
    assert found, f"{label} URL not printed:\n{output}"
    return found[1]


def test_the_banner_and_the_lock_file_name_every_server(
    dev_stack: ServiceProcess, state_dir: Path
) -> None:
    printed = {
        "redis_url": _printed_url(dev_stack.output, r"Redis \(Valkey\)"),
        "database_url": _printed_url(dev_stack.output, "PostgreSQL"),
        "aws_endpoint_url": _printed_url(dev_stack.output, "AWS emulator"),
    }
    assert http_get(printed["aws_endpoint_url"] + "/moto-api/data.json")[0] == 200
    owner = json.loads((state_dir / "stack.lock").read_text())
    assert owner == {
        "pid": dev_stack.process.pid,
        "service_url": f"http://127.0.0.1:{dev_stack.port}",
        **printed,
    }


def test_migrate_uses_the_running_stack(dev_stack: ServiceProcess, state_dir: Path) -> None:
    pids = _server_pids(state_dir)
    result = konnichiwa(state_dir, "migrate")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(
        f"Using the running dev stack in {state_dir} (pid {dev_stack.process.pid}, serving "
        f"http://127.0.0.1:{dev_stack.port}):\n"
    )
    assert result.stdout.endswith("the schema is up to date\n")
    assert "stopping" not in result.stderr
    assert http_get(dev_stack.url + "/status")[0] == 200
    assert _server_pids(state_dir) == pids


def test_a_second_serve_refuses_and_names_the_first(
    dev_stack: ServiceProcess, state_dir: Path
) -> None:
    pids = _server_pids(state_dir)
    result = konnichiwa(state_dir, "serve", "--port", str(free_port()))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (
        f"konnichiwa: configuration error: the dev stack in {state_dir} is in use by pid "
        f"{dev_stack.process.pid}, serving http://127.0.0.1:{dev_stack.port}: stop it first, "
        "or set KONNICHIWA_STATE_DIR to another folder\n"
    )
    assert http_get(dev_stack.url + "/status")[0] == 200
    assert _server_pids(state_dir) == pids


def test_a_killed_owner_leaves_its_servers_to_the_next(tmp_path: Path, server_dir: Path) -> None:
    environment = _dev(server_dir / "state")
    first = ServiceProcess(tmp_path / "first.log", environment, "--workers", "1")
    first.wait_until_serving()
    valkey, postgres = _server_pids(server_dir / "state")
    first.process.kill()  # SIGKILL: its servers stay, and only the kernel releases its lock
    first.process.wait()
    with running_service(tmp_path / "second.log", environment, "--workers", "1") as second:
        assert http_get(second.url + "/status")[0] == 200
        assert f"stopping a valkey server (pid {valkey}) left running" in second.output
        assert _stopped(valkey)
        assert second.stop() == 0
    assert _stopped(postgres), "the dead owner's PostgreSQL is stopped with the stack"
