"""`/config` and `/storage`: SSM parameters and S3 buckets, read through a cache that spares AWS.

SSM allows about 40 requests a second per account and region, far below this service's traffic:
every answer is cached per worker for CONFIG_CACHE_SECONDS, concurrent misses share one call, and
when AWS fails the last good answer is served (for at most CONFIG_STALE_SECONDS more) with
`X-Cache: stale`. A parameter that does not exist is remembered for NOT_FOUND_SECONDS.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Final

from aiohttp import web

from konnichiwa.auth import api_key
from konnichiwa.aws import AwsUnavailable, aws_errors, s3_client, ssm_client
from konnichiwa.coalesce import TtlCache
from konnichiwa.errors import Problem
from konnichiwa.schemas import (
    PARAMETER_NAME_PATTERN,
    Bucket,
    BucketList,
    Parameter,
    ParameterList,
    encode,
    json_response,
    rfc3339,
)
from konnichiwa.scoreboard import AWS_CACHE_RESULTS, Cell, worker_slot
from konnichiwa.settings import settings_key

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_ssm import SSMClient
    from types_aiobotocore_ssm.type_defs import ParameterTypeDef

CacheKey = tuple[str, ...]
aws_cache = web.AppKey("aws_cache", TtlCache[CacheKey, bytes | Problem])
# How long a "not found" is kept: a name nobody defined must not cost an SSM call per request
# (SSM allows an account ~40 a second), yet one defined now is seen soon.
NOT_FOUND_SECONDS: Final = 10

PARAMETER_NAME: Final = re.compile(PARAMETER_NAME_PATTERN)
# SSM's limits: a name past them cannot exist.
MAX_NAME_LENGTH: Final = 1011
MAX_NAME_LEVELS: Final = 15
CACHE_HEADER: Final = "X-Cache"
# The scoreboard cell that counts each kind of cache answer (for /metrics).
_CACHE_CELLS: Final = {result: Cell.AWS_CACHE + n for n, result in enumerate(AWS_CACHE_RESULTS)}


def parameter_name(raw: str, prefix: str) -> str:
    """The full SSM name for `raw` (relative to `prefix`, or absolute within it).

    Raises a 400 problem for a name not shaped as PARAMETER_NAME_PATTERN says (no `..`
    climbing), and a 404 for one outside `prefix` or past SSM's limits: AWS is never asked.
    """
    if not PARAMETER_NAME.fullmatch(raw):
        raise Problem(
            400,
            "Bad Request",
            "A parameter name is segments of letters, digits, '_', '.' and '-' (none of them "
            f"'.' or '..') separated by single '/': db/host, or {prefix}db/host.",
            type="/problems/invalid-parameter-name",
        )
    full = raw if raw.startswith("/") else prefix + raw
    if not full.startswith(prefix):
        detail = f"This service reads only the parameters under {prefix}."
    elif len(full) > MAX_NAME_LENGTH or full.count("/") > MAX_NAME_LEVELS:
        detail = (
            f"SSM names have at most {MAX_NAME_LEVELS} levels and {MAX_NAME_LENGTH} characters."
        )
    else:
        return full
    raise Problem(404, "Not Found", detail, type="/problems/not-found")


def describe_parameter(found: ParameterTypeDef, decrypted: bool) -> Parameter:
    kind = found["Type"]
    visible = kind != "SecureString" or decrypted
    return Parameter(
        name=found["Name"],
        type=kind,
        version=found["Version"],
        last_modified=rfc3339(found["LastModifiedDate"]),
        value=found["Value"] if visible else None,
    )


async def list_parameters(ssm: SSMClient, prefix: str) -> ParameterList:
    """Every parameter under `prefix`, all pages of SSM's answer; no SecureString value."""
    parameters = []
    with aws_errors("ssm:GetParametersByPath", f"parameter path {prefix}"):
        pages = ssm.get_paginator("get_parameters_by_path").paginate(
            Path=prefix.rstrip("/"), Recursive=True, WithDecryption=False
        )
        async for page in pages:
            parameters += [describe_parameter(found, False) for found in page["Parameters"]]
    parameters.sort(key=lambda parameter: parameter.name)
    return ParameterList(prefix, parameters)


async def read_parameter(ssm: SSMClient, name: str, decrypt: bool) -> Parameter:
    permission = "ssm:GetParameter" + (" (and kms:Decrypt on its key)" if decrypt else "")
    with aws_errors(permission, f"parameter {name}"):
        answer = await ssm.get_parameter(Name=name, WithDecryption=decrypt)
    return describe_parameter(answer["Parameter"], decrypt)


async def list_buckets(s3: S3Client) -> BucketList:
    """The account's buckets, all pages."""
    buckets = []
    with aws_errors("s3:ListAllMyBuckets", "bucket list"):
        async for page in s3.get_paginator("list_buckets").paginate():
            buckets += [
                Bucket(bucket.get("Name", ""), _timestamp(bucket.get("CreationDate")))
                for bucket in page.get("Buckets", [])
            ]
    return BucketList(buckets)


def _timestamp(moment: datetime | None) -> str:
    return "" if moment is None else rfc3339(moment)


async def _cached(
    request: web.Request, key: CacheKey, read: Callable[[], Awaitable[object]]
) -> web.Response:
    async def fetch() -> bytes | Problem:
        try:
            return encode(await read())
        except Problem as problem:
            if problem.status == 404:
                return problem
            raise

    answer = await request.app[aws_cache].get(key, fetch)
    request.app[worker_slot].count(_CACHE_CELLS[answer.status])
    if isinstance(answer.value, Problem):
        raise answer.value
    headers = {CACHE_HEADER: answer.status, "Age": str(math.floor(answer.age))}
    return json_response(answer.value, headers=headers)


async def config_index(request: web.Request) -> web.Response:
    """Every parameter under this service's SSM prefix (all pages): name, type, version, last
    change, and the value of String and StringList parameters (SecureString values are never
    listed)."""
    prefix = request.app[settings_key].ssm_prefix
    ssm = request.app[ssm_client]
    return await _cached(request, ("list", prefix), lambda: list_parameters(ssm, prefix))


async def config_show(request: web.Request) -> web.Response:
    """One parameter with its value. The name may be relative to the prefix (`db/host`) or
    absolute within it (`/konnichiwa/dev/db/host`). A SecureString's value is decrypted only for
    keys with the `secrets` scope (null otherwise)."""
    name = parameter_name(request.match_info["name"], request.app[settings_key].ssm_prefix)
    decrypt = "secrets" in request[api_key].scopes
    ssm = request.app[ssm_client]
    key = ("parameter", name, "decrypted" if decrypt else "plain")
    return await _cached(request, key, lambda: read_parameter(ssm, name, decrypt))


async def storage(request: web.Request) -> web.Response:
    """The account's S3 buckets: name and creation date."""
    s3 = request.app[s3_client]
    return await _cached(request, ("buckets",), lambda: list_buckets(s3))


def setup_cloud(app: web.Application) -> None:
    settings = app[settings_key]
    found_ttl = settings.config_cache_seconds
    app[aws_cache] = TtlCache(
        ttl=found_ttl,
        stale=settings.config_stale_seconds,
        outages=(AwsUnavailable,),
        ttl_of=lambda value: (
            min(found_ttl, NOT_FOUND_SECONDS) if isinstance(value, Problem) else found_ttl
        ),
    )
