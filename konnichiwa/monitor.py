"""`konnichiwa monitor`: the operator's capacity check, a Nagios-style plugin over `/inspect`.

Exit codes follow the Nagios convention: 0 OK, 1 WARNING (a figure above its threshold),
2 CRITICAL (a figure above the critical level, or Redis/Postgres down), 3 UNKNOWN (the service
cannot be asked: unreachable, a refused key, an answer that is not an /inspect document; or the
check itself was called wrongly).
"""

from __future__ import annotations

import argparse
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from http.client import HTTPMessage
from pathlib import Path
from typing import IO, Final, NamedTuple

import msgspec
from dotenv import dotenv_values

from konnichiwa.schemas import Inspection

OK, WARNING, CRITICAL, UNKNOWN = range(4)
STATES: Final = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
DESCRIPTION: Final = (
    "Ask the service at API_URL (default http://localhost:$PORT, PORT as the service reads it, "
    "4000 if unset) with API_KEY, from the environment or .env, whether there is capacity left. "
    "Exit status, as Nagios reads it: 0 OK, 1 WARNING, 2 CRITICAL (a figure above --critical, or "
    "Redis/Postgres down), 3 UNKNOWN (the service cannot be asked, or a usage error)."
)
_decode = msgspec.json.Decoder(Inspection).decode
_encode = msgspec.json.Encoder().encode


class Check(NamedTuple):
    name: str
    value: float
    warning: float
    critical: float

    @property
    def code(self) -> int:
        return (
            CRITICAL if self.value > self.critical else WARNING if self.value > self.warning else OK
        )


class Report(msgspec.Struct):
    status: str
    code: int
    summary: str
    checks: dict[str, float]
    inspection: Inspection | None = None


