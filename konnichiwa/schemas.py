"""Request and response shapes: one msgspec struct validates, encodes and documents each."""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
from aiohttp import web

from konnichiwa.errors import FieldError, Problem, validation_problem

_T = TypeVar("_T")

NAME_MAX_LENGTH: Final = 100
JSON_CONTENT_TYPE: Final = "application/json"
encode = msgspec.json.Encoder().encode


def json_response(
    body: msgspec.Struct | bytes, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON answer from a struct, or from bytes encoded once ahead of time."""
    return web.Response(
        body=body if isinstance(body, bytes) else encode(body),
        status=status,
        content_type=JSON_CONTENT_TYPE,
        headers=headers,
    )


class Greeting(msgspec.Struct):
    message: Annotated[str, msgspec.Meta(examples=["こんにちは"])]
    romaji: Annotated[str, msgspec.Meta(examples=["konnichiwa"])]


class GreetingQuery(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[
        str | None,
        msgspec.Meta(description="Greet someone by name: letters and single inner spaces."),
    ] = None


Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
MESSAGE_MAX_LENGTH: Final = 1000


class State(msgspec.Struct):
    counter: int
    message: str


class Status(msgspec.Struct):
    counter: int
    message: str
    timestamp: Annotated[str, msgspec.Meta(description="RFC 3339, UTC")]
    uptime_seconds: float


class UpdateRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Any of: set `counter`, or add `increment` to it; set `message`. At least one."""

    counter: Int64 | msgspec.UnsetType = msgspec.UNSET
    increment: Int64 | msgspec.UnsetType = msgspec.UNSET
    message: Annotated[str, msgspec.Meta(max_length=MESSAGE_MAX_LENGTH)] | msgspec.UnsetType = (
        msgspec.UNSET
    )


class UpdateResult(msgspec.Struct):
    success: bool
    message: str
    old_state: State
    new_state: State
    seq: Annotated[int, msgspec.Meta(description="Audit sequence number: the `id` in /logs")]


class PageQuery(msgspec.Struct, forbid_unknown_fields=True):
    page: Annotated[int, msgspec.Meta(ge=1, description="1 is the newest page")] = 1
    limit: Annotated[int, msgspec.Meta(ge=1, le=100, description="entries per page")] = 10

    def bounds(self, total: int) -> tuple[int, int]:
        """(high, low): the page holds numbers low < n <= high of a dense 1..total, newest first."""
        high = max(0, total - (self.page - 1) * self.limit)
        return high, max(0, high - self.limit)

    def pages(self, total: int) -> int:
        return -(-total // self.limit)


class AuditEntry(msgspec.Struct):
    id: Annotated[int, msgspec.Meta(description="The change's sequence number (`seq`)")]
    timestamp: str
    old_counter: int
    new_counter: int
    old_message: str
    new_message: str
    update_type: Annotated[str, msgspec.Meta(examples=["counter", "increment, message"])]


class LogsPage(msgspec.Struct):
    logs: list[AuditEntry]
    page: int
    limit: int
    total: int
    total_pages: int


EMAIL_MAX_LENGTH: Final = 254


class NewUser(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(description="Letters of any script, single inner spaces")]
    email: Annotated[str, msgspec.Meta(max_length=EMAIL_MAX_LENGTH, examples=["taro@example.jp"])]


class User(msgspec.Struct):
    id: int
    name: str
    email: str
    created_at: str


class UsersPage(msgspec.Struct):
    users: list[User]
    page: int
    limit: int
    total: int
    total_pages: int


class DependencyCheck(msgspec.Struct, omit_defaults=True):
    status: Literal["up", "down"]
    latency_ms: float
    detail: str | None = None


class AuditBacklog(msgspec.Struct):
    """Changes acknowledged but not yet in Postgres, and how long the oldest has waited."""

    entries: int
    oldest_age_seconds: float


class Readiness(msgspec.Struct):
    status: Literal["ready", "degraded"]
    checks: dict[str, DependencyCheck]
    audit_backlog: AuditBacklog


ParameterType = Literal["String", "StringList", "SecureString"]


class Parameter(msgspec.Struct):
    """An SSM parameter. `value` is null for a SecureString unless the key may decrypt it."""

    name: Annotated[str, msgspec.Meta(examples=["/konnichiwa/dev/db/host"])]
    type: ParameterType
    version: int
    last_modified: str
    value: str | None


class ParameterList(msgspec.Struct):
    prefix: str
    parameters: list[Parameter]


class Bucket(msgspec.Struct):
    name: str
    creation_date: str


class BucketList(msgspec.Struct):
    buckets: list[Bucket]


_AT_PATH: Final = re.compile(r"^(?P<message>.*?) - at `\$\.?(?P<path>[^`]*)`$")
_NAMED_FIELD: Final = re.compile(r"field `(?P<field>[^`]+)`")


def field_errors(exc: msgspec.ValidationError) -> list[FieldError]:
    """Turn msgspec's message ("Expected `int`, got `str` - at `$.counter`") into field errors."""
    text = str(exc)
    if located := _AT_PATH.match(text):
        return [FieldError(located["path"] or "body", located["message"])]
    if named := _NAMED_FIELD.search(text):
        return [FieldError(named["field"], text)]
    return [FieldError("body", text)]


_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


async def decode_body(request: web.Request, into: type[_T]) -> _T:
    """A JSON request body validated into `into`: 415, 400 or 422 problems when it is not."""
    content_type = request.content_type
    if content_type != JSON_CONTENT_TYPE and not content_type.endswith("+json"):
        raise Problem(
            415,
            "Unsupported Media Type",
            "Send the body as JSON with 'Content-Type: application/json'.",
        )
    decoder = _decoders.get(into)
    if decoder is None:
        decoder = _decoders[into] = msgspec.json.Decoder(into)
    try:
        return decoder.decode(await request.read())  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        raise validation_problem(field_errors(exc)) from None
    except msgspec.DecodeError:
        raise Problem(
            400, "Bad Request", "The body is not valid JSON.", type="/problems/malformed-json"
        ) from None


def rfc3339(moment: datetime) -> str:
    """A UTC timestamp as RFC 3339 with microseconds and a Z."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def convert_query(query: object, into: type[_T]) -> _T:
    """Validate query parameters (strings) into a struct; raise a 422 problem on bad values."""
    try:
        return msgspec.convert(query, into, strict=False)
    except msgspec.ValidationError as exc:
        raise validation_problem(field_errors(exc)) from None


_NAME_SHAPE: Final = re.compile(r"[^\W\d_]+(?: [^\W\d_]+)*")


def person_name(raw: str, field: str = "name") -> str:
    """A person's name in any script: letters (and their combining marks), single inner spaces."""
    name = unicodedata.normalize("NFC", raw.strip())
    problem = None
    if not name:
        problem = "must not be empty"
    elif len(name) > NAME_MAX_LENGTH:
        problem = f"must be at most {NAME_MAX_LENGTH} characters"
    elif not _NAME_SHAPE.fullmatch(_without_marks(name)):
        problem = "may contain only letters and single spaces between words"
    if problem is not None:
        raise validation_problem([FieldError(field, f"The name {problem}.")])
    return name


def _without_marks(text: str) -> str:
    # Scripts such as Devanagari write names with combining marks (category M), which \w lacks.
    return "".join(ch for ch in text if not unicodedata.category(ch).startswith("M"))


class Memory(msgspec.Struct):
    total_bytes: int
    available_bytes: int
    used_bytes: int
    percent: float


class Swap(msgspec.Struct):
    total_bytes: int
    used_bytes: int
    percent: float


class Disk(msgspec.Struct):
    path: Annotated[str, msgspec.Meta(description="A directory on the data volume")]
    total_bytes: int
    used_bytes: int
    free_bytes: int
    percent: float


class Network(msgspec.Struct):
    bytes_sent: int
    bytes_received: int
    packets_sent: int
    packets_received: int


class Host(msgspec.Struct):
    """The machine (or container's host) the answering worker runs on, sampled once a second."""

    hostname: str
    boot_time: Annotated[str, msgspec.Meta(description="RFC 3339, UTC")]
    uptime_seconds: float
    cpu_count: int
    cpu_percent: float
    cpu_percent_per_core: list[float]
    load_average: Annotated[list[float], msgspec.Meta(description="1, 5 and 15 minutes")]
    memory: Memory
    swap: Swap
    disk: Disk
    network: Network


class WorkerFigures(msgspec.Struct):
    slot: int
    pid: int
    uptime_seconds: float
    rss_bytes: int
    cpu_percent: float
    threads: int
    open_fds: int
    connections: int
    requests_in_flight: int
    event_loop_lag_ms: float


class ServiceFigures(msgspec.Struct):
    version: str
    role: str
    environment: str
    uptime_seconds: float
    worker_count: int
    answered_by: Annotated[int, msgspec.Meta(description="pid of the worker answering")]
    workers: list[WorkerFigures]


class Latency(msgspec.Struct):
    """Percentiles from a histogram (buckets 1-1.5-2-3-5-7 per decade); null without requests."""

    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class Traffic(msgspec.Struct):
    """Summed over every worker; the request asking is in flight, not yet served."""

    requests_served: int
    requests_in_flight: int
    requests_per_second_10s: float
    requests_per_second_60s: float
    latency_60s: Latency
    responses_by_status_class: Annotated[
        dict[str, int], msgspec.Meta(examples=[{"2xx": 1200, "4xx": 3, "5xx": 0}])
    ]
    errors: Annotated[int, msgspec.Meta(description="4xx and 5xx responses")]


class Pool(msgspec.Struct):
    """Connections of every worker's pool: lent out to a request, or idle."""

    in_use: int
    idle: int


class DependencyFigures(msgspec.Struct, omit_defaults=True):
    status: Literal["up", "down"]
    latency_ms: float
    pool: Pool
    detail: str | None = None


class Dependencies(msgspec.Struct):
    redis: DependencyFigures
    postgres: DependencyFigures
    audit_backlog: Annotated[
        AuditBacklog | None, msgspec.Meta(description="null while Redis cannot be asked")
    ]
    event_loop_lag_ms: Annotated[float, msgspec.Meta(description="The most any worker lags")]
    sampled_at: Annotated[str, msgspec.Meta(description="RFC 3339, UTC")]


class Inspection(msgspec.Struct):
    host: Host
    service: ServiceFigures
    traffic: Traffic
    dependencies: Dependencies
