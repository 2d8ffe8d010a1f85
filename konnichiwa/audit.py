"""The audit log: a consumer moving outbox stream entries into Postgres, and `/logs` reading them.

Delivery is at-least-once (XREADGROUP, XAUTOCLAIM of entries a dead consumer left pending) and
the insert is idempotent (ON CONFLICT on the sequence number), so each change is exactly one row.
Every batch also advances a watermark — all rows 1..upto are present — in the same transaction;
it is mirrored into the Redis state hash as `persisted`. The stream is trimmed only to the newest
OUTBOX_KEPT of the persisted entries, so `/logs` reads the newest sequence number and the page's
entries the outbox still holds in one Redis round trip, and asks Postgres only for older ones:
every change acknowledged before the request is in its answer, without waiting for Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

import asyncpg
import msgspec
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from konnichiwa.background import running
from konnichiwa.coalesce import CoalescedReads, Memo
from konnichiwa.errors import Problem
from konnichiwa.postgres import bounded_connection, pg_pool
from konnichiwa.redis_store import COMMAND_TIMEOUT, LuaScript, connect, redis_client
from konnichiwa.schemas import (
    AuditBacklog,
    AuditEntry,
    LogsPage,
    PageQuery,
    convert_query,
    encode,
    json_response,
    rfc3339,
)
from konnichiwa.settings import settings_key
from konnichiwa.state import (
    AuditRow,
    StateKeys,
    read_audit_row,
    state_keys,
)

log = logging.getLogger("konnichiwa.audit")

GROUP: Final = "audit-writers"
BATCH_SIZE: Final = 1000
# Group commit: after a batch of GATHER_FROM to GATHER_BELOW entries, the consumer lets the next
# one gather for a moment. A Postgres batch has a fixed cost (its transaction, commit and
# watermark, ~0.4 ms) that dominates small ones: ~36 µs of Postgres time per row in batches of
# 15, ~12 µs in batches of 150. An entry then waits at most GATHER_SECONDS longer on its way to
# Postgres. Below GATHER_FROM writes are few: the fixed cost is small in total, and each entry
# goes at once (gathering those too measured no difference in CPU at 200 updates/s).
GATHER_FROM: Final = 10
GATHER_BELOW: Final = 100
GATHER_SECONDS: Final = 0.005
BLOCK_MS: Final = 1000  # one XREADGROUP waits at most this long for new entries
CLAIM_IDLE_MS: Final = 5000  # entries pending this long belong to a consumer that died
CLAIM_EVERY: Final = 2.0
RETRY_MAX_DELAY: Final = 2.0
# Persisted entries the outbox keeps after the unpersisted ones: the newest pages of /logs (ten
# pages of the largest limit) are then read from Redis alone. ~200 bytes of Redis memory each.
OUTBOX_KEPT: Final = 1000
SLOW_BATCH_SECONDS: Final = 0.5
LOG_PAGES_KEPT: Final = 256
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

# After a batch is in Postgres, in one round trip: acknowledge the batch's entries, trim the
# stream to the newest ARGV[5] entries Postgres holds, publish the watermark (it only moves
# forward), and read the next batch for the consumer (ARGV: watermark, group, consumer, how many
# to read, how many to keep, then the IDs) — it never blocks: with nothing new the reply is empty
# and the consumer waits in XREADGROUP. Trimming is approximate (whole stream nodes): it may keep
# more. XACK comes first: a Redis at maxmemory refuses a script whose first write may grow
# memory (HSET), while XACK and XTRIM only free it, so a full Redis still drains.
FINISH_BATCH: Final = LuaScript("""
local upto = tonumber(ARGV[1])
if #ARGV > 5 then
  redis.call('XACK', KEYS[2], ARGV[2], unpack(ARGV, 6))
end
local below = upto + 1 - tonumber(ARGV[5])
if below > 1 then
  redis.call('XTRIM', KEYS[2], 'MINID', '~', string.format('%d', below))
end
if upto > tonumber(redis.call('HGET', KEYS[1], 'persisted') or '0') then
  redis.call('HSET', KEYS[1], 'persisted', ARGV[1])
end
if tonumber(ARGV[4]) > 0 then
  local reply = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4],
                           'STREAMS', KEYS[2], '>')
  if reply then
    return reply[1][2]
  end
