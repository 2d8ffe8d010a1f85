"""Peak throughput and latency per endpoint with wrk, as ratios to a bare aiohttp app measured in
the same run. Each endpoint is measured in several rounds, each round between two reference runs
and compared with their mean, and the round with the median ratio is reported: a shared machine's
drift, or a burst of noise during one round, does not tilt a verdict.

    python -m loadtests.bench                     # every endpoint, 5 rounds of 5 s, 64 connections
    python -m loadtests.bench --rounds 5 --endpoint "GET /status" --endpoint "POST /update"
    python -m loadtests.bench --appendfsync always --endpoint "POST /update"

The service runs on a Valkey the benchmark starts, with fsync every second by default: the
table's targets were set for that; `--appendfsync always` measures the shipped durable setting.

Prints a table, saves JSON and a bar chart PNG under loadtests/results/, exits 1 when a target of
the table in the README is missed.
"""

from __future__ import annotations

import argparse
import contextlib
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

from konnichiwa.auth import new_api_key
from konnichiwa.embedded import VALKEY_CONFIG, valkey_server
from loadtests.plan import UNTHROTTLED
from tests.support import ServiceProcess, free_port, http_get, running_service

RESULTS = Path(__file__).with_name("results")
UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
RSS_EARLY, RSS_LATE, RSS_MAX_GROWTH = 200_000, 1_000_000, 0.05


@dataclass(frozen=True)
class Endpoint:
    """What wrk sends, and what the service must reach relative to the reference."""

    name: str
    path: str
    min_ratio: float
    max_p99_ms: float
    method: str = "GET"
    body: str = ""
    authorised: bool = False


ENDPOINTS = (
    Endpoint("GET /", "/", 0.85, 10),
    Endpoint("GET /health", "/health", 0.85, 10),
    Endpoint("GET /status", "/status", 0.60, 15),
    Endpoint("GET /inspect", "/inspect", 0.50, 15, authorised=True),
    Endpoint("POST /update", "/update", 0.35, 25, "POST", '{"increment":1}', authorised=True),
    Endpoint("GET /logs", "/logs?page=1&limit=10", 0.30, 25),
    Endpoint("GET /users", "/users?page=1&limit=10", 0.30, 25, authorised=True),
)


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


def wrk_script(endpoint: Endpoint, api_key: str, folder: Path) -> Path:
    """A wrk Lua script setting the method, body and headers of the endpoint's request."""
    script = folder / f"{re.sub(r'[^a-z]+', '-', endpoint.name.lower())}.lua"
    lines = [f'wrk.method = "{endpoint.method}"']
    if endpoint.body:
        lines += [
            f"wrk.body = '{endpoint.body}'",
            'wrk.headers["Content-Type"] = "application/json"',
        ]
    if endpoint.authorised:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {api_key}"')
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


