"""Storage under faults: an object store that goes away and comes back (the retry budget), an embedded S3 server
whose internal ports refuse anyone without its keys, and a server that lives exactly as long as its users."""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pagoda_dist import storage
from pagoda_dist.storage import retry, settings, urls
from pagoda_dist.storage.local_s3 import _PORT_FLAGS, LocalS3Server, free_port_block

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[1]
OUTAGE_S = 10.0  # how long the server is down in the outage tests


def _wait_until(cond: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step_s)
    return cond()


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _point_at(server: LocalS3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """This process's AWS_* variables aimed at `server` (and at nobody's own AWS config)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_RETRY_MODE",
                 "AWS_MAX_ATTEMPTS", settings.BUDGET_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)


# -- the retry budget against a real server that goes away ------------------------------------------------------

@pytest.fixture
def restartable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LocalS3Server, str]]:
    """A server of this test's own (so it can be stopped), this process pointed at it, and a bucket URL."""
    server = LocalS3Server(tmp_path / "s3", free_port_block(), startup_timeout_s=60)
    server.start()
    try:
        _point_at(server, monkeypatch, tmp_path)
        yield server, server.ensure_bucket("outage")
    finally:
        storage.configure()
        server.stop()


def _restart_after(server: LocalS3Server, delay_s: float) -> threading.Thread:
    def restart() -> None:
        time.sleep(delay_s)
        server.start()
    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    return thread


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        start = time.monotonic()
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            out["error"] = exc
        out["seconds"] = time.monotonic() - start
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_put_and_get_started_during_an_outage_succeed_within_the_budget(restartable) -> None:
    server, bucket = restartable
    storage.configure(endpoint_url=server.endpoint, region=server.region, retry_budget_s=OUTAGE_S + 30)
    before = storage.join(bucket, "before.bin")
    during = storage.join(bucket, "during.bin")
    storage.write_bytes(before, b"written before the outage")

    server.stop()
    assert not server.status().running
    restarter = _restart_after(server, OUTAGE_S)
    put_thread, put = _in_thread(lambda: storage.write_bytes(during, b"written during the outage"))
    get_thread, get = _in_thread(lambda: storage.read_bytes(before))
    for t in (put_thread, get_thread, restarter):
        t.join(timeout=OUTAGE_S + 60)

    assert "error" not in put, put.get("error")
    assert "error" not in get, get.get("error")
    assert get["value"] == b"written before the outage"
    # Both calls really spanned the outage: they started while the server was down and ended after it came back.
    assert put["seconds"] > OUTAGE_S - 2 and get["seconds"] > OUTAGE_S - 2
    assert storage.read_bytes(during) == b"written during the outage"


def test_an_outage_longer_than_the_budget_fails_naming_the_budget_key(restartable) -> None:
    server, bucket = restartable
    url = storage.join(bucket, "x.bin")
    storage.write_bytes(url, b"x")
    storage.configure(endpoint_url=server.endpoint, region=server.region, retry_budget_s=3)
    server.stop()
    start = time.monotonic()
    with pytest.raises(storage.EndpointUnreachable) as info:
        storage.read_bytes(url)
    took = time.monotonic() - start
    message = str(info.value)
    assert "storage.retry_budget_s=3" in message and "ran out" in message, message
    assert url in message and server.endpoint in message
    assert 3 <= took < 3 + 15, took  # the budget, plus at most one last attempt (botocore's own few retries)
    assert server.credentials().secret_access_key not in message


def test_permanent_errors_fail_at_once_even_with_a_long_budget(restartable, monkeypatch: pytest.MonkeyPatch) -> None:
    server, bucket = restartable
    storage.configure(endpoint_url=server.endpoint, region=server.region, retry_budget_s=600)
    url = storage.join(bucket, "obj.bin")
    storage.write_bytes(url, b"data")
    start = time.monotonic()
    with pytest.raises(storage.BucketNotFound, match="no-such-bucket-pagoda"):
        storage.read_bytes("s3://no-such-bucket-pagoda/k")
    with pytest.raises(storage.ObjectNotFound):
        storage.read_bytes(storage.join(bucket, "missing.bin"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "Wr0ngSecretValueThatMustNotLeak123456789")
    with pytest.raises(storage.AccessDenied, match="AWS_SECRET_ACCESS_KEY"):
        storage.read_bytes(url)
    assert time.monotonic() - start < 10


# -- the retry loop itself (no server) ---------------------------------------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def test_retries_run_until_the_budget_with_capped_backoff() -> None:
    from botocore.exceptions import EndpointConnectionError

    clock = _Clock()
    calls = []

    def refused() -> None:
        calls.append(clock.now)
        clock.now += 0.01  # each attempt takes a moment
        raise EndpointConnectionError(endpoint_url="http://e")

    policy = storage.RetryPolicy(base_delay_s=0.5, max_delay_s=4.0, budget_s=60.0)
    with pytest.raises(storage.EndpointUnreachable) as info:
        retry.call_with_retry(refused, url="s3://b/k", endpoint="http://e", action="read", policy=policy,
                              sleep=clock.sleep, clock=clock)
    assert "storage.retry_budget_s=60" in str(info.value) and f"after {len(calls)} attempts" in str(info.value)
    assert calls[-1] - calls[0] == pytest.approx(60.0, abs=0.05)  # the last attempt is made at the deadline
    assert all(w <= 4.0 for w in clock.waits) and max(clock.waits) > 2.0  # the cap binds, and is reached
    assert len(calls) >= 15  # ~60 s of waits of at most 4 s each

    # The budget counts from the first failure: a call that recovers within it returns, however long it took.
    clock2, state = _Clock(), {"n": 0}

    def flaky() -> str:
        state["n"] += 1
        if clock2.now < 1000.0 + 40:
            raise EndpointConnectionError(endpoint_url="http://e")
        return "ok"

    assert retry.call_with_retry(flaky, url="s3://b/k", endpoint="E", action="read", policy=policy,
                                 sleep=clock2.sleep, clock=clock2) == "ok"


def test_retry_policy_validates() -> None:
    with pytest.raises(ValueError, match="storage.retry_budget_s"):
        storage.RetryPolicy(budget_s=-1)
    with pytest.raises(ValueError, match="storage.retry_budget_s"):
        storage.RetryPolicy(budget_s=float("inf"))
    assert storage.RetryPolicy().budget_s >= 120 + 30  # survives a 2-minute outage, with room to spare
    assert storage.RetryPolicy().max_attempts is None


def test_storage_config_knob() -> None:
    from pagoda_dist.config import ConfigError, StorageConfig

    assert StorageConfig().retry_budget_s == 180.0
    assert StorageConfig(retry_budget_s=5).retry_budget_s == 5
    with pytest.raises(ConfigError, match="retry_budget_s"):
        StorageConfig(retry_budget_s=-1)


def test_budget_reaches_child_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(settings.BUDGET_ENV, raising=False)
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    try:
        assert storage.configure().retry.budget_s == retry.DEFAULT_BUDGET_S
        storage.configure(endpoint_url="http://127.0.0.1:9", retry_budget_s=42.5)
        env = storage.env_for_workers()
    finally:
        storage.configure()
    assert env[settings.BUDGET_ENV] == "42.5"
    assert env["AWS_RETRY_MODE"] == "adaptive" and env["AWS_MAX_ATTEMPTS"] == "4"
    # A Ray worker calls configure(endpoint, region) with the forwarded environment: it gets the same budget.
    code = ("from pagoda_dist import storage; "
            "print(storage.configure('http://127.0.0.1:9', 'us-east-1').retry.budget_s)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert float(out.strip()) == 42.5
    # A Ray actor that applies the forwarded environment after importing storage, and never configures it.
    code = ("import os; from pagoda_dist import storage; os.environ.update(__import__('json').loads(os.environ['E'])); "
            "print(storage.settings.current().retry.budget_s)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "E": json.dumps(env)}, cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert float(out.strip()) == 42.5


def test_botocore_standard_retry_mode_unless_configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))

    def client_retries() -> dict:
        fs, _ = storage.filesystem("s3://bkt/key")
        fs.connect()
        return dict(fs.s3.meta.config.retries)

    storage.configure(endpoint_url="http://127.0.0.1:9")
    try:
        assert client_retries() == {"mode": "standard"}  # botocore's own default would be "legacy"
        monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
        assert client_retries() == {"mode": "adaptive", "total_max_attempts": 7}
        monkeypatch.delenv("AWS_RETRY_MODE")
        assert client_retries() == {"mode": "standard", "total_max_attempts": 7}
        monkeypatch.delenv("AWS_MAX_ATTEMPTS")
        (tmp_path / "config").write_text("[default]\nretry_mode = legacy\nmax_attempts = 2\n")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
        assert urls.botocore_retries() == {"mode": "legacy"}
        assert client_retries() == {"mode": "legacy", "total_max_attempts": 2}
    finally:
        storage.configure()


# -- the embedded server's ports --------------------------------------------------------------------------------

def _http(port: int, method: str, path: str, body: bytes | None = None,
          context: ssl.SSLContext | None = None) -> tuple[int | str, bytes]:
    """(status, body) of one request, or (exception name, b"") when no response came."""
    conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context) if context
            else http.client.HTTPConnection("127.0.0.1", port, timeout=5))
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__, b""
    finally:
        conn.close()