class Unknown(Exception):
    """The service could not be asked, or did not answer with an /inspect document."""


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would resend the Authorization header to wherever a redirect points."""

    def redirect_request(  # noqa: PLR0917  (urllib's signature)
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> None:
        return None  # urllib then raises the 3xx as an HTTPError


_opener = urllib.request.build_opener(_RefuseRedirects)


def percent(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError("expected a percentage from 0 to 100")
    return value


def seconds(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise argparse.ArgumentTypeError("expected a positive number of seconds")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu", type=percent, default=70.0, help="CPU %% warning level (70)")
    parser.add_argument("--memory", type=percent, default=70.0, help="memory %% warning (70)")
    parser.add_argument("--disk", type=percent, default=70.0, help="disk %% warning level (70)")
    parser.add_argument(
        "--critical", type=percent, default=90.0, help="%% above which any figure is critical (90)"
    )
    parser.add_argument("--timeout", type=seconds, default=5.0, help="seconds to wait (5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per check")
    parser.add_argument(
        "--watch", type=seconds, metavar="SECONDS", help="check again every SECONDS until Ctrl-C"
    )


def connection(environ: Mapping[str, str], env_file: Path = Path(".env")) -> tuple[str, str]:
    """API_URL (default: the service's own port on localhost) and API_KEY from the environment,
    else from `.env`."""
    values = {k: v for k, v in dotenv_values(env_file).items() if v} if env_file.is_file() else {}
    values.update({k: v for k, v in environ.items() if v})
    key = values.get("API_KEY")
    if not key:
        raise Unknown("API_KEY is not set (in the environment or .env)")
    url = values.get("API_URL") or f"http://localhost:{_port(values.get('PORT', '4000'))}"
    url = url.rstrip("/")
    # urllib also opens file: and ftp: URLs; the key goes to an HTTP service or nowhere.
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise Unknown(f"API_URL must be an http:// or https:// URL, not {url!r}")
    return url, key


def _port(raw: str) -> int:
    """PORT as the service reads it."""
    if not re.fullmatch(r"[0-9]+", raw.strip()) or not 1 <= int(raw) <= 65535:
        raise Unknown(f"PORT={raw!r} is not valid: expected an integer from 1 to 65535")
    return int(raw)


def fetch(url: str, key: str, timeout: float) -> Inspection:
    request = urllib.request.Request(  # noqa: S310  (connection() admits only http and https)
        url + "/inspect", headers={"Authorization": f"Bearer {key}"}
    )
    try:
        with _opener.open(request, timeout=timeout) as response:
            return _decode(response.read())
    except urllib.error.HTTPError as error:
        answer = f"{url}/inspect answered {error.code} {error.reason}"
        if 300 <= error.code < 400:
            answer += f", a redirect to {error.headers.get('Location')}: not followed with the key"
        raise Unknown(answer) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise Unknown(f"cannot reach {url}: {reason}") from None
    except msgspec.DecodeError as error:
        raise Unknown(f"{url}/inspect did not answer an /inspect document: {error}") from None


def evaluate(inspection: Inspection, args: argparse.Namespace) -> Report:
    host = inspection.host
    checks = [
        Check("cpu", host.cpu_percent, args.cpu, args.critical),
        Check("memory", host.memory.percent, args.memory, args.critical),
        Check("disk", host.disk.percent, args.disk, args.critical),
    ]
    deps = inspection.dependencies
    down = [name for name, dep in (("redis", deps.redis), ("postgres", deps.postgres))
            if dep.status == "down"]  # fmt: skip
    code = max([CRITICAL if down else OK, *(check.code for check in checks)])
    parts = [f"{c.name} {c.value:.1f}%" + ("" if c.code == OK else f" > {_limit(c)}%")
             for c in checks]  # fmt: skip
    parts += [f"{name} down" for name in down]
    traffic = inspection.traffic
    p95 = traffic.latency_60s.p95_ms
    parts.append(
        f"{traffic.requests_per_second_10s:g} req/s, p95 "
        + ("-" if p95 is None else f"{p95:g} ms")
        + f", {inspection.service.worker_count} workers"
    )
    return Report(
        STATES[code], code, ", ".join(parts), {c.name: c.value for c in checks}, inspection
    )


def _limit(check: Check) -> float:
    return check.critical if check.code == CRITICAL else check.warning


def check_once(url: str, key: str, args: argparse.Namespace) -> Report:
    try:
        return evaluate(fetch(url, key, args.timeout), args)
    except Unknown as problem:
        return Report(STATES[UNKNOWN], UNKNOWN, str(problem), {})


def render(report: Report, as_json: bool) -> str:
    if as_json:
        return _encode(report).decode()
    lines = [f"KONNICHIWA {report.status} - {report.summary}"]
    if report.inspection is not None:
        lines += _table(report.inspection)
    return "\n".join(lines)


def _table(inspection: Inspection) -> list[str]:
    deps = inspection.dependencies
    rows = [f"{'pid':>8} {'rss MiB':>8} {'cpu %':>6} {'conns':>6} {'in flight':>9}"]
    rows += [
        f"{w.pid:>8} {w.rss_bytes / 2**20:>8.1f} {w.cpu_percent:>6.1f} {w.connections:>6} "
        f"{w.requests_in_flight:>9}"
        for w in inspection.service.workers
    ]
    backlog = deps.audit_backlog
    rows.append(
        f"redis {deps.redis.status} {deps.redis.latency_ms:g} ms, "
        f"postgres {deps.postgres.status} {deps.postgres.latency_ms:g} ms, "
        + ("audit backlog unknown" if backlog is None else f"audit backlog {backlog.entries}")
    )
    return rows


def run(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    """Check once (or every `--watch` seconds until interrupted); the last check's exit code."""
    try:
        url, key = connection(environ)
    except Unknown as problem:
        print(render(Report(STATES[UNKNOWN], UNKNOWN, str(problem), {}), args.json))
        return UNKNOWN
    report = check_once(url, key, args)
    if args.watch is None:
        print(render(report, args.json))
        return report.code
    try:
        while True:
            if not args.json:
                print("\033[H\033[2J" + time.strftime("%H:%M:%S"))  # clear the terminal
            print(render(report, args.json), flush=True)
            time.sleep(args.watch)
            report = check_once(url, key, args)
    except KeyboardInterrupt:
        return report.code