def post_json(url: str, body: dict[str, object], api_key: str) -> None:
    request = urllib.request.Request(  # noqa: S310  (loopback URL of the service under test)
        url, json.dumps(body).encode(), {"Content-Type": "application/json",
                                        "Authorization": f"Bearer {api_key}"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=5):  # noqa: S310
        pass


def audit_total(base: str) -> int:
    """The audit log's size once Postgres holds every acknowledged change (waits for it)."""
    while True:
        status, body = http_get(base + "/logs?limit=1", timeout=5)
        if status == 200:
            total: int = json.loads(body)["total"]
            return total


def seed(base: str, api_key: str) -> None:
    """A few changes and users, so /logs and /users answer full pages."""
    for n in range(20):
        post_json(base + "/update", {"increment": 1, "message": f"seed {n}"}, api_key)
        post_json(base + "/users", {"name": "Yamada Taro", "email": f"seed{n}@example.jp"}, api_key)


@dataclass(frozen=True)
class Round:
    """One wrk run of an endpoint and the mean of the reference runs just before and after it."""

    figures: Measurement
    baseline: float
    persisted_per_second: float | None  # writes: the rate at which Postgres caught up

    @property
    def ratio(self) -> float:
        return self.figures.requests_per_second / self.baseline


def median_round(rounds: Sequence[Round]) -> Round:
    """The round whose ratio is the median (of an odd number; the upper middle of an even one)."""
    return sorted(rounds, key=lambda r: r.ratio)[len(rounds) // 2]


def result_of(endpoint: Endpoint, rounds: Sequence[Round]) -> Result:
    chosen = median_round(rounds)
    m, baseline, persisted = chosen.figures, chosen.baseline, chosen.persisted_per_second
    return Result(
        endpoint.name, m.requests_per_second, m.p50_ms, m.p99_ms, round(baseline),
        round(chosen.ratio, 3), endpoint.min_ratio, endpoint.max_p99_ms,
        sum(r.figures.errors for r in rounds), persisted,
        None if persisted is None else round(persisted / baseline, 3),
        tuple(round(r.ratio, 3) for r in rounds),
    )  # fmt: skip


def measure(
    base: str, endpoint: Endpoint, script: Path, options: argparse.Namespace
) -> tuple[Measurement, float | None]:
    """wrk against one endpoint; for writes, also the rate persisted to Postgres."""
    url = base + endpoint.path
    if endpoint.method == "GET":
        return run_wrk(url, options.duration, options.connections, script), None
    before, started = audit_total(base), time.monotonic()
    figures = run_wrk(url, options.duration, options.connections, script)
    persisted = audit_total(base) - before
    return figures, persisted / (time.monotonic() - started)


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
        f"{'endpoint':<15}{'req/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'ref/s':>9}{'ratio':>7}"
        f"{'target':>8}{'p99 <':>7}  verdict",
    ]
    for r in results:
        persisted = (
            f"  ({r.persisted_per_second:,.0f}/s persisted)" if r.persisted_per_second else ""
        )
        lines.append(
            f"{r.endpoint:<15}{r.requests_per_second:>10,.0f}{r.p50_ms:>8.2f}{r.p99_ms:>8.2f}"
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
        "--appendfsync", choices=("everysec", "always"), default="everysec",
        help="the fsync policy of the Valkey the service runs on (the table's targets are for "
        "everysec; the shipped default is always)",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, help="JSON file (default: results/bench-<time>)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_arguments(argv)
    ensure_wrk()
    chosen = [e for e in ENDPOINTS if not options.endpoint or e.name in options.endpoint]
    output = options.output or RESULTS / time.strftime("bench-%Y%m%d-%H%M%S.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    api_key = new_api_key()
    environment = {
        "API_KEYS": f"{api_key}:read+write+inspect",
        "ENVIRONMENT": "dev",
        "WORKERS": str(options.workers),
        **UNTHROTTLED,  # the limiter runs on every request, but wrk's one address is not refused
    }
    valkey = {**VALKEY_CONFIG, "appendfsync": options.appendfsync}
    with tempfile.TemporaryDirectory(prefix="konnichiwa-bench-") as scratch:
        folder = Path(scratch)
        with (
            valkey_server(folder / "valkey", config=valkey) as redis_url,
            reference_app(options.workers) as reference_url,
            running_service(
                folder / "service.log", {**environment, "REDIS_URL": redis_url}
            ) as service,
        ):
            seed(service.url, api_key)
            reference = [run_wrk(reference_url, options.duration, options.connections)]
            results = []
            memory = MemoryWatch(service, api_key)
            for endpoint in chosen:
                script = wrk_script(endpoint, api_key, folder)
                run_wrk(service.url + endpoint.path, 2, options.connections, script)  # warm-up
                rounds = []
                for _ in range(options.rounds):
                    figures, persisted = measure(service.url, endpoint, script, options)
                    reference.append(run_wrk(reference_url, options.duration, options.connections))
                    around = reference[-2].requests_per_second + reference[-1].requests_per_second
                    rounds.append(Round(figures, around / 2, persisted))
                    memory.observe()
                results.append(result_of(endpoint, rounds))
            growth = memory.finish(
                lambda: run_wrk(service.url + "/status", options.duration, options.connections)
            )
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
                    "appendfsync": options.appendfsync,
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