def _refused(answer: tuple[int | str, bytes]) -> bool:
    """No answer, an authorization refusal, or Go's reply to plain HTTP on a TLS port."""
    status, body = answer
    return isinstance(status, str) or status in (401, 403) or (status == 400 and b"HTTPS server" in body)


def _grpc_call(target: str, credentials=None) -> str:  # noqa: ANN001 - grpc.ChannelCredentials
    """The status of one raw unary call ('OK' or a StatusCode name); UNAVAILABLE means no connection was allowed."""
    import grpc

    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    try:
        call = channel.unary_unary("/filer_pb.SeaweedFiler/GetFilerConfiguration",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        call(b"", timeout=5)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name
    finally:
        channel.close()


def test_only_the_authenticated_s3_api_is_reachable(s3_server) -> None:
    pytest.importorskip("grpc")
    import grpc

    server: LocalS3Server = s3_server.server
    bucket = s3_server.bucket("sec-" + os.urandom(4).hex())[5:].strip("/")
    payload = b"SECRET-CHECKPOINT-" * 64
    client = server._client()
    client.put_object(Bucket=bucket, Key="ck.bin", Body=payload)
    tls = server.tls_dir
    ca, cert, key = ((tls / n).read_bytes() for n in ("ca.crt", "node.crt", "node.key"))
    no_cert = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    with_cert = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    with_cert.load_cert_chain(str(tls / "node.crt"), str(tls / "node.key"))

    probes = [("GET", f"/{bucket}/ck.bin", None), ("GET", f"/buckets/{bucket}/ck.bin", None),
              ("GET", f"/buckets/{bucket}/ck.bin?metadata=true", None), ("PUT", f"/{bucket}/ck.bin", b"EVIL"),
              ("PUT", f"/buckets/{bucket}/ck.bin", b"EVIL"), ("POST", "/submit", b"EVIL"),
              ("GET", "/dir/assign", None), ("GET", "/dir/lookup?volumeId=1", None), ("GET", "/vol/status", None),
              ("GET", "/status", None), ("GET", "/1,0101010101", None), ("GET", "/", None)]
    let_in: list[tuple] = []  # every request that was not refused, for one report over all ports
    controls: list[str] = []
    for i, (flag, name) in enumerate(_PORT_FLAGS):
        port = server.port + i
        for method, path, body in probes:
            answer = _http(port, method, path, body)
            leaked = payload[:16] in answer[1]
            if name == "S3":  # the S3 API's own answers: AccessDenied, or MethodNotAllowed for /submit ...
                refused = path == "/status" or (isinstance(answer[0], int) and 400 <= answer[0] < 500)  # + health
            else:
                refused = _refused(answer)
            if leaked or not refused:
                let_in.append((name, port, method, path, answer[0], answer[1][:60]))
        if flag.endswith(".grpc"):
            for how, creds in (("plaintext gRPC", None), ("TLS without a client certificate",
                                                           grpc.ssl_channel_credentials(ca))):
                status = _grpc_call(f"127.0.0.1:{port}", creds)
                if status != "UNAVAILABLE":
                    let_in.append((name, port, how, status))
            # Control: the same probe reaches the service with the server's own client certificate.
            if _grpc_call(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca, key, cert)) == "UNAVAILABLE":
                controls.append(name)
        elif name != "S3":
            answer = _http(port, "GET", "/status", context=no_cert)
            if not isinstance(answer[0], str):
                let_in.append((name, port, "HTTPS without a client certificate", answer[0]))
            if not isinstance(_http(port, "GET", "/status", context=with_cert)[0], int):
                controls.append(name)
    assert not let_in, "requests without credentials that were not refused:\n" + "\n".join(map(str, let_in))
    assert not controls, f"the server's own certificate was refused on {controls}: the probes prove nothing"

    # The local sockets weed adds beside its ports: owner-only, and they want the client certificate too.
    sockets = [p for p in (server.data_dir / "s3.sock", server.data_dir / "filer.sock") if p.exists()]
    for i, (flag, _) in enumerate(_PORT_FLAGS):
        if flag.endswith(".grpc"):
            sockets += sorted(Path("/tmp").glob(f"seaweedfs-*-grpc-{server.port + i}.sock"))
    assert any("grpc" in p.name for p in sockets)
    for sock in sockets:
        assert sock.stat().st_mode & 0o077 == 0, sock
        if "grpc" in sock.name:
            assert _grpc_call(f"unix:{sock}") == "UNAVAILABLE", sock
    assert server.data_dir.stat().st_mode & 0o077 == 0
    for private in (server.security_file, tls / "node.key", tls / "node.crt", tls / "ca.crt"):
        assert private.stat().st_mode & 0o077 == 0, private

    # The S3 API still works with the key pair, and nothing above changed the object.
    assert client.get_object(Bucket=bucket, Key="ck.bin")["Body"].read() == payload
    client.put_object(Bucket=bucket, Key="after.bin", Body=b"ok")
    assert client.get_object(Bucket=bucket, Key="after.bin")["Body"].read() == b"ok"


