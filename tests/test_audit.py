"""Audit log: `/logs` paging, read-your-writes, and the outbox consumer's exactly-once rows."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import msgspec
import pytest
import redis.asyncio

from konnichiwa.audit import OUTBOX_KEPT, PAGE, audit_backlog, persist, read_page
from konnichiwa.schemas import AuditBacklog, PageQuery, UpdateRequest, rfc3339
from konnichiwa.state import (
    MAX_UPDATE_BATCH,
    Change,
    StateKeys,
    apply_changes,
    apply_update,
)
from konnichiwa.testing import grow_audit_log
from tests.support import FULL_AUTH, Client, drained_readiness


async def _update(client: Client, body: dict[str, object]) -> dict[str, object]:
    response = await client.post("/update", json=body, headers=FULL_AUTH)
    assert response.status == 200
    answer: dict[str, object] = await response.json()
    return answer


async def _logs(client: Client, **params: object) -> dict[str, object]:
    response = await client.get("/logs", params={k: str(v) for k, v in params.items()})
    assert response.status == 200, await response.text()
    body: dict[str, object] = await response.json()
    return body


async def test_empty_log(client: Client) -> None:
    assert await _logs(client) == {
        "logs": [],
        "page": 1,
        "limit": 10,
        "total": 0,
        "total_pages": 0,
    }


@pytest.mark.parametrize(
    ("page", "limit", "ids", "total_pages"),
    [
        (1, 10, list(range(25, 15, -1)), 3),
        (2, 10, list(range(15, 5, -1)), 3),
        (3, 10, [5, 4, 3, 2, 1], 3),
        (4, 10, [], 3),
        (100, 10, [], 3),
        (1, 1, [25], 25),
        (25, 1, [1], 25),
        (1, 100, list(range(25, 0, -1)), 1),
        (2, 24, [1], 2),
    ],
)
async def test_paging(
    client: Client, page: int, limit: int, ids: list[int], total_pages: int
) -> None:
    for _ in range(25):
        await _update(client, {"increment": 1})
    body = await _logs(client, page=page, limit=limit)
    assert [entry["id"] for entry in body["logs"]] == ids  # type: ignore[attr-defined]
    assert (body["page"], body["limit"], body["total"], body["total_pages"]) == (
        page,
        limit,
        25,
        total_pages,
    )


@pytest.mark.parametrize(
    "params",
    [
        {"page": "0"},
        {"page": "-1"},
        {"page": "one"},
        {"page": "1.5"},
        {"limit": "0"},
        {"limit": "101"},
        {"limit": "ten"},
        {"limit": ""},
        {"size": "10"},
    ],
)
async def test_bad_paging_parameters(client: Client, params: dict[str, str]) -> None:
    response = await client.get("/logs", params=params)
    assert response.status == 422
    body = await response.json()
    assert body["errors"][0]["field"] == next(iter(params))


async def test_entries_describe_each_change(client: Client) -> None:
    await _update(client, {"counter": 10})
    await _update(client, {"message": "hi"})
    await _update(client, {"counter": 3, "message": "yo"})
    await _update(client, {"increment": -4, "message": "z"})
    logs = (await _logs(client))["logs"]
    assert [(e["update_type"], e["old_counter"], e["new_counter"]) for e in logs] == [  # type: ignore[attr-defined]
        ("increment, message", 3, -1),
        ("counter, message", 10, 3),
        ("message", 10, 10),
        ("counter", 0, 10),
    ]
    assert [(e["old_message"], e["new_message"]) for e in logs] == [  # type: ignore[attr-defined]
        ("yo", "z"),
        ("hi", "yo"),
        ("", "hi"),
        ("", ""),
    ]
    for entry in logs:  # type: ignore[attr-defined]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", entry["timestamp"])


async def test_messages_reach_the_log_exactly_as_sent(client: Client) -> None:
    """The script writes each audit row as JSON itself (cjson): every character survives."""
    message = 'quote " backslash \\ slash / newline \n tab \t \x01 \x7f こんにちは 🎌'
    answer = await _update(client, {"message": message})
    assert answer["new_state"] == {"counter": 0, "message": message}
    await _update(client, {"message": "after"})
    logs = (await _logs(client))["logs"]
    assert [(e["old_message"], e["new_message"]) for e in logs] == [  # type: ignore[attr-defined]
        (message, "after"),
        ("", message),
    ]


async def test_read_your_writes_from_another_connection(client: Client) -> None:
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as other:
        for n in range(1, 201):
            answer = await _update(client, {"counter": n, "message": f"m{n}"})
            async with other.get(client.make_url("/logs"), params={"limit": "1"}) as response:
                assert response.status == 200
                body = await response.json()
            assert body["total"] == n
            assert body["logs"][0]["id"] == answer["seq"] == n
            assert body["logs"][0]["new_message"] == f"m{n}"


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """One connection to the test's database (statistics counted on it are its own)."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    yield pool
    await pool.close()


