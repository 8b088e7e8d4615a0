"""Precompute throughput: a plain in-process loop vs the Ray actor pool with 1 and 2 actors, on the same inputs.

    python benchmarks/precompute.py [--images 256] [--shard-size 32] [--steps 18] [--workdir DIR]

All three invert the same image shards (builtin:photo-tiles, 64px RGB, teacher at 16px) with the same untrained
teacher (speed does not depend on the weights) and the same torch thread count per worker (1 per CPU of an
actor), and write committed pair shards. Ray is started once beforehand (as `pagoda run` does), so the actor
timings include actor start-up and teacher loading but not Ray's own start. Prints images/s, the ratio to the plain
loop (goal: 1 actor >= 0.9x), the 2-actor scaling efficiency, network evaluations per image, and checks that the
three outputs hold bit-identical latents.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pagoda_dist import storage  # noqa: E402
from pagoda_dist.config import Config, load_config  # noqa: E402
from pagoda_dist.data.manifest import read_manifest  # noqa: E402
from pagoda_dist.data.prepare import prepare  # noqa: E402
from pagoda_dist.data.shards import iter_shard  # noqa: E402
from pagoda_dist.models.unet import UNet  # noqa: E402
from pagoda_dist.precompute import ShardInverter, build_job, commit_teacher, run_precompute  # noqa: E402
from pagoda_dist.precompute.job import make_tasks  # noqa: E402


def config(root: Path, steps: int, output: str, actors: int) -> Config:
    overrides = {
        "run.root": str(root), "data.resolution": 64, "model.resolution": 16, "model.channels": 32,
        "model.channel_mult": "[1, 2]", "model.num_res_blocks": 1, "model.attn_resolutions": "[]",
        "precompute.solver": "heun", "precompute.steps": steps, "precompute.batch_size": 32,
        "precompute.psnr_samples": 0, "precompute.cpus_per_actor": 1, "precompute.min_actors": actors,
        "precompute.max_actors": actors, "precompute.output": str(root / output),
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def plain_loop(cfg: Config) -> float:
    """The same per-shard work with no Ray: one process, the actor's thread count. Returns wall seconds."""
    started = time.monotonic()
    job, inputs, _ = build_job(cfg)
    torch.set_num_threads(job.torch_threads)
    inverter = ShardInverter(job)
    for task in make_tasks(inputs, cfg.shards_url, cfg.pairs_url):
        inverter.process(task)
    return time.monotonic() - started


def shard_seconds(pairs_url: str, names: list[str], key: str) -> float:
    """Sum over shards of the wall (`seconds`) or CPU (`cpu_seconds`) time the worker recorded in the shard's
    commit marker: the work itself, without start-up. CPU time stays meaningful on a machine others load."""
    return sum(float(storage.read_commit(storage.join(pairs_url, n[: -len(".tar")])).meta[key]) for n in names)


def latents(pairs_url: str, names: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        stem = name[: -len(".tar")]
        for s in iter_shard(storage.join(pairs_url, stem, name)):
            out[f"{name}/{s.key}"] = s.arrays["latent"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=18, help="Karras points of the Heun inversion")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="pagoda-bench-precompute-"))

    import ray

    base = config(root, args.steps, "pairs-plain", 1)
    prepare("builtin:photo-tiles", base.shards_url, resolution=64, channels=3, shard_size=args.shard_size,
            limit=args.images, val_fraction=0.0, workers=1, progress=False)
    torch.manual_seed(0)
    commit_teacher(base.run_url, UNet(base.model))
    inputs = read_manifest(base.shards_url)
    names = [s.name for shards in inputs.splits.values() for s in shards]
    images = sum(inputs.count(k) for k in inputs.splits)

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    t = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, logging_level="WARNING",
             log_to_driver=False)
    ray_start = time.monotonic() - t

    rows = []  # (label, wall seconds, pairs url, load average when it started)
    load = os.getloadavg()[0]
    plain_s = plain_loop(base)
    rows.append(("plain loop (1 thread)", plain_s, base.pairs_url, load))
    evals = 0
    for actors in (1, 2):
        cfg = config(root, args.steps, f"pairs-{actors}", actors)
        load = os.getloadavg()[0]
        report = run_precompute(cfg, progress=False)
        evals = report.network_evals_per_latent
        rows.append((f"Ray, {actors} actor{'s' * (actors > 1)} (1 CPU each)", report.elapsed_s, cfg.pairs_url,
                     load))
    ray.shutdown()

    reference = latents(rows[0][2], names)
    others = [latents(url, names) for _, _, url, _ in rows[1:]]
    identical = all(other.keys() == reference.keys() and all(np.array_equal(v, other[k]) for k, v in
                                                             reference.items()) for other in others)
    one_actor = images / rows[1][1]
    print(f"\nprecompute benchmark: {images} images ({len(names)} shards of {args.shard_size}), 64px RGB -> 16px "
          f"teacher ({sum(p.numel() for p in UNet(base.model).parameters()) / 1e6:.2f}M params), Heun "
          f"{args.steps} points = {evals} network evaluations per image; {os.cpu_count()} CPUs; "
          f"Ray start {ray_start:.1f}s (not counted)")
    print(f"{'mode':32s} {'wall s':>8s} {'img/s':>8s} {'vs plain':>9s} {'shard wall s':>13s} "
          f"{'CPU ms/img':>11s} {'load avg':>9s}")
    for label, seconds, url, load in rows:
        rate = images / seconds
        cpu_ms = 1000 * shard_seconds(url, names, "cpu_seconds") / images
        print(f"{label:32s} {seconds:8.1f} {rate:8.2f} {rate / (images / plain_s):8.2f}x "
              f"{shard_seconds(url, names, 'seconds'):13.1f} {cpu_ms:11.1f} {load:9.1f}")
    two = images / rows[2][1]
    print(f"scaling efficiency 2 actors vs 1: {two / (2 * one_actor):.0%}; "
          f"1 actor vs plain loop: {one_actor / (images / plain_s):.2f}x (goal >= 0.9x); "
          f"latents identical across all three: {identical}")
    print(f"work dir: {root}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
