"""Logging: JSON lines carry the request ID; text lines too."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from konnichiwa.errors import request_id
from konnichiwa.logs import configure_logging
from konnichiwa.settings import Settings


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_log_lines_carry_the_request_id(
    log_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(Settings(log_format=log_format, log_level="INFO"))  # type: ignore[arg-type]
    token = request_id.set("req-7")
    try:
        logging.getLogger("konnichiwa.test").warning("cache %s", "cold")
    finally:
        request_id.reset(token)
    line = capsys.readouterr().err.strip()
    if log_format == "json":
        entry = json.loads(line)
        assert entry["message"] == "cache cold"
        assert entry["request_id"] == "req-7"
        assert entry["level"] == "WARNING"
        assert entry["time"].endswith("Z")
    else:
        assert "[req-7] cache cold" in line
