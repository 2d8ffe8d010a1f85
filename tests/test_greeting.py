"""`GET /`: the greeting, by name in any script, and 422 for what is not a name."""

from __future__ import annotations

import pytest

from tests.support import Client

VALID_NAMES = [
    ("Taro", "こんにちは、Taroさん"),
    ("José", "こんにちは、Joséさん"),
    ("山田 太郎", "こんにちは、山田 太郎さん"),
    ("  Anne Marie  ", "こんにちは、Anne Marieさん"),
    ("Ольга", "こんにちは、Ольгаさん"),
    ("देवनागरी", "こんにちは、देवनागरीさん"),
    ("Jose\u0301", "こんにちは、Joséさん"),  # combining accent, stored composed (NFC)
]
INVALID_NAMES = [
    "T4ro",
    "Taro!",
    "<script>",
    "Anne  Marie",
    "",
    "   ",
    "x" * 101,
    "tab\tname",
    "O'Brien",
    "\u0301Taro",  # a combining mark with no letter to carry it
    "\tTaro",  # only spaces around a name are dropped
    " " + "x" * 100,  # 101 characters as sent
    "Ⅻ",  # a number (Nl), not a letter
]


async def test_anonymous_greeting(client: Client) -> None:
    response = await client.get("/")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == {"message": "こんにちは", "romaji": "konnichiwa"}


@pytest.mark.parametrize(("name", "message"), VALID_NAMES)
async def test_greets_by_name(client: Client, name: str, message: str) -> None:
    response = await client.get("/", params={"name": name})
    assert response.status == 200
    assert (await response.json())["message"] == message


@pytest.mark.parametrize("name", INVALID_NAMES)
async def test_rejects_what_is_not_a_name(client: Client, name: str) -> None:
    response = await client.get("/", params={"name": name})
    assert response.status == 422
    assert response.content_type == "application/problem+json"
    body = await response.json()
    assert body["errors"][0]["field"] == "name"


async def test_repeated_name_is_refused(client: Client) -> None:
    response = await client.get("/", params=[("name", "Taro"), ("name", "Jiro")])
    assert response.status == 422
    assert (await response.json())["errors"][0]["field"] == "name"


async def test_unknown_query_parameter(client: Client) -> None:
    response = await client.get("/", params={"nmae": "Taro"})
    assert response.status == 422
    assert (await response.json())["errors"][0]["field"] == "nmae"
