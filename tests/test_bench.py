"""The benchmark's arithmetic: wrk's output, the verdict per endpoint, the memory check, and
which Valkey each row is measured on, in what order."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from loadtests.bench import (
    ENDPOINTS,
    FSYNC_POLICIES,
    LARGE,
    Endpoint,
    Measurement,
    MemoryGrowth,
    Result,
    Round,
    parse_wrk,
    plan,
    result_of,
    selected,
)

WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:4000/status
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.21ms    2.10ms  40.12ms   80.00%
  Latency Distribution
     50%  850.00us
     75%    6.01ms
     90%    8.11ms
     99%   12.70ms
  110312 requests in 10.00s, 20.13MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  11030.82
Transfer/sec:      2.01MB
"""


def test_parse_wrk() -> None:
    figures = parse_wrk(WRK_OUTPUT)
    assert figures.requests_per_second == 11030.82
    assert figures.p50_ms == pytest.approx(0.85)
    assert figures.p99_ms == 12.7
    assert figures.requests == 110312
    assert figures.errors == 3


def test_parse_wrk_refuses_output_without_figures() -> None:
    with pytest.raises(ValueError, match="no throughput"):
        parse_wrk("unable to connect to 127.0.0.1:4000 Connection refused\n")


@pytest.mark.parametrize(
    ("ratio", "persisted_ratio", "p99_ms", "errors", "met"),
    [
        (0.40, None, 20.0, 0, True),
        (0.34, None, 20.0, 0, False),
        (0.40, 0.30, 20.0, 0, False),  # answered fast, but Postgres fell behind
        (0.40, 0.36, 20.0, 0, True),
        (0.40, None, 25.0, 0, False),
        (0.40, None, 20.0, 1, False),
    ],
)
def test_result_verdict(
    ratio: float, persisted_ratio: float | None, p99_ms: float, errors: int, met: bool
) -> None:
    result = Result(
        "POST /update", 6000, 5.0, p99_ms, 15000, ratio, 0.35, 25, errors, None, persisted_ratio
    )
    assert result.met is met


@pytest.mark.parametrize(
    ("early", "late", "growth", "met"),
    [
        ({1: 100, 2: 200}, {1: 104, 2: 200}, 0.04, True),
        ({1: 100, 2: 200}, {1: 100, 2: 212}, 0.06, False),
        ({1: 100, 2: 200}, {1: 90, 2: 190}, -0.05, True),
        ({1: 100, 2: 200}, {1: 100, 3: 200}, float("inf"), False),  # a worker was replaced
    ],
)
def test_memory_growth(
    early: dict[int, int], late: dict[int, int], growth: float, met: bool
) -> None:
    check = MemoryGrowth(200_000, early, 1_000_000, late)
    assert check.growth == pytest.approx(growth)
    assert check.met is met


def _round(rate: float, baseline: float, p99_ms: float, errors: int = 0) -> Round:
    return Round(Measurement(rate, 2.0, p99_ms, int(rate * 5), errors), baseline, None)


def test_the_median_round_is_reported_with_every_rounds_errors() -> None:
    greeting = Endpoint("GET /", "/", 0.85, 10)
    slow_burst = _round(12_000, 20_000, 30.0)  # noise in one round: 0.60
    rounds = [_round(18_000, 20_000, 8.0), slow_burst, _round(19_000, 20_000, 7.0, errors=2)]
    result = result_of(greeting, rounds)
    assert (result.ratio, result.p99_ms, result.reference_per_second) == (0.9, 8.0, 20_000)
    assert result.round_ratios == (0.9, 0.6, 0.95)
    assert result.errors == 2
    assert not result.met, "an error in any round fails the endpoint"
    clean = result_of(greeting, [*rounds[:2], _round(19_000, 20_000, 7.0)])
    assert clean.met
    assert result_of(greeting, [slow_burst]).met is False


@pytest.mark.parametrize(
    ("endpoint", "label"),
    [
        (Endpoint("GET /status", "/status", 0.8, 15), "GET /status"),
        (Endpoint("POST /update", "/update", 0.35, 15, appendfsync="always"),
         "POST /update (always)"),
        (Endpoint("GET /logs", "/logs", 0.65, 25, rows=LARGE), "GET /logs, 1M rows"),
        (Endpoint("GET /users random pages", "/users", 0.4, 25, random_pages=True),
         "GET /users random pages, 10k rows"),
    ],
)  # fmt: skip
def test_each_row_names_its_fsync_policy_or_data_size(endpoint: Endpoint, label: str) -> None:
    assert endpoint.label == label


def _labels(stacks: list[tuple[str, list[Endpoint]]]) -> list[tuple[str, list[str]]]:
    return [(policy, [e.label for e in endpoints]) for policy, endpoints in stacks]


def test_reads_run_on_the_first_valkey_by_data_size_before_its_writes() -> None:
    (first, reads), (second, writes) = _labels(plan(selected(None, FSYNC_POLICIES), FSYNC_POLICIES))
    assert (first, second) == FSYNC_POLICIES
    assert writes == ["POST /update (always)"]
    assert reads[-1] == "POST /update (everysec)"
    assert reads.index("GET /logs random pages, 10k rows") < reads.index("GET /logs, 1M rows")
    assert len(reads) == len(ENDPOINTS) - 1


@pytest.mark.parametrize(
    ("names", "policies", "stacks"),
    [
        (["POST /update"], ["always"], [("always", ["POST /update (always)"])]),
        (["GET /status"], ["always"], [("always", ["GET /status"])]),
        (["POST /update"], FSYNC_POLICIES,
         [("everysec", ["POST /update (everysec)"]), ("always", ["POST /update (always)"])]),
        (["GET /status"], FSYNC_POLICIES, [("everysec", ["GET /status"])]),
    ],
)  # fmt: skip
def test_only_the_valkeys_the_chosen_rows_need_are_started(
    names: list[str], policies: Sequence[str], stacks: list[tuple[str, list[str]]]
) -> None:
    assert _labels(plan(selected(names, policies), policies)) == stacks
