"""Storage: URL I/O on local paths, file:// and a real S3 server; atomic commit sets; retries; clear errors;
the embedded S3 server's lifecycle."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from pagoda_dist import storage
from pagoda_dist.storage import errors, urls
from pagoda_dist.storage.local_s3 import LocalS3Error, LocalS3Server, free_port_block
from tests.conftest_s3 import FAST_RETRY

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["plain", "file", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh storage root in each flavour of URL."""
    if request.param == "plain":
        return str(tmp_path / "store")
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    return storage.join(request.getfixturevalue("s3_env"), "store")


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def _full_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


# -- plain I/O ---------------------------------------------------------------------------------------------------

def test_put_get_list_range_read(root: str) -> None:
    data = bytes(range(256)) * 4
    storage.write_bytes(storage.join(root, "a.bin"), data)
    storage.write_bytes(storage.join(root, "sub", "b.txt"), b"hello")

    assert storage.read_bytes(storage.join(root, "a.bin")) == data
    assert storage.read_bytes(storage.join(root, "a.bin"), 10, 20) == data[10:20]
    assert storage.read_bytes(storage.join(root, "a.bin"), start=1000) == data[1000:]
    assert storage.read_bytes(storage.join(root, "a.bin"), start=-4) == data[-4:]
    assert storage.size(storage.join(root, "a.bin")) == len(data)
    assert storage.exists(storage.join(root, "sub", "b.txt"))
    assert not storage.exists(storage.join(root, "nope.bin"))

    assert storage.list_dir(root) == [storage.join(root, "a.bin"), storage.join(root, "sub")]
    assert storage.list_files(root) == {"a.bin": len(data), "sub/b.txt": 5}
    assert storage.glob(storage.join(root, "*.bin")) == [storage.join(root, "a.bin")]
    assert storage.list_dir(storage.join(root, "missing")) == []

    with storage.open_url(storage.join(root, "stream.bin"), "wb") as f:
        f.write(b"x" * 1000)
    with storage.open_url(storage.join(root, "stream.bin"), "rb") as f:
        f.seek(990)
        assert f.read() == b"x" * 10

    storage.remove(storage.join(root, "sub"))
    assert not storage.exists(storage.join(root, "sub", "b.txt"))
    storage.remove(storage.join(root, "sub"))  # removing nothing is fine


def test_missing_object_is_object_not_found(root: str) -> None:
    url = storage.join(root, "missing.bin")
    with pytest.raises(storage.ObjectNotFound) as info:
        storage.read_bytes(url)
    assert isinstance(info.value, FileNotFoundError)
    assert url in str(info.value)