end
return {}
""")
# After Redis lost its latest writes (a crash inside the AOF fsync second, a restore), carry on
# from what Postgres already holds, so new changes never reuse a persisted sequence number.
RECONCILE: Final = LuaScript("""
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if seq < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'persisted', ARGV[1],
             'counter', ARGV[2], 'message', ARGV[3])
  return 1
end
return 0
""")

# A page of /logs as the outbox holds it, atomically with the newest sequence number it must
# reach: [seq, persisted, entries low < n <= high] (ARGV: entries on the pages before, the limit;
# low and high as PageQuery.bounds computes them). Entries are in the stream from the oldest one
# kept to the newest, so a page's entries are all of it, a newest part of it, or none.
LOG_PAGE: Final = LuaScript("""
local held = redis.call('HMGET', KEYS[1], 'seq', 'persisted')
local high = math.max(0, tonumber(held[1] or '0') - tonumber(ARGV[1]))
local low = math.max(0, high - tonumber(ARGV[2]))
local entries = {}
if high > low then
  entries = redis.call('XRANGE', KEYS[2], string.format('%d-0', low + 1),
                       string.format('%d-0', high))
end
return {held[1] or '0', held[2] or '0', entries}
""")

PERSIST: Final = "SELECT audit_persist_batch($1)"  # see migrations 0004 and 0005
# A page holds 100 rows at most (the largest limit, schemas.PageQuery). Saying so caps the
# planner's guess at the rows of a range whose bounds it cannot see (a share of the table:
# thousands of rows at a million), so the plan made once for any bounds costs no more than one
# made for the call's own: Postgres keeps that generic plan at any size instead of planning
# every call afresh.
PAGE: Final = """
SELECT seq, changed_at, old_counter, new_counter, old_message, new_message, update_type
FROM audit_log WHERE seq <= $1 AND seq > $2 ORDER BY seq DESC LIMIT 100
"""


# An outbox entry holds its audit row, JSON text as audit_persist_batch takes it, in one field
# (see state.UPDATE_SCRIPT). Entries written by the release before it hold the same values in
# seven fields of these names: consumers of this release persist those too (rolling deploys).
ROW_FIELD: Final = b"row"
SEPARATE_FIELDS: Final = (b"seq", b"ts", b"old_counter", b"new_counter", b"old_message",
                          b"new_message", b"update_type")  # fmt: skip
_encode = msgspec.json.Encoder().encode


def audit_row(fields: dict[bytes, bytes]) -> bytes:
    """An outbox entry's audit row, JSON text passed on unparsed."""
    row = fields.get(ROW_FIELD)
    if row is None:
        return _encode([fields[name].decode() for name in SEPARATE_FIELDS])
    return row


def written_at(fields: dict[bytes, bytes]) -> datetime:
    """When an outbox entry's change was made (Redis's clock, microseconds)."""
    return _moment(read_audit_row(audit_row(fields)).micros)