# -- the embedded server's lifetime -----------------------------------------------------------------------------

_USER = textwrap.dedent("""
    import json, sys
    from pagoda_dist.storage.local_s3 import LocalS3Server

    server = LocalS3Server(sys.argv[1], int(sys.argv[2]), startup_timeout_s=60)
    with server.session() as st:
        rec = json.loads(server.pid_file.read_text())
        print(json.dumps({"weed": st.pid, "supervisor": rec["supervisor"]}), flush=True)
        for line in sys.stdin:
            if line.strip() == "use":
                client = server._client()
                server.ensure_bucket("shared")
                client.put_object(Bucket="shared", Key="k", Body=b"still here")
                body = client.get_object(Bucket="shared", Key="k")["Body"].read().decode()
                print(json.dumps({"read": body, "weed": server.status().pid}), flush=True)
            else:
                break
""")


class _User:
    """A separate process holding a session on the server (what a driver, or `pagoda prepare`, does)."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _USER, str(data_dir), str(port)], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line, f"the user process failed to start the server (exit {self.proc.wait()})"
        self.started = json.loads(line)

    def use(self) -> dict:
        self.proc.stdin.write("use\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the user process died (exit {self.proc.wait()})"
        return json.loads(line)

    def leave(self) -> None:
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()
        assert self.proc.wait(timeout=60) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def server_dir(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    data_dir, port = tmp_path / "s3", free_port_block()
    yield data_dir, port
    LocalS3Server(data_dir, port).stop()  # whatever a failed test left


def test_server_dies_with_its_sigkilled_user(server_dir) -> None:
    user = _User(*server_dir)
    weed, supervisor = user.started["weed"], user.started["supervisor"]
    assert not _gone(weed) and not _gone(supervisor)
    os.kill(user.proc.pid, signal.SIGKILL)
    user.proc.wait()
    assert _wait_until(lambda: _gone(weed) and _gone(supervisor), timeout_s=12), "weed outlived its killed user"
    server = LocalS3Server(*server_dir)
    assert not server.status().running and not server.pid_file.exists()
    assert not any(Path(p).exists() for p in server._grpc_socket_paths())  # weed's /tmp sockets went with it


def test_server_dies_with_its_sigkilled_supervisor(server_dir) -> None:
    user = _User(*server_dir)
    try:
        weed = user.started["weed"]
        os.kill(user.started["supervisor"], signal.SIGKILL)
        assert _wait_until(lambda: _gone(weed), timeout_s=5), "weed outlived its supervisor"
    finally:
        user.kill()
    server = LocalS3Server(*server_dir)
    assert server.stop() is None  # nothing runs; what the killed pair left behind is cleared ...

    def cleared() -> bool:  # ... once the kernel has closed the dead weed's listeners (a loaded machine lags)
        server.stop()
        return not server.pid_file.exists() and not any(Path(p).exists() for p in server._grpc_socket_paths())

    assert _wait_until(cleared, timeout_s=10), [p for p in server._grpc_socket_paths() if Path(p).exists()]


def test_server_keeps_serving_a_second_user_after_the_first_leaves(server_dir) -> None:
    first = _User(*server_dir)
    second = None
    try:
        second = _User(*server_dir)
        weed = first.started["weed"]
        assert second.started["weed"] == weed  # joined, not started anew
        assert len(LocalS3Server(*server_dir).users()) == 2
        first.leave()  # the process that started the server exits
        time.sleep(3)  # longer than the server needs to notice and stop, if it wrongly did
        assert second.use() == {"read": "still here", "weed": weed}
        assert not _gone(weed)
        second.leave()  # the last user leaves: now it stops
        assert _wait_until(lambda: _gone(weed), timeout_s=15), "weed outlived its last user"
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_nested_sessions_of_one_process_keep_the_server(server_dir) -> None:
    server = LocalS3Server(*server_dir, startup_timeout_s=60)
    with server.session() as outer:
        with server.session():
            assert server.status().pid == outer.pid
        time.sleep(1.0)  # the supervisor polls every 0.25 s
        assert server.status().pid == outer.pid and len(server.users()) == 1
    assert _wait_until(lambda: _gone(outer.pid), timeout_s=15), "weed outlived its last session"


def test_pinned_server_outlives_sessions_until_stopped(server_dir) -> None:
    server = LocalS3Server(*server_dir, startup_timeout_s=60)
    status = server.start()  # `pagoda s3 up`
    try:
        with server.session():
            assert server.status().pid == status.pid
        time.sleep(1.5)
        assert server.status().running and server.users() == ["pinned"]
    finally:
        assert server.stop() == status.pid
    assert _gone(status.pid) and not server.status().running
