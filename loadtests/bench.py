"""Peak throughput and latency per endpoint with wrk, as ratios to a bare aiohttp app measured in
the same run. Each endpoint is measured in several rounds, each round between two reference runs
and compared with their mean, and the round with the median ratio is reported: a shared machine's
drift, or a burst of noise during one round, does not tilt a verdict.

    python -m loadtests.bench                     # every endpoint, 5 rounds of 5 s, 64 connections
    python -m loadtests.bench --rounds 5 --endpoint "GET /status" --endpoint "POST /update"
    python -m loadtests.bench --appendfsync always --endpoint "POST /update"

The service runs on a Valkey and a Postgres the benchmark starts: `POST /update` is measured once
on a Valkey that fsyncs every second and once on one that fsyncs every write (the shipped
setting), each with the changes carried per fsync; the reads on the first of them. Pages are read
at page 1 and, a different page and limit each request among the older half, at 10k and 1M audit
rows and users, written straight into Postgres.

Prints a table, saves JSON and a bar chart PNG under loadtests/results/, exits 1 when a target of
ENDPOINTS (the table in docs/performance.md) is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import asyncpg
import redis

from konnichiwa.auth import new_api_key
from konnichiwa.embedded import VALKEY_CONFIG, postgres_server, valkey_server
from konnichiwa.health import FRESH_FOR
from konnichiwa.testing import grow_audit_log, grow_users
from loadtests.plan import UNTHROTTLED
from tests.support import ServiceProcess, free_port, http_get, running_service

RESULTS = Path(__file__).with_name("results")
UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
RSS_EARLY, RSS_LATE, RSS_MAX_GROWTH = 200_000, 1_000_000, 0.05


SMALL, LARGE = 10_000, 1_000_000  # audit rows and users in the database
FSYNC_POLICIES = ("everysec", "always")  # Valkey's appendfsync: each second, each write


@dataclass(frozen=True)
class Endpoint:
    """What wrk sends, on what data and Valkey, and what the service must reach relative to the
    reference."""

    name: str
    path: str
    min_ratio: float
    max_p99_ms: float
    method: str = "GET"
    body: str = ""
    authorised: bool = False
    rows: int = SMALL  # the audit rows and users the database holds while it is measured
    random_pages: bool = False  # a page and limit of its own per request, among the older half
    appendfsync: str | None = None  # a write: the fsync policy of the Valkey it is measured on

    @property
    def label(self) -> str:
        """The name, and for a write its fsync policy, for a page read the data's size."""
        if self.appendfsync is not None:
            return f"{self.name} ({self.appendfsync})"
        if self.rows == SMALL and not self.random_pages:
            return self.name
        size = f"{self.rows // LARGE}M" if self.rows >= LARGE else f"{self.rows // 1000}k"
        return f"{self.name}, {size} rows"


ENDPOINTS = (
    Endpoint("GET /", "/", 0.95, 10),
    Endpoint("GET /health", "/health", 0.95, 10),
    Endpoint("GET /status", "/status", 0.80, 15),
    Endpoint("GET /inspect", "/inspect", 0.75, 15, authorised=True),
    Endpoint("POST /update", "/update", 0.50, 15, "POST", '{"increment":1}', authorised=True,
             appendfsync="everysec"),
    Endpoint("POST /update", "/update", 0.35, 15, "POST", '{"increment":1}', authorised=True,
             appendfsync="always"),
    Endpoint("GET /logs", "/logs?page=1&limit=10", 0.65, 25, rows=LARGE),
    Endpoint("GET /logs random pages", "/logs", 0.40, 25, random_pages=True),
    Endpoint("GET /logs random pages", "/logs", 0.40, 25, rows=LARGE, random_pages=True),
    Endpoint("GET /users", "/users?page=1&limit=10", 0.65, 25, authorised=True, rows=LARGE),
    Endpoint("GET /users random pages", "/users", 0.40, 25, authorised=True, random_pages=True),
    Endpoint("GET /users random pages", "/users", 0.40, 25, authorised=True, rows=LARGE,
             random_pages=True),
)  # fmt: skip


