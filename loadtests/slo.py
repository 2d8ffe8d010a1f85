"""The service-level check: the mixed Locust scenario at a fixed rate, judged against the SLO.

    python -m loadtests.slo                       # embedded stack, 1,000 req/s for 60 s
    python -m loadtests.slo --host URL --api-key=KEY --rate 2000 --run-time 120
    python -m loadtests.slo -- --processes 2      # anything after -- goes to Locust

Exit status: 0 when every objective holds, 1 when one is missed, 2 when the run itself failed.
Locust's CSV files and HTML report (with charts) are written to the results folder.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

from prometheus_client.parser import text_string_to_metric_families

from konnichiwa.auth import new_api_key
from loadtests.plan import UNTHROTTLED, USER_RATE
from tests.support import running_service

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
RESULTS = Path(__file__).with_name("results")


@dataclass(frozen=True)
class Objectives:
    """What a run must achieve; the defaults are the product's promise."""

    rate: float = 1000.0
    min_rate_ratio: float = 0.95
    p95_ms: float = 300.0
    p99_ms: float = 1000.0
    max_failure_ratio: float = 0.001


@dataclass(frozen=True)
class EndpointStats:
    """One row of Locust's `_stats.csv`."""

    name: str
    requests: int
    failures: int
    requests_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def from_row(cls, row: dict[str, str]) -> EndpointStats:
        def number(column: str) -> float:
            value = row[column]
            return 0.0 if value in ("", "N/A") else float(value)

        return cls(
            name=f"{row['Type']} {row['Name']}".strip(),
            requests=int(row["Request Count"]), failures=int(row["Failure Count"]),
            requests_per_second=number("Requests/s"), p50_ms=number("50%"),
            p95_ms=number("95%"), p99_ms=number("99%"), max_ms=number("Max Response Time"),
        )  # fmt: skip


class RunFiles(NamedTuple):
    """The files of a Locust run that the verdict reads, under one prefix."""

    stats: Path  # per-endpoint rows (--csv)
    statistics: Path  # final statistics with per-second counts (--json-file)
    window: Path  # when every user ran and when the run stopped (--steady-window-file)

    @classmethod
    def at(cls, prefix: Path) -> RunFiles:
        return cls(
            Path(f"{prefix}_stats.csv"), Path(f"{prefix}.json"), Path(f"{prefix}_window.json")
        )


@dataclass(frozen=True)
class Outcome:
    """A finished run: per-endpoint rows, the aggregate, and the steady-state rate."""

    endpoints: tuple[EndpointStats, ...]
    total: EndpointStats
    steady_rate: float

    @classmethod
    def read(cls, prefix: Path) -> Outcome:
        files = RunFiles.at(prefix)
        with files.stats.open(newline="") as stats:
            rows = [EndpointStats.from_row(row) for row in csv.DictReader(stats)]
        window = json.loads(files.window.read_text())
        entries = json.loads(files.statistics.read_text())
        per_second = [entry["num_reqs_per_sec"] for entry in entries]
        return cls(
            tuple(rows[:-1]), rows[-1], rate_between(per_second, window["start"], window["stop"])
        )

    def misses(self, objectives: Objectives) -> list[str]:
        """Every objective the run missed, in words; empty when the SLO holds."""
        total, found = self.total, []
        if self.steady_rate < objectives.rate * objectives.min_rate_ratio:
            found.append(
                f"throughput {self.steady_rate:.0f} req/s is below "
                f"{objectives.min_rate_ratio:.0%} of the {objectives.rate:.0f} req/s target"
            )
        if total.p95_ms >= objectives.p95_ms:
            found.append(f"p95 {total.p95_ms:.0f} ms is not under {objectives.p95_ms:.0f} ms")
        if total.p99_ms >= objectives.p99_ms:
            found.append(f"p99 {total.p99_ms:.0f} ms is not under {objectives.p99_ms:.0f} ms")
        failure_ratio = total.failures / total.requests if total.requests else 1.0
        if failure_ratio > objectives.max_failure_ratio:
            found.append(
                f"{total.failures} of {total.requests} requests failed ({failure_ratio:.2%} > "
                f"{objectives.max_failure_ratio:.2%})"
            )
        return found

    def summary(self) -> str:
        """One screen: a line per endpoint and the aggregate."""
        header = f"{'endpoint':<28}{'requests':>10}{'fails':>7}{'req/s':>9}"
        header += f"{'p50':>7}{'p95':>7}{'p99':>7}{'max':>8}  (ms)"
        lines = [header]
        for row in (*self.endpoints, self.total):
            lines.append(
                f"{row.name[:27]:<28}{row.requests:>10}{row.failures:>7}"
                f"{row.requests_per_second:>9.1f}{row.p50_ms:>7.0f}{row.p95_ms:>7.0f}"
                f"{row.p99_ms:>7.0f}{row.max_ms:>8.0f}"
            )
        lines.append(f"steady-state throughput: {self.steady_rate:.1f} req/s")
        return "\n".join(lines)


