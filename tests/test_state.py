"""Shared state: `/status` and `/update` — contract, atomicity, bad input changing nothing."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import redis.asyncio

from konnichiwa.errors import Problem
from konnichiwa.schemas import State, UpdateRequest
from konnichiwa.state import Applied, StateKeys, apply_changes, apply_update, describe
from tests.support import FULL_AUTH, READ_AUTH, Client

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


async def _update(client: Client, body: object) -> tuple[int, dict[str, object]]:
    response = await client.post("/update", json=body, headers=FULL_AUTH)
    return response.status, await response.json(content_type=None)


async def _state(client: Client) -> tuple[int, str]:
    body = await (await client.get("/status")).json()
    return body["counter"], body["message"]


async def test_initial_status(client: Client) -> None:
    response = await client.get("/status")
    assert response.status == 200
    body = await response.json()
    assert (body["counter"], body["message"]) == (0, "")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", body["timestamp"])
    assert isinstance(body["uptime_seconds"], float)
    assert body["uptime_seconds"] >= 0


VALID_UPDATES = [
    ({"counter": 5}, (5, ""), "counter"),
    ({"increment": 3}, (3, ""), "increment"),
    ({"increment": -3}, (-3, ""), "increment"),
    ({"message": "hello"}, (0, "hello"), "message"),
    ({"counter": 7, "message": "こんにちは"}, (7, "こんにちは"), "counter, message"),
    ({"increment": 2, "message": ""}, (2, ""), "increment, message"),
    ({"counter": INT64_MAX}, (INT64_MAX, ""), "counter"),
    ({"counter": INT64_MIN}, (INT64_MIN, ""), "counter"),
    ({"message": "x" * 1000}, (0, "x" * 1000), "message"),
]


@pytest.mark.parametrize(("body", "expected", "update_type"), VALID_UPDATES)
async def test_valid_updates(
    client: Client, body: dict[str, object], expected: tuple[int, str], update_type: str
) -> None:
    status, answer = await _update(client, body)
    assert status == 200
    assert answer["success"] is True
    assert answer["message"] == "State updated successfully"
    assert answer["old_state"] == {"counter": 0, "message": ""}
    assert answer["new_state"] == {"counter": expected[0], "message": expected[1]}
    assert answer["seq"] == 1
    assert await _state(client) == expected


async def test_sequence_and_consecutive_values(client: Client) -> None:
    await _update(client, {"counter": 10, "message": "a"})
    status, answer = await _update(client, {"increment": 5})
    assert status == 200
    assert answer["old_state"] == {"counter": 10, "message": "a"}
    assert answer["new_state"] == {"counter": 15, "message": "a"}
    assert answer["seq"] == 2


INVALID_UPDATES = [
    ([], "body"),
    ("counter", "body"),
    (42, "body"),
    ({}, "body"),
    ({"id": 1}, "id"),
    ({"counter": 1, "extra": True}, "extra"),
    ({"counter": "5"}, "counter"),
    ({"counter": True}, "counter"),
    ({"counter": 1.5}, "counter"),
    ({"counter": 2.0**53}, "counter"),  # a float that large may not be the number written
    ({"increment": 1e300}, "increment"),
    ({"counter": None}, "counter"),
    ({"counter": INT64_MAX + 1}, "counter"),
    ({"counter": INT64_MIN - 1}, "counter"),
    ({"increment": 2**64}, "increment"),
    ({"increment": False}, "increment"),
    ({"message": 5}, "message"),
    ({"message": None}, "message"),
    ({"message": "x" * 1001}, "message"),
    ({"message": "NUL \x00 inside"}, "message"),
    ({"counter": 1, "increment": 1}, "increment"),
]


async def test_whole_numbers_written_as_floats_are_integers(client: Client) -> None:
    """JSON Schema's `integer`, which the OpenAPI document uses, counts 5.0 as one."""
    status, answer = await _update(client, {"counter": 7.0, "message": "x"})
    assert (status, answer["new_state"]) == (200, {"counter": 7, "message": "x"})
    status, answer = await _update(client, {"increment": -2.0})
    assert (status, answer["new_state"]) == (200, {"counter": 5, "message": "x"})


@pytest.mark.parametrize(("body", "field"), INVALID_UPDATES)
async def test_invalid_updates_change_nothing(client: Client, body: object, field: str) -> None:
    await _update(client, {"counter": 9, "message": "before"})
    status, answer = await _update(client, body)
    assert status == 422
    assert [error["field"] for error in answer["errors"]] == [field]  # type: ignore[attr-defined]
    assert await _state(client) == (9, "before")


DUPLICATE_KEYS = [
    (b'{"increment": 1, "increment": 2}', "increment"),
    (b'{"counter":1,"message":"a","counter":1}', "counter"),
    (b'{"message": "x", "c\\u006funter": 1, "counter": 2}', "counter"),  # an escaped key
    (b'{"message": "a\\", \\"message\\": \\"b", "message": "c"}', "message"),
]


@pytest.mark.parametrize(("data", "field"), DUPLICATE_KEYS)
async def test_duplicate_keys_change_nothing(client: Client, data: bytes, field: str) -> None:
    response = await client.post(
        "/update", data=data, headers={**FULL_AUTH, "Content-Type": "application/json"}
    )
    assert response.status == 422
    assert [error["field"] for error in (await response.json())["errors"]] == [field]
    assert await _state(client) == (0, "")


