"""`pagoda s3 up|down|status`: manage the embedded S3 server from the command line."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import StorageError
from .local_s3 import LocalS3Server, ServerStatus

ACTIONS = ("up", "down", "status")
EXIT_NOT_RUNNING = 3  # as `systemctl status` / LSB init scripts report a stopped service


def _describe(st: ServerStatus, say: Callable[[str], None]) -> None:
    # The secret key stays in its file: only paths and the endpoint are printed.
    say(f"  endpoint:    {st.endpoint}")
    say(f"  data:        {st.data_dir}")
    say(f"  credentials: {st.credentials_file} (owner-only; the secret key is kept only there)")
    say(f"  log:         {st.log_file}")
    say(f"  use it:      export AWS_ENDPOINT_URL={st.endpoint} AWS_SHARED_CREDENTIALS_FILE="
        f"{st.shared_credentials_file}")


def s3_command(action: str, data_dir: Path, port: int = 8333, *, buckets: Sequence[str] = (),
               say: Callable[[str], None] = print) -> int:
    """Run `up` (start, creating `buckets`), `down` (stop by PID) or `status`; returns the process exit code
    (0 ok, 1 failure, 2 bad action, 3 `status` of a stopped server)."""
    if action not in ACTIONS:
        print(f"pagoda s3: unknown action {action!r}; use one of {', '.join(ACTIONS)}", file=sys.stderr)
        return 2
    server = LocalS3Server(data_dir, port)
    try:
        if action == "up":
            already = server.status().running
            st = server.start()
            for name in buckets:
                server.ensure_bucket(name)
            say(f"pagoda s3: {'already running' if already else 'started'} (pid {st.pid})")
            _describe(st, say)
            if buckets:
                say(f"  buckets:     {', '.join(f's3://{b}/' for b in buckets)}")
            return 0
        if action == "down":
            others = [u for u in server.users() if u != "pinned"]
            pid = server.stop()
            say(f"pagoda s3: stopped (pid {pid})" if pid else "pagoda s3: not running")
            if pid and others:
                say(f"pagoda s3: note: {len(others)} process(es) were still using it (PIDs "
                    f"{', '.join(u.split('.')[0] for u in others)})")
            return 0
        st = server.status()
        say(f"pagoda s3: running (pid {st.pid})" if st.running else "pagoda s3: not running")
        _describe(st, say)
        if st.running:
            users = server.users()
            pids = [u.split(".")[0] for u in users if u != "pinned"]
            say(f"  kept up by:  {'`pagoda s3 up` (until `pagoda s3 down`)' if 'pinned' in users else ''}"
                f"{'; ' if 'pinned' in users and pids else ''}{'processes ' + ', '.join(pids) if pids else ''}")
        return 0 if st.running else EXIT_NOT_RUNNING
    except (StorageError, ValueError, OSError) as exc:
        print(f"pagoda s3 {action}: {exc}", file=sys.stderr)
        return 1
