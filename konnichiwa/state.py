"""The shared state: a counter and a message in one Redis hash, changed only by one Lua script.

Each change also takes the next number of a dense audit sequence and appends its audit event to a
stream (the outbox), in the same script: concurrent writers on any worker or host can neither lose
an update nor see non-consecutive old/new values. Counter values never pass through Lua numbers
(doubles): Redis does the 64-bit arithmetic (HINCRBY refuses to overflow) and Lua moves strings.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Final, NamedTuple

import msgspec
from aiohttp import web
from redis.asyncio import Redis

from konnichiwa.coalesce import CoalescedRead
from konnichiwa.errors import FieldError, Problem, validation_problem
from konnichiwa.idempotency import idempotent
from konnichiwa.redis_store import LuaScript, Runner, key_prefix, pipeliner, redis_client
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

started_at = web.AppKey("started_at", float)

UPDATE_SCRIPT: Final = LuaScript("""
local old_counter = redis.call('HGET', KEYS[1], 'counter') or '0'
local old_message = redis.call('HGET', KEYS[1], 'message') or ''
if ARGV[1] == 'increment' then
  local added = redis.pcall('HINCRBY', KEYS[1], 'counter', ARGV[2])
  if type(added) == 'table' and added.err then
    return {'overflow'}
  end
elseif ARGV[1] == 'set' then
  redis.call('HSET', KEYS[1], 'counter', ARGV[2])
end
local new_message = old_message
if ARGV[3] == '1' then
  new_message = ARGV[4]
  redis.call('HSET', KEYS[1], 'message', new_message)
end
local new_counter = redis.call('HGET', KEYS[1], 'counter') or '0'
local seq = string.format('%d', redis.call('HINCRBY', KEYS[1], 'seq', 1))
local now = redis.call('TIME')
local micros = now[1] .. string.format('%06d', now[2])
redis.call('XADD', KEYS[2], seq .. '-0',
  'seq', seq, 'ts', micros, 'old_counter', old_counter, 'new_counter', new_counter,
  'old_message', old_message, 'new_message', new_message, 'update_type', ARGV[5])
return {seq, old_counter, new_counter, old_message, new_message}
""")


class StateKeys:
    """Key names, namespaced by environment; one hash tag keeps them in one Redis Cluster slot."""

    def __init__(self, environment: str) -> None:
        self.state = f"{key_prefix(environment)}:state"
        self.audit = f"{key_prefix(environment)}:audit"


state_keys = web.AppKey("state_keys", StateKeys)


def describe(request: UpdateRequest) -> tuple[str, str, str]:
    """(mode, counter argument, update_type) for the script; reject contradictory input."""
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
    if request.message is not msgspec.UNSET:
        changed.append("message")
    if not changed:
        raise validation_problem(
            [FieldError("body", "Give at least one of `counter`, `increment`, `message`.")]
        )
    return mode, argument, ", ".join(changed)


async def apply_update(run: Runner, keys: StateKeys, request: UpdateRequest) -> UpdateResult:
    """Apply one change atomically; raise a 409 problem if an increment would overflow.

    `run` sends a command: a client's `execute_command`, or a worker's `Pipeliner.execute`.
    """
    mode, argument, update_type = describe(request)
    message = request.message if isinstance(request.message, str) else None
    reply = await UPDATE_SCRIPT(
        run,
        (keys.state, keys.audit),
        mode,
        argument,
        "0" if message is None else "1",
        message or "",
        update_type,
    )
    if reply[0] == b"overflow":
        raise Problem(
            409,
            "Conflict",
            "The increment would take the counter outside the signed 64-bit range; "
            "nothing was changed.",
            type="/problems/counter-overflow",
        )
    seq, old_counter, new_counter, old_message, new_message = reply
    return UpdateResult(
        success=True,
        message="State updated successfully",
        old_state=State(int(old_counter), _text(old_message)),
        new_state=State(int(new_counter), _text(new_message)),
        seq=int(seq),
    )


class Snapshot(NamedTuple):
    """The state hash at one moment: the values, the newest change, the last one persisted."""

    counter: int
    message: str
    seq: int
    persisted: int


async def read_snapshot(redis: Redis, keys: StateKeys) -> Snapshot:
    counter, message, seq, persisted = await redis.hmget(
        keys.state, ["counter", "message", "seq", "persisted"]
    )
    return Snapshot(int(counter or 0), _text(message), int(seq or 0), int(persisted or 0))


# Every read of the state on this worker goes through one coalesced HMGET.
snapshots = web.AppKey("snapshots", CoalescedRead[Snapshot])


def _text(value: bytes | str | None) -> str:
    """A Redis reply as text (the client returns bytes; nothing stores non-UTF-8)."""
    return value.decode() if isinstance(value, bytes) else value or ""


async def status(request: web.Request) -> web.Response:
    """The current counter and message."""
    app = request.app
    snapshot = await app[snapshots].get()
    uptime = round(time.time() - app[started_at], 3)
    now = rfc3339(datetime.now(UTC))
    return json_response(Status(snapshot.counter, snapshot.message, now, uptime))


async def update(request: web.Request) -> web.Response:
    """Change the counter (set or increment) and/or the message, atomically."""
    body = await decode_body(request, UpdateRequest)
    app = request.app

    async def apply() -> web.Response:
        result = await apply_update(app[pipeliner].execute, app[state_keys], body)
        return json_response(result)

    return await idempotent(request, encode(body), apply)


def setup_state(app: web.Application) -> None:
    keys = app[state_keys] = StateKeys(app[settings_key].environment)
    app[started_at] = time.time()
    app[snapshots] = CoalescedRead(lambda: read_snapshot(app[redis_client], keys))
