"""The SLO command: its verdict on figures, and a short real run against the embedded stack."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtests.plan import UNTHROTTLED
from loadtests.slo import EndpointStats, Objectives, Outcome, ServiceLatency, rate_between
from tests.support import free_port, running_service

ROOT = Path(__file__).parents[1]
GOOD = EndpointStats("Aggregated", 60_000, 0, 1000.0, 2.0, 5.0, 9.0, 40.0)


@pytest.mark.parametrize(
    ("changes", "steady_rate", "missed"),
    [
        ({}, 999.0, []),
        ({}, 950.0, []),
        ({}, 949.0, ["throughput 949 req/s is below 95% of the 1000 req/s target"]),
        ({"p95_ms": 300.0}, 1000.0, ["p95 300 ms is not under 300 ms"]),
        ({"p99_ms": 1000.0}, 1000.0, ["p99 1000 ms is not under 1000 ms"]),
        ({"failures": 60}, 1000.0, []),
        ({"failures": 61}, 1000.0, ["61 of 60000 requests failed (0.10% > 0.10%)"]),
        ({"requests": 0}, 0.0, ["throughput", "0 of 0 requests failed"]),
    ],
)
def test_misses(changes: dict[str, Any], steady_rate: float, missed: list[str]) -> None:
    total = dataclasses.replace(GOOD, **changes)
    found = Outcome((total,), total, steady_rate).misses(Objectives())
    assert len(found) == len(missed)
    for text, expected in zip(found, missed, strict=True):
        assert text.startswith(expected)


def test_rate_between_counts_whole_seconds_of_every_endpoint() -> None:
    status = {"99": 500, "100": 400, "101": 410, "102": 420, "103": 90}
    update = {"99": 100, "100": 100, "101": 100, "102": 110, "104": 5}
    # Spawning ended at 99.4 and the stop came at 103.2: seconds 100-102 are whole.
    assert rate_between([status, update], 99.4, 103.2) == pytest.approx(1540 / 3)
    assert rate_between([status], 100.0, 101.0) == 400
    assert rate_between([status], 100.2, 100.9) == 0.0


def test_service_latency_counts_only_the_run_and_reads_bucket_bounds() -> None:
    inf = float("inf")
    before = ServiceLatency({"GET /status": {0.001: 50, 0.002: 50, 0.01: 50, inf: 50}})
    after = ServiceLatency({
        "GET /status": {0.001: 50, 0.002: 140, 0.01: 149, inf: 150},  # 90, 9 and 1 in the run
        "POST /update": {0.001: 0, 0.002: 0, 0.01: 10, inf: 10},
        "GET /idle": {0.001: 0, 0.002: 0, 0.01: 0, inf: 0},
    })  # fmt: skip
    lines = after.since(before).summary().splitlines()
    assert lines[1].split() == ["GET", "/status", "100", "2", "10", "10"]
    assert lines[2].split() == ["POST", "/update", "10", "10", "10", "10"]
    assert lines[3].split() == ["all", "routes", "110", "2", "10", "10"]
    assert len(lines) == 4, "a route without requests in the run is left out"
    slow = ServiceLatency({"GET /": {0.001: 0, inf: 100}}).summary().splitlines()
    assert slow[1].split()[-3:] == ["inf", "inf", "inf"]


def test_service_latency_is_none_when_metrics_cannot_be_read() -> None:
    assert ServiceLatency.scrape(f"http://127.0.0.1:{free_port()}", "any-key") is None


@pytest.mark.slow
@pytest.mark.parametrize(
    "locust_options",
    [
        pytest.param([], id="one-process"),
        pytest.param(["--", "--processes", "2"], id="distributed"),
    ],
)
def test_slo_run_passes_on_the_embedded_stack(server_dir: Path, locust_options: list[str]) -> None:
    # Distributed, the master learns the workers' counts from their reports, which arrive up to
    # seconds later than the requests: the steady-state rate must still count every request.
    run = subprocess.run(
        [sys.executable, "-m", "loadtests.slo", "--run-time", "10", "--results", str(server_dir),
         *locust_options],
        cwd=ROOT, capture_output=True, text=True, timeout=170, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SLO met" in run.stdout
    for endpoint in (
        "GET /status",
        "POST /update",
        "GET /logs?page=[n]",
        "POST /users",
        "GET /inspect",
    ):
        assert endpoint in run.stdout
    service = run.stdout[run.stdout.index("inside the service") :].splitlines()
    assert any(line.startswith("POST /update") for line in service), "the service's own figures"
    assert any(line.startswith("all routes") for line in service)
    assert (server_dir / "locust.html").read_text().count("<html") == 1
    outcome = Outcome.read(server_dir / "locust")
    assert outcome.total.failures == 0
    assert outcome.total.requests >= 9000


@pytest.mark.slow
def test_a_key_that_looks_like_an_option_reaches_locust(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    key = "-a-key-that-starts-like-an-option-0123456789"
    environment = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "API_KEYS": f"{key}:read+write+inspect",
        **UNTHROTTLED,
    }
    with running_service(tmp_path / "serve.log", environment, "--workers", "1") as service:
        run = subprocess.run(
            [sys.executable, "-m", "loadtests.slo", "--host", service.url, f"--api-key={key}",
             "--rate", "50", "--run-time", "3", "--results", str(tmp_path / "slo")],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert "expected one argument" not in run.stderr
    outcome = Outcome.read(tmp_path / "slo" / "locust")
    assert outcome.total.requests > 0, run.stdout + run.stderr
    assert outcome.total.failures == 0, "every request, with the key or without, was answered"