def selected(names: Sequence[str] | None, policies: Sequence[str]) -> list[Endpoint]:
    """The endpoints named (all without names), writes only for the fsync policies given."""
    return [
        e
        for e in ENDPOINTS
        if (not names or e.name in names) and e.appendfsync in (None, *policies)
    ]


def plan(chosen: Sequence[Endpoint], policies: Sequence[str]) -> list[tuple[str, list[Endpoint]]]:
    """A Valkey per fsync policy with the endpoints measured on it, in order: the reads on the
    first one's, by the size of their data (which only grows), then its writes (the rows written
    straight into Postgres take the numbers after the newest: none may be taken by a change)."""
    stacks = []
    for number, policy in enumerate(policies):
        measured = [
            e for e in chosen if e.appendfsync == policy or (e.appendfsync is None and number == 0)
        ]
        if measured:
            stacks.append((policy, sorted(measured, key=lambda e: (e.appendfsync or "", e.rows))))
    return stacks


@dataclass(frozen=True)
class Measurement:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


@dataclass(frozen=True)
class Result:
    endpoint: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    reference_per_second: float  # the mean of the reference runs just before and after
    ratio: float
    min_ratio: float
    max_p99_ms: float
    errors: int
    persisted_per_second: float | None = None  # writes: the rate at which Postgres caught up
    persisted_ratio: float | None = None
    round_ratios: tuple[float, ...] = ()  # every round's, the reported one among them
    changes_per_turn: float | None = None  # writes: see Round

    @property
    def met(self) -> bool:
        ratio = min(
            self.ratio, self.ratio if self.persisted_ratio is None else self.persisted_ratio
        )
        return ratio >= self.min_ratio and self.p99_ms < self.max_p99_ms and self.errors == 0


def parse_wrk(output: str) -> Measurement:
    """Figures from `wrk --latency` output."""

    def latency(percent: str) -> float:
        found = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        if found is None:
            raise ValueError(f"no {percent}% latency in wrk output:\n{output}")
        return float(found[1]) * UNITS[found[2]]

    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    total = re.search(r"^\s+(\d+) requests in", output, re.MULTILINE)
    if rate is None or total is None:
        raise ValueError(f"no throughput in wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    errors = int(non_2xx[1]) if non_2xx else 0
    errors += sum(int(n) for n in sockets.groups()) if sockets else 0
    return Measurement(float(rate[1]), latency("50"), latency("99"), int(total[1]), errors)


# Each request a page and limit of its own among the older half of `rows`: pages no cache holds.
# Limits of 5 to 15, 10 on average as on page 1, so the two rows differ in caching, not in size.
# Each thread draws its own.
RANDOM_PAGES = """
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("number", threads)
end
function init(args)
  math.randomseed(os.time() * 100 + number)
end
function request()
  local limit = math.random(5, 15)
  local pages = math.floor({rows} / limit)
  local page = math.random(math.floor(pages / 2) + 1, pages)
  return wrk.format(nil, "{path}?page=" .. page .. "&limit=" .. limit)
end
"""


def wrk_script(endpoint: Endpoint, api_key: str, folder: Path) -> Path:
    """A wrk Lua script setting the method, body and headers of the endpoint's requests."""
    script = folder / f"{re.sub(r'[^a-z0-9]+', '-', endpoint.label.lower())}.lua"
    lines = [f'wrk.method = "{endpoint.method}"']
    if endpoint.body:
        lines += [
            f"wrk.body = '{endpoint.body}'",
            'wrk.headers["Content-Type"] = "application/json"',
        ]
    if endpoint.authorised:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {api_key}"')
    if endpoint.random_pages:
        lines.append(RANDOM_PAGES.format(rows=endpoint.rows, path=endpoint.path))
    script.write_text("\n".join(lines) + "\n")
    return script


def run_wrk(url: str, seconds: int, connections: int, script: Path | None = None) -> Measurement:
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if script is not None:
        command[1:1] = ["-s", str(script)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return parse_wrk(output)


def ensure_wrk() -> None:
    """wrk from Debian, installed on first use (the benchmark's only system dependency)."""
    if shutil.which("wrk"):
        return
    if os.geteuid() != 0:
        sys.exit("bench: wrk is not installed; run `sudo apt-get install -y wrk`")
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False, capture_output=True)
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True)