def _moment(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


async def persist(pool: asyncpg.Pool, rows: Sequence[bytes]) -> int:
    """Insert a batch of audit rows (duplicates ignored) and return the watermark after it: one
    round trip, the rows joined into one JSON array as they are."""
    upto: int = await pool.fetchval(PERSIST, (b"[%b]" % b",".join(rows)).decode())
    return upto


class AuditWriter:
    """One worker's consumer in the group that drains the outbox stream into Postgres."""

    def __init__(self, redis: Redis, pool: asyncpg.Pool, keys: StateKeys) -> None:
        self.redis, self.pool, self.keys = redis, pool, keys
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self.last_claim = 0.0

    async def run(self) -> None:
        """Move batches until cancelled; no failure stops it, it only waits and retries."""
        delay = 0.1
        handed: list[Any] = []  # the next batch, read by the script that finished the last one
        while True:
            try:
                rows, ids = _decode(handed) if handed else await self._next_batch()
                handed = []
                upto = await self._store(rows) if rows else 0
                if ids:
                    # No batch handed over when a claim is due (the next read must be the claim)
                    # or when the next one should gather first.
                    gather = GATHER_FROM <= len(ids) < GATHER_BELOW
                    count = 0 if gather or self._claim_due() else BATCH_SIZE
                    keys = (self.keys.state, self.keys.audit)
                    handed = await FINISH_BATCH(
                        self.redis.execute_command,
                        keys,
                        upto,
                        GROUP,
                        self.name,
                        count,
                        OUTBOX_KEPT,
                        *ids,
                    )
                    if gather:
                        await asyncio.sleep(GATHER_SECONDS)
                delay = 0.1
                continue
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # the stream was deleted (e.g. Redis lost its data)
                    await reconcile(self.redis, self.pool, self.keys)
                    await self.ensure_group()
                    continue
                log.error("audit consumer: Redis refused a command: %s", exc)
            except (RedisError, OSError) as exc:
                log.warning("audit consumer: Redis unavailable (%s); retrying", exc)
            except Exception:
                log.exception("audit consumer: unexpected failure; retrying")
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY)

    async def ensure_group(self) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
            await self.redis.xgroup_create(self.keys.audit, GROUP, id="0", mkstream=True)

    def _claim_due(self) -> bool:
        return time.monotonic() - self.last_claim > CLAIM_EVERY

    async def _next_batch(self) -> tuple[list[bytes], list[bytes]]:
        if self._claim_due():
            self.last_claim = time.monotonic()
            await reconcile(self.redis, self.pool, self.keys)  # Redis may have failed over
            claimed = await self.redis.xautoclaim(
                self.keys.audit, GROUP, self.name, CLAIM_IDLE_MS, "0-0", count=BATCH_SIZE
            )
            entries: list[Any] = claimed[1]
            if entries:
                log.info("audit consumer: claimed %d entries of a stopped consumer", len(entries))
                return _decode(entries)
        reply: Any = await self.redis.xreadgroup(  # RESP2: [[stream, [(id, fields)...]]]
            GROUP, self.name, {self.keys.audit: ">"}, count=BATCH_SIZE, block=BLOCK_MS
        )
        return _decode(reply[0][1]) if reply else ([], [])

    async def _store(self, rows: list[bytes]) -> int:
        """Persist until it works (the entries stay pending, safe in Redis); the new watermark."""
        delay = 0.1
        started = time.monotonic()
        while True:
            try:
                upto = await persist(self.pool, rows)
                break
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                log.warning("audit consumer: Postgres unavailable (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY)
        if (took := time.monotonic() - started) > SLOW_BATCH_SECONDS:
            log.warning("audit consumer: %d entries took %.2f s to persist", len(rows), took)
        return upto


def _decode(entries: list[Any]) -> tuple[list[bytes], list[bytes]]:
    """Entries as redis-py parses them, (id, {field: value}), or as a script returns them,
    [id, [field, value, ...]]; an entry deleted meanwhile has no fields."""
    ids = [entry_id for entry_id, _ in entries]
    return [audit_row(_as_dict(fields)) for _, fields in entries if fields], ids


def _as_dict(fields: dict[bytes, bytes] | list[bytes]) -> dict[bytes, bytes]:
    return fields if isinstance(fields, dict) else dict(zip(fields[::2], fields[1::2], strict=True))


async def reconcile(redis: Redis, pool: asyncpg.Pool, keys: StateKeys) -> None:
    """Make sure Redis is not behind Postgres; restore the state from the last audit row if so."""
    row = await pool.fetchrow(
        "SELECT a.seq, a.new_counter, a.new_message FROM audit_watermark w "
        "JOIN audit_log a ON a.seq = w.upto"
    )
    if row is None:
        return
    if await RECONCILE(
        redis.execute_command, (keys.state,), row["seq"], row["new_counter"], row["new_message"]
    ):
        log.error("Redis was behind the audit log; state restored from change %d", row["seq"])


async def audit_writer_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run this worker's outbox consumer for as long as the worker serves."""
    app[log_pages] = Memo(LOG_PAGES_KEPT)
    redis, keys = app[redis_client], app[state_keys]
    app[outbox_pages] = CoalescedReads(
        lambda page: read_outbox_page(redis, keys, page), LOG_PAGES_KEPT
    )
    # A client of its own: its XREADGROUP waits up to BLOCK_MS, longer than requests' commands may.
    consumer_redis = connect(
        app[settings_key].require("redis_url"),
        timeout=BLOCK_MS / 1000 + COMMAND_TIMEOUT,
        connections=2,
    )
    writer = AuditWriter(consumer_redis, app[pg_pool], keys)
    try:
        await reconcile(writer.redis, writer.pool, writer.keys)
        await writer.ensure_group()
        async with running(writer.run(), "audit-writer"):
            yield
    finally:
        await consumer_redis.aclose()


# The backlog in one round trip: [changes not yet in Postgres, the oldest of them or nothing].
BACKLOG: Final = LuaScript("""
local held = redis.call('HMGET', KEYS[1], 'seq', 'persisted')
local behind = tonumber(held[1] or '0') - tonumber(held[2] or '0')
if behind <= 0 then
  return {0, {}}
end
local after = string.format('%d-0', tonumber(held[2] or '0') + 1)
return {behind, redis.call('XRANGE', KEYS[2], after, '+', 'COUNT', 1)}
""")


async def audit_backlog(redis: Redis, keys: StateKeys) -> AuditBacklog:
    behind, oldest = await BACKLOG(redis.execute_command, (keys.state, keys.audit))
    if behind <= 0:
        return AuditBacklog(0, 0.0)
    now = datetime.now(UTC)
    written = written_at(_as_dict(oldest[0][1])) if oldest else now
    return AuditBacklog(behind, round(max((now - written).total_seconds(), 0.0), 3))


class OutboxPage(NamedTuple):
    """What LOG_PAGE read: the newest change, the watermark, the page's rows still in the outbox."""

    seq: int
    persisted: int
    rows: list[AuditRow]


async def read_outbox_page(redis: Redis, keys: StateKeys, page: tuple[int, int]) -> OutboxPage:
    number, limit = page
    seq, persisted, entries = await LOG_PAGE(
        redis.execute_command, (keys.state, keys.audit), (number - 1) * limit, limit
    )
    rows, _ = _decode(entries)
    return OutboxPage(int(seq), int(persisted), [read_audit_row(row) for row in rows])


def older_than_outbox(found: OutboxPage, query: PageQuery) -> tuple[int, int]:
    """(high, low): the page's part that only Postgres holds, empty when high == low; a 503
    problem if the outbox lacks changes Postgres does not hold either (Redis lost them)."""
    high, low = query.bounds(found.seq)
    oldest = found.rows[0].seq if found.rows else high + 1
    if oldest - 1 > max(low, found.persisted) or len(found.rows) != high - oldest + 1:
        log.error("audit log: the outbox lacks changes of %d..%d not in Postgres (up to %d)",
                  low + 1, high, found.persisted)  # fmt: skip
        raise Problem(
            503,
            "Service Unavailable",
            "Some changes of this page are missing from the outbox and not yet in Postgres.",
            type="/problems/audit-log-incomplete",
            headers={"Retry-After": "5"},
        )
    return max(low, oldest - 1), low


def outbox_entry(row: AuditRow) -> AuditEntry:
    return AuditEntry(
        id=row.seq,
        timestamp=rfc3339(_moment(row.micros)),
        old_counter=row.old_counter,
        new_counter=row.new_counter,
        old_message=row.old_message,
        new_message=row.new_message,
        update_type=row.update_type,
    )


async def read_page(pool: asyncpg.Pool, high: int, low: int) -> list[AuditEntry]:
    """Rows low < seq <= high (a page: 100 at most), newest first: a range scan on the dense
    sequence, no OFFSET."""
    if high <= low:
        return []
    async with bounded_connection(pool) as conn:
        rows = await conn.fetch(PAGE, high, low)
    return [
        AuditEntry(
            id=row["seq"],
            timestamp=rfc3339(row["changed_at"]),
            old_counter=row["old_counter"],
            new_counter=row["new_counter"],
            old_message=row["old_message"],
            new_message=row["new_message"],
            update_type=row["update_type"],
        )
        for row in rows
    ]


# Concurrent requests for one page share a LOG_PAGE round trip made after they arrived.
outbox_pages = web.AppKey("outbox_pages", CoalescedReads[tuple[int, int], OutboxPage])


# A page is fixed by (newest change, page, limit): no audit entry ever changes, so its encoded
# answer can be shared by every request that asks for it.
log_pages = web.AppKey("log_pages", Memo[tuple[int, int, int], bytes])


async def logs(request: web.Request) -> web.Response:
    """The audit log, newest first; includes every change acknowledged before this request."""
    query = convert_query(request.query, PageQuery)
    app = request.app
    found = await app[outbox_pages].get((query.page, query.limit))
    high, low = older_than_outbox(found, query)

    async def render() -> bytes:
        entries = [outbox_entry(row) for row in reversed(found.rows)]
        entries += await read_page(app[pg_pool], high, low)
        pages = query.pages(found.seq)
        return encode(LogsPage(entries, query.page, query.limit, found.seq, pages))

    return json_response(await app[log_pages].get((found.seq, query.page, query.limit), render))
