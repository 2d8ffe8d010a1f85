"""/metrics: Prometheus text that prometheus-client's own parser reads, with exact counts."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry
from pytest_aiohttp import AiohttpClient

from konnichiwa.app import create_app
from konnichiwa.metrics import family
from konnichiwa.settings import Settings
from tests.support import FULL_AUTH, READ_AUTH, Client


async def _scrape(client: Client) -> dict[str, Metric]:
    response = await client.get("/metrics", headers=FULL_AUTH)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(await response.text())}


def _value(family: Metric, suffix: str = "", **labels: str) -> float:
    (sample,) = [
        s
        for s in family.samples
        if s.name == family.name + suffix and labels.items() <= s.labels.items()
    ]
    return sample.value


async def test_metrics_count_by_route_and_status(client: Client) -> None:
    for _ in range(3):
        assert (await client.get("/status")).status == 200
    assert (await client.get("/users/1", headers=FULL_AUTH)).status == 404
    assert (await client.get("/nowhere")).status == 404
    families = await _scrape(client)
    requests = families["konnichiwa_requests"]
    assert requests.type == "counter"
    assert _value(requests, "_total", route="/status", status="2xx", method="GET") == 3
    assert _value(requests, "_total", route="/users/{id}", status="4xx") == 1
    assert _value(requests, "_total", route="other", status="4xx") == 1
    duration = families["konnichiwa_request_duration_seconds"]
    assert duration.type == "histogram"
    assert _value(duration, "_count", route="/status") == 3
    assert _value(duration, "_bucket", route="/status", le="+Inf") == 3
    # The latency objective's bound (300 ms) is a bucket of its own: alerts count against it.
    assert _value(duration, "_bucket", route="/status", le="0.3") == 3
    buckets = [
        s.value
        for s in duration.samples
        if s.name.endswith("_bucket") and s.labels["route"] == "/status"
    ]
    assert buckets == sorted(buckets), "buckets are cumulative"
    assert 0 < _value(duration, "_sum", route="/status") < 3


async def test_metrics_report_dependencies_and_workers(client: Client) -> None:
    families = await _scrape(client)
    assert _value(families["konnichiwa_requests_in_flight"]) == 1
    assert _value(families["konnichiwa_dependency_up"], dependency="redis") == 1
    assert _value(families["konnichiwa_dependency_up"], dependency="postgres") == 1
    assert _value(families["konnichiwa_dependency_latency_seconds"], dependency="redis") > 0
    assert _value(families["konnichiwa_audit_backlog_entries"]) == 0
    assert _value(families["konnichiwa_pool_connections"], pool="postgres", state="idle") >= 1
    assert _value(families["konnichiwa_worker_resident_memory_bytes"], worker="0") > 10 * 2**20
    assert families["konnichiwa_worker_cpu_seconds"].type == "counter"
    assert _value(families["konnichiwa_worker_cpu_seconds"], "_total", worker="0") > 0
    assert 0 < _value(families["konnichiwa_host_memory_percent"]) < 100


async def test_metrics_need_the_inspect_scope(client: Client) -> None:
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers=READ_AUTH)).status == 403


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1273 * 1e-6, "0.001273"),  # µs scaled to seconds: no binary noise
        (0.1 + 0.2, "0.3"),
        (85700608, "8.5700608e+07"),  # a byte count: prometheus-client prints Go's exponent form
        (True, "1.0"),
        (0, "0.0"),
        (1764878902.123456, "1.764878902123456e+09"),  # a Unix time to the µs
        (2.5e-05, "2.5e-05"),
    ],
)
def test_values_print_without_binary_noise(value: float, text: str) -> None:
    class Example(Collector):
        def collect(self) -> Iterator[Metric]:
            yield family(GaugeMetricFamily, "konnichiwa_example", "An example.", (), [((), value)])

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Example())
    *_, sample = generate_latest(registry).decode().splitlines()
    assert sample == f"konnichiwa_example {text}"


async def test_every_exposed_value_is_clean(client: Client) -> None:
    assert (await client.get("/status")).status == 200
    response = await client.get("/metrics", headers=FULL_AUTH)
    values = [line.rpartition(" ")[2] for line in (await response.text()).splitlines()
              if not line.startswith("#")]  # fmt: skip
    assert values
    # Nothing finer than the nanosecond: binary noise (0.0012729999999999998) would be.
    unclean = [v for v in values if float(v) != round(float(v), 9)]
    assert unclean == []


async def test_metrics_give_each_workers_start(client: Client) -> None:
    families = await _scrape(client)
    started = _value(families["konnichiwa_worker_start_time_seconds"], worker="0")
    assert time.time() - 60 < started <= time.time()


@pytest.mark.slow
async def test_metrics_count_aws_cache_answers(
    aiohttp_client: AiohttpClient, settings: Settings, aws_url: str
) -> None:
    aws = settings.replace(
        aws_endpoint_url=aws_url, aws_credentials=("testing", "testing"), aws_region="us-east-1"
    )
    client = await aiohttp_client(create_app(aws))
    for _ in range(3):
        assert (await client.get("/config", headers=FULL_AUTH)).status == 200
    lookups = (await _scrape(client))["konnichiwa_aws_cache_lookups"]
    assert lookups.type == "counter"
    counts = {result: _value(lookups, "_total", result=result) for result in ("hit", "miss")}
    assert counts == {"hit": 2, "miss": 1}
    assert _value(lookups, "_total", result="stale") == 0
