"""Logging: JSON lines carry the request ID; text lines too; other libraries stay quiet."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import werkzeug._internal

from konnichiwa.errors import request_id
from konnichiwa.logs import OWN_LOGGERS, SELF_RAISING, configure_logging
from konnichiwa.settings import Settings

LIBRARY = "botocore.auth"  # signs every AWS request, at DEBUG, with the request's details


@pytest.fixture(autouse=True)
def _restore_loggers() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("", *OWN_LOGGERS, *SELF_RAISING, "botocore")]
    handlers, levels = logging.getLogger().handlers[:], [logger.level for logger in loggers]
    yield
    logging.getLogger().handlers[:] = handlers
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


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


@pytest.mark.parametrize(
    ("log_level", "library_debug_shown"),
    [("DEBUG", False), ("DEBUG,botocore=DEBUG", True), ("INFO, botocore = debug", True)],
)
def test_other_libraries_log_debug_only_when_named(
    log_level: str, library_debug_shown: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(Settings.from_env({"LOG_LEVEL": log_level}, env_file=None))
    logging.getLogger("konnichiwa.test").debug("own detail")
    logging.getLogger(LIBRARY).debug("signing detail")
    logging.getLogger("aiohttp.access").info("GET / 200")
    logging.getLogger(LIBRARY).warning("clock skew")
    err = capsys.readouterr().err
    assert ("own detail" in err) == log_level.startswith("DEBUG")
    assert ("signing detail" in err) == library_debug_shown
    assert "GET / 200" in err  # the access log follows the service's level
    assert "clock skew" in err


@pytest.mark.parametrize(("log_level", "shown"), [("DEBUG", False), ("INFO,werkzeug=INFO", True)])
def test_a_library_that_raises_its_own_level_stays_quiet_unless_named(
    log_level: str, shown: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(Settings.from_env({"LOG_LEVEL": log_level}, env_file=None))
    werkzeug._internal._log(
        "info", '127.0.0.1 - - "POST / HTTP/1.1" 200 -'
    )  # as moto's server does
    assert ("POST /" in capsys.readouterr().err) == shown
