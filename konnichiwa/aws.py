"""AWS clients (one per service per worker, opened at start-up) and AWS errors as problem+json."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Set
from typing import TYPE_CHECKING, Any, Final, Literal

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import web
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from konnichiwa.errors import Problem
from konnichiwa.settings import Settings, settings_key

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_secretsmanager import SecretsManagerClient
    from types_aiobotocore_ssm import SSMClient

log = logging.getLogger("konnichiwa.aws")

AwsService = Literal["ssm", "s3", "secretsmanager"]

ssm_client: web.AppKey[SSMClient] = web.AppKey("ssm_client")
s3_client: web.AppKey[S3Client] = web.AppKey("s3_client")
secrets_client: web.AppKey[SecretsManagerClient] = web.AppKey("secrets_client")

# Bounded everywhere: a slow or unreachable AWS costs a request at most about
# attempts x (connect + read) seconds, then a 503, never a hang.
CONNECT_TIMEOUT: Final = 2.0
READ_TIMEOUT: Final = 3.0
MAX_ATTEMPTS: Final = 2  # the first call and one retry ("standard" mode backs off between them)
RETRY_AFTER: Final = "2"

# Error codes AWS uses for "slow down" and for its own trouble: worth a retry later, a 503 now.
_UNAVAILABLE_CODES: Final = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "TooManyRequestsException",
    "RequestLimitExceeded", "RequestThrottled", "SlowDown", "ServiceUnavailable",
    "InternalServerError", "InternalError", "InternalFailure", "ServiceUnavailableException",
    "InternalServiceError", "InternalServerErrorException",
})  # fmt: skip
_DENIED_CODES: Final = frozenset({"AccessDenied", "AccessDeniedException"})
# The credentials are wrong or expired: the service's set-up is at fault, not the caller.
_CREDENTIAL_CODES: Final = frozenset({
    "InvalidClientTokenId", "UnrecognizedClientException", "ExpiredToken",
    "ExpiredTokenException", "SignatureDoesNotMatch", "InvalidAccessKeyId",
})  # fmt: skip
_NOT_FOUND_CODES: Final = frozenset({"ParameterNotFound", "ResourceNotFoundException"})


def client_config() -> AioConfig:
    return AioConfig(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        max_pool_connections=32,
    )


def aws_ctx(services: Set[AwsService]) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context opening one client for each of `services` on this worker."""

    async def open_clients(app: web.Application) -> AsyncIterator[None]:
        args = client_args(app[settings_key])
        session = get_session()
        async with contextlib.AsyncExitStack() as stack:
            # Creating a client loads its service model (~200 ms): once per worker, never per call.
            enter = stack.enter_async_context
            if "ssm" in services:
                app[ssm_client] = await enter(session.create_client("ssm", **args))
            if "s3" in services:
                app[s3_client] = await enter(session.create_client("s3", **args))
            if "secretsmanager" in services:
                app[secrets_client] = await enter(session.create_client("secretsmanager", **args))
            yield

    return open_clients


def client_args(settings: Settings) -> dict[str, Any]:
    """`create_client` arguments: region, endpoint, bounded time-outs and retries, credentials."""
    args: dict[str, Any] = {
        "region_name": settings.aws_region,
        "endpoint_url": settings.aws_endpoint_url,
        "config": client_config(),
    }
    if settings.aws_credentials is not None:
        args["aws_access_key_id"], args["aws_secret_access_key"] = settings.aws_credentials
    return args


class AwsUnavailable(Problem):
    """AWS is slow, throttling, failing or unreachable: a 503 worth retrying, and a reason to
    serve a cached answer instead."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            503,
            "Service Unavailable",
            detail,
            type="/problems/aws-unavailable",
            headers={"Retry-After": RETRY_AFTER},
        )


@contextlib.contextmanager
def aws_errors(permission: str, subject: str) -> Iterator[None]:
    """Turn what an AWS call raises into a problem: `permission` is the IAM action it needs,
    `subject` names what it reads (for a 404)."""
    try:
        yield
    except ClientError as exc:
        raise _client_problem(exc, permission, subject) from None
    except (ConnectionError, HTTPClientError) as exc:  # time-outs and refused connections
        log.warning("AWS unreachable for %s: %r", permission, exc)
        raise AwsUnavailable(
            "AWS did not answer in time or could not be reached; try again shortly."
        ) from None
    except (NoCredentialsError, PartialCredentialsError) as exc:
        log.error("no usable AWS credentials for %s: %s", permission, exc)
        raise AwsUnavailable("The service has no usable AWS credentials.") from None
    except BotoCoreError as exc:
        log.error("AWS call for %s failed: %r", permission, exc)
        raise AwsUnavailable("The AWS call failed; try again shortly.") from None


def _client_problem(exc: ClientError, permission: str, subject: str) -> Problem:
    error = exc.response.get("Error", {})
    code = error.get("Code", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in _NOT_FOUND_CODES:
        return Problem(404, "Not Found", f"There is no {subject}.", type="/problems/not-found")
    if code in _DENIED_CODES or (status == 403 and code not in _CREDENTIAL_CODES):
        log.error("AWS denied %s: %s", permission, error.get("Message", ""))
        return Problem(
            403,
            "Forbidden",
            f"The service's AWS role lacks the '{permission}' permission for {subject}.",
            type="/problems/aws-access-denied",
            extensions={"permission": permission},
        )
    if code in _UNAVAILABLE_CODES or status >= 500:
        log.warning("AWS unavailable for %s: %s", permission, code)
        return AwsUnavailable(f"AWS is throttling or failing ({code}); try again shortly.")
    if code in _CREDENTIAL_CODES:
        log.error("AWS rejected the service's credentials for %s: %s", permission, code)
        return AwsUnavailable("AWS rejected the service's credentials.")
    log.error("AWS refused %s: %s %s", permission, code, error.get("Message", ""))
    return Problem(502, "Bad Gateway", f"AWS refused the request ({code}).")
