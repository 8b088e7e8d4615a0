"""Pytest fixtures for a real S3 endpoint: one embedded SeaweedFS server per test session, on free loopback ports,
held by a server session of this process: it stops when the session ends, and also if pytest is killed (no
orphaned `weed`). Registered via `pytest_plugins` in tests/conftest.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pagoda_dist.storage import LocalS3Server, RetryPolicy, configure, free_port_block

# Short waits so failure tests (closed port, ...) finish in well under a second.
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay_s=0.05, max_delay_s=0.2)


@dataclass
class S3TestServer:
    """The session's server, as tests see it."""

    server: LocalS3Server

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def env(self) -> dict[str, str]:
        """AWS_* variables (secret included) that point a client at this server."""
        return self.server.env()

    def bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh uniquely named one by default) and return its URL, `s3://name/`."""
        return self.server.ensure_bucket(name or f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3TestServer]:
    """One embedded S3 server for the whole session, on ports no user's server is using."""
    server = LocalS3Server(tmp_path_factory.mktemp("s3-server"), port=free_port_block(), startup_timeout_s=60)
    with server.session():
        yield S3TestServer(server)


@pytest.fixture
def s3_env(s3_server: S3TestServer, monkeypatch: pytest.MonkeyPatch,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Point this process's storage at the session server (env + `configure`) and yield a fresh bucket URL."""
    isolated = tmp_path_factory.mktemp("aws-config")
    # Keep a developer's own AWS profile, token or endpoint from leaking into the test.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(isolated / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(isolated / "credentials"))
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    configure(endpoint_url=s3_server.endpoint, region=s3_server.server.region, retry=FAST_RETRY)
    try:
        yield s3_server.bucket()
    finally:
        configure()
