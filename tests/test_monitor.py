"""`konnichiwa monitor` as a real process against a real two-worker service: every exit code."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgspec
import pytest
from pytest_aiohttp import AiohttpClient

from konnichiwa.app import create_app
from konnichiwa.embedded import valkey_server
from konnichiwa.monitor import CRITICAL, add_arguments, evaluate
from konnichiwa.schemas import Inspection
from konnichiwa.settings import Settings
from tests.support import (
    FULL_AUTH,
    FULL_KEY,
    Servers,
    ServiceProcess,
    create_database,
    database_url_for,
)
from tests.support import running_service as serve

OK_LEVELS = ("--cpu", "100", "--memory", "100", "--disk", "100", "--critical", "100")
WARN_ON_MEMORY = ("--cpu", "100", "--memory", "0", "--disk", "100", "--critical", "100")


@pytest.fixture(scope="module")
def service(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One service for the module, on a database of its own."""
    name = f"monitor_{os.getpid()}"
    asyncio.run(create_database(servers.database_url, name))
    environment = {
        "REDIS_URL": servers.redis_url,
        "DATABASE_URL": database_url_for(servers.database_url, name),
        "API_KEY": FULL_KEY,
    }
    log = tmp_path_factory.mktemp("monitor") / "serve.log"
    with serve(log, environment, "--workers", "2") as running:
        yield running


def _environment(**variables: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if k not in ("API_URL", "API_KEY", "PORT")}
    return {**inherited, **variables}


def monitor(
    *args: str, cwd: Path | None = None, **variables: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "konnichiwa", "monitor", *args],
        env=_environment(**variables),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


CASES = [
    pytest.param(OK_LEVELS, 0, "OK", id="ok"),
    pytest.param(WARN_ON_MEMORY, 1, "WARNING", id="warning-memory"),
    pytest.param(("--critical", "0"), 2, "CRITICAL", id="critical"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "code", "state"), CASES)
def test_thresholds_set_the_exit_code(
    service: ServiceProcess, args: tuple[str, ...], code: int, state: str
) -> None:
    result = monitor(*args, API_URL=service.url, API_KEY=FULL_KEY)
    assert result.returncode == code, result.stdout + result.stderr
    assert result.stdout.startswith(f"KONNICHIWA {state} - ")
    assert "2 workers" in result.stdout


def test_json_report(service: ServiceProcess) -> None:
    result = monitor("--json", "--critical", "0", API_URL=service.url, API_KEY=FULL_KEY)
    assert result.returncode == 2
    report = json.loads(result.stdout)
    assert (report["status"], report["code"]) == ("CRITICAL", 2)
    assert set(report["checks"]) == {"cpu", "memory", "disk"}
    assert report["inspection"]["service"]["worker_count"] == 2