def _event(seq: int) -> bytes:
    micros = int(datetime.now(UTC).timestamp() * 1e6)
    return msgspec.json.encode([str(seq), str(micros), str(seq - 1), str(seq), "", "", "increment"])


async def test_redelivered_batches_make_no_duplicates(pool: asyncpg.Pool) -> None:
    assert await persist(pool, [_event(s) for s in (1, 2, 3)]) == 3
    assert await persist(pool, [_event(s) for s in (5, 6)]) == 3  # 4 missing: no advance
    assert await persist(pool, [_event(s) for s in (2, 3, 4)]) == 6  # redelivery + the gap
    assert await pool.fetchval("SELECT count(*) FROM audit_log") == 6


async def test_the_previous_releases_function_still_persists(pool: asyncpg.Pool) -> None:
    """Consumers of the release before 0005 send arrays to audit_persist during a rolling deploy."""
    moment = datetime.now(UTC)
    assert await persist(pool, [_event(1)]) == 1
    upto = await pool.fetchval(
        "SELECT audit_persist($1, $2, $3, $4, $5, $6, $7)",
        [2, 3], [moment, moment], [1, 2], [2, 3], ["", ""], ["", "x"], ["increment"] * 2,
    )  # fmt: skip
    stored = await pool.fetch("SELECT seq, changed_at, new_message FROM audit_log ORDER BY seq")
    assert upto == 3
    assert [(row["seq"], row["new_message"]) for row in stored] == [(1, ""), (2, ""), (3, "x")]
    assert [row["changed_at"] for row in stored[1:]] == [moment, moment]


async def test_rows_are_stored_exactly_as_the_outbox_holds_them(pool: asyncpg.Pool) -> None:
    """64-bit ends, microseconds, and messages that JSON must escape survive the trip."""
    micros = 1_795_000_000_123_457  # 2026-11-18T...457 µs
    message = 'quote " backslash \\ newline \n tab \t \x01 こんにちは 🎌'
    rows = [
        msgspec.json.encode(row)
        for row in (
            ["1", str(micros), str(2**63 - 1), str(-(2**63)), message, "", "counter, message"],
            ["2", str(micros + 1), "0", "9007199254740993", "", message, "counter"],
        )
    ]
    assert await persist(pool, rows) == 2
    stored = await pool.fetch("SELECT * FROM audit_log ORDER BY seq")
    expected = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    assert [row["changed_at"] for row in stored] == [expected, expected + timedelta(microseconds=1)]
    assert (stored[0]["old_counter"], stored[0]["new_counter"]) == (2**63 - 1, -(2**63))
    assert stored[1]["new_counter"] == 9007199254740993
    assert stored[0]["old_message"] == stored[1]["new_message"] == message
    assert stored[0]["update_type"] == "counter, message"


async def test_a_batch_reads_only_the_rows_past_the_watermark(pool: asyncpg.Pool) -> None:
    """However large the log and whatever the planner knows of it, a batch never scans it all."""
    await pool.execute(
        "INSERT INTO audit_log SELECT g, now(), g - 1, g, '', '', 'increment' "
        "FROM generate_series(1, 20000) g"
    )
    await pool.execute("UPDATE audit_watermark SET upto = 20000")
    scans = "SELECT seq_scan, idx_scan FROM pg_stat_user_tables WHERE relname = 'audit_log'"
    await pool.execute("SELECT pg_stat_force_next_flush()")
    before = await pool.fetchrow(scans)
    for first in range(20001, 20100, 10):
        await pool.execute("SELECT pg_stat_force_next_flush()")
        assert await persist(pool, [_event(s) for s in range(first, first + 10)]) == first + 9
    await pool.execute("SELECT pg_stat_clear_snapshot()")
    after = await pool.fetchrow(scans)
    assert before is not None
    assert after is not None
    assert after["seq_scan"] == before["seq_scan"]
    assert after["idx_scan"] > before["idx_scan"]


