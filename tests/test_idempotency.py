"""Idempotency-Key on POST /update: replay, different body, concurrent duplicates, per API key."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
import redis.asyncio

from konnichiwa.auth import SCOPES, ApiKey, keyring
from konnichiwa.idempotency import KEY_REUSED, IdempotencyRecord
from konnichiwa.schemas import UpdateRequest
from konnichiwa.state import Applied, StateKeys, apply_changes, describe
from tests.support import FULL_AUTH, FULL_KEY, Client

OTHER_KEY = "another-client-key-0123456789"


async def _post(
    client: Client, body: object, key: str | None, auth: dict[str, str] = FULL_AUTH
) -> tuple[int, dict[str, str], bytes]:
    headers = {**auth, "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    data = body if isinstance(body, str) else json.dumps(body)
    response = await client.post("/update", data=data, headers=headers)
    return response.status, dict(response.headers), await response.read()


async def _counter(client: Client) -> int:
    counter: int = (await (await client.get("/status")).json())["counter"]
    return counter


async def test_same_key_same_body_replays(client: Client) -> None:
    first = await _post(client, {"increment": 5}, "key-1")
    second = await _post(client, '{ "increment" : 5 }', "key-1")  # the same body, spelled apart
    assert first[0] == second[0] == 200
    assert "Idempotent-Replayed" not in first[1]
    assert second[1]["Idempotent-Replayed"] == "true"
    assert second[2] == first[2]
    assert await _counter(client) == 5


async def test_same_key_other_body_is_refused(client: Client) -> None:
    await _post(client, {"increment": 5}, "key-2")
    status, _, body = await _post(client, {"increment": 6}, "key-2")
    assert status == 422
    assert json.loads(body)["type"] == "/problems/idempotency-key-reused"
    assert await _counter(client) == 5


async def test_without_a_key_every_request_applies(client: Client) -> None:
    await _post(client, {"increment": 1}, None)
    await _post(client, {"increment": 1}, None)
    assert await _counter(client) == 2


async def test_concurrent_duplicates_apply_once(client: Client) -> None:
    results = await asyncio.gather(*(_post(client, {"increment": 1}, "burst") for _ in range(50)))
    assert {status for status, _, _ in results} == {200}  # the others replay the first
    applied = [r for r in results if "Idempotent-Replayed" not in r[1]]
    assert len(applied) == 1
    assert await _counter(client) == 1
    logs = await (await client.get("/logs")).json()
    assert logs["total"] == 1


async def test_keys_belong_to_one_api_key(client: Client) -> None:
    client.app[keyring].replace([ApiKey(FULL_KEY, SCOPES), ApiKey(OTHER_KEY, SCOPES)])
    await _post(client, {"increment": 1}, "shared-name")
    status, headers, _ = await _post(
        client, {"increment": 1}, "shared-name", {"X-API-Key": OTHER_KEY}
    )
    assert status == 200
    assert "Idempotent-Replayed" not in headers
    assert await _counter(client) == 2


async def test_a_failed_request_releases_its_key(client: Client) -> None:
    await _post(client, {"counter": 2**63 - 1}, None)
    assert (await _post(client, {"increment": 1}, "retry-me"))[0] == 409
    status, headers, _ = await _post(client, {"increment": 1}, "retry-me")
    assert status == 409  # run again, not replayed: failures are never kept
    assert "Idempotent-Replayed" not in headers


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "naïve"])
async def test_malformed_keys(client: Client, key: str) -> None:
    status, _, body = await _post(client, {"increment": 1}, key)
    assert status == 422
    assert json.loads(body)["errors"][0]["field"] == "Idempotency-Key"
    assert await _counter(client) == 0


async def test_answers_are_kept_for_a_day_compactly(client: Client, redis_url: str) -> None:
    await _post(client, {"increment": 1, "message": "kept"}, "kept")
    connection = redis.asyncio.Redis.from_url(redis_url)
    try:
        (key,) = await connection.keys("{konnichiwa:dev}:once:update:*")
        assert 86000 < await connection.ttl(key) <= 86400
        used = await connection.memory_usage(key)
        assert used is not None
        assert used < 300  # bytes: the key, the fingerprint and the audit row
    finally:
        await connection.aclose()


async def test_a_batch_with_one_key_twice_applies_it_once(redis_url: str) -> None:
    """The record is written beside the change, inside the script: the second change of a
    batch already finds it."""
    record = IdempotencyRecord("{konnichiwa:dev}:once:update:test", "f" * 32)
    other = IdempotencyRecord(record.key, "e" * 32)
    changes = [
        describe(UpdateRequest(increment=2), record),
        describe(UpdateRequest(increment=2), record),
        describe(UpdateRequest(increment=3), other),
    ]
    connection = redis.asyncio.Redis.from_url(redis_url)
    try:
        first, again, reused = await apply_changes(
            connection.execute_command, StateKeys("dev"), changes
        )
        assert await connection.hget("{konnichiwa:dev}:state", "counter") == b"2"
    finally:
        await connection.aclose()
    assert isinstance(first, Applied)
    assert again == Applied(first.result, replayed=True)
    assert not first.replayed
    assert reused is KEY_REUSED


async def _register(
    client: Client, body: dict[str, str], key: str
) -> tuple[int, dict[str, str], bytes]:
    headers = {**FULL_AUTH, "Idempotency-Key": key}
    response = await client.post("/user", json=body, headers=headers)
    return response.status, dict(response.headers), await response.read()


TARO = {"name": "Taro Yamada", "email": "taro@example.jp"}


async def test_a_user_is_created_once_per_key(client: Client) -> None:
    first = await _register(client, TARO, "user-1")
    again = await _register(client, {"email": TARO["email"], "name": TARO["name"]}, "user-1")
    assert first[0] == again[0] == 201
    assert again[2] == first[2]
    assert again[1]["Location"] == first[1]["Location"]
    assert again[1]["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first[1]
    other = await _register(client, {**TARO, "email": "jiro@example.jp"}, "user-1")
    assert other[0] == 422
    assert json.loads(other[2])["type"] == "/problems/idempotency-key-reused"
    assert (await (await client.get("/users", headers=FULL_AUTH)).json())["total"] == 1


async def test_concurrent_user_requests_with_one_key_create_one(client: Client) -> None:
    """The second request waits on the first's transaction, then replays its answer."""
    results = await asyncio.gather(*(_register(client, TARO, "burst") for _ in range(20)))
    assert {status for status, _, _ in results} == {201}
    assert len({body for _, _, body in results}) == 1
    assert sum("Idempotent-Replayed" not in headers for _, headers, _ in results) == 1
    assert (await (await client.get("/users", headers=FULL_AUTH)).json())["total"] == 1


async def test_a_refused_user_keeps_nothing_and_an_expired_key_is_new(
    client: Client, database_url: str
) -> None:
    await _register(client, TARO, "first")
    assert (await _register(client, {**TARO, "name": "Jiro"}, "taken"))[0] == 409
    database = await asyncpg.connect(database_url)
    try:
        assert await database.fetchval("SELECT count(*) FROM idempotency_records") == 1
        await database.execute(
            "UPDATE idempotency_records SET created_at = now() - interval '2 days'"
        )
    finally:
        await database.close()
    status, headers, _ = await _register(client, {**TARO, "email": "hanako@example.jp"}, "first")
    assert status == 201
    assert "Idempotent-Replayed" not in headers