def test_the_default_url_is_the_service_port(service: ServiceProcess, tmp_path: Path) -> None:
    result = monitor(*OK_LEVELS, cwd=tmp_path, PORT=str(service.port), API_KEY=FULL_KEY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 workers" in result.stdout


def test_unknown_for_a_port_that_is_not_one(tmp_path: Path) -> None:
    result = monitor(*OK_LEVELS, cwd=tmp_path, PORT="http", API_KEY=FULL_KEY)
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout == (
        "KONNICHIWA UNKNOWN - PORT='http' is not valid: expected an integer from 1 to 65535\n"
    )


@pytest.mark.parametrize(
    "args",
    [("--cpu", "abc"), ("--cpu", "150"), ("--watch", "0"), ("--cpu",), ("--json", "--verbose")],
    ids=["not-a-number", "above-100", "no-interval", "no-value", "unknown-option"],
)
def test_a_usage_error_is_unknown_not_critical(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = monitor(*args, cwd=tmp_path, API_KEY=FULL_KEY)
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr.startswith("usage: konnichiwa monitor ")
    assert "\nkonnichiwa monitor: error: " in result.stderr


def test_help_names_the_settings_and_the_exit_codes(tmp_path: Path) -> None:
    result = monitor("--help", cwd=tmp_path)
    assert result.returncode == 0
    words = " ".join(result.stdout.split())
    for told in ("API_URL", "http://localhost:$PORT", "API_KEY", ".env", "0 OK", "1 WARNING",
                 "2 CRITICAL", "3 UNKNOWN", "usage error"):  # fmt: skip
        assert told in words


def test_reads_dot_env(service: ServiceProcess, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"API_URL={service.url}\nAPI_KEY={FULL_KEY}\n")
    result = monitor(*OK_LEVELS, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("path", "key", "says"),
    [
        pytest.param("", "wrong-key-0123456789abcdef", "answered 401", id="wrong-key"),
        pytest.param("", None, "API_KEY is not set", id="no-key"),
        pytest.param("/openapi.json?from=", FULL_KEY, "did not answer", id="not-an-inspect-answer"),
    ],
)
def test_unknown_when_the_service_cannot_be_asked(
    service: ServiceProcess, tmp_path: Path, path: str, key: str | None, says: str
) -> None:
    variables = {"API_URL": service.url + path} | ({} if key is None else {"API_KEY": key})
    result = monitor(*OK_LEVELS, cwd=tmp_path, **variables)
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.startswith("KONNICHIWA UNKNOWN - ")
    assert says in result.stdout


@contextmanager
def recording_server(status: HTTPStatus, location: str = "") -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on a free local port that answers every GET with `status` (and
    `location`), and records the Authorization header of each request it receives."""
    received: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            received.append(self.headers.get("Authorization", ""))
            self.send_response(status)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the test reads `received`, not stderr."""

    with ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}", received
        finally:
            server.shutdown()
            thread.join()


@pytest.mark.slow
@pytest.mark.parametrize(
    "status",
    [HTTPStatus.MOVED_PERMANENTLY, HTTPStatus.FOUND, HTTPStatus.SEE_OTHER,
     HTTPStatus.TEMPORARY_REDIRECT, HTTPStatus.PERMANENT_REDIRECT],
    ids=lambda status: str(status.value),
)  # fmt: skip
def test_a_redirect_is_unknown_and_the_key_stays_home(tmp_path: Path, status: HTTPStatus) -> None:
    with (
        recording_server(HTTPStatus.OK) as (elsewhere, received_elsewhere),
        recording_server(status, elsewhere + "/inspect") as (url, received),
    ):
        result = monitor(*OK_LEVELS, cwd=tmp_path, API_URL=url, API_KEY=FULL_KEY)
    assert received == [f"Bearer {FULL_KEY}"]
    assert received_elsewhere == [], "the redirect was followed"
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout == (
        f"KONNICHIWA UNKNOWN - {url}/inspect answered {status.value} {status.phrase}, "
        f"a redirect to {elsewhere}/inspect: not followed with the key\n"
    )


@pytest.mark.parametrize("url", ["file:///etc", "ftp://127.0.0.1", "localhost:4000"])
def test_unknown_for_a_url_that_is_not_http(tmp_path: Path, url: str) -> None:
    result = monitor(*OK_LEVELS, cwd=tmp_path, API_URL=url, API_KEY=FULL_KEY)
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout == (
        f"KONNICHIWA UNKNOWN - API_URL must be an http:// or https:// URL, not {url!r}\n"
    )


@pytest.mark.slow
def test_unknown_once_the_service_stops(tmp_path: Path, redis_url: str, database_url: str) -> None:
    environment = {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "API_KEY": FULL_KEY}
    with serve(tmp_path / "serve.log", environment, "--workers", "1") as running:
        assert monitor(*OK_LEVELS, API_URL=running.url, API_KEY=FULL_KEY).returncode == 0
        assert running.stop() == 0
    result = monitor(*OK_LEVELS, API_URL=running.url, API_KEY=FULL_KEY)
    assert result.returncode == 3
    assert result.stdout.startswith(f"KONNICHIWA UNKNOWN - cannot reach {running.url}")


@pytest.fixture
def interruptible() -> Iterator[None]:
    """Children started meanwhile can be interrupted, even when this suite inherited SIGINT
    ignored (a job a shell without job control started in the background): an ignored signal
    stays ignored in a child, a handled one is reset to its default."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("interruptible")
def test_watch_repeats_until_interrupted(service: ServiceProcess) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "konnichiwa", "monitor", "--watch", "0.2", *WARN_ON_MEMORY],
        env=_environment(API_URL=service.url, API_KEY=FULL_KEY),
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        reports = 0
        for line in process.stdout:
            reports += line.startswith("KONNICHIWA WARNING")
            if reports == 3:
                break
        process.send_signal(signal.SIGINT)
        # Keep reading: a child blocked on a full pipe could not get to its exit.
        rest, _ = process.communicate(timeout=30)
        assert process.returncode == 1, rest[-2000:]


@pytest.mark.slow
async def test_a_dependency_down_is_critical(
    aiohttp_client: AiohttpClient, settings: Settings, tmp_path: Path
) -> None:
    with valkey_server(tmp_path / "stopped") as url:
        client = await aiohttp_client(create_app(settings.replace(redis_url=url)))
    for _ in range(50):  # the sampler notices within about a second
        response = await client.get("/inspect", headers=FULL_AUTH)
        assert response.status == 200, "/inspect needs no Redis"
        answer = msgspec.json.decode(await response.read(), type=Inspection)
        if answer.dependencies.redis.status == "down":
            break
        await asyncio.sleep(0.1)
    assert answer.dependencies.redis.status == "down"
    assert answer.dependencies.postgres.status == "up"
    assert answer.dependencies.audit_backlog is None
    thresholds = argparse.ArgumentParser()
    add_arguments(thresholds)
    report = evaluate(answer, thresholds.parse_args(OK_LEVELS))
    assert (report.status, report.code) == ("CRITICAL", CRITICAL)
    assert "redis down" in report.summary
