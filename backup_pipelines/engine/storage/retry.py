"""The one retry policy for S3, and what a request's final failure means for the operator.

Who retries what (nothing is retried twice over):

- **botocore retries every request**, in its ``standard`` mode: connection failures and
  timeouts, HTTP 500/502/503/504, throttling (``SlowDown``, 429), with exponential backoff and
  jitter (50 ms base for errors, 1 s for throttling, at most 20 s between tries), up to
  :data:`S3_MAX_ATTEMPTS` tries in all. Uploads are re-sent by botocore as well: every request
  body is in memory (a multipart upload holds one part at a time).
- **The engine adds no loop around a request.** Its only retry is where botocore cannot help:
  a download whose *body* breaks after the response arrived is resumed from the byte it reached
  (a Range request, If-Match the same ETag so bytes of a replaced object are never spliced in),
  at most :data:`DOWNLOAD_RESUMES` times per download (``S3Storage(resume_attempts=...)``).
- Clients built by :func:`default_s3_client` carry this policy. The Dagster resource is built
  with :data:`S3_RETRIES` (dagster-aws's ``max_attempts`` counts the retries after the first
  try). A client a caller builds itself keeps its own retry settings.

When the tries run out, :func:`s3_error` turns the exception into one line saying what failed
and what to do (:class:`StorageUnreachableError` when S3 could not be reached at all).
``backup_pipelines_tests/engine/test_storage_retry.py`` counts the tries against a real HTTP
server that fails on purpose.
"""

from __future__ import annotations

from typing import Any

from backup_pipelines.engine.storage.base import StorageError, StorageUnreachableError

S3_MAX_ATTEMPTS = 5  # tries of one S3 request in all: the first and 4 retries
S3_RETRIES = S3_MAX_ATTEMPTS - 1  # the same, counted as dagster-aws's S3Resource(max_attempts=)
DOWNLOAD_RESUMES = 3  # a download body that breaks is resumed at most this often
RESUME_BACKOFF_SECONDS = 0.5  # first pause before a resume; doubles after each
CONNECT_TIMEOUT_SECONDS = 10
READ_TIMEOUT_SECONDS = 120

_TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
}

_HINTS = {
    "NoSuchBucket": "create the bucket or fix S3_BACKUP_BUCKET / offsite.bucket",
    "AccessDenied": "the credentials lack permission (s3:PutObject, s3:GetObject, s3:ListBucket, "
    "s3:DeleteObject on the bucket)",
    "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID / the profile in use",
    "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY / the profile in use",
    "RequestTimeTooSkewed": "this host's clock is more than 15 minutes off: S3 refuses its "
    "requests; fix the clock (timedatectl, NTP) and retry",
}


def s3_client_config() -> Any:
    """The botocore client configuration carrying the policy above."""
    from botocore.config import Config

    return Config(
        retries={"mode": "standard", "total_max_attempts": S3_MAX_ATTEMPTS},
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
        # One connection per part in flight (S3Storage(concurrency=) is capped at 32).
        max_pool_connections=32,
    )


def default_s3_client() -> Any:
    """A boto3 S3 client from the environment (``AWS_*`` credentials, ``AWS_ENDPOINT_URL_S3``)
    with this module's retry policy."""
    import boto3

    return boto3.session.Session().client("s3", config=s3_client_config())


def configured_attempts(client: Any) -> int | None:
    """How many tries in all ``client`` makes per request (None when it does not say)."""
    retries = getattr(getattr(getattr(client, "meta", None), "config", None), "retries", None)
    value = (retries or {}).get("total_max_attempts")
    return int(value) if value else None


def client_error_code(exc: BaseException) -> str:
    from botocore.exceptions import ClientError

    if isinstance(exc, StorageError):
        return exc.code
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def is_transient(exc: BaseException) -> bool:
    """A failure that may pass by itself: the network, a 5xx, throttling."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return True
    if isinstance(exc, ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return status >= 500 or client_error_code(exc) in _TRANSIENT_CODES
    return False


def is_stream_error(exc: BaseException) -> bool:
    """A connection that broke while a response body was being read (botocore cannot retry it:
    the response was already handed over). A body that simply ends early (the connection closed
    before Content-Length bytes) is one too: botocore reports it as IncompleteReadError."""
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import HTTPError as Urllib3Error

    return isinstance(
        exc,
        ResponseStreamingError | IncompleteReadError | ReadTimeoutError | Urllib3Error | OSError,
    )


def _is_unreachable(exc: BaseException) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return isinstance(exc, BotoConnectionError | HTTPClientError)


def _setup_problem(exc: BaseException) -> tuple[str, str] | None:
    """What is wrong and what to do when boto3 fails before talking to S3 (no credentials, no
    region): these are configuration problems of this host, not S3 errors."""
    from botocore.exceptions import (
        CredentialRetrievalError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return (
            f"no usable AWS credentials on this host ({exc})",
            "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or give the "
            "host an instance role), e.g. in the environment file the service reads",
        )
    if isinstance(exc, NoRegionError):
        return ("no AWS region configured", "export AWS_DEFAULT_REGION (e.g. us-east-1)")
    return None


def _attempts_made(exc: BaseException, client: Any) -> str:
    metadata = (getattr(exc, "response", None) or {}).get("ResponseMetadata", {})
    if "RetryAttempts" in metadata:
        return f"{int(metadata['RetryAttempts']) + 1} attempts"
    configured = configured_attempts(client)
    return f"{configured} attempts" if configured else "retries"


def s3_error(what: str, exc: BaseException, client: Any) -> StorageError | None:
    """The one-line error for an S3 request that failed for good (botocore's retries are over),
    or None when ``exc`` is not an S3 or network failure (a bug: let it surface as it is)."""
    setup = _setup_problem(exc)
    if setup is not None:
        return StorageError(f"cannot {what}: {setup[0]}", hint=setup[1], code=type(exc).__name__)
    endpoint = getattr(getattr(client, "meta", None), "endpoint_url", "?")
    if _is_unreachable(exc):
        return StorageUnreachableError(
            f"S3 unreachable while trying to {what} ({endpoint}) after "
            f"{_attempts_made(exc, client)}: {exc}",
            hint="check the network, AWS_ENDPOINT_URL_S3 and the bucket's region; "
            "the local backup is kept and the next run uploads what is missing",
        )
    code = client_error_code(exc)
    if not code:
        return None
    if is_transient(exc):
        return StorageError(
            f"S3 kept failing to {what} ({endpoint}) after {_attempts_made(exc, client)}: {exc}",
            hint="S3 reported a server-side or throttling error; retry later",
            code=code,
        )
    return StorageError(
        f"S3 refused to {what}: {exc}",
        hint=_HINTS.get(code, "check the bucket name, region and credentials"),
        code=code,
    )