@pytest.mark.parametrize(
    "data",
    [
        b'{"message": "\\"counter\\": 1, \\"counter\\": 2", "counter": 3}',  # keys in a string
        b'{"message": "a\\\\", "counter": 3}',  # a value ending in an escaped backslash
        b'{ "counter" : 3 , "message" : ":\\":" }',
    ],
)
async def test_keys_inside_strings_are_no_duplicates(client: Client, data: bytes) -> None:
    response = await client.post(
        "/update", data=data, headers={**FULL_AUTH, "Content-Type": "application/json"}
    )
    assert response.status == 200
    assert (await response.json())["new_state"]["counter"] == 3


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        (b"{not json", "application/json", 400),
        (b"", "application/json", 400),
        (b'{"counter": 1', "application/json", 400),
        (b'{"counter": 1}', "text/plain", 415),
        (b"counter=1", "application/x-www-form-urlencoded", 415),
    ],
)
async def test_malformed_bodies(
    client: Client, data: bytes, content_type: str, status: int
) -> None:
    response = await client.post(
        "/update", data=data, headers={**FULL_AUTH, "Content-Type": content_type}
    )
    assert response.status == status
    assert response.content_type == "application/problem+json"
    assert await _state(client) == (0, "")


@pytest.mark.parametrize(
    ("start", "increment"), [(INT64_MAX, 1), (INT64_MIN, -1), (INT64_MAX - 5, 10), (-5, INT64_MIN)]
)
async def test_overflow_is_refused_not_wrapped(client: Client, start: int, increment: int) -> None:
    await _update(client, {"counter": start})
    status, answer = await _update(client, {"increment": increment, "message": "never"})
    assert status == 409
    assert answer["type"] == "/problems/counter-overflow"
    assert await _state(client) == (start, "")
    status, answer = await _update(client, {"increment": 0})
    assert answer["seq"] == 2  # the refused change took no sequence number


@pytest.mark.parametrize(
    ("start", "increment"),
    [(2**53 - 2, 1), (2**53 - 1, 1), (2**53, 1), (-(2**53) + 2, -1), (-(2**53) + 1, -1),
     (INT64_MAX - 1, 1), (INT64_MIN + 1, -1), (2**53 + 1, -(2**54))],
)  # fmt: skip
async def test_increments_are_exact_across_the_whole_64_bit_range(
    client: Client, start: int, increment: int
) -> None:
    """Around ±2**53, where a Lua number stops holding every integer, and at the ends."""
    await _update(client, {"counter": start})
    status, answer = await _update(client, {"increment": increment})
    assert status == 200
    assert answer["new_state"] == {"counter": start + increment, "message": ""}
    assert await _state(client) == (start + increment, "")


@pytest.mark.parametrize(
    ("headers", "status"), [({}, 401), (READ_AUTH, 403), ({"X-API-Key": "nope" * 5}, 401)]
)
async def test_update_needs_the_write_scope(
    client: Client, headers: dict[str, str], status: int
) -> None:
    response = await client.post("/update", json={"counter": 1}, headers=headers)
    assert response.status == status
    assert await _state(client) == (0, "")


async def test_concurrent_increments_are_never_lost(client: Client) -> None:
    results = await asyncio.gather(*(_update(client, {"increment": 1}) for _ in range(200)))
    assert all(status == 200 for status, _ in results)
    assert await _state(client) == (200, "")
    seqs = sorted(int(answer["seq"]) for _, answer in results)  # type: ignore[call-overload]
    assert seqs == list(range(1, 201))
    for _, answer in results:  # each change saw exactly the value before it
        old, new = answer["old_state"], answer["new_state"]
        assert new["counter"] == old["counter"] + 1  # type: ignore[index]


async def test_every_change_is_in_the_outbox(redis_url: str) -> None:
    keys = StateKeys("dev")
    connection = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:  # no consumer runs here: the entries stay in the outbox
        await apply_update(connection.execute_command, keys, UpdateRequest(counter=4, message="m"))
        await apply_update(connection.execute_command, keys, UpdateRequest(increment=-1))
        entries = await connection.xrange(keys.audit)
    finally:
        await connection.aclose()
    assert entries is not None
    assert [entry_id for entry_id, _ in entries] == ["1-0", "2-0"]
    rows = [json.loads(fields["row"]) for _, fields in entries]  # type: ignore[index]
    # [seq, µs since the epoch, old counter, new counter, old message, new message, update type]
    assert [row[:1] + row[2:] for row in rows] == [
        ["1", "0", "4", "", "m", "counter, message"],
        ["2", "4", "3", "m", "m", "increment"],
    ]
    assert all(re.fullmatch(r"\d{16}", row[1]) for row in rows)


async def test_a_batch_applies_changes_in_order_and_refuses_only_an_overflow(
    redis_url: str,
) -> None:
    connection = redis.asyncio.Redis.from_url(redis_url)
    requests = [
        UpdateRequest(counter=2**63 - 2),
        UpdateRequest(increment=5, message="never written"),
        UpdateRequest(increment=1, message="kept"),
        UpdateRequest(message="last"),
    ]
    try:
        outcomes = await apply_changes(
            connection.execute_command, StateKeys("dev"), [describe(r) for r in requests]
        )
    finally:
        await connection.aclose()
    first_outcome, overflow, *rest = outcomes
    assert isinstance(overflow, Problem)
    assert overflow.status == 409
    assert isinstance(first_outcome, Applied)
    first = first_outcome.result
    third, fourth = (outcome.result for outcome in rest if isinstance(outcome, Applied))
    assert (first.seq, third.seq, fourth.seq) == (1, 2, 3)
    assert third.old_state == State(2**63 - 2, "")
    assert third.new_state == State(2**63 - 1, "kept")
    assert fourth.old_state == third.new_state
    assert fourth.new_state == State(2**63 - 1, "last")