def rate_between(per_second: Sequence[dict[str, int]], start: float, stop: float) -> float:
    """Requests a second over the whole seconds between `start` and `stop`, from Locust's final
    per-second counts (one dict per endpoint, keyed by the wall-clock second)."""
    seconds = range(math.ceil(start), math.floor(stop))
    requests = sum(counts.get(str(second), 0) for counts in per_second for second in seconds)
    return requests / len(seconds) if seconds else 0.0


# Cumulative request counts per latency bucket (upper bound in seconds), by route.
Histograms = dict[str, dict[float, float]]
DURATION: Final = "konnichiwa_request_duration_seconds"


@dataclass(frozen=True)
class ServiceLatency:
    """The service's own latency histograms (its /metrics), so a run can tell the time spent in
    the service from the time spent in the load generator and on the way."""

    histograms: Histograms

    @classmethod
    def scrape(cls, host: str, api_key: str) -> ServiceLatency | None:
        """The histograms now; None when /metrics cannot be read (a key without `inspect`)."""
        request = urllib.request.Request(  # noqa: S310  (the service under test, http)
            f"{host}/metrics", headers={"Authorization": f"Bearer {api_key}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                text = response.read().decode()
        except (urllib.error.URLError, OSError):
            return None
        histograms: Histograms = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples if family.name == DURATION else ():
                if sample.name == f"{DURATION}_bucket":
                    route = f"{sample.labels['method']} {sample.labels['route']}"
                    histograms.setdefault(route, {})[float(sample.labels["le"])] = sample.value
        return cls(histograms)

    def since(self, earlier: ServiceLatency) -> ServiceLatency:
        """The requests served between `earlier` and this scrape."""
        return ServiceLatency({
            route: {le: count - earlier.histograms.get(route, {}).get(le, 0.0)
                    for le, count in buckets.items()}
            for route, buckets in self.histograms.items()
        })  # fmt: skip

    def summary(self) -> str:
        """A line per route and one for all: requests and p50/p95/p99, each the upper bound of
        the 1-2-3-5 bucket it falls in (so 'p99 10' reads: 99 % were answered within 10 ms)."""
        rows = {route: b for route, b in self.histograms.items() if max(b.values(), default=0)}
        everything: dict[float, float] = {}
        for buckets in rows.values():
            for le, count in buckets.items():
                everything[le] = everything.get(le, 0.0) + count
        lines = [f"{'inside the service (its /metrics)':<38}{'requests':>10}"
                 f"{'p50':>7}{'p95':>7}{'p99':>7}  (ms, bucket bounds)"]  # fmt: skip
        for route, buckets in (*sorted(rows.items()), ("all routes", everything)):
            figures = "".join(f"{_bound(buckets, q):>7}" for q in (0.5, 0.95, 0.99))
            lines.append(f"{route[:37]:<38}{max(buckets.values(), default=0):>10.0f}{figures}")
        return "\n".join(lines)


def _bound(buckets: dict[float, float], quantile: float) -> str:
    """The smallest bucket bound (ms) within which `quantile` of the requests were answered."""
    ordered = sorted(buckets.items())
    total = ordered[-1][1] if ordered else 0.0
    for le, count in ordered:
        if total and count >= quantile * total:
            return "inf" if le == float("inf") else f"{le * 1000:g}"
    return "-"


def locust_command(
    host: str, api_key: str, prefix: Path, options: argparse.Namespace, extra: Sequence[str]
) -> list[str]:
    """The headless Locust run: fixed-rate shape, CSV and HTML reports under `prefix`."""
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--host", host, f"--api-key={api_key}", "--shape", "fixed",
        "--rate", str(options.rate), "--user-rate", str(options.user_rate),
        "--mix", options.mix, "--run-time", f"{options.run_time}s", "--stop-timeout", "5",
        "--csv", str(prefix), "--html", f"{prefix}.html",
        "--json-file", str(prefix), "--steady-window-file", str(RunFiles.at(prefix).window),
        "--loglevel", "WARNING", "--only-summary",
        *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def target(options: argparse.Namespace, folder: Path) -> Iterator[tuple[str, str]]:
    """(URL, API key) of the service under test: `--host`, or one started on the embedded stack."""
    if options.host:
        yield options.host, options.api_key
        return
    api_key = new_api_key()
    environment = {
        "API_KEYS": f"{api_key}:read+write+inspect",
        "ENVIRONMENT": "dev",
        **UNTHROTTLED,  # the limiter runs on every request, but Locust's one address is not refused
    }
    if options.workers:
        environment["WORKERS"] = str(options.workers)
    with running_service(folder / "service.log", environment) as service:
        yield service.url, api_key


def parse_arguments(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", help="a running service (default: start one)")
    parser.add_argument(
        "--api-key", default="", help="its key with read, write, inspect scopes (--api-key=KEY)"
    )
    parser.add_argument("--workers", type=int, help="worker processes of a started service")
    parser.add_argument("--rate", type=float, default=Objectives.rate, help="requests/s")
    parser.add_argument(
        "--user-rate", type=float, default=USER_RATE, help="requests/s per simulated user"
    )
    parser.add_argument("--run-time", type=int, default=60, help="seconds")
    parser.add_argument("--mix", default="reader=70,writer=20,operator=5,admin=5")
    parser.add_argument("--results", type=Path, help="folder for the reports")
    parser.add_argument("--p95-ms", type=float, default=Objectives.p95_ms)
    parser.add_argument("--p99-ms", type=float, default=Objectives.p99_ms)
    parser.add_argument("--max-failure-ratio", type=float, default=Objectives.max_failure_ratio)
    arguments = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in arguments:
        split = arguments.index("--")
        arguments, extra = arguments[:split], arguments[split + 1 :]
    options = parser.parse_args(arguments)
    if options.host and not options.api_key:
        parser.error("--api-key is required with --host")
    return options, extra


def main(argv: Sequence[str] | None = None) -> int:
    options, extra = parse_arguments(argv)
    folder = options.results or RESULTS / time.strftime("slo-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / "locust"
    objectives = Objectives(
        options.rate, p95_ms=options.p95_ms, p99_ms=options.p99_ms,
        max_failure_ratio=options.max_failure_ratio,
    )  # fmt: skip
    with target(options, folder) as (host, api_key):
        print(f"slo: {options.rate:.0f} req/s for {options.run_time} s against {host}", flush=True)
        before = ServiceLatency.scrape(host, api_key)
        run = subprocess.run(locust_command(host, api_key, prefix, options, extra), check=False)
        after = ServiceLatency.scrape(host, api_key)
    if not all(path.is_file() for path in RunFiles.at(prefix)):
        print(f"slo: the Locust run produced no results (exit {run.returncode})", file=sys.stderr)
        return 2
    outcome = Outcome.read(prefix)
    print(outcome.summary())
    if before is not None and after is not None:
        print(after.since(before).summary())
    else:
        print("the service's own figures: its /metrics could not be read (a key without `inspect`)")
    print(f"reports: {folder}")
    misses = outcome.misses(objectives)
    for miss in misses:
        print(f"SLO MISSED: {miss}")
    if not misses:
        print(
            f"SLO met: >= {objectives.min_rate_ratio:.0%} of {objectives.rate:.0f} req/s, "
            f"p95 < {objectives.p95_ms:.0f} ms, p99 < {objectives.p99_ms:.0f} ms, "
            f"failures <= {objectives.max_failure_ratio:.1%}"
        )
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
