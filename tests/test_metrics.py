"""/metrics: Prometheus text that prometheus-client's own parser reads, with exact counts."""

from __future__ import annotations

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

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
