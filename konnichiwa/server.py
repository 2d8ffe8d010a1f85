"""Serving: a supervisor that keeps N worker processes on one port, and the worker itself.

Workers bind the port with SO_REUSEPORT, so the kernel spreads connections over them; the port
is claimed for them first, against anyone else. The supervisor replaces a worker that dies and,
on SIGTERM or SIGINT, lets every worker drain its in-flight requests before it exits 0 — within
the 30 s an ECS task gets after SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from aiohttp.log import access_logger

from konnichiwa.app import counted_routes, create_app
from konnichiwa.logs import configure_logging
from konnichiwa.protocol import ConnectionPolicy, GuardedAppRunner
from konnichiwa.scoreboard import Scoreboard, ScoreboardFile
from konnichiwa.settings import Settings, SettingsError

log = logging.getLogger("konnichiwa.server")

DRAIN_SECONDS: Final = 20.0  # a worker's wait for in-flight requests after SIGTERM
STOP_SECONDS: Final = 24.0  # the supervisor's wait for its workers before SIGKILL
START_SECONDS: Final = 60.0  # how long a worker may take to open its pools and migrate
MAX_RESTART_DELAY: Final = 30.0
STABLE_SECONDS: Final = 10.0  # a worker that lived this long resets the restart back-off

PR_SET_PDEATHSIG: Final = 1  # from <linux/prctl.h>
ORPHANED: Final = signal.SIGUSR1  # what a worker gets when its supervisor dies

_spawn = multiprocessing.get_context("spawn")


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when it is installed, the standard loop otherwise."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def _stop_with_parent(parent: int) -> None:
    """Have the kernel send ORPHANED when the supervisor dies, even by SIGKILL (Linux).

    A signal of its own, not the supervisor's SIGTERM: the worker must know that nobody else will
    clean up after it. (The parent pid cannot tell: while the dying supervisor's other threads
    exit, the worker's parent is still that process.)
    """
    libc_name = ctypes.util.find_library("c")
    if sys.platform != "linux" or libc_name is None:
        return
    ctypes.CDLL(libc_name, use_errno=True).prctl(PR_SET_PDEATHSIG, ORPHANED)
    if os.getppid() != parent:  # it died before the request was in place
        os.kill(os.getpid(), ORPHANED)


def run_worker(
    settings: Settings, ready: Event, parent: int, board: ScoreboardFile, slot: int
) -> None:
    """A worker process: serve until SIGTERM or SIGINT, then drain and close the pools."""
    configure_logging(settings)
    _stop_with_parent(parent)
    orphaned = False
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            orphaned = runner.run(_serve(settings, ready, Scoreboard.open(board), slot))
    finally:
        if orphaned or os.getppid() != parent:  # the supervisor died: clean up for it
            shutil.rmtree(board.path.parent, ignore_errors=True)


async def _serve(settings: Settings, ready: Event, board: Scoreboard, slot: int) -> bool:
    """Serve until a signal; whether it was the one saying the supervisor died."""
    runner = GuardedAppRunner(
        create_app(settings, board, slot),
        ConnectionPolicy.for_worker(settings),
        access_log=access_logger if settings.access_log else None,
        shutdown_timeout=DRAIN_SECONDS,
    )
    await runner.setup()  # runs the cleanup contexts: Redis PING, Postgres migrations
    # Everything start-up made (modules, AWS service models, the app) lives as long as the worker:
    # out of the collector's sight, a full collection walks only what serving made, not 120k
    # objects — a 100 ms pause otherwise, every few seconds under load.
    gc.freeze()
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, ORPHANED):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=True, backlog=2048)
        await site.start()
        ready.set()
        await stop.wait()
        log.info("draining")
    finally:
        await runner.cleanup()
    return ORPHANED in received


@contextlib.contextmanager
def claimed_port(host: str, port: int) -> Iterator[None]:
    """Keep host:port for this supervisor's workers from before the first one starts until the
    supervisor exits; SettingsError if anyone else has it, or nobody can.

    SO_REUSEPORT would let a second konnichiwa (the same user, the same option) bind beside our
    workers and take half their connections. A probe bound without it fails while anyone listens
    on the port, or holds a guard there; our guard, bound with SO_REUSEPORT (so our workers can
    join it) but not SO_REUSEADDR, and never listening, then makes every other program's bind
    fail, also while a worker is being replaced. Only the few system calls between the probe and
    the guard are open: two supervisors would both pass only by reaching them in the same
    microseconds.
    """
    with contextlib.ExitStack() as guards:
        try:
            for family, address in _addresses(host, port):
                with _server_socket(family) as probe:
                    # A connection of an earlier run, in TIME_WAIT, holds nothing.
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(address)
                guard = guards.enter_context(_server_socket(family))
                guard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                guard.bind(address)
        except OSError as error:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if error.errno == errno.EADDRINUSE:
                raise SettingsError(
                    f"{where} is in use, by another konnichiwa or any other program: stop it, or "
                    "choose another port with PORT or --port"
                ) from None
            raise SettingsError(
                f"cannot listen on {where} ({error.strerror}): check HOST and PORT"
            ) from None
        yield


def _addresses(host: str, port: int) -> set[tuple[socket.AddressFamily, tuple[Any, ...]]]:
    """(family, address) of each socket the event loop listens on for host:port."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return {(family, address) for family, _, _, _, address in found}


def _server_socket(family: socket.AddressFamily) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:  # IPv6 only, as the event loop's listening sockets are
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


@dataclasses.dataclass(frozen=True)
class Worker:
    process: multiprocessing.process.BaseProcess
    # Held for the worker's life: the child opens this semaphore by name while it starts, and
    # the parent's last reference going away would unlink it.
    ready: Event
    started: float
    slot: int  # its place on the scoreboard, handed on to its replacement


class Supervisor:
    """Starts the workers, replaces any that die, and stops them all on a signal."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers: dict[int, Worker] = {}
        self.stopping = False
        self.restart_delay = 1.0
        self.board: ScoreboardFile

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        # Memory-backed where the system has /dev/shm: counting must never wait for a disk.
        shared = Path("/dev/shm")  # noqa: S108  (mkdtemp makes a private one inside)  # nosec B108
        directory = Path(
            tempfile.mkdtemp(prefix="konnichiwa-", dir=shared if shared.is_dir() else None)
        )
        self.board = ScoreboardFile(
            directory / "scoreboard", self.settings.workers, counted_routes(self.settings)
        )
        self.board.create()
        try:
            if not self._start_all():
                return 1
            print(
                f"Serving on http://{self.settings.host}:{self.settings.port} "
                f"with {self.settings.workers} worker(s); Ctrl-C or SIGTERM stops.",
                flush=True,
            )
            while not self.stopping:
                self._replace_dead()
            return 0
        finally:
            self._stop_all()
            shutil.rmtree(directory, ignore_errors=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _spawn_worker(self, slot: int) -> Worker:
        ready = _spawn.Event()
        process = _spawn.Process(
            target=run_worker,
            args=(self.settings, ready, os.getpid(), self.board, slot),
            daemon=False,
        )
        process.start()
        assert process.pid is not None  # noqa: S101  (set by start())
        worker = self.workers[process.pid] = Worker(process, ready, time.monotonic(), slot)
        return worker

    def _start_all(self) -> bool:
        """Start every worker and wait until all listen; False if one failed to start."""
        started = [self._spawn_worker(slot) for slot in range(self.settings.workers)]
        deadline = time.monotonic() + START_SECONDS
        for worker in started:
            process = worker.process
            while not worker.ready.wait(0.1):
                if self.stopping:
                    return True
                if not process.is_alive():
                    log.error(
                        "worker %s exited with code %s while starting",
                        process.pid,
                        process.exitcode,
                    )
                    return False
                if time.monotonic() > deadline:
                    log.error("worker %s did not start within %.0f s", process.pid, START_SECONDS)
                    return False
        return True

    def _replace_dead(self) -> None:
        sentinels = [worker.process.sentinel for worker in self.workers.values()]
        multiprocessing.connection.wait(sentinels, timeout=0.5)
        for pid, worker in list(self.workers.items()):
            if worker.process.is_alive() or self.stopping:
                continue
            del self.workers[pid]
            lived = time.monotonic() - worker.started
            self.restart_delay = 1.0 if lived > STABLE_SECONDS else self.restart_delay
            log.error(
                "worker %s exited with code %s after %.1f s; starting a new one in %.0f s",
                pid, worker.process.exitcode, lived, self.restart_delay,
            )  # fmt: skip
            self._sleep_unless_stopping(self.restart_delay)
            self.restart_delay = min(self.restart_delay * 2, MAX_RESTART_DELAY)
            if not self.stopping:
                self._spawn_worker(worker.slot)

    def _sleep_unless_stopping(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(0.1)

    def _stop_all(self) -> None:
        for pid, worker in self.workers.items():
            if worker.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for worker in self.workers.values():
            process = worker.process
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join()
        self.workers.clear()
