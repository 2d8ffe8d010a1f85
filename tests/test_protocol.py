"""Slow, idle, oversized and malformed clients against a real listening worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import aiohttp
import psutil
import pytest
from aiohttp import web

from konnichiwa.app import create_app
from konnichiwa.protocol import MAX_HEADER_BYTES, ConnectionPolicy, GuardedAppRunner
from konnichiwa.settings import Settings
from tests.support import FULL_AUTH, FULL_KEY, free_port, running_service

HEADER_SECONDS, BODY_SECONDS, KEEPALIVE_SECONDS = 1, 1, 2
FIVE_SECONDS = aiohttp.ClientTimeout(total=5)


class Live(NamedTuple):
    port: int
    url: str
    policy: ConnectionPolicy


@pytest.fixture
async def live(settings: Settings) -> AsyncIterator[Live]:
    """The app behind the worker's own runner, on a real port, with short deadlines."""
    settings = settings.replace(
        header_timeout_seconds=HEADER_SECONDS,
        body_timeout_seconds=BODY_SECONDS,
        keepalive_seconds=KEEPALIVE_SECONDS,
        max_connections=16,
    )
    policy = ConnectionPolicy.for_worker(settings)
    runner = GuardedAppRunner(create_app(settings), policy, access_log=None, shutdown_timeout=2)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Live(port, f"http://127.0.0.1:{port}", policy)
    finally:
        await runner.cleanup()


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes


def parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body, raw)


async def exchange(port: int, *chunks: bytes, pause: float = 0.0, within: float = 10.0) -> Answer:
    """Send `chunks` (`pause` s apart) on one connection, stopping once the server has closed
    it; the answer read until then."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()

    async def read_all() -> None:
        with contextlib.suppress(ConnectionError):  # a reset after the answer came
            while chunk := await reader.read(65536):
                received.extend(chunk)

    reading = asyncio.create_task(read_all())
    try:
        for chunk in chunks:
            if reading.done():
                break
            writer.write(chunk)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            await asyncio.sleep(pause)
        await asyncio.wait_for(reading, within)
        return parse(bytes(received))
    finally:
        writer.close()


async def requests_counted(url: str, status: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + "/metrics", headers=FULL_AUTH) as reply,
    ):
        text = await reply.text()
    prefix = f'konnichiwa_requests_total{{method="",route="other",status="{status}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def assert_problem(answer: Answer, status: int) -> None:
    assert answer.status == status, answer.raw
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["x-request-id"]
    assert answer.headers["connection"] == "close"


HOST = b"Host: localhost\r\n"
CLOSE = b"Connection: close\r\n"
# Requests aiohttp cannot parse, each carrying bytes that must never come back.
MALFORMED = [
    pytest.param(b"G<script>T / HTTP/1.1\r\n" + HOST + b"\r\n", id="bad-method"),
    pytest.param(b"GET / HTTP/1.1\r\n" + HOST + b"X-Evil: <script>\x01\r\n\r\n", id="header-byte"),
    pytest.param(b"GET /<script> HTTP/9.9\r\n" + HOST + b"\r\n", id="bad-version"),
    pytest.param(
        b"POST /update HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\nX-Tag: <script>\r\n\r\n0\r\n\r\n",
        id="length-and-chunked",
    ),
    pytest.param(
        b"POST /update HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nContent-Length: 2\r\n"
        b"X-Tag: <script>\r\n\r\nab",
        id="two-lengths",
    ),
]


@pytest.mark.parametrize("request_bytes", MALFORMED)
async def test_malformed_request_is_a_counted_problem_echoing_nothing(
    live: Live, request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    answer = await exchange(live.port, request_bytes)
    assert_problem(answer, 400)
    assert b"<script>" not in answer.raw
    assert await requests_counted(live.url, "4xx") == 1
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_a_burst_of_malformed_requests_logs_one_line(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    answers = [await exchange(live.port, b"\x16\x03\x01 not http\r\n\r\n") for _ in range(20)]
    assert {answer.status for answer in answers} == {400}
    warnings = [r for r in caplog.records if r.name == "konnichiwa.protocol"]
    assert len(warnings) <= 1
    assert await requests_counted(live.url, "4xx") == 20


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # A newline in the path: no route matches, still our 404.
        (b"GET /%0a HTTP/1.1\r\n" + HOST + CLOSE + b"\r\n", 404),
        # A byte no text encoding gives: the key is simply wrong.
        (b"GET /users HTTP/1.1\r\n" + HOST + CLOSE + b"X-API-Key: \xff\xfe\r\n\r\n", 401),
    ],
    ids=["newline-path", "0xff-key"],
)
async def test_odd_bytes_reach_a_route_and_get_its_problem(
    live: Live, request_bytes: bytes, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    answer = await exchange(live.port, request_bytes)
    assert_problem(answer, status)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_headers_sent_a_byte_at_a_time_are_cut_off(live: Live) -> None:
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        slowloris = asyncio.create_task(
            exchange(live.port, *(bytes([b]) for b in b"GET / HTTP/1.1\r\nX-Slow: yes"), pause=0.2)
        )
        while not slowloris.done():  # everyone else is served meanwhile
            async with session.get(live.url + "/") as reply:
                assert reply.status == 200
            await asyncio.sleep(0.1)
        answer = await slowloris
    assert_problem(answer, 408)
    assert HEADER_SECONDS <= time.monotonic() - started < HEADER_SECONDS + 1.5


async def test_a_body_that_trickles_is_cut_off(live: Live) -> None:
    head = (
        b"POST /update HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
        b"Authorization: " + FULL_AUTH["Authorization"].encode() + b"\r\n"
        b"Content-Length: 200\r\n\r\n"
    )
    started = time.monotonic()
    answer = await exchange(live.port, head, *([b" "] * 40), pause=0.1)
    assert_problem(answer, 408)
    assert BODY_SECONDS <= time.monotonic() - started < BODY_SECONDS + 1.5
    async with aiohttp.ClientSession() as session, session.get(live.url + "/status") as reply:
        assert (await reply.json())["counter"] == 0  # nothing was applied


@pytest.mark.slow
async def test_idle_connection_is_closed_after_keepalive(live: Live) -> None:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    try:
        assert await asyncio.wait_for(reader.read(), KEEPALIVE_SECONDS + 2) == b""
    finally:
        writer.close()
    assert time.monotonic() - started >= KEEPALIVE_SECONDS - 0.5


async def test_oversized_headers_are_refused_without_keeping_them(live: Live) -> None:
    filler = b"X-Filler: " + b"a" * 4000 + b"\r\n"
    chunks = [b"GET / HTTP/1.1\r\n", *[filler] * (MAX_HEADER_BYTES // len(filler) + 2)]
    answer = await exchange(live.port, *chunks)
    assert_problem(answer, 431)
    assert await requests_counted(live.url, "4xx") == 1


async def test_client_that_hangs_up_mid_body_is_a_499_not_a_dependency_failure(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", live.port)
    writer.write(
        b"POST /update HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
        b"Authorization: " + FULL_AUTH["Authorization"].encode() + b"\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler is reading the body
    writer.transport.abort()
    async with aiohttp.ClientSession() as session:
        for _ in range(50):  # the worker notices the reset on its next loop turns
            async with session.get(live.url + "/metrics", headers=FULL_AUTH) as reply:
                text = await reply.text()
            if 'route="/update",status="4xx"' in text:
                break
            await asyncio.sleep(0.05)
    assert 'konnichiwa_requests_total{method="POST",route="/update",status="4xx"} 1' in text
    assert 'route="/update",status="5xx"' not in text
    assert not [r for r in caplog.records if "dependency" in r.getMessage()]


async def test_connections_over_the_cap_close_the_longest_idle(live: Live) -> None:
    idle = [
        await asyncio.open_connection("127.0.0.1", live.port)
        for _ in range(live.policy.max_connections * 2)
    ]
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(5):
                async with session.get(live.url + "/health") as reply:
                    assert reply.status == 200
        closed = 0
        for reader, _ in idle:
            with_data = await asyncio.wait_for(reader.read(), 2)
            closed += with_data == b""
            if closed >= live.policy.max_connections:
                break
        assert closed >= live.policy.max_connections  # the oldest made room
    finally:
        for _, writer in idle:
            writer.close()


@pytest.mark.slow
async def test_held_sockets_leave_health_answering_and_memory_returns(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    """A worker with 300 descriptors, 500 idle sockets and 300 half-sent 1 MB headers: /health
    still answers, and the worker's memory is back within 10 % once they are gone."""
    environment = {"REDIS_URL": redis_url, "DATABASE_URL": database_url}
    launcher = ("prlimit", "--nofile=300:300")
    with running_service(
        tmp_path / "serve.log", environment, "--workers", "1", launcher=launcher
    ) as service:
        (worker,) = service.workers()
        port = service.port
        async with aiohttp.ClientSession() as session:

            async def health() -> int:
                async with session.get(service.url + "/health", timeout=FIVE_SECONDS) as reply:
                    return reply.status

            for _ in range(200):  # warm up what serving allocates once
                assert await health() == 200
            rss_before = worker.memory_info().rss
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(500)]
            assert await health() == 200
            header = b"GET / HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 8000 + b"\r\n"
            for _ in range(300):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(header * 128)  # about 1 MB, never finished
                held.append((reader, writer))
            assert await health() == 200
            for _, writer in held:
                writer.transport.abort()
            assert await health() == 200
            assert await _memory_back(worker, rss_before * 1.1, within=10), rss_before
    assert "Traceback" not in service.output


