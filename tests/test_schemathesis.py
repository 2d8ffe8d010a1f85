"""Schemathesis against the real app on a real port, with the real stores and AWS emulator: every
operation, with and without keys, every phase and check. The OpenAPI document and the validators
agree both ways: what the document allows is accepted, what it refuses is refused."""

from __future__ import annotations

import asyncio
import itertools
import sys
import unicodedata
from typing import Any, Final

import msgspec
import pytest
import schemathesis
from pytest_aiohttp import AiohttpServer
from schemathesis.core.jsonschema import patterns
from schemathesis.engine import events
from schemathesis.engine import from_schema as engine_for
from schemathesis.engine.statistic import Statistic

from konnichiwa.app import create_app
from konnichiwa.openapi import openapi_document
from konnichiwa.settings import Rate, RateLimits, Settings
from tests.support import FULL_KEY

pytestmark = pytest.mark.slow

SEED: Final = 17
# Examples per operation and generation mode in the fuzzing phase: the module runs in about a
# minute on two cores (the coverage, example and stateful phases add their own cases).
MAX_EXAMPLES: Final = 40
KEYS: Final = {"bearer": {"bearer": FULL_KEY}, "apiKey": {"api_key": FULL_KEY}}
UNLIMITED: Final = RateLimits(*[Rate(10**9, 1)] * len(RateLimits._fields))


def exact_marks() -> str:
    """Every combining mark (Unicode category M) of this Python's Unicode, as regex class ranges."""
    marks = [c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c))[0] == "M"]
    ranges = []
    for _, run in itertools.groupby(enumerate(marks), lambda pair: pair[1] - pair[0]):
        codes = [code for _, code in run]
        ranges.append(f"\\U{codes[0]:08x}-\\U{codes[-1]:08x}")
    return "".join(ranges)


@pytest.fixture(autouse=True)
def generate_only_real_marks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Schemathesis generates `\\p{M}` from an approximation: whole blocks, unassigned code
    points included (U+20FB), which no validator calls marks. Give it the real ones."""
    marks = exact_marks()
    approximate = patterns._MARK_CLASS
    monkeypatch.setattr(
        patterns,
        "_UNICODE_PROPERTY_MAP",
        tuple(
            (escape, cls.replace(approximate, marks))
            for escape, cls in patterns._UNICODE_PROPERTY_MAP
        ),
    )
    for table in (patterns._UNICODE_PROPERTY_RAW_MAP, patterns._UNICODE_SHORTHAND_RAW_MAP):
        monkeypatch.setitem(table, "M", marks)


def run_schemathesis(
    document: dict[str, Any], url: str, keys: dict[str, Any] | None
) -> tuple[Statistic, list[str]]:
    """Everything `st run` does, deterministically: its statistics and the errors it met."""
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "base-url": url,
            "cache": {"enabled": False},
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
            "phases": {"coverage": {"generate-duplicate-query-parameters": True}},
            **({"auth": {"openapi": keys}} if keys else {}),
        }
    )
    # From the document itself, not its URL: schemathesis skips the operation it loaded from.
    schema = schemathesis.openapi.from_dict(document, config=config)
    statistic, errors = Statistic(), []
    for event in engine_for(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            statistic.on_scenario_finished(event.recorder)
        elif isinstance(event, events.NonFatalError | events.FatalError):
            errors.append(repr(event))
    return statistic, errors


def _failures(statistic: Statistic) -> list[str]:
    return [
        f"{label}: {failure.title}\n  {group.code_sample}"
        for label, groups in statistic.failures.items()
        for group in groups.values()
        for failure in group.failures
    ]


@pytest.mark.parametrize("keys", [KEYS, None], ids=["with-keys", "without-keys"])
async def test_schemathesis_finds_nothing(
    settings: Settings, aws_url: str, aiohttp_server: AiohttpServer, keys: dict[str, Any] | None
) -> None:
    # (the server fixture after the settings: its app closes before the test database is dropped)
    app = create_app(
        settings.replace(
            aws_endpoint_url=aws_url,
            aws_credentials=("testing", "testing"),
            aws_region="us-east-1",
            rate_limits=UNLIMITED,  # schemathesis is not the abuse a quota is for
        )
    )
    server = await aiohttp_server(app)
    document = msgspec.json.decode(app[openapi_document])
    statistic, errors = await asyncio.to_thread(
        run_schemathesis, document, str(server.make_url("")), keys
    )
    print(f"schemathesis ran {statistic.total_cases} cases")  # the figure to quote
    assert errors == []
    assert _failures(statistic) == []
    assert statistic.errored_cases == 0
    assert statistic.tested_operations == {
        f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item
    }
    assert statistic.total_cases > 1000
