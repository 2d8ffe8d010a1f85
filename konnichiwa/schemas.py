"""Request and response shapes: one msgspec struct validates, encodes and documents each."""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar

import msgspec
from aiohttp import web
from email_validator import SPECIAL_USE_DOMAIN_NAMES
from multidict import MultiMapping

from konnichiwa.errors import FieldError, Problem, validation_problem

_T = TypeVar("_T")
_S = TypeVar("_S", bound=msgspec.Struct)

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


# The OpenAPI patterns are ECMA-262 with Unicode properties, as JSON Schema reads them. Python's
# re has no \p{..}: person_name checks the same with unicodedata.
NAME_PATTERN: Final = r"^ *\p{L}[\p{L}\p{M}]*(?: \p{L}[\p{L}\p{M}]*)* *$"
PersonName = Annotated[
    str,
    msgspec.Meta(
        max_length=NAME_MAX_LENGTH,
        extra_json_schema={"pattern": NAME_PATTERN},
        description="Words of letters in any script (each letter may carry combining marks), "
        "single spaces between them; spaces around are dropped.",
        examples=["山田 太郎"],
    ),
]


class GreetingQuery(msgspec.Struct, forbid_unknown_fields=True):
    name: PersonName | None = None


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

    # What state.describe() refuses beyond the fields' own types, stated for the OpenAPI document.
    extra_json_schema: ClassVar[dict[str, Any]] = {
        "minProperties": 1,
        "not": {"required": ["counter", "increment"]},
    }

    counter: Int64 | msgspec.UnsetType = msgspec.UNSET
    increment: Int64 | msgspec.UnsetType = msgspec.UNSET
    message: (
        Annotated[
            str,
            msgspec.Meta(
                max_length=MESSAGE_MAX_LENGTH, extra_json_schema={"pattern": r"^[^\u0000]*$"}
            ),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET


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
EMAIL_LOCAL_PART_MAX_LENGTH: Final = 64  # RFC 5321 4.5.3.1.1
# The addresses users.email_address accepts, in ASCII: a dot-atom local part (RFC 5322 atext),
# then host-name labels with a top-level label that ends in a letter. email-validator also
# refuses labels with "--" as their third and fourth characters (except valid Punycode) and
# special-use domains (RFC 6761).
_ATEXT: Final = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL: Final = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_TOP_LABEL: Final = "(?:[A-Za-z0-9][A-Za-z0-9-]{0,61})?[A-Za-z]"
_SPECIAL_USE: Final = "|".join(
    "".join(f"[{c.upper()}{c}]" for c in name) for name in SPECIAL_USE_DOMAIN_NAMES
)
EMAIL_SCHEMA: Final = {
    "pattern": rf"^ *{_ATEXT}+(?:\.{_ATEXT}+)*@(?:{_LABEL}\.)+{_TOP_LABEL} *$",
    "allOf": [{"pattern": rf"^ *[^@]{{1,{EMAIL_LOCAL_PART_MAX_LENGTH}}}@"}],
    "not": {
        "anyOf": [
            {"pattern": "@(?:[A-Za-z0-9-]*\\.)*[A-Za-z0-9]{2}--"},
            {"pattern": rf"\.(?:{_SPECIAL_USE}) *$"},
        ]
    },
}


class NewUser(msgspec.Struct, forbid_unknown_fields=True):
    name: PersonName
    email: Annotated[
        str,
        msgspec.Meta(
            max_length=EMAIL_MAX_LENGTH,
            extra_json_schema=EMAIL_SCHEMA,
            description="An address that can receive mail; spaces around are dropped. "
            "Internationalized addresses (RFC 6531, IDNA 2008) are accepted too.",
            examples=["taro@example.jp"],
        ),
    ]


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


# An SSM parameter name as /config/{name} takes it (cloud.parameter_name): relative to the
# service's prefix, or absolute; segments of SSM's characters, none of them "." or "..".
_SSM_SEGMENT: Final = r"(?:[A-Za-z0-9_-]|\.[A-Za-z0-9_-]|\.\.[A-Za-z0-9_.-])[A-Za-z0-9_.-]*"
PARAMETER_NAME_PATTERN: Final = rf"^/?(?:{_SSM_SEGMENT})(?:/(?:{_SSM_SEGMENT}))*$"


class ParameterPath(msgspec.Struct):
    name: Annotated[
        str,
        msgspec.Meta(
            pattern=PARAMETER_NAME_PATTERN,
            description="Relative to this service's prefix (db/host) or absolute within it",
            examples=["db/host"],
        ),
    ]


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
_FLOAT_FOR_INT: Final = "Expected `int`, got `float`"
# A JSON string (escaped quotes and all) followed by a colon: an object's key. Matching starts at
# a string's opening quote or, after a value string, inside it, where it can only end at the
# value's closing quote, which a comma or brace follows, never a colon.
_JSON_KEY: Final = re.compile(rb'"((?:[^"\\]|\\.)*)"\s*:')


def repeated_key(body: bytes, value: msgspec.Struct) -> str | None:
    """The first key that `body`, a flat JSON object decoded into `value`, names twice (msgspec
    keeps the last silently)."""
    # Each key brings a colon, and colons inside strings only add: as many colons as fields
    # given means no key came twice. Counting is far cheaper than scanning for keys below.
    given = msgspec.structs.astuple(value)
    if body.count(b":") == len(given) - given.count(msgspec.UNSET):
        return None
    seen = set()
    for raw in _JSON_KEY.findall(body):
        key = msgspec.json.decode(b'"' + raw + b'"') if b"\\" in raw else raw.decode()
        if key in seen:
            return str(key)
        seen.add(key)
    return None


async def decode_body(request: web.Request, into: type[_S]) -> _S:
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
    body = await request.read()
    try:
        value: _S = decoder.decode(body)
    except msgspec.ValidationError as exc:
        value = _with_whole_floats(body, into, exc)
    except msgspec.DecodeError:
        raise Problem(
            400, "Bad Request", "The body is not valid JSON.", type="/problems/malformed-json"
        ) from None
    # Decoded into a struct, the body is a flat object (no struct has an object field).
    if (key := repeated_key(body, value)) is not None:
        raise validation_problem([FieldError(key, f"`{key}` is given more than once.")])
    return value


def _with_whole_floats(body: bytes, into: type[_S], error: msgspec.ValidationError) -> _S:
    """`body` decoded once more with whole numbers written as floats (`5.0`) taken as integers,
    as JSON Schema's `integer` allows; else the 422 for `error`. Exact below 2^53 only, so
    larger ones stay an error."""
    fields = msgspec.json.decode(body) if str(error).startswith(_FLOAT_FOR_INT) else None
    if not isinstance(fields, dict):
        raise validation_problem(field_errors(error)) from None
    whole = {
        name: int(value)
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53
        else value
        for name, value in fields.items()
    }
    try:
        return msgspec.convert(whole, into)
    except msgspec.ValidationError as exc:
        raise validation_problem(field_errors(exc)) from None


def rfc3339(moment: datetime) -> str:
    """A UTC timestamp as RFC 3339 with microseconds and a Z."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def convert_query(query: MultiMapping[str], into: type[_T]) -> _T:
    """Validate query parameters (strings) into a struct; raise a 422 problem on bad values or
    on a parameter given more than once."""
    if len(query) > 1 and len(set(query)) < len(query):
        repeated = next(name for name in query if len(query.getall(name)) > 1)
        raise validation_problem([FieldError(repeated, f"`{repeated}` is given more than once.")])
    try:
        return msgspec.convert(dict(query), into, strict=False)
    except msgspec.ValidationError as exc:
        raise validation_problem(field_errors(exc)) from None


def person_name(raw: str, field: str = "name") -> str:
    """A name as NAME_PATTERN states it (its length was checked on decoding), without the
    spaces around it, in NFC."""
    name = raw.strip(" ")
    if not name:
        problem = "The name must not be empty."
    elif not all(map(_is_word, name.split(" "))):
        problem = "The name may contain only letters (with their marks) and single spaces."
    else:
        normal = unicodedata.normalize("NFC", name)
        # NFC lengthens a few letters (U+0958 becomes two code points): past the limit, keep
        # the canonically equivalent form as sent, which the schema allows.
        return normal if len(normal) <= NAME_MAX_LENGTH else name
    raise validation_problem([FieldError(field, problem)])


def _is_word(word: str) -> bool:
    # A letter, then letters and combining marks (Devanagari writes vowels as marks).
    categories = [unicodedata.category(ch)[0] for ch in word]
    return bool(categories) and categories[0] == "L" and set(categories) <= {"L", "M"}


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