@contextlib.contextmanager
def reference_app(workers: int) -> Iterator[str]:
    """The bare aiohttp + uvloop app with the same worker count; its URL."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loadtests.reference",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                if http_get(url, timeout=1)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the reference app did not start")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class Stack:
    """The service on a Valkey and a Postgres of its own; the rows its database was grown to."""

    service: ServiceProcess
    valkey_url: str
    database_url: str
    rows: int = 0


@contextlib.contextmanager
def stack(folder: Path, appendfsync: str, environment: dict[str, str]) -> Iterator[Stack]:
    """Start Valkey fsyncing as `appendfsync`, Postgres, and the service on them."""
    valkey = {**VALKEY_CONFIG, "appendfsync": appendfsync}
    with (
        valkey_server(folder / "valkey", config=valkey) as valkey_url,
        postgres_server(folder / "postgres") as database_url,
        running_service(
            folder / "service.log",
            {**environment, "REDIS_URL": valkey_url, "DATABASE_URL": database_url},
        ) as service,
    ):
        yield Stack(service, valkey_url, database_url)


def persisted_total(base: str) -> int:
    """The audit log's size once Postgres holds every change acknowledged before the call
    (waits for the outbox to drain; a readiness answer counts from FRESH_FOR after the call)."""
    fresh_from = time.monotonic() + FRESH_FOR
    while True:
        asked = time.monotonic()
        status, body = http_get(base + "/health/ready", timeout=5)
        backlog = json.loads(body).get("audit_backlog") if status == 200 else None
        if backlog is not None and backlog["entries"] == 0 and asked >= fresh_from:
            return logs_total(base)
        time.sleep(0.05)


def logs_total(base: str) -> int:
    """The number of changes /logs reports."""
    while True:
        status, body = http_get(base + "/logs?limit=1", timeout=5)
        if status == 200:
            total: int = json.loads(body)["total"]
            return total


def grow(stack: Stack, rows: int) -> None:
    """Grow the audit log and the users to `rows` straight in Postgres, and wait until the
    service's Redis carries on after them (each consumer checks every audit.CLAIM_EVERY)."""

    async def write() -> None:
        connection = await asyncpg.connect(stack.database_url)
        try:
            await grow_audit_log(connection, rows)
            await grow_users(connection, rows)
        finally:
            await connection.close()

    asyncio.run(write())
    deadline = time.monotonic() + 30
    while logs_total(stack.service.url) < rows:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service did not take up the {rows:,} rows written")
        time.sleep(0.2)
    stack.rows = rows


