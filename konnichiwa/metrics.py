"""`/metrics`: the /inspect figures as Prometheus text, collected from the scoreboard per scrape.

prometheus-client's multiprocess mode would keep a file per metric and process and re-read them
all on every scrape; the scoreboard already holds every worker's counters in one shared mapping,
so a custom collector reads it directly (correct across workers, counters that survive a replaced
worker). Served on the service port with the `inspect` scope, like /inspect: one port to open,
one key to give Prometheus (`authorization: {credentials: ...}` in its scrape config).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Final

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

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

# Exposed histogram buckets: the 1-2-3-5 bounds of the scoreboard's finer ones (so exact); 0.3 s
# is the latency objective's, which the alerting rules count requests against.
EXPOSED: Final = tuple(
    index
    for index, bound in enumerate(BOUNDS)
    if f"{bound:e}".startswith(("1.0", "2.0", "3.0", "5.0"))
)
# (label values, value) of each sample of a family.
Samples = Iterable[tuple[Sequence[str], float]]
# (method, path) of each route number the scoreboard counts, the last one for "other".
route_labels = web.AppKey("route_labels", tuple)


def family(
    kind: type[CounterMetricFamily | GaugeMetricFamily],
    name: str,
    text: str,
    labels: Sequence[str],
    samples: Samples,
) -> Metric:
    """A counter or gauge family; values rounded to the nanosecond, so figures scaled from µs or
    ms print as `0.001273`, not `0.0012729999999999998`."""
    made = kind(name, text, labels=labels)
    for values, value in samples:
        made.add_metric(values, round(float(value), 9))
    return made


def gauge(name: str, text: str, value: float) -> Metric:
    """A gauge of one unlabelled value."""
    return family(GaugeMetricFamily, name, text, (), [((), value)])


class ScoreboardCollector(Collector):
    """Every /metrics family, read from the scoreboard and this worker's latest samples."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        app = self.app
        yield from _route_families(app)
        yield from _service_families(app)
        yield from _counter_families(app)
        yield from _worker_families(app)


def _route_families(app: web.Application) -> Iterator[Metric]:
    labels = app[route_labels]
    totals = app[scoreboard].route_totals()
    seen = [(labels[n], row) for n, row in enumerate(totals) if sum(row[: RouteCell.SUM])]
    yield family(
        CounterMetricFamily, "konnichiwa_requests_total",
        "Responses sent, by route and status class.", ("method", "route", "status"),
        (((*route, status), row[RouteCell.STATUS + index])
         for route, row in seen
         for index, status in enumerate(STATUS_CLASSES) if row[RouteCell.STATUS + index]),
    )  # fmt: skip
    duration = HistogramMetricFamily(
        "konnichiwa_request_duration_seconds",
        "Time to answer, by route.",
        labels=("method", "route"),
    )
    for route, row in seen:
        duration.add_metric(route, _buckets(row[RouteCell.HISTOGRAM :]), row[RouteCell.SUM] / 1e6)
    yield duration


def _buckets(counts: Sequence[int]) -> list[tuple[str, float]]:
    """The exposed cumulative buckets of a scoreboard histogram, `+Inf` last."""
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    start = 0
    for index in EXPOSED:
        cumulative += sum(counts[start : index + 1])
        start = index + 1
        buckets.append((f"{BOUNDS[index]:g}", cumulative))
    buckets.append(("+Inf", sum(counts)))
    return buckets


def _worker_families(app: web.Application) -> Iterator[Metric]:
    workers = [(str(n), figures) for n, figures in app[scoreboard].workers() if figures[Cell.PID]]
    for kind, name, text, cell, per_unit in (
        (GaugeMetricFamily, "resident_memory_bytes", "Resident memory of each worker.", Cell.RSS,
         1),
        (CounterMetricFamily, "cpu_seconds_total", "CPU time each worker has used.",
         Cell.CPU_SECONDS_US, 1e6),
        (GaugeMetricFamily, "open_fds", "Open file descriptors of each worker.", Cell.FDS, 1),
        (GaugeMetricFamily, "threads", "Threads of each worker.", Cell.THREADS, 1),
        (GaugeMetricFamily, "connections", "Open sockets of each worker.", Cell.CONNECTIONS, 1),
        (GaugeMetricFamily, "event_loop_lag_seconds", "How late each worker's loop woke up.",
         Cell.LOOP_LAG_US, 1e6),
        (GaugeMetricFamily, "rate_limiter_down",
         "1 while the worker's rate limiter cannot reach Redis.", Cell.RATE_LIMITER_DOWN, 1),
        (GaugeMetricFamily, "start_time_seconds",
         "When each worker started (Unix time): a change is a restart.", Cell.STARTED_US, 1e6),
    ):  # fmt: skip
        yield family(
            kind, f"konnichiwa_worker_{name}", text, ("worker",),
            (((n,), figures[cell] / per_unit) for n, figures in workers),
        )  # fmt: skip