async def _memory_back(process: psutil.Process, limit: float, within: float) -> bool:
    """Whether `process`'s resident memory falls to `limit` within `within` seconds (a worker
    releases what a crowd of connections took a second after they have gone)."""
    deadline = time.monotonic() + within
    while process.memory_info().rss > limit:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


@pytest.mark.slow
async def test_sigterm_answers_every_request_in_flight_even_mid_upload(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    """100 requests in flight at SIGTERM, half of them still sending their bodies: each gets
    its whole answer, saying the connection closes; the service exits 0 in time."""
    environment = {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "API_KEY": FULL_KEY}
    body = b'{"increment": 1}'
    head = (
        b"POST /update HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
        b"Authorization: " + FULL_AUTH["Authorization"].encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    with running_service(tmp_path / "serve.log", environment, "--workers", "2") as service:
        connections = [await asyncio.open_connection("127.0.0.1", service.port) for _ in range(100)]
        for number, (_, writer) in enumerate(connections):
            writer.write(head + body[: number % 2 * 5])  # half send part of the body already
            await writer.drain()
        await asyncio.sleep(0.5)  # every request is being handled, waiting for its body
        stopped_at = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(1)  # the workers are draining
        for number, (_, writer) in enumerate(connections):
            writer.write(body[number % 2 * 5 :])
        answers = [parse(await asyncio.wait_for(reader.read(), 25)) for reader, _ in connections]
        for _, writer in connections:
            writer.close()
        exit_code = await asyncio.to_thread(service.process.wait, 25)
    assert time.monotonic() - stopped_at < 25
    assert exit_code == 0
    assert [answer.status for answer in answers] == [200] * 100
    assert {answer.headers["connection"] for answer in answers} == {"close"}
    counters = sorted(json.loads(answer.body)["new_state"]["counter"] for answer in answers)
    assert counters == list(range(1, 101))  # each applied, once
