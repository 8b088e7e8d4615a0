"""Images/s streamed by `StreamingReader` from the embedded S3 server vs local disk, at several resolutions.

    python benchmarks/data_stream.py                       # photo tiles at 64 px, streamed at 16, 32, 64 px
    python benchmarks/data_stream.py --workers 2 --batch 64 --epochs 2

Prepares builtin:photo-tiles once at 64 px on local disk, uploads the same committed folder to a fresh bucket of
an embedded SeaweedFS server (127.0.0.1, stopped by PID at the end), then streams each resolution from both,
alternating, and prints images/s side by side with the S3/local ratio (goal: >= 0.7). The figures include
decoding and on-the-fly downsampling, i.e. what a training loop gets.

On a busy shared machine wall-clock rates swing with other load, so the CPU time spent per image is printed too
(this process + DataLoader workers + the S3 server process); on a CPU-bound machine throughput is inversely
proportional to it, so "CPU ratio" = local CPU / S3 CPU is the load-independent estimate of the S3/local ratio.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import embedded_s3


def best_of(streams: dict[str, tuple[str, int | None]], res: int, args: argparse.Namespace
            ) -> tuple[dict[str, float], dict[str, float]]:
    """The best images/s and the least CPU ms per image of each stream (name -> (url, S3 server pid or None))
    over args.repeats epochs-long measurements, alternated so that drift on a shared machine hits every stream."""
    rates, cpu = dict.fromkeys(streams, 0.0), dict.fromkeys(streams, float("inf"))
    for _ in range(args.repeats):
        for name, (url, pid) in streams.items():
            rate, ms = stream_rate(url, resolution=res, batch=args.batch, workers=args.workers, epochs=args.epochs,
                                   window=args.window, server_pid=pid)
            rates[name], cpu[name] = max(rates[name], rate), min(cpu[name], ms)
    return rates, cpu


def cpu_seconds(server_pid: int | None) -> float:
    """CPU time of this process, its reaped children (DataLoader workers) and the S3 server so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    if server_pid is not None:  # the server is our child too, but is reaped only when it stops
        fields = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def stream_rate(url: str, *, resolution: int, batch: int, workers: int, epochs: float, window: int,
                server_pid: int | None) -> tuple[float, float]:
    """(images/s after a short warm-up, CPU ms per image over the whole run, S3 server included)."""
    from pagoda_dist.data.reader import StreamingReader

    cpu0 = cpu_seconds(server_pid)
    reader = StreamingReader(url, batch_size=batch, resolution=resolution, num_workers=workers, seed=1,
                             shuffle_window=window)
    total = int(epochs * reader.samples_per_epoch) // batch
    warmup = 2 * max(1, workers)
    start, seen, images = 0.0, 0, 0
    for i, b in enumerate(reader):
        if i == warmup:
            start, seen = time.perf_counter(), 0
        seen += len(b)
        images += len(b)
        if i >= warmup + total:
            break
    rate = seen / (time.perf_counter() - start)
    del b  # the loop above has exited: the DataLoader workers are joined (and their CPU time reaped) now
    return rate, (cpu_seconds(server_pid) - cpu0) / images * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs timed per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per cell (best kept)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many tiles")
    parser.add_argument("--window", type=int, default=1024,
                        help="shuffle window (data.shuffle_buffer); one range read fetches window/4 samples")
    args = parser.parse_args()

    from pagoda_dist import storage
    from pagoda_dist.data.prepare import prepare

    with tempfile.TemporaryDirectory(prefix="pagoda-bench-") as tmp:
        local = str(Path(tmp) / "tiles-64")
        report = prepare("builtin:photo-tiles", local, resolution=64, shard_size=500, workers=2,
                         limit=args.limit, progress=False)
        print(f"dataset: {report.counts['train']} train tiles at 64 px (PNG) in {len(report.shards['train'])} shards")
        server, bucket = embedded_s3(Path(tmp) / "s3")
        try:
            remote = storage.join(bucket, "tiles-64")
            storage.upload_dir(local, remote)
            print(f"S3: {server.endpoint}; batch {args.batch}, {args.workers} DataLoader workers, shuffle window "
                  f"{args.window}, {args.epochs} epoch(s) per measurement, best of {args.repeats}\n")
            print(f"{'res':>5} {'local img/s':>12} {'S3 img/s':>10} {'ratio':>6}   "
                  f"{'local CPU ms/img':>16} {'S3 CPU ms/img':>14} {'CPU ratio':>9}")
            pid = server.status().pid
            for res in args.resolutions:
                rates, cpu = best_of({"local": (local, None), "s3": (remote, pid)}, res, args)
                print(f"{res:>5} {rates['local']:>12.0f} {rates['s3']:>10.0f} {rates['s3'] / rates['local']:>6.2f}   "
                      f"{cpu['local']:>16.3f} {cpu['s3']:>14.3f} {cpu['local'] / cpu['s3']:>9.2f}", flush=True)
        finally:
            storage.configure()
            server.stop()


if __name__ == "__main__":
    main()