def _service_families(app: web.Application) -> Iterator[Metric]:
    board, latest = app[scoreboard], app[sampler]
    in_flight = sum(figures[Cell.IN_FLIGHT] for _, figures in board.workers())
    deps = dependencies(board, latest.dependencies)
    host = latest.host
    named = {"redis": deps.redis, "postgres": deps.postgres}
    backlog = deps.audit_backlog
    yield gauge("konnichiwa_requests_in_flight", "Requests being answered.", in_flight)
    yield family(
        GaugeMetricFamily, "konnichiwa_dependency_up",
        "1 when the dependency answered its last check.", ("dependency",),
        (((n,), d.status == "up") for n, d in named.items()),
    )  # fmt: skip
    yield family(
        GaugeMetricFamily, "konnichiwa_dependency_latency_seconds",
        "Round trip of the last check.", ("dependency",),
        (((n,), d.latency_ms / 1000) for n, d in named.items()),
    )  # fmt: skip
    yield family(
        GaugeMetricFamily, "konnichiwa_pool_connections",
        "Pooled connections of every worker, by state.", ("pool", "state"),
        (((n, state), count)
         for n, d in named.items()
         for state, count in (("in_use", d.pool.in_use), ("idle", d.pool.idle))),
    )  # fmt: skip
    if backlog is not None:
        yield gauge("konnichiwa_audit_backlog_entries",
                    "Changes not yet in the Postgres audit log.", backlog.entries)  # fmt: skip
        yield gauge("konnichiwa_audit_backlog_age_seconds",
                    "How long the oldest of them has waited.",
                    backlog.oldest_age_seconds)  # fmt: skip
    yield gauge("konnichiwa_host_cpu_percent", "CPU use of the host.", host.cpu_percent)
    yield gauge("konnichiwa_host_memory_percent", "Memory use of the host.", host.memory.percent)
    yield family(GaugeMetricFamily, "konnichiwa_host_disk_percent", "Use of the data volume.",
                 ("path",), [((host.disk.path,), host.disk.percent)])  # fmt: skip


def _counter_families(app: web.Application) -> Iterator[Metric]:
    workers = [figures for _, figures in app[scoreboard].workers()]
    yield family(
        CounterMetricFamily, "konnichiwa_aws_cache_lookups_total",
        "Answers of /config and /storage by where they came from: the cache (hit), AWS (miss), "
        "or the last good answer while AWS fails (stale).", ("result",),
        (((result,), sum(w[Cell.AWS_CACHE + n] for w in workers))
         for n, result in enumerate(AWS_CACHE_RESULTS)),
    )  # fmt: skip
    yield family(
        CounterMetricFamily, "konnichiwa_rate_limited_total",
        "Requests refused with 429, by policy.", ("policy",),
        (((name,), sum(w[Cell.RATE_LIMITED + n] for w in workers))
         for n, name in enumerate(POLICIES)),
    )  # fmt: skip
    yield family(
        CounterMetricFamily, "konnichiwa_rate_limit_unchecked_total",
        "Requests decided while the rate limiter could not reach Redis: reads admitted (fail "
        "open), writes refused (fail closed).", ("decision",),
        (((decision,), sum(w[cell] for w in workers))
         for decision, cell in (("admitted", Cell.UNCHECKED_ADMITTED),
                                ("refused", Cell.UNCHECKED_REFUSED))),
    )  # fmt: skip


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition (0.0.4) of the service's figures, every worker summed."""
    # A registry of its own per scrape: the collector reads this request's app, and the global
    # registry would add the process's own default collectors.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ScoreboardCollector(request.app))
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
    )
