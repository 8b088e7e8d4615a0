"""Storage: one way to open, list, read and write any URL (`s3://`, `file://`, plain paths), atomic commit sets,
and the embedded local S3 server. Only this package talks to object storage; the rest of pagoda passes URLs."""

from .commit import (
    COMMIT_MARKER,
    CommitDamaged,
    CommitInfo,
    CommitSet,
    PartInfo,
    commit_existing,
    committed_children,
    download_committed,
    file_parts,
    is_committed,
    latest_committed,
    marked_children,
    read_commit,
    verify,
    write_committed,
)
from .errors import (
    AccessDenied,
    AlreadyCommitted,
    BucketNotFound,
    EndpointUnreachable,
    NotCommitted,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
)
from .local_s3 import LocalS3Error, LocalS3Server, free_port_block
from .ops import (
    copy_file,
    download_dir,
    exists,
    glob,
    info,
    list_dir,
    list_files,
    open_url,
    read_bytes,
    remove,
    size,
    upload_dir,
    write_bytes,
)
from .retry import RetryPolicy
from .s3_cli import s3_command
from .settings import S3Settings, configure, describe_endpoint, env_for_workers
from .urls import filesystem, is_remote, join, relative, scheme

__all__ = [
    "COMMIT_MARKER", "AccessDenied", "AlreadyCommitted", "BucketNotFound", "CommitDamaged", "CommitInfo", "CommitSet",
    "EndpointUnreachable", "LocalS3Error", "LocalS3Server", "NotCommitted", "ObjectNotFound", "PartInfo",
    "RetryPolicy", "S3Settings", "StorageError", "StorageUnavailable", "commit_existing", "committed_children",
    "configure", "copy_file", "describe_endpoint", "download_committed", "download_dir", "env_for_workers", "exists",
    "file_parts", "filesystem", "free_port_block", "glob", "info", "is_committed", "is_remote", "join",
    "latest_committed", "list_dir", "list_files", "marked_children", "open_url", "read_bytes", "read_commit",
    "relative", "remove", "s3_command", "scheme", "size", "upload_dir", "verify", "write_bytes", "write_committed",
]
