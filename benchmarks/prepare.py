"""Images/s of `pagoda prepare` from an S3 class-folder source, built by 1 vs 2 Ray tasks, side by side.

    python benchmarks/prepare.py                                   # photo tiles, 128 px JPEGs -> 64 px shards
    python benchmarks/prepare.py --dataset fashion-mnist --limit 6000 --rounds 3

Writes the source once as JPEG class folders (ImageNet's layout: one folder per source photo for the tiles, per
class for Fashion-MNIST) to a fresh bucket of an embedded SeaweedFS server (127.0.0.1, stopped at the end), starts
a local Ray with one CPU per task of the largest count timed, warms the task workers up, then prepares the whole
source repeatedly, alternating the task counts (data.prepare_workers), each round into a fresh OUT. Each figure is
a whole prepare's wall time: the listing, shuffle and split, the shard tasks, the manifest and the commit. Every
round must write the same shard bytes whatever the task count; the benchmark checks that too.

The S3 server, the driver and the tasks share this machine's cores, so on a small machine the ratio says as much
about the machine as about prepare: the CPU count and load are printed with the figures.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import embedded_s3


def write_class_folders(dataset: str, tile: int, limit: int | None, root: Path) -> int:
    """The builtin dataset as JPEG files in class folders below `root`; returns the number of images."""
    from pagoda_dist.data import builtin

    source = builtin.build(dataset, resolution=tile, val_fraction=0.0, seed=0, limit=limit)
    for i, item in enumerate(source.items):
        label = item.group if source.class_names is None else source.class_names[int(item.cls or 0)]
        folder = root / "".join(c if c.isalnum() else "_" for c in label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(item.pixels).save(folder / f"{i:06d}.JPEG", quality=90)
    return len(source.items)


def shard_digests(url: str) -> dict[str, str]:
    from pagoda_dist import storage

    return {rel: hashlib.sha256(storage.read_bytes(storage.join(url, rel))).hexdigest()
            for rel in storage.list_files(url) if rel.endswith(".tar")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["photo-tiles", "fashion-mnist"], default="photo-tiles")
    parser.add_argument("--tile", type=int, default=128, help="side of the source JPEGs (photo tiles), px")
    parser.add_argument("--resolution", type=int, default=64, help="data.resolution of the shards, px")
    parser.add_argument("--shard-size", type=int, default=250, help="data.shard_size")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many source images")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2], help="Ray task counts to compare")
    parser.add_argument("--rounds", type=int, default=3, help="timed prepares per task count (alternating)")
    args = parser.parse_args()

    import ray

    from pagoda_dist import storage
    from pagoda_dist.config import Config
    from pagoda_dist.data.prepare import prepare
    from pagoda_dist.prepare_ray import RayShards
    from pagoda_dist.runtime.ray_session import worker_env

    settings = dict(resolution=args.resolution, image_format="jpeg", jpeg_quality=95, shard_size=args.shard_size,
                    val_fraction=0.01, progress=False)
    with tempfile.TemporaryDirectory(prefix="pagoda-bench-") as tmp:
        n = write_class_folders(args.dataset, args.tile, args.limit, Path(tmp) / "train")
        server, bucket = embedded_s3(Path(tmp) / "s3")
        try:
            src = storage.join(bucket, "imagenet-layout", "train")
            storage.upload_dir(Path(tmp) / "train", src)
            folders = len({rel.split("/")[0] for rel in storage.list_files(src)})
            ray.init(num_cpus=max(args.tasks), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            runner = RayShards(worker_env(Config()))
            # Warm-up: start every task worker process (and its imports) before anything is timed.
            prepare(src, storage.join(bucket, "warm-up"), workers=max(args.tasks), runner=runner,
                    **{**settings, "limit": max(args.tasks) * args.shard_size})
            print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs, load average "
                  f"{os.getloadavg()[0]:.1f} (shared with the S3 server and the driver)")
            print(f"source: {n} JPEGs ({args.dataset}, {args.tile} px) in {folders} class folders on {server.endpoint};"
                  f" shards: {args.resolution} px JPEG, {args.shard_size} per shard\n")
            rates: dict[int, list[float]] = {t: [] for t in args.tasks}
            reference: dict[str, str] | None = None
            for r in range(args.rounds):
                for tasks in args.tasks:  # alternating, so drift on a shared machine hits every count
                    out = storage.join(bucket, f"out-{tasks}-{r}")
                    start = time.perf_counter()
                    report = prepare(src, out, workers=tasks, runner=runner, **settings)
                    rate = report.inputs / (time.perf_counter() - start)
                    rates[tasks].append(rate)
                    digests = shard_digests(out)
                    reference = reference or digests
                    if digests != reference:
                        raise SystemExit(f"{out}: shards differ from the first round's; prepare must not depend on "
                                         "the task count")
                    print(f"round {r + 1}: {tasks} task(s) {rate:8.1f} img/s ({len(digests)} shards)", flush=True)
            base = statistics.median(rates[args.tasks[0]])
            print()
            for tasks in args.tasks:
                median = statistics.median(rates[tasks])
                print(f"{tasks} task(s): median {median:8.1f} img/s  ratio vs {args.tasks[0]}: {median / base:.2f}")
            print(f"shards identical across all {args.rounds * len(args.tasks)} prepares: yes")
        finally:
            if ray.is_initialized():
                ray.shutdown()
            storage.configure()
            server.stop()


if __name__ == "__main__":
    main()