async def _persisted(client: Client) -> dict[str, object]:
    """The readiness answer once Postgres holds every change (the consumer runs meanwhile)."""
    body = await drained_readiness(str(client.make_url("")).rstrip("/"), within=5)
    assert body is not None, "the audit log did not catch up"
    return body


async def _postgres_entries(database_url: str, high: int) -> list[dict[str, object]]:
    """Rows 1..high as Postgres holds them, in the answer's form, newest first."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    entries: list[dict[str, object]] = []
    try:
        for top in range(high, 0, -100):  # a page at most
            entries += msgspec.to_builtins(await read_page(pool, top, max(0, top - 100)))
    finally:
        await pool.close()
    return entries


async def test_pages_read_alike_from_the_outbox_and_from_postgres(
    client: Client, redis_url: str, database_url: str
) -> None:
    """The newest pages come from the outbox, older ones from Postgres, some from both: every
    entry reads the same as the row Postgres holds."""
    keys = StateKeys("dev")
    count = OUTBOX_KEPT + 300
    changes = [
        Change("set" if n % 3 else "increment", str(n), str(n % 2), f"m{n}", "counter, message")
        for n in range(1, count + 1)
    ]
    connection = redis.asyncio.Redis.from_url(redis_url)
    try:
        for start in range(0, count, MAX_UPDATE_BATCH):
            batch = changes[start : start + MAX_UPDATE_BATCH]
            await apply_changes(connection.execute_command, keys, batch)
        await _persisted(client)
        kept = await connection.xlen(keys.audit)
    finally:
        await connection.aclose()
    assert OUTBOX_KEPT <= kept < count  # so the oldest pages can only come from Postgres
    answered: list[dict[str, object]] = []
    for page in range(1, count // 100 + 2):
        answered += (await _logs(client, page=page, limit=100))["logs"]  # type: ignore[arg-type]
    assert [entry["id"] for entry in answered] == list(range(count, 0, -1))
    assert answered == await _postgres_entries(database_url, count)


async def test_a_page_the_outbox_lost_is_a_503(client: Client, redis_url: str) -> None:
    """Changes neither in Postgres nor in the outbox (Redis lost them): no page with a hole."""
    keys = StateKeys("dev")
    connection = redis.asyncio.Redis.from_url(redis_url)
    try:
        await connection.hset(keys.state, mapping={"counter": "3", "seq": "3"})
        for seq in (1, 3):
            row = [str(seq), "1795000000000000", str(seq - 1), str(seq), "", "", "counter"]
            await connection.xadd(keys.audit, {"row": msgspec.json.encode(row)}, id=f"{seq}-0")
    finally:
        await connection.aclose()
    for params in ({}, {"page": "2", "limit": "1"}):  # pages holding change 2
        response = await client.get("/logs", params=params)
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        assert (await response.json())["type"] == "/problems/audit-log-incomplete"
    for page, ids in ((1, [3]), (3, [1])):  # pages without it are whole
        body = await _logs(client, page=page, limit=1)
        assert [entry["id"] for entry in body["logs"]] == ids  # type: ignore[attr-defined]


async def test_entries_of_the_previous_layout_are_persisted(
    client: Client, redis_url: str, database_url: str
) -> None:
    """During a rolling deploy the outbox also holds entries of seven fields, as the release
    before this one wrote them: they reach the log like any other."""
    keys = StateKeys("dev")
    micros = 1_795_000_000_123_456
    connection = redis.asyncio.Redis.from_url(redis_url)
    try:
        await connection.hset(keys.state, mapping={"counter": "7", "message": "old", "seq": "1"})
        await connection.xadd(
            keys.audit,
            {"seq": "1", "ts": str(micros), "old_counter": "0", "new_counter": "7",
             "old_message": "", "new_message": "old", "update_type": "counter, message"},
            id="1-0",
        )  # fmt: skip
    finally:
        await connection.aclose()
    assert (await _update(client, {"increment": 1}))["seq"] == 2
    logs = (await _logs(client))["logs"]
    assert [(e["id"], e["new_counter"], e["new_message"]) for e in logs] == [  # type: ignore[attr-defined]
        (2, 8, "old"),
        (1, 7, "old"),
    ]
    assert logs[1]["timestamp"] == rfc3339(  # type: ignore[index]
        datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    )
    await _persisted(client)
    assert await _postgres_entries(database_url, 2) == logs


async def test_backlog_counts_changes_not_yet_persisted(redis_url: str) -> None:
    connection = redis.asyncio.Redis.from_url(redis_url)
    keys = StateKeys("dev")
    try:
        assert await audit_backlog(connection, keys) == AuditBacklog(0, 0.0)
        for _ in range(3):  # no consumer runs here: the changes wait in the outbox
            await apply_update(connection.execute_command, keys, UpdateRequest(increment=1))
        backlog = await audit_backlog(connection, keys)
    finally:
        await connection.aclose()
    assert backlog.entries == 3
    assert 0 <= backlog.oldest_age_seconds < 5


async def test_readiness_reports_the_backlog(client: Client) -> None:
    await _update(client, {"increment": 1})
    assert (await _persisted(client))["status"] == "ready"


async def test_a_redis_that_lost_data_resumes_after_the_audit_log(
    client: Client, redis_url: str
) -> None:
    for n in range(1, 4):
        await _update(client, {"counter": n * 10, "message": f"v{n}"})
    await _persisted(client)
    connection = redis.asyncio.Redis.from_url(redis_url)
    await connection.flushdb()  # as if Redis came back empty
    await connection.aclose()
    for _ in range(100):  # the consumers notice within their 2 s claim cycle
        if (await (await client.get("/status")).json())["counter"] == 30:
            break
        await asyncio.sleep(0.05)
    answer = await _update(client, {"increment": 1})
    assert answer["seq"] == 4
    assert answer["old_state"] == {"counter": 30, "message": "v3"}
    assert (await _logs(client))["total"] == 4


async def test_pages_of_a_million_changes_keep_one_plan(pool: asyncpg.Pool) -> None:
    """Uncached pages anywhere in a large log: Postgres plans the page statement once (an index
    range scan for any bounds), not afresh for each call's bounds."""
    async with pool.acquire() as conn:
        await grow_audit_log(conn, 1_000_000)
    bounds = [(9_000 * limit, 9_000 * limit - limit) for limit in range(1, 101, 5)]
    for high, low in bounds:
        entries = await read_page(pool, high, low)
        assert [entry.id for entry in entries] == list(range(high, low, -1))
    plans = await pool.fetchrow(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1",
        PAGE,
    )
    assert plans is not None
    # The first five calls are planned for their own bounds; the generic plan is kept after.
    assert (plans["custom_plans"], plans["generic_plans"]) == (5, len(bounds) - 5)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f"PREPARE page (bigint, bigint) AS {PAGE}")
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        plan = "\n".join(row[0] for row in await conn.fetch("EXPLAIN EXECUTE page(500000, 0)"))
        await conn.execute("DEALLOCATE page")
    assert "Index Scan Backward using audit_log_pkey" in plan
    assert "Sort" not in plan
    assert "rows=100 " in plan, plan  # the planner's guess, whatever the table's size


async def test_a_page_of_the_largest_limit_is_whole(pool: asyncpg.Pool) -> None:
    """The page statement's own cap lets the largest page the API accepts through whole."""
    largest: int = msgspec.json.schema(PageQuery)["$defs"]["PageQuery"]["properties"]["limit"][
        "maximum"
    ]
    async with pool.acquire() as conn:
        await grow_audit_log(conn, largest)
    entries = await read_page(pool, largest, 0)
    assert [entry.id for entry in entries] == list(range(largest, 0, -1))
