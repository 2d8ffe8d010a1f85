"""The SLO command: its verdict on figures, and a short real run against the embedded stack."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtests.slo import EndpointStats, Objectives, Outcome

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


def test_slo_run_passes_on_the_embedded_stack(server_dir: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "loadtests.slo", "--run-time", "10", "--results", str(server_dir)],
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
    assert (server_dir / "locust.html").read_text().count("<html") == 1
    outcome = Outcome.read(server_dir / "locust")
    assert outcome.total.failures == 0
    assert outcome.total.requests >= 9000
