"""Storage exceptions and the mapping from raw fsspec/s3fs/botocore failures to them.

Every storage failure that leaves this package is a `StorageError` whose message names the URL, the S3 endpoint
(never a credential) and what to do. Subclasses also derive from the matching builtin (`FileNotFoundError`,
`PermissionError`, `ConnectionError`) so callers that only know the builtins still catch them.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from enum import Enum

try:  # botocore comes with s3fs; keep local-only use working without it
    from botocore import exceptions as boto_exc
except ImportError:  # pragma: no cover - s3fs is a hard dependency of the project
    boto_exc = None


class StorageError(Exception):
    """A storage operation failed; `url` and `endpoint` say where."""

    def __init__(self, message: str, *, url: str = "", endpoint: str = "") -> None:
        super().__init__(message)
        self.url = url
        self.endpoint = endpoint


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object (or local file) does not exist."""


class BucketNotFound(StorageError, FileNotFoundError):
    """The bucket named in an s3:// URL does not exist at the endpoint."""


class AccessDenied(StorageError, PermissionError):
    """The credentials were refused (wrong key/secret, missing credentials, or no permission)."""


class EndpointUnreachable(StorageError, ConnectionError):
    """No connection could be made to the S3 endpoint."""


class StorageUnavailable(StorageError):
    """The endpoint kept answering with transient errors (5xx, throttling) until the retries ran out."""


class NotCommitted(StorageError, FileNotFoundError):
    """A commit set was read but has no commit marker."""


class AlreadyCommitted(StorageError, FileExistsError):
    """A commit set was written to a prefix that is already committed."""


class Kind(Enum):
    """How a raw failure behaves: retry it, or report it at once."""

    TRANSIENT = "transient"
    PERMANENT = "permanent"


# S3 error codes. Anything 5xx or throttling is worth retrying; auth and existence errors never are.
_THROTTLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "TooManyRequestsException", "RequestThrottled", "BandwidthLimitExceeded", "PriorRequestNotComplete",
})
_TRANSIENT_CODES = _THROTTLE_CODES | frozenset({
    "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException", "OperationAborted",
    "500", "502", "503", "504",
})
_AUTH_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
    "InvalidSecurity", "AllAccessDisabled", "AuthorizationHeaderMalformed", "403",
})
_NO_BUCKET_CODES = frozenset({"NoSuchBucket"})
_NO_OBJECT_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
# s3fs turns NoSuchBucket into FileNotFoundError carrying S3's message; that text is all that is left sometimes.
_NO_BUCKET_TEXT = "specified bucket does not exist"


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes/contexts, outermost first (s3fs wraps botocore errors via __cause__)."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not s for s in seen) and len(seen) < 16:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code (`NoSuchBucket`, `SlowDown`, ...) found anywhere in the exception chain."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status:
                return str(status)
    return None


def is_missing_bucket(exc: BaseException) -> bool:
    """True when S3 said the bucket does not exist (by code, or by the message s3fs kept)."""
    return s3_error_code(exc) in _NO_BUCKET_CODES or any(
        _NO_BUCKET_TEXT in str(e) for e in _chain(exc) if not isinstance(e, StorageError))


def _is_connection_failure(exc: BaseException) -> bool:
    """True when no usable connection could be made (refused, DNS failure, connect timeout)."""
    for e in _chain(exc):
        if boto_exc is not None and isinstance(e, boto_exc.ConnectionError):  # EndpointConnectionError, ConnectTimeout
            return True
        if isinstance(e, (ConnectionRefusedError, socket.gaierror)):
            return True
        if type(e).__name__ in {"ClientConnectorError", "ClientConnectorDNSError", "ServerTimeoutError"}:
            return True  # aiohttp's, matched by name to avoid importing aiohttp for local use
    return False


