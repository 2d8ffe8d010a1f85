"""`/metrics`: the /inspect figures as Prometheus text, written straight from the scoreboard.

prometheus-client's multiprocess mode would keep one file per metric and process and re-read
them all on every scrape; the scoreboard already holds every worker's counters in one shared
mapping, so exposing it directly is the same result (correct across workers, counters that
survive a replaced worker) for less work and no extra dependency. Served on the service port
with the `inspect` scope, like /inspect: one port to open, one key to give Prometheus
(`authorization: {credentials: ...}` in its scrape config).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Final

from aiohttp import web

from konnichiwa.capacity import dependencies, sampler
from konnichiwa.ratelimit import POLICIES
from konnichiwa.scoreboard import (
    AWS_CACHE_RESULTS,
    BOUNDS,
    STATUS_CLASSES,
    Cell,
    RouteCell,
    scoreboard,
)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
# Exposed histogram buckets: the 1-2-3-5 bounds of the scoreboard's finer ones (so exact); 0.3 s
# is the latency objective's, which the alerting rules count requests against.
EXPOSED: Final = tuple(
    index
    for index, bound in enumerate(BOUNDS)
    if f"{bound:e}".startswith(("1.0", "2.0", "3.0", "5.0"))
)
Sample = tuple[str, dict[str, str], float]
# (method, path) of each route number the scoreboard counts, the last one for "other".
route_labels = web.AppKey("route_labels", tuple)


def _number(value: float) -> str:
    """Whole numbers as integers, others as the shortest repr of their value to the nanosecond:
    `1273 * 1e-6` reads 0.001273, not 0.0012729999999999998 (figures are whole µs at best)."""
    rounded = round(float(value), 9)
    return str(int(rounded)) if rounded.is_integer() else repr(rounded)


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def family(name: str, kind: str, text: str, samples: Iterable[Sample]) -> Iterator[str]:
    yield f"# HELP {name} {text}"
    yield f"# TYPE {name} {kind}"
    for suffix, labels, value in samples:
        rendered = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
        yield (
            f"{name}{suffix}{{{rendered}}} {_number(value)}"
            if labels
            else f"{name}{suffix} {_number(value)}"
        )


def _route_families(app: web.Application) -> Iterator[str]:
    labels = [{"method": method, "route": path} for method, path in app[route_labels]]
    totals = app[scoreboard].route_totals()
    seen = [(labels[n], row) for n, row in enumerate(totals) if sum(row[: RouteCell.SUM])]
    yield from family(
        "konnichiwa_requests_total", "counter", "Responses sent, by route and status class.",
        (("", {**route, "status": status}, row[index])
         for route, row in seen
         for index, status in enumerate(STATUS_CLASSES) if row[index]),
    )  # fmt: skip
    yield from family(
        "konnichiwa_request_duration_seconds", "histogram", "Time to answer, by route.",
        (sample for route, row in seen for sample in _histogram(route, row)),
    )  # fmt: skip


def _histogram(labels: dict[str, str], row: Sequence[int]) -> Iterator[Sample]:
    counts = row[RouteCell.HISTOGRAM :]
    cumulative = 0
    start = 0
    for index in EXPOSED:
        cumulative += sum(counts[start : index + 1])
        start = index + 1
        yield "_bucket", {**labels, "le": f"{BOUNDS[index]:g}"}, cumulative
    total = sum(counts)
    yield "_bucket", {**labels, "le": "+Inf"}, total
    yield "_sum", labels, row[RouteCell.SUM] / 1e6
    yield "_count", labels, total


def _worker_families(app: web.Application) -> Iterator[str]:
    workers = [(str(n), figures) for n, figures in app[scoreboard].workers() if figures[Cell.PID]]
    for name, kind, text, field, per_unit in (
        ("resident_memory_bytes", "gauge", "Resident memory of each worker.", Cell.RSS, 1),
        ("cpu_seconds_total", "counter", "CPU time each worker has used.", Cell.CPU_SECONDS_US,
         1e6),
        ("open_fds", "gauge", "Open file descriptors of each worker.", Cell.FDS, 1),
        ("threads", "gauge", "Threads of each worker.", Cell.THREADS, 1),
        ("connections", "gauge", "Open sockets of each worker.", Cell.CONNECTIONS, 1),
        ("event_loop_lag_seconds", "gauge", "How late each worker's loop woke up.",
         Cell.LOOP_LAG_US, 1e6),
        ("rate_limiter_down", "gauge", "1 while the worker's rate limiter cannot reach Redis.",
         Cell.RATE_LIMITER_DOWN, 1),
        ("start_time_seconds", "gauge", "When each worker started (Unix time): a change is a "
         "restart.", Cell.STARTED_US, 1e6),
    ):  # fmt: skip
        yield from family(
            f"konnichiwa_worker_{name}", kind, text,
            (("", {"worker": n}, figures[field] / per_unit) for n, figures in workers),
        )  # fmt: skip


def _service_families(app: web.Application) -> Iterator[str]:
    board, latest = app[scoreboard], app[sampler]
    in_flight = sum(figures[Cell.IN_FLIGHT] for _, figures in board.workers())
    deps = dependencies(board, latest.dependencies)
    host = latest.host
    named = {"redis": deps.redis, "postgres": deps.postgres}
    backlog = deps.audit_backlog
    yield from family("konnichiwa_requests_in_flight", "gauge", "Requests being answered.",
                      [("", {}, in_flight)])  # fmt: skip
    yield from family(
        "konnichiwa_dependency_up", "gauge", "1 when the dependency answered its last check.",
        (("", {"dependency": n}, d.status == "up") for n, d in named.items()),
    )  # fmt: skip
    yield from family(
        "konnichiwa_dependency_latency_seconds", "gauge", "Round trip of the last check.",
        (("", {"dependency": n}, d.latency_ms / 1000) for n, d in named.items()),
    )  # fmt: skip
    yield from family(
        "konnichiwa_pool_connections", "gauge", "Pooled connections of every worker, by state.",
        (("", {"pool": n, "state": state}, count)
         for n, d in named.items()
         for state, count in (("in_use", d.pool.in_use), ("idle", d.pool.idle))),
    )  # fmt: skip
    if backlog is not None:
        yield from family("konnichiwa_audit_backlog_entries", "gauge",
                          "Changes not yet in the Postgres audit log.",
                          [("", {}, backlog.entries)])  # fmt: skip
        yield from family("konnichiwa_audit_backlog_age_seconds", "gauge",
                          "How long the oldest of them has waited.",
                          [("", {}, backlog.oldest_age_seconds)])  # fmt: skip
    yield from family("konnichiwa_host_cpu_percent", "gauge", "CPU use of the host.",
                      [("", {}, host.cpu_percent)])  # fmt: skip
    yield from family("konnichiwa_host_memory_percent", "gauge", "Memory use of the host.",
                      [("", {}, host.memory.percent)])  # fmt: skip
    yield from family("konnichiwa_host_disk_percent", "gauge", "Use of the data volume.",
                      [("", {"path": host.disk.path}, host.disk.percent)])  # fmt: skip


def _counter_families(app: web.Application) -> Iterator[str]:
    workers = [figures for _, figures in app[scoreboard].workers()]
    yield from family(
        "konnichiwa_aws_cache_lookups_total", "counter",
        "Answers of /config and /storage by where they came from: the cache (hit), AWS (miss), "
        "or the last good answer while AWS fails (stale).",
        (("", {"result": result}, sum(w[Cell.AWS_CACHE + n] for w in workers))
         for n, result in enumerate(AWS_CACHE_RESULTS)),
    )  # fmt: skip
    yield from family(
        "konnichiwa_rate_limited_total", "counter", "Requests refused with 429, by policy.",
        (("", {"policy": name}, sum(w[Cell.RATE_LIMITED + n] for w in workers))
         for n, name in enumerate(POLICIES)),
    )  # fmt: skip
    yield from family(
        "konnichiwa_rate_limit_unchecked_total", "counter",
        "Requests decided while the rate limiter could not reach Redis: reads admitted (fail "
        "open), writes refused (fail closed).",
        (("", {"decision": decision}, sum(w[field] for w in workers))
         for decision, field in (("admitted", Cell.UNCHECKED_ADMITTED),
                                 ("refused", Cell.UNCHECKED_REFUSED))),
    )  # fmt: skip


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition (0.0.4) of the service's figures, every worker summed."""
    app = request.app
    lines = [
        *_route_families(app), *_service_families(app), *_counter_families(app),
        *_worker_families(app),
    ]  # fmt: skip
    return web.Response(
        body="\n".join(lines).encode() + b"\n", headers={"Content-Type": CONTENT_TYPE}
    )
