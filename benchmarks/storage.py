"""Large-object write and read throughput: the embedded S3 server next to local disk, in one run.

    python benchmarks/storage.py [--size-mb 128] [--repeats 3]

Starts its own SeaweedFS server on free loopback ports in a temporary folder (stopped by PID at the end), writes
and reads one object of --size-mb through `pagoda_dist.storage` (the same calls training uses) --repeats times
per target, and prints median MB/s per target and the local/S3 ratio. Local reads usually come from the page
cache, as they would for a checkpoint read back soon after it was written.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pagoda_dist import storage  # noqa: E402
from pagoda_dist.storage import LocalS3Server, free_port_block  # noqa: E402


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(url: str, data: bytes, repeats: int) -> tuple[list[float], list[float]]:
    """Write then read `data` at `url` `repeats` times; MB/s of each write and each read (1 MB = 10^6 bytes)."""
    digest = hashlib.sha256(data).digest()
    writes, reads = [], []
    for _ in range(repeats):
        seconds, _ = _timed(lambda: storage.write_bytes(url, data))
        writes.append(len(data) / seconds / 1e6)
        seconds, back = _timed(lambda: storage.read_bytes(url))
        reads.append(len(data) / seconds / 1e6)
        if hashlib.sha256(back).digest() != digest:  # a benchmark of wrong bytes measures nothing
            raise RuntimeError(f"read back from {url} differs from what was written")
        del back
    return writes, reads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=128, help="object size in MB (10^6 bytes)")
    parser.add_argument("--repeats", type=int, default=3, help="writes and reads per target")
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a new temp folder)")
    args = parser.parse_args(argv)
    if args.size_mb < 1 or args.repeats < 1:
        parser.error("--size-mb and --repeats must be >= 1")

    data = os.urandom(args.size_mb * 10**6)  # incompressible, like weights
    with tempfile.TemporaryDirectory(prefix="pagoda-bench-", dir=args.dir) as work:
        server = LocalS3Server(Path(work) / "s3", port=free_port_block())
        server.start()
        try:
            bucket = server.ensure_bucket("bench")
            os.environ.update(server.env())
            storage.configure(endpoint_url=server.endpoint, region=server.region)
            results = {
                "local disk": measure(str(Path(work) / "local" / "object.bin"), data, args.repeats),
                "embedded S3": measure(storage.join(bucket, "object.bin"), data, args.repeats),
            }
        finally:
            server.stop()

    med = {name: (statistics.median(w), statistics.median(r)) for name, (w, r) in results.items()}
    print(f"object {args.size_mb} MB, {args.repeats} repeats, medians (MB/s); S3 = SeaweedFS on 127.0.0.1")
    print(f"{'target':<14}{'write MB/s':>12}{'read MB/s':>12}")
    for name, (w, r) in med.items():
        print(f"{name:<14}{w:>12.1f}{r:>12.1f}")
    (lw, lr), (sw, sr) = med["local disk"], med["embedded S3"]
    print(f"{'local / S3':<14}{lw / sw:>11.1f}x{lr / sr:>11.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
