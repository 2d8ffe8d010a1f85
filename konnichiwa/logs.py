"""Logging set-up: plain text for people, JSON lines for log pipelines, request ID in both."""

from __future__ import annotations

import logging
import sys
import time
from typing import Final

import msgspec

from konnichiwa.errors import request_id
from konnichiwa.settings import Settings

_encode = msgspec.json.Encoder().encode
# Loggers LOG_LEVEL sets: the service's own and its HTTP server's (the access log among them).
# Every other library logs warnings and errors only, unless LOG_LEVEL names it.
OWN_LOGGERS: Final = ("konnichiwa", "aiohttp")
LIBRARY_LEVEL: Final = "WARNING"
# Libraries that turn their own logger up to INFO when it has no level (werkzeug, under the dev
# stack's AWS emulator, logs every request): held at LIBRARY_LEVEL too, unless named.
SELF_RAISING: Final = ("werkzeug",)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request ID, pid, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encode(entry).decode()


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s [pid %(process)d] [%(request_id)s] %(message)s"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LIBRARY_LEVEL)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(settings.log_level)
    for name in SELF_RAISING:
        logging.getLogger(name).setLevel(LIBRARY_LEVEL)
    for name, level in settings.library_log_levels:
        logging.getLogger(name).setLevel(level)