def classify(exc: BaseException) -> Kind:
    """Whether a raw failure is worth retrying: connection trouble, timeouts, 5xx and throttling are."""
    if isinstance(exc, StorageError):
        return Kind.TRANSIENT if isinstance(exc, (EndpointUnreachable, StorageUnavailable)) else Kind.PERMANENT
    code = s3_error_code(exc)
    if code is not None:
        return Kind.TRANSIENT if code in _TRANSIENT_CODES else Kind.PERMANENT
    if _is_connection_failure(exc):
        return Kind.TRANSIENT
    for e in _chain(exc):
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                          FileExistsError, ValueError, TypeError)):
            return Kind.PERMANENT
        if isinstance(e, (TimeoutError, socket.timeout, asyncio.TimeoutError, ConnectionError)):
            return Kind.TRANSIENT
        if boto_exc is not None and isinstance(e, boto_exc.HTTPClientError):  # read timeout, reset, incomplete read
            return Kind.TRANSIENT
        if type(e).__name__ in {"FSTimeoutError", "ClientPayloadError", "ServerDisconnectedError", "IncompleteRead"}:
            return Kind.TRANSIENT
        if isinstance(e, OSError) and e.errno in {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET}:
            return Kind.TRANSIENT  # s3fs maps 503 SlowDown to EBUSY when the code is lost
    return Kind.PERMANENT


def redact(text: str) -> str:
    """Blank out any secret this process knows of, in case a server or library echoed one back."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _bucket_of(url: str) -> str:
    rest = url.split("://", 1)[1] if "://" in url else url
    return rest.split("/", 1)[0]


def translate(exc: BaseException, *, url: str, endpoint: str, action: str, attempts: int = 1,
              note: str = "") -> StorageError:
    """A `StorageError` describing `exc` for `url`; the original stays reachable as `__cause__`. `note` (why the
    retries stopped) is added to the message of a transient failure."""
    if isinstance(exc, StorageError):
        return exc
    where = f"{action} {url}"
    remote = "://" in url and not url.startswith("file://")
    code = s3_error_code(exc)
    tried = f" after {attempts} attempts" if attempts > 1 else ""
    gave_up = f" It {note}." if note else ""
    if is_missing_bucket(exc):
        bucket = _bucket_of(url)
        return BucketNotFound(
            f"{where}: bucket '{bucket}' does not exist at {endpoint}. Create it (for the local server: "
            f"`pagoda s3 up` then `aws --endpoint-url {endpoint} s3 mb s3://{bucket}`) or fix the storage URL "
            "in the config.", url=url, endpoint=endpoint)
    if code in _AUTH_CODES or (boto_exc is not None and any(
            isinstance(e, (boto_exc.NoCredentialsError, boto_exc.PartialCredentialsError)) for e in _chain(exc))):
        if not remote:
            return AccessDenied(f"{where}: permission denied by the local file system; check the path's owner "
                                "and mode.", url=url)
        why = f"S3 said {code}" if code else "no credentials were found"
        return AccessDenied(
            f"{where}: access denied by {endpoint} ({why}). Check the credentials (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials; for the local server, the credentials "
            f"file that `pagoda s3 status` names) and that they may use bucket '{_bucket_of(url)}'.",
            url=url, endpoint=endpoint)
    if code in _NO_OBJECT_CODES or (code is None and isinstance(exc, FileNotFoundError)):
        return ObjectNotFound(f"{where}: no such object or file.", url=url, endpoint=endpoint if remote else "")
    if isinstance(exc, PermissionError) and not remote:
        return AccessDenied(f"{where}: permission denied by the local file system ({exc.strerror or exc}); "
                            "check the path's owner and mode.", url=url)
    if _is_connection_failure(exc):
        return EndpointUnreachable(
            f"{where}: cannot reach the S3 endpoint {endpoint}{tried} ({type(_chain(exc)[-1]).__name__}). Is the "
            "server running (`pagoda s3 status` for the local one)? Check storage.endpoint_url / AWS_ENDPOINT_URL "
            f"and the network.{gave_up}", url=url, endpoint=endpoint)
    if classify(exc) is Kind.TRANSIENT:
        what = f"S3 error {code}" if code else redact(f"{type(exc).__name__}: {exc}")
        return StorageUnavailable(
            f"{where}: {endpoint if remote else 'storage'} kept failing{tried} ({what}); try again later or check "
            f"the server's health.{gave_up}", url=url, endpoint=endpoint)
    detail = f"S3 error {code}" if code else redact(f"{type(exc).__name__}: {exc}")
    return StorageError(f"{where} failed: {detail}.", url=url, endpoint=endpoint if remote else "")
