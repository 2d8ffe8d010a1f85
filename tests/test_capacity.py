"""/inspect: its shape from real psutil, its scope, and traffic counted across every worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import msgspec
import psutil
import pytest

from konnichiwa.schemas import Inspection
from tests.support import FULL_AUTH, FULL_KEY, READ_AUTH, Client, running_service


async def test_inspect_shape(client: Client) -> None:
    for _ in range(5):
        assert (await client.get("/status")).status == 200
    assert (await client.get("/nowhere")).status == 404
    response = await client.get("/inspect", headers=FULL_AUTH)
    assert response.status == 200
    body = msgspec.json.decode(await response.read(), type=Inspection)  # validates every field
    host = body.host
    assert host.cpu_count >= 1
    assert len(host.cpu_percent_per_core) == host.cpu_count
    assert len(host.load_average) == 3
    assert 0 < host.memory.used_bytes < host.memory.total_bytes
    assert 0 < host.disk.percent <= 100
    assert host.network.bytes_received > 0
    assert host.uptime_seconds > 0
    assert body.service.worker_count == 1
    (worker,) = body.service.workers
    assert worker.pid > 0
    assert worker.rss_bytes > 10 * 2**20
    assert worker.threads >= 1
    assert worker.open_fds > 3
    traffic = body.traffic
    assert traffic.requests_served == 6
    assert traffic.responses_by_status_class["2xx"] == 5
    assert traffic.errors == 1
    assert traffic.requests_in_flight == 1  # this very request
    assert traffic.requests_per_second_60s > 0
    assert traffic.latency_60s.p50_ms is not None
    assert 0 < traffic.latency_60s.p50_ms <= traffic.latency_60s.p99_ms  # type: ignore[operator]
    deps = body.dependencies
    assert (deps.redis.status, deps.postgres.status) == ("up", "up")
    assert deps.redis.latency_ms > 0
    assert deps.postgres.pool.in_use + deps.postgres.pool.idle >= 2
    assert deps.audit_backlog is not None
    assert deps.audit_backlog.entries == 0


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer not-a-key-0123456789"}, 401), (READ_AUTH, 403)],
)
async def test_inspect_needs_the_inspect_scope(
    client: Client, headers: dict[str, str], status: int
) -> None:
    response = await client.get("/inspect", headers=headers)
    assert response.status == status
    assert response.content_type == "application/problem+json"


async def _inspect_on_new_connection(url: str) -> Inspection:
    """One /inspect on a connection of its own: the kernel picks the worker that answers."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.get(url + "/inspect", headers=FULL_AUTH) as response,
    ):
        return msgspec.json.decode(await response.read(), type=Inspection)


@pytest.mark.slow
async def test_every_worker_counts_and_any_reports_all(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    environment = {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "API_KEY": FULL_KEY}
    with running_service(tmp_path / "serve.log", environment, "--workers", "2") as service:
        pids = {worker.pid for worker in service.workers()}
        before = (await _inspect_on_new_connection(service.url)).traffic.requests_served
        sent = 400
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)
        ) as session:  # one connection per request: both workers get some

            async def status() -> int:
                async with session.get(service.url + "/status") as response:
                    return response.status

            statuses = await asyncio.gather(*(status() for _ in range(sent)))
        assert statuses == [200] * sent
        answers = [await _inspect_on_new_connection(service.url) for _ in range(12)]
    assert {answer.service.answered_by for answer in answers} == pids, "both should answer"
    for asked_before, answer in enumerate(answers):
        assert {w.pid for w in answer.service.workers} == pids
        assert answer.service.worker_count == 2
        # Exact: the first /inspect, every /status, and the /inspect requests before this one.
        assert answer.traffic.requests_served == before + 1 + sent + asked_before
        assert answer.traffic.requests_in_flight == 1
    served_by = [w.requests_in_flight for w in answers[-1].service.workers]
    assert sorted(served_by) == [0, 1]


@pytest.mark.slow
async def test_a_replaced_worker_takes_over_its_slot_and_counts(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    environment = {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "API_KEY": FULL_KEY}
    with running_service(tmp_path / "serve.log", environment, "--workers", "2") as service:
        before = await _inspect_on_new_connection(service.url)
        victim = before.service.workers[0]
        dying = psutil.Process(victim.pid)
        dying.kill()
        dying.wait(5)  # gone, its listening socket with it
        for asked in range(1, 150):  # the supervisor starts a replacement after a 1 s back-off
            answer = await _inspect_on_new_connection(service.url)
            # What the dead worker counted stays: the total only grows, by each /inspect asked.
            assert answer.traffic.requests_served == before.traffic.requests_served + asked
            if answer.service.workers[victim.slot].pid != victim.pid:
                break
            await asyncio.sleep(0.2)
    replacement, survivor = answer.service.workers
    assert answer.service.worker_count == 2
    assert replacement.slot == victim.slot
    assert replacement.pid not in (victim.pid, survivor.pid)
    assert replacement.uptime_seconds < survivor.uptime_seconds
    assert replacement.requests_in_flight + survivor.requests_in_flight == 1
