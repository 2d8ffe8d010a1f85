"""The shared state: a counter and a message in one Redis hash, changed only by one Lua script.

Each change also takes the next number of a dense audit sequence and appends its audit row to a
stream (the outbox), in the same script: concurrent writers on any worker or host can neither lose
an update nor see non-consecutive old/new values. Counters pass through Lua numbers (doubles)
only where those are exact; beyond that Redis does the 64-bit arithmetic (HINCRBY, which refuses
to overflow) and Lua moves the digits as strings.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Final, NamedTuple

import msgspec
from aiohttp import web
from redis.asyncio import Redis

from konnichiwa.coalesce import CoalescedRead
from konnichiwa.errors import DEPENDENCY_ERRORS, FieldError, Problem, validation_problem
from konnichiwa.idempotency import (
    KEEP_SECONDS,
    KEY_REUSED,
    REPLAYED,
    IdempotencyRecord,
    outcome_unknown,
    record_for,
)
from konnichiwa.redis_store import (
    Batcher,
    LuaScript,
    PipelinedConnection,
    Runner,
    key_prefix,
    never_sent,
    redis_client,
)
from konnichiwa.schemas import (
    State,
    Status,
    UpdateRequest,
    UpdateResult,
    decode_body,
    encode,
    json_response,
    rfc3339,
)
from konnichiwa.settings import settings_key

# A batch of changes, each applied whole and in order; one reply per change: its audit row,
# "overflow", or for a change whose Idempotency-Key was used before, "R" and the first answer's
# audit row (or "reused" when the body differs). ARGV[1] is the batch as one MessagePack array of
# `Change`s: one argument to pack and parse instead of seven per change. A change with an
# Idempotency-Key names its record by index into KEYS, and the record (fingerprint, then the
# audit row) is written right beside the change, so no crash or stall can part them: a retry
# always finds the first answer. ARGV[2] is how long records are kept. The audit row is one JSON
# array of strings, [seq, microseconds since the epoch, old_counter, new_counter, old_message,
# new_message, update_type]: the outbox entry's only field and the reply alike, passed to Postgres
# as it is (one stream field instead of seven is what makes the script, the consumer's reads and
# the consumer itself cheap). The state hash is written once per batch, at the end: a script that
# has written once always runs to its end (Redis refuses a script for lack of memory only before
# its first write), so the hash, the stream and the records cannot part. Lua moves counters as
# strings and adds them as numbers only when the sum is exact in a double; otherwise Redis's
# HINCRBY does it.
UPDATE_SCRIPT: Final = LuaScript("""
local held = redis.call('HMGET', KEYS[1], 'counter', 'message', 'seq')
local counter, message = held[1] or '0', held[2] or ''
local first_seq = tonumber(held[3] or '0')
local seq = first_seq
local now = redis.call('TIME')
local micros = now[1] .. string.format('%06d', now[2])
local replies = {}
for _, change in ipairs(cmsgpack.unpack(ARGV[1])) do
  local mode, argument, record = change[1], change[2], change[6]
  local kept = record > 0 and redis.call('GET', KEYS[record])
  if kept then
    if string.sub(kept, 1, 32) == change[7] then
      replies[#replies + 1] = 'R' .. string.sub(kept, 33)
    else
      replies[#replies + 1] = 'reused'
    end
  else
    local new_counter = counter
    if mode == 'increment' then
      local a, b = tonumber(counter), tonumber(argument)
      if a > -2^52 and a < 2^52 and b > -2^52 and b < 2^52 then
        new_counter = string.format('%d', a + b)  -- exact: the sum is within a double's integers
      else  -- Redis does the 64-bit arithmetic, refusing to overflow
        redis.call('HSET', KEYS[1], 'counter', counter)
        local added = redis.pcall('HINCRBY', KEYS[1], 'counter', argument)
        if type(added) == 'table' and added.err then
          new_counter = nil
        else
          new_counter = redis.call('HGET', KEYS[1], 'counter')
        end
      end
    elseif mode == 'set' then
      new_counter = argument
    end
    if new_counter == nil then
      replies[#replies + 1] = 'overflow'
    else
      local new_message = message
      if change[3] == '1' then
        new_message = change[4]
      end
      seq = seq + 1
      local id = string.format('%d', seq)
      local row = cjson.encode({id, micros, counter, new_counter, message, new_message, change[5]})
      redis.call('XADD', KEYS[2], id .. '-0', 'row', row)
      if record > 0 then
        redis.call('SET', KEYS[record], change[7] .. row, 'EX', ARGV[2])
      end
      replies[#replies + 1] = row
      counter, message = new_counter, new_message
    end
  end
end
if seq > first_seq then
  redis.call('HSET', KEYS[1], 'counter', counter, 'message', message,
             'seq', string.format('%d', seq))
end
return replies
""")
# Changes waiting while a batch is in Redis go in the next one; a cap keeps each script short
# (Redis runs nothing else while a script runs).
MAX_UPDATE_BATCH: Final = 256
# Batches of a worker pipelined at once. Redis writes (and under `appendfsync always`, fsyncs)
# its append-only file once per event-loop turn: every batch that reaches it during one turn's
# fsync is in the next turn's, whichever worker sent it. With one batch in flight a worker's
# changes wait for its previous batch's fsync before they are even sent.
UPDATE_BATCHES_IN_FLIGHT: Final = 4


class Change(NamedTuple):
    """One change as the update script takes it."""

    mode: str  # "set", "increment" or "keep"
    argument: str  # the counter's new value or increment, in decimal
    has_message: str  # "1" if the message is set
    message: str
    update_type: str  # what /logs says changed, e.g. "increment, message"
    record: IdempotencyRecord | None = None


_pack_changes: Final = msgspec.msgpack.Encoder().encode


class Applied(NamedTuple):
    """A change's answer, and whether it is the first answer replayed for a retry."""

    result: UpdateResult
    replayed: bool


class StateKeys:
    """Key names, namespaced by environment; one hash tag keeps them in one Redis Cluster slot."""

    def __init__(self, environment: str) -> None:
        self.state = f"{key_prefix(environment)}:state"
        self.audit = f"{key_prefix(environment)}:audit"


state_keys = web.AppKey("state_keys", StateKeys)


def describe(request: UpdateRequest, record: IdempotencyRecord | None = None) -> Change:
    """The script's arguments for one valid request (and its Idempotency-Key's record); a 422
    problem for contradictory input."""
    changed = []
    mode, argument = "keep", ""
    if request.counter is not msgspec.UNSET and request.increment is not msgspec.UNSET:
        raise validation_problem(
            [FieldError("increment", "`increment` cannot be combined with `counter`.")]
        )
    if request.counter is not msgspec.UNSET:
        mode, argument = "set", str(request.counter)
        changed.append("counter")
    elif request.increment is not msgspec.UNSET:
        mode, argument = "increment", str(request.increment)
        changed.append("increment")
    message = request.message if isinstance(request.message, str) else None
    if message is not None:
        if "\x00" in message:  # Postgres text cannot hold it: the change could never be audited
            raise validation_problem(
                [FieldError("message", "The message cannot contain the NUL character (U+0000).")]
            )
        changed.append("message")
    if not changed:
        raise validation_problem(
            [FieldError("body", "Give at least one of `counter`, `increment`, `message`.")]
        )
    has_message = "0" if message is None else "1"
    return Change(mode, argument, has_message, message or "", ", ".join(changed), record)


async def apply_changes(
    run: Runner, keys: StateKeys, changes: Sequence[Change], keep_seconds: int = KEEP_SECONDS
) -> list[Applied | Problem]:
    """Apply changes in one script, each atomically; a 409 problem for one that would overflow,
    a 422 for an Idempotency-Key used before with another body.

    `run` sends a command, e.g. a client's `execute_command`.
    """
    script_keys = [keys.state, keys.audit]
    packed = []
    for change in changes:
        record = change.record
        if record is None:
            packed.append((*change[:5], 0, ""))
        else:
            script_keys.append(record.key)
            packed.append((*change[:5], len(script_keys), record.fingerprint))
    replies = await UPDATE_SCRIPT(run, script_keys, _pack_changes(packed), keep_seconds)
    return [_outcome(reply) for reply in replies]


async def apply_update(run: Runner, keys: StateKeys, request: UpdateRequest) -> UpdateResult:
    """Apply one change on its own."""
    (outcome,) = await apply_changes(run, keys, [describe(request)])
    if isinstance(outcome, Problem):
        raise outcome
    return outcome.result


class AuditRow(msgspec.Struct, array_like=True, frozen=True):
    """A change as the outbox holds it (see UPDATE_SCRIPT), its numbers read from their text."""

    seq: int
    micros: int
    old_counter: int
    new_counter: int
    old_message: str
    new_message: str
    update_type: str


read_audit_row: Final = msgspec.json.Decoder(AuditRow, strict=False).decode


OVERFLOW: Final = Problem(
    409,
    "Conflict",
    "The increment would take the counter outside the signed 64-bit range; nothing was changed.",
    type="/problems/counter-overflow",
)


def _outcome(reply: bytes) -> Applied | Problem:
    if reply == b"overflow":
        return OVERFLOW
    if reply == b"reused":
        return KEY_REUSED
    replayed = reply[:1] == b"R"
    row = read_audit_row(reply[1:] if replayed else reply)
    result = UpdateResult(
        success=True,
        message="State updated successfully",
        old_state=State(row.old_counter, row.old_message),
        new_state=State(row.new_counter, row.new_message),
        seq=row.seq,
    )
    return Applied(result, replayed)


# Each worker sends its concurrent changes to Redis together, one script per batch, pipelined on
# one connection of its own: batches are applied in the order their changes arrived.
updates = web.AppKey("updates", Batcher[Change, Applied])
update_connection = web.AppKey("update_connection", PipelinedConnection)


class Snapshot(NamedTuple):
    """The state at one moment."""

    counter: int
    message: str


async def read_snapshot(redis: Redis, keys: StateKeys) -> Snapshot:
    counter, message = await redis.hmget(keys.state, ["counter", "message"])
    return Snapshot(int(counter or 0), _text(message))


class Reading:
    """One coalesced read of the state, shared by every /status request it serves; their answer
    is encoded once, when the first of them asks."""

    def __init__(self, snapshot: Snapshot, read_at: float, started: float) -> None:
        self.snapshot, self.read_at, self.started = snapshot, read_at, started

    @functools.cached_property
    def status_body(self) -> bytes:
        return encode(
            Status(
                self.snapshot.counter,
                self.snapshot.message,
                rfc3339(datetime.fromtimestamp(self.read_at, UTC)),
                round(self.read_at - self.started, 3),
            )
        )


async def read_state(redis: Redis, keys: StateKeys, started: float) -> Reading:
    return Reading(await read_snapshot(redis, keys), time.time(), started)


# Every /status read on this worker goes through one coalesced HMGET.
readings = web.AppKey("readings", CoalescedRead[Reading])


def _text(value: bytes | str | None) -> str:
    """A Redis reply as text (the client returns bytes; nothing stores non-UTF-8)."""
    return value.decode() if isinstance(value, bytes) else value or ""


async def status(request: web.Request) -> web.Response:
    """The current counter and message."""
    return json_response((await request.app[readings].get()).status_body)


async def update(request: web.Request) -> web.Response:
    """Change the counter (set or increment) and/or the message, atomically."""
    body = await decode_body(request, UpdateRequest)
    record = record_for(request, body, "update")
    change = describe(body, record)
    try:
        applied = await request.app[updates](change)
    except DEPENDENCY_ERRORS as exc:
        if never_sent(exc):
            raise
        raise outcome_unknown("Redis", "the update", record is not None) from exc
    return json_response(applied.result, headers=REPLAYED if applied.replayed else None)


async def update_connection_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the connection this worker's updates are pipelined on; fail start-up at once if
    Redis does not answer."""
    connection = PipelinedConnection(
        app[settings_key].require("redis_url"), scripts=(UPDATE_SCRIPT,)
    )
    await connection("PING")
    app[update_connection] = connection
    yield
    await connection.aclose()


def setup_state(app: web.Application) -> None:
    keys = app[state_keys] = StateKeys(app[settings_key].environment)
    started = time.time()
    app[readings] = CoalescedRead(lambda: read_state(app[redis_client], keys, started))
    app[updates] = Batcher(
        lambda changes: apply_changes(app[update_connection], keys, changes),
        MAX_UPDATE_BATCH,
        UPDATE_BATCHES_IN_FLIGHT,
    )
    app.cleanup_ctx.append(update_connection_ctx)