def valkey_turns(url: str) -> int:
    """How many turns Valkey's event loop has made (INFO stats)."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("stats")
    finally:
        client.close()
    return int(stats["eventloop_cycles"])


@dataclass(frozen=True)
class Round:
    """One wrk run of an endpoint and the mean of the reference runs just before and after it."""

    figures: Measurement
    baseline: float
    persisted_per_second: float | None = None  # writes: the rate at which Postgres caught up
    # Writes: changes per turn of Valkey's event loop. A turn writes the append-only file once
    # and, under appendfsync always, fsyncs it once if it wrote; Valkey counts turns, not fsyncs,
    # so this is at most the changes per fsync (turns that wrote nothing count too).
    changes_per_turn: float | None = None

    @property
    def ratio(self) -> float:
        return self.figures.requests_per_second / self.baseline


def median_round(rounds: Sequence[Round]) -> Round:
    """The round whose ratio is the median (of an odd number; the upper middle of an even one)."""
    return sorted(rounds, key=lambda r: r.ratio)[len(rounds) // 2]


def result_of(endpoint: Endpoint, rounds: Sequence[Round]) -> Result:
    chosen = median_round(rounds)
    m, baseline, persisted = chosen.figures, chosen.baseline, chosen.persisted_per_second
    per_turn = chosen.changes_per_turn
    return Result(
        endpoint.label, m.requests_per_second, m.p50_ms, m.p99_ms, round(baseline),
        round(chosen.ratio, 3), endpoint.min_ratio, endpoint.max_p99_ms,
        sum(r.figures.errors for r in rounds), persisted,
        None if persisted is None else round(persisted / baseline, 3),
        tuple(round(r.ratio, 3) for r in rounds), None if per_turn is None else round(per_turn, 1),
    )  # fmt: skip


def measure(stack: Stack, endpoint: Endpoint, script: Path, options: argparse.Namespace) -> Round:
    """wrk against one endpoint (no baseline yet); for writes, also the rate persisted to
    Postgres and the changes per Valkey turn."""
    url = stack.service.url + endpoint.path
    if endpoint.method == "GET":
        return Round(run_wrk(url, options.duration, options.connections, script), 0.0)
    before, started = persisted_total(stack.service.url), time.monotonic()
    turns = valkey_turns(stack.valkey_url)
    figures = run_wrk(url, options.duration, options.connections, script)
    turns = valkey_turns(stack.valkey_url) - turns
    changes = persisted_total(stack.service.url) - before
    return Round(figures, 0.0, changes / (time.monotonic() - started), changes / max(turns, 1))


@dataclass(frozen=True)
class MemoryGrowth:
    """Worker RSS after RSS_EARLY and after RSS_LATE requests served: it must stay flat."""

    early_requests: int
    early_rss: dict[int, int]  # by worker pid
    late_requests: int
    late_rss: dict[int, int]

    @property
    def growth(self) -> float:
        """The largest relative growth of one worker (infinite if a worker was replaced)."""
        if self.early_rss.keys() != self.late_rss.keys():
            return float("inf")
        return max((self.late_rss[pid] - rss) / rss for pid, rss in self.early_rss.items())

    @property
    def met(self) -> bool:
        return self.growth < RSS_MAX_GROWTH


class MemoryWatch:
    """Notes worker RSS once the service has served RSS_EARLY requests, and again at RSS_LATE."""

    def __init__(self, service: ServiceProcess, api_key: str) -> None:
        self.service, self.api_key = service, api_key
        self.early: tuple[int, dict[int, int]] | None = None

    def observe(self) -> tuple[int, dict[int, int]]:
        request = urllib.request.Request(  # noqa: S310  (loopback URL of the service under test)
            self.service.url + "/inspect", headers={"Authorization": f"Bearer {self.api_key}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            served: int = json.loads(response.read())["traffic"]["requests_served"]
        mark = served, {w.pid: w.memory_info().rss for w in self.service.workers()}
        if self.early is None and served >= RSS_EARLY:
            self.early = mark
        return mark

    def finish(self, more_load: Callable[[], object]) -> MemoryGrowth:
        """Add load until RSS_LATE requests are served; the growth between the two marks."""
        served, rss = self.observe()
        while served < RSS_LATE or self.early is None:
            more_load()
            served, rss = self.observe()
        assert self.early is not None
        return MemoryGrowth(*self.early, served, rss)


def chart(results: Sequence[Result], path: Path) -> None:
    import matplotlib  # noqa: PLC0415  (heavy; only this step needs it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(figsize=(9, 4.5))
    names = [result.endpoint for result in results]
    axes.bar(names, [result.ratio for result in results], color="#4c72b0", label="measured")
    axes.scatter(names, [result.min_ratio for result in results], color="#c44e52", marker="_",
                 s=900, linewidths=3, label="target", zorder=3)  # fmt: skip
    axes.set_ylabel("throughput ÷ bare aiohttp reference")
    axes.set_title("Konnichiwa vs a bare aiohttp app (same workers, same run)")
    axes.legend()
    for index, result in enumerate(results):
        axes.annotate(f"{result.requests_per_second:,.0f}/s", (index, result.ratio),
                      ha="center", va="bottom", fontsize=8)  # fmt: skip
    figure.autofmt_xdate(rotation=20)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def report(results: Sequence[Result], reference: Sequence[Measurement]) -> str:
    lines = [
        "reference (bare aiohttp) runs: "
        + ", ".join(f"{m.requests_per_second:,.0f}/s p99 {m.p99_ms:.1f} ms" for m in reference),
        f"{'endpoint':<34}{'req/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'ref/s':>9}{'ratio':>7}"
        f"{'target':>8}{'p99 <':>7}  verdict",
    ]
    for r in results:
        persisted = (
            f"  ({r.persisted_per_second:,.0f}/s persisted, {r.changes_per_turn} changes per "
            "Valkey turn)"
            if r.persisted_per_second
            else ""
        )
        lines.append(
            f"{r.endpoint:<34}{r.requests_per_second:>10,.0f}{r.p50_ms:>8.2f}{r.p99_ms:>8.2f}"
            f"{r.reference_per_second:>9,.0f}{r.ratio:>7.2f}"
            f"{r.min_ratio:>8.2f}{r.max_p99_ms:>7.0f}  "
            f"{'met' if r.met else 'MISSED'}{persisted}"
            f"  (rounds {' '.join(f'{ratio:.2f}' for ratio in r.round_ratios)})"
        )
    return "\n".join(lines)


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--duration", type=int, default=5, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=5, help="runs per endpoint (median kept)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--endpoint", action="append", choices=[e.name for e in ENDPOINTS],
        help="measure only these (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--appendfsync", action="append", choices=FSYNC_POLICIES,
        help="measure writes only on a Valkey with this fsync policy (repeatable; default: each "
        "in turn); the reads run on the first",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, help="JSON file (default: results/bench-<time>)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_arguments(argv)
    ensure_wrk()
    policies = options.appendfsync or FSYNC_POLICIES
    stacks = plan(selected(options.endpoint, policies), policies)
    output = options.output or RESULTS / time.strftime("bench-%Y%m%d-%H%M%S.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    api_key = new_api_key()
    environment = {
        "API_KEYS": f"{api_key}:read+write+inspect",
        "ENVIRONMENT": "dev",
        "WORKERS": str(options.workers),
        **UNTHROTTLED,  # the limiter runs on every request, but wrk's one address is not refused
    }
    measured: dict[Endpoint, Result] = {}
    growth: MemoryGrowth | None = None
    with (
        tempfile.TemporaryDirectory(prefix="konnichiwa-bench-") as scratch,
        reference_app(options.workers) as reference_url,
    ):
        reference = [run_wrk(reference_url, options.duration, options.connections)]
        for policy, endpoints in stacks:
            folder = Path(scratch) / policy
            with stack(folder, policy, environment) as running:
                memory = MemoryWatch(running.service, api_key) if growth is None else None
                for endpoint in endpoints:
                    if endpoint.rows > running.rows:
                        grow(running, endpoint.rows)
                    script = wrk_script(endpoint, api_key, folder)
                    url = running.service.url + endpoint.path
                    run_wrk(url, 2, options.connections, script)  # warm-up
                    rounds = []
                    for _ in range(options.rounds):
                        measurement = measure(running, endpoint, script, options)
                        reference.append(
                            run_wrk(reference_url, options.duration, options.connections)
                        )
                        around = (
                            reference[-2].requests_per_second + reference[-1].requests_per_second
                        )
                        rounds.append(dataclasses.replace(measurement, baseline=around / 2))
                        if memory is not None:
                            memory.observe()
                    measured[endpoint] = result_of(endpoint, rounds)
                if memory is not None:
                    status = running.service.url + "/status"
                    more = functools.partial(run_wrk, status, options.duration, options.connections)
                    growth = memory.finish(more)
    assert growth is not None
    results = [measured[e] for e in ENDPOINTS if e in measured]  # in the table's order
    print(report(results, reference))
    print(
        f"worker RSS {sorted(growth.early_rss.values())} bytes after {growth.early_requests:,} "
        f"requests, {sorted(growth.late_rss.values())} after {growth.late_requests:,}: "
        f"growth {growth.growth:.1%} (< {RSS_MAX_GROWTH:.0%}: {'met' if growth.met else 'MISSED'})"
    )
    output.write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "settings": {
                    "appendfsync": list(policies),
                    "workers": options.workers,
                    "duration_s": options.duration,
                    "rounds": options.rounds,
                    "connections": options.connections,
                    "load_generator": "wrk -t2",
                },
                "reference": [asdict(m) for m in reference],
                "results": [asdict(r) | {"met": r.met} for r in results],
                "memory": asdict(growth) | {"growth": growth.growth, "met": growth.met},
            },
            indent=2,
        )
        + "\n"
    )
    chart(results, output.with_suffix(".png"))
    print(f"saved {output} and {output.with_suffix('.png')}")
    return 0 if all(r.met for r in results) and growth.met else 1


if __name__ == "__main__":
    sys.exit(main())