def test_upload_and_download_dir(root: str, tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    (src / "nested").mkdir(parents=True)
    (src / "model.pt").write_bytes(b"m" * 3000)
    (src / "nested" / "optim.pt").write_bytes(b"o" * 10)
    assert storage.upload_dir(src, storage.join(root, "ckpt")) == {"model.pt": 3000, "nested/optim.pt": 10}

    dst = tmp_path / "back"
    storage.download_dir(storage.join(root, "ckpt"), dst)
    assert (dst / "model.pt").read_bytes() == b"m" * 3000
    assert (dst / "nested" / "optim.pt").read_bytes() == b"o" * 10
    with pytest.raises(storage.ObjectNotFound):
        storage.download_dir(storage.join(root, "nothing-here"), tmp_path / "x")


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "d" / "f.json"
    storage.write_bytes(str(target), b"old")

    def crash(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(storage.StorageError) as info:
        storage.write_bytes(str(target), b"new")
    assert str(target) in str(info.value)
    assert target.read_bytes() == b"old"  # a failed write never leaves a half file behind
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]


def test_join_scheme_relative() -> None:
    assert storage.join("s3://b/x/", "a", "/c.txt") == "s3://b/x/a/c.txt"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert [storage.scheme(u) for u in ("s3://b/k", "/x", "file:///x", "rel/x")] == ["s3", "file", "file", "file"]
    assert storage.relative("s3://b/x/a/f", "s3://b/x") == "a/f"
    with pytest.raises(ValueError):
        storage.filesystem("s3://")


# -- commit sets -------------------------------------------------------------------------------------------------

def test_commit_set_invisible_until_marker(root: str, tmp_path: Path) -> None:
    parent = storage.join(root, "ckpts")
    prefix = storage.join(parent, "step-000000100")
    local = tmp_path / "weights.bin"
    local.write_bytes(b"w" * 5000)

    cs = storage.CommitSet(prefix).begin()
    cs.put("model/weights.bin", local)
    cs.put("state.json", b'{"step": 100}')
    assert not storage.is_committed(prefix)
    assert storage.committed_children(parent) == []
    assert storage.latest_committed(parent) is None
    with pytest.raises(storage.NotCommitted):
        storage.read_commit(prefix)

    cs.commit({"step": 100})
    assert storage.is_committed(prefix)
    assert storage.committed_children(parent) == [prefix]
    info = storage.read_commit(prefix)
    assert info.meta == {"step": 100}
    assert {rel: p.size for rel, p in info.parts.items()} == {"model/weights.bin": 5000, "state.json": 13}
    assert all(p.sha256 and len(p.sha256) == 64 for p in info.parts.values())
    assert storage.verify(prefix) == []


def test_committed_children_order_and_broken_sets(root: str) -> None:
    parent = storage.join(root, "runs")
    for step in (9, 10, 12):
        storage.write_committed(storage.join(parent, f"step-{step}"), {"w.bin": b"x" * step})
    storage.CommitSet(storage.join(parent, "step-11")).begin().put("w.bin", b"half")  # never committed
    storage.remove(storage.join(parent, "step-12", "w.bin"))  # marker present, part lost
    assert storage.committed_children(parent) == [storage.join(parent, "step-9"), storage.join(parent, "step-10")]
    assert storage.latest_committed(parent) == storage.join(parent, "step-10")
    assert storage.verify(storage.join(parent, "step-12")) == ["w.bin is missing"]


def test_a_failing_store_is_not_taken_for_a_missing_commit(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A marker that cannot be read because the store keeps failing must raise, not make the newest checkpoint look
    uncommitted (a resume would then quietly start from an older one)."""
    from pagoda_dist.storage import commit

    parent = storage.join(root, "runs")
    for step in (1, 2):
        storage.write_committed(storage.join(parent, f"step-{step}"), {"w.bin": b"x"})
    real_read = commit.read_bytes

    def flaky(url: str) -> bytes:
        if url.startswith(storage.join(parent, "step-2")):
            raise storage.StorageUnavailable(f"{url}: kept failing (S3 error InternalError)", url=url)
        return real_read(url)

    monkeypatch.setattr(commit, "read_bytes", flaky)
    with pytest.raises(storage.StorageUnavailable, match="InternalError"):
        storage.latest_committed(parent)
    monkeypatch.setattr(commit, "read_bytes", real_read)
    storage.write_bytes(storage.join(parent, "step-2", storage.COMMIT_MARKER), b"{not json")  # a broken marker
    assert storage.latest_committed(parent) == storage.join(parent, "step-1")  # is skipped, with a warning


def test_recommit_is_refused(root: str) -> None:
    prefix = storage.join(root, "set")
    storage.write_committed(prefix, {"a": b"1"})
    with pytest.raises(storage.AlreadyCommitted, match="already committed"):
        storage.write_committed(prefix, {"a": b"2"})
    with pytest.raises(storage.AlreadyCommitted):
        storage.commit_existing(prefix)
    assert storage.read_bytes(storage.join(prefix, "a")) == b"1"


def test_commit_existing_parts(root: str) -> None:
    prefix = storage.join(root, "step-1")
    for rank in range(2):  # as each rank would write its own shard before rank 0 commits
        storage.write_bytes(storage.join(prefix, f"rank{rank}.pt"), b"r" * (rank + 1))
    with pytest.raises(storage.StorageError, match="rank2.pt"):
        storage.commit_existing(prefix, expected={"rank0.pt": 1, "rank2.pt": -1})
    assert not storage.is_committed(prefix)
    info = storage.commit_existing(prefix, meta={"world": 2}, expected={"rank0.pt": 1, "rank1.pt": 2})
    assert set(info.parts) == {"rank0.pt", "rank1.pt"}
    assert storage.committed_children(root) == [prefix]


def test_bad_part_names_rejected(tmp_path: Path) -> None:
    cs = storage.CommitSet(str(tmp_path / "p")).begin()
    for bad in ("COMMIT", "../x", "a//b", ""):
        with pytest.raises(ValueError):
            cs.put(bad, b"x")
    with pytest.raises(TypeError):
        cs.put("a.txt", "text is not bytes")  # type: ignore[arg-type]


_WRITER = textwrap.dedent("""
    import sys
    from pagoda_dist.storage import CommitSet
    cs = CommitSet(sys.argv[1]).begin()  # the S3 endpoint comes from AWS_ENDPOINT_URL, as in a Ray worker
    cs.put("model/weights.bin", b"w" * 200_000)
    cs.put("state.json", b"{}")
    print("parts-written", flush=True)
    sys.stdin.read()  # blocks until the test kills us: the marker is never written
    cs.commit({"step": 1})
""")


def test_writer_killed_mid_commit_leaves_nothing_committed(root: str) -> None:
    parent = storage.join(root, "ckpts")
    prefix = storage.join(parent, "step-1")
    env = {**os.environ, **storage.env_for_workers(),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, prefix], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == b"parts-written"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL

    assert storage.list_files(prefix)  # the dead writer's parts are there...
    assert not storage.is_committed(prefix)  # ...but nothing looks committed
    assert storage.committed_children(parent) == []

    storage.write_committed(prefix, {"model/weights.bin": b"new", "other.bin": b"x"}, {"step": 1})
    assert storage.committed_children(parent) == [prefix]
    assert set(storage.list_files(prefix)) == {"model/weights.bin", "other.bin", storage.COMMIT_MARKER}
    assert storage.read_bytes(storage.join(prefix, "model/weights.bin")) == b"new"


# -- clear errors against the real server -------------------------------------------------------------------------

def test_wrong_credentials_give_access_denied(s3_env: str, s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    url = storage.join(s3_env, "obj.bin")
    storage.write_bytes(url, b"data")
    real_secret = s3_server.env["AWS_SECRET_ACCESS_KEY"]
    wrong_secret = "Wr0ngSecretValueThatMustNotLeak123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    for call in (lambda: storage.read_bytes(url), lambda: storage.write_bytes(url, b"x"),
                 lambda: storage.list_dir(s3_env)):
        with pytest.raises(storage.AccessDenied) as info:
            call()
        text = _full_text(info.value)
        assert s3_env.rstrip("/") in str(info.value) and s3_server.endpoint in str(info.value)
        assert "AWS_SECRET_ACCESS_KEY" in str(info.value)  # says what to check
        assert real_secret not in text and wrong_secret not in text
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(storage.AccessDenied, match="no credentials were found"):
        storage.read_bytes(url)


def test_missing_bucket_gives_bucket_not_found(s3_env: str, s3_server) -> None:
    url = "s3://no-such-bucket-pagoda/x/y.bin"
    for call in (lambda: storage.read_bytes(url), lambda: storage.write_bytes(url, b"x"),
                 lambda: storage.list_dir("s3://no-such-bucket-pagoda/x"), lambda: storage.exists(url)):
        with pytest.raises(storage.BucketNotFound) as info:
            call()
        assert "no-such-bucket-pagoda" in str(info.value) and s3_server.endpoint in str(info.value)
        assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in _full_text(info.value)


def test_closed_port_gives_endpoint_unreachable(s3_env: str, s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # our retry layer alone (botocore's is tested in test_storage_faults)
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    storage.configure(endpoint_url=endpoint, retry=FAST_RETRY)
    url = storage.join(s3_env, "obj.bin")
    start = time.monotonic()
    with pytest.raises(storage.EndpointUnreachable) as info:
        storage.read_bytes(url)
    assert time.monotonic() - start < 10
    assert url in str(info.value) and endpoint in str(info.value) and "3 attempts" in str(info.value)
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in _full_text(info.value)


# -- retries and error classification (no server) ------------------------------------------------------------------

@pytest.mark.parametrize("exc, kind", [
    (_client_error("SlowDown", 503), errors.Kind.TRANSIENT),
    (_client_error("InternalError", 500), errors.Kind.TRANSIENT),
    (_client_error("503", 503), errors.Kind.TRANSIENT),
    (EndpointConnectionError(endpoint_url="http://x"), errors.Kind.TRANSIENT),
    (TimeoutError(), errors.Kind.TRANSIENT),
    (_client_error("AccessDenied", 403), errors.Kind.PERMANENT),
    (_client_error("SignatureDoesNotMatch", 403), errors.Kind.PERMANENT),
    (_client_error("NoSuchBucket", 404), errors.Kind.PERMANENT),
    (_client_error("NoSuchKey", 404), errors.Kind.PERMANENT),
    (FileNotFoundError("x"), errors.Kind.PERMANENT),
])
def test_classify(exc: BaseException, kind: errors.Kind) -> None:
    assert errors.classify(exc) is kind
    wrapped = FileNotFoundError("s3fs-style wrapper")
    wrapped.__cause__ = exc
    if isinstance(exc, ClientError):  # s3fs re-raises ClientErrors as OSErrors with the original as cause
        assert errors.classify(wrapped) is kind


def test_transient_errors_are_retried_with_growing_jittered_backoff() -> None:
    calls, waits = [], []
    policy = storage.RetryPolicy(max_attempts=5, base_delay_s=0.1, max_delay_s=0.3)

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise _client_error("SlowDown", 503)
        return "ok"

    from pagoda_dist.storage.retry import call_with_retry
    assert call_with_retry(flaky, url="s3://b/k", endpoint="E", action="read", policy=policy,
                           sleep=waits.append) == "ok"
    assert len(calls) == 4 and len(waits) == 3
    assert all(0 <= w <= min(0.3, 0.1 * 2 ** i) for i, w in enumerate(waits))

    def down() -> None:
        raise _client_error("ServiceUnavailable", 503)

    with pytest.raises(storage.StorageUnavailable, match="after 2 attempts"):
        call_with_retry(down, url="s3://b/k", endpoint="E", action="read",
                        policy=storage.RetryPolicy(max_attempts=2, base_delay_s=0), sleep=waits.append)


@pytest.mark.parametrize("code, status, cls", [
    ("AccessDenied", 403, storage.AccessDenied), ("NoSuchBucket", 404, storage.BucketNotFound),
    ("NoSuchKey", 404, storage.ObjectNotFound), ("InvalidArgument", 400, storage.StorageError),
])
def test_permanent_errors_are_not_retried(code: str, status: int, cls: type) -> None:
    from pagoda_dist.storage.retry import call_with_retry
    calls = []

    def fail() -> None:
        calls.append(1)
        raise _client_error(code, status)

    with pytest.raises(cls) as info:
        call_with_retry(fail, url="s3://bkt/k", endpoint="http://e", action="read", policy=storage.RetryPolicy(),
                        sleep=lambda s: None)
    assert len(calls) == 1 and "s3://bkt/k" in str(info.value)


# -- settings and client cache -------------------------------------------------------------------------------------

def test_filesystem_cached_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    storage.configure(endpoint_url="http://127.0.0.1:1")
    try:
        fs1, path = storage.filesystem("s3://bkt/a/b")
        assert path == "bkt/a/b" and storage.filesystem("s3://bkt/other")[0] is fs1
        monkeypatch.setattr(urls.os, "getpid", lambda: -12345)  # as in a forked child / Ray worker
        assert storage.filesystem("s3://bkt/a/b")[0] is not fs1
    finally:
        storage.configure()
    assert storage.filesystem("s3://bkt/a/b")[0] is not fs1  # configure() drops clients built earlier


def test_env_for_workers_forwards_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "supersecretvalue")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tokenvalue")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://other:1")
    storage.configure(endpoint_url="http://127.0.0.1:8333", region="eu-west-1")
    try:
        env = storage.env_for_workers()
    finally:
        storage.configure()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8333" and env["AWS_REGION"] == "eu-west-1"
    assert "AWS_ENDPOINT_URL_S3" not in env
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)
    with pytest.raises(ValueError, match="endpoint_url"):
        storage.configure(endpoint_url="127.0.0.1:8333")


# -- the embedded server -------------------------------------------------------------------------------------------

def test_session_server_files_and_status(s3_server) -> None:
    server: LocalS3Server = s3_server.server
    for path in (server.credentials_file, server.shared_credentials_file, server.pid_file):
        assert path.stat().st_mode & 0o777 == 0o600
    st = server.status()
    assert st.running and st.pid and st.endpoint == s3_server.endpoint
    secret = server.credentials().secret_access_key
    assert secret not in repr(server.credentials())
    assert "AWS_SECRET_ACCESS_KEY" not in server.env(include_secret=False)
    assert json.loads(server.credentials_file.read_text())["secret_access_key"] == secret

    lines: list[str] = []
    assert storage.s3_command("status", server.data_dir, server.port, say=lines.append) == 0
    out = "\n".join(lines)
    assert "running" in out and s3_server.endpoint in out and str(server.credentials_file) in out
    assert secret not in out


def test_a_hundred_buckets_each_take_writes(s3_server) -> None:
    """Every bucket gets a volume of its own; weed's default volume cap (free disk / volume size, ~70 with 80 GB
    free) once refused every write past that many buckets with InternalError, whatever the data's size."""
    client = s3_server.server._client()
    for i in range(100):
        bucket = s3_server.bucket(f"many-{i:03d}-" + os.urandom(3).hex())[5:].strip("/")
        client.put_object(Bucket=bucket, Key="x.bin", Body=b"%d" % i)
        assert client.get_object(Bucket=bucket, Key="x.bin")["Body"].read() == b"%d" % i


def test_activate_points_process_at_server_without_secret_in_env(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    server: LocalS3Server = s3_server.server
    monkeypatch.setattr(os, "environ", dict(os.environ))  # activate() edits the environment; undo it afterwards
    os.environ.update(AWS_ACCESS_KEY_ID="AKIDSOMEONEELSE", AWS_SECRET_ACCESS_KEY="someone-elses-secret",
                      AWS_PROFILE="missing-profile")
    try:
        env = server.activate()
        assert env["AWS_ENDPOINT_URL"] == server.endpoint
        url = storage.join(s3_server.bucket(), "a.txt")
        storage.write_bytes(url, b"hi")
        assert storage.read_bytes(url) == b"hi"
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"} & set(os.environ)
        assert storage.env_for_workers()["AWS_SHARED_CREDENTIALS_FILE"] == str(server.shared_credentials_file)
    finally:
        storage.configure()


def test_server_stop_by_pid_restart_keeps_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, port = tmp_path / "s3", free_port_block()
    lines: list[str] = []
    assert storage.s3_command("up", data_dir, port, buckets=["keep"], say=lines.append) == 0
    server = LocalS3Server(data_dir, port)
    pid = server.status().pid
    assert pid and server.credentials().secret_access_key not in "\n".join(lines)
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the down server is reported after FAST_RETRY's attempts alone
        storage.configure(endpoint_url=server.endpoint, retry=FAST_RETRY)
        storage.write_committed("s3://keep/set", {"a.bin": b"persisted"})

        assert storage.s3_command("down", data_dir, port, say=lines.append) == 0
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        assert storage.s3_command("status", data_dir, port, say=lines.append) == 3
        with pytest.raises(storage.EndpointUnreachable):
            storage.read_bytes("s3://keep/set/a.bin")

        server.start()
        assert storage.committed_children("s3://keep/") == ["s3://keep/set"]
        assert storage.read_bytes("s3://keep/set/a.bin") == b"persisted"
    finally:
        storage.configure()
        server.stop()
    assert not server.status().running


def test_server_start_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(LocalS3Error, match="does not exist"):
        LocalS3Server(tmp_path / "a", free_port_block(), weed=tmp_path / "no-weed").start()
    base = free_port_block()
    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 2))
        s.listen()
        with pytest.raises(LocalS3Error, match=f"{base + 2} \\(master\\)"):
            LocalS3Server(tmp_path / "b", base).start()
    assert storage.s3_command("sideways", tmp_path / "c", base) == 2
