"""`GET /`: hello in Japanese, by name when asked."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from konnichiwa.schemas import (
    Greeting,
    GreetingQuery,
    convert_query,
    encode,
    json_response,
    person_name,
)

HELLO: Final = "こんにちは"
ANONYMOUS: Final = encode(Greeting(HELLO, "konnichiwa"))


def greeting_for(name: str | None) -> Greeting:
    if name is None:
        return Greeting(HELLO, "konnichiwa")
    valid = person_name(name)
    return Greeting(f"{HELLO}、{valid}さん", f"konnichiwa, {valid}-san")


async def greet(request: web.Request) -> web.Response:
    """Say hello; `?name=` greets someone by name."""
    if not request.query_string:
        return json_response(ANONYMOUS)
    query = convert_query(request.query, GreetingQuery)
    return json_response(greeting_for(query.name))
