"""Quality against training time: every committed checkpoint of every stage of a run, evaluated.

Runs (or resumes) `pagoda run CONFIG` with checkpoints kept at a fine interval, then scores each committed
checkpoint against the same held-out real images and the same noise, so the curves are comparable point to point:

- teacher checkpoints with the teacher's sampler (config's solver / steps / guidance), at the base resolution;
- one-step student (distill) checkpoints at the base resolution, beside the final teacher's score: PaGoDA's
  student learns from real data, so it should reach the teacher;
- each grown stage's checkpoints at its resolution, beside the bicubic upsampling of the stage below (its final
  checkpoint, same noise): growing must add detail at the finest SWD level;
- the real-vs-real floor at every resolution.

Training time per checkpoint is the stage's own wall time of training (from its telemetry), without start-up.
Prints one table per stage and writes everything to --json.

    python benchmarks/quality_vs_time.py configs/tiny.yaml distill.train.total_kimg=20 --json q.json
    python benchmarks/quality_vs_time.py configs/tiles.yaml --every teacher=10,distill=4,grow=4
    python benchmarks/quality_vs_time.py configs/tiles.yaml --no-train --seeds 5   # final checkpoints, 5 noise draws
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import scipy.stats
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
from benchmarks.common import config_parser  # noqa: E402
from pagoda_dist.chain import StageSpec, chain, stage_spec  # noqa: E402
from pagoda_dist.config import Config, load_config  # noqa: E402
from pagoda_dist.data.tensors import downsample  # noqa: E402
from pagoda_dist.eval.evaluate import HeldOut, Scorer, bicubic, generate, held_out  # noqa: E402
from pagoda_dist.eval.fid import EFFNET_METRIC  # noqa: E402
from pagoda_dist.eval.inputs import load_export_network, load_network  # noqa: E402
from pagoda_dist.pipeline import local_storage, run_pipeline  # noqa: E402
from pagoda_dist.runtime import CheckpointStore  # noqa: E402


def parse_every(text: str) -> dict[str, float]:
    """'teacher=4,distill=2,grow=1' -> checkpoint interval (kimg) per stage kind."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in ("teacher", "distill", "grow") or not value:
            raise SystemExit(f"--every: expected teacher=K,distill=K,grow=K, got {item!r}")
        out[key] = float(value)
    return out


def training_seconds(cfg: Config, stage: str) -> dict[int, float]:
    """Cumulative training seconds at each logged image count, from the stage's metrics.jsonl (last record wins
    where a resumed attempt logged the same count again)."""
    path = Path("work") / "runs" / cfg.run.name / stage / "metrics.jsonl"
    if not path.exists():
        return {}
    records = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "sec_per_kimg" in row:
            records[int(row["nimg"])] = float(row["sec_per_kimg"])
    elapsed, previous, out = 0.0, 0, {}
    for nimg in sorted(records):
        elapsed += records[nimg] * (nimg - previous) / 1000
        out[nimg], previous = elapsed, nimg
    return out


def seconds_at(table: dict[int, float], nimg: int) -> float | None:
    """Training seconds at `nimg` (checkpoints fall on logging boundaries; else the nearest logged count)."""
    if not table:
        return None
    nearest = min(table, key=lambda n: abs(n - nimg))
    return table[nearest]


def evaluate_checkpoints(cfg: Config, spec: StageSpec, noise: torch.Tensor, data: HeldOut, score: Scorer,
                         below: torch.Tensor | None) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Scores every committed checkpoint of stage `spec`; returns the rows and the last checkpoint's images."""
    stage, res = spec.name, spec.resolution
    real = downsample(data.real, res)
    timeline = training_seconds(cfg, stage)
    bicubic_metrics = score(real, bicubic(below, res), data.captions) if below is not None else None
    rows, fake = [], None
    store = CheckpointStore(cfg.run_url, stage)
    for ref in store.committed():
        net = load_export_network(store.export_url(ref))
        fake = generate(cfg, net, noise, data.condition)
        row = {"kimg": ref.nimg / 1000, "train_s": seconds_at(timeline, ref.nimg),
               "metrics": score(real, fake, data.captions)}
        if bicubic_metrics is not None:
            row["bicubic_from_below"] = bicubic_metrics
        rows.append(row)
        print(f"[quality] {stage} {row['kimg']:.1f} kimg: " + line(row["metrics"]), flush=True)
    if fake is None:
        raise SystemExit(f"no committed checkpoint of {stage} under {cfg.run_url}")
    return rows, fake


def line(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in metrics.items())


def table(stage: str, res: int, rows: list[dict[str, Any]], floor: dict[str, float],
          reference: tuple[str, dict[str, float]] | None) -> str:
    """One stage's curve: kimg, training seconds, SWD at the finest level and on average, FID-EffNetLite0."""
    fine = f"swd/{res}"
    out = [f"\n{stage} ({res}px)", f"{'kimg':>7} {'train s':>8} {fine:>9} {'swd/avg':>8} {'FID-EffNetLite0':>16}"]
    for row in rows:
        m, t = row["metrics"], row["train_s"]
        out.append(f"{row['kimg']:7.1f} {t if t is not None else float('nan'):8.0f} {m[fine]:9.1f} "
                   f"{m['swd/avg']:8.1f} {m[EFFNET_METRIC]:16.1f}")
    if reference is not None:
        name, m = reference
        out.append(f"{name:>16} {m[fine]:9.1f} {m['swd/avg']:8.1f} {m[EFFNET_METRIC]:16.1f}")
    out.append(f"{'real-vs-real':>16} {floor[fine]:9.1f} {floor['swd/avg']:8.1f} {floor[EFFNET_METRIC]:16.1f}")
    return "\n".join(out)


def final_over_seeds(cfg: Config, data: HeldOut, score: Scorer, seeds: int) -> dict[str, list[dict[str, Any]]]:
    """The final checkpoint of every stage scored on `seeds` noise draws, each beside its reference on the same
    noise: the final teacher for the student, the bicubic x2 of the stage below for a grown stage.

    One draw's SWD moves by several percent with the noise, so a comparison is read from the paired differences.
    Seed 1 is the noise of the curves above.
    """
    specs = {spec.name: spec for spec in chain(cfg)}
    nets = {name: load_network(cfg, name) for name in specs}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name, spec in specs.items() if spec.kind != "teacher"}
    for seed in range(1, seeds + 1):
        g = torch.Generator().manual_seed(cfg.run.seed + seed)
        noise = torch.randn(cfg.eval.num_images, cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution,
                            generator=g)
        images = {stage: generate(cfg, net, noise, data.condition) for stage, net in nets.items()}
        below = "teacher"
        for stage in rows:
            res = specs[stage].resolution
            real = downsample(data.real, res)
            reference = images[below] if specs[stage].kind == "distill" else bicubic(images[below], res)
            rows[stage].append({"seed": seed, "metrics": score(real, images[stage], data.captions),
                                "reference": score(real, reference, data.captions)})
            below = stage
    return rows


def seeds_table(stage: str, res: int, rows: list[dict[str, Any]]) -> str:
    """Mean (sd) of the stage and its reference over the draws, and the paired change per draw."""
    reference = "final teacher" if stage == "distill" else "bicubic of below"
    out = [f"\n{stage} ({res}px), final checkpoint over {len(rows)} noise draws vs {reference} on the same noise"]
    for key in (f"swd/{res}", EFFNET_METRIC):
        ours = [r["metrics"][key] for r in rows]
        ref = [r["reference"][key] for r in rows]
        change = [a / b - 1 for a, b in zip(ours, ref)]
        spread = (lambda v: f" ({statistics.stdev(v):.1f})") if len(rows) > 1 else (lambda v: "")
        out.append(f"  {key:>16}: {statistics.mean(ours):.1f}{spread(ours)} vs {statistics.mean(ref):.1f}"
                   f"{spread(ref)}; change per draw {' '.join(f'{c:+.1%}' for c in change)}, median "
                   f"{statistics.median(change):+.1%}, lower in {sum(c < 0 for c in change)}/{len(change)}"
                   f"{mean_interval(change)}")
    return "\n".join(out)


def mean_interval(change: list[float]) -> str:
    """The mean paired change and its 95% t-interval: whether the draws can tell the stage from its reference at all
    (an interval across zero means they cannot, whichever way the mean points)."""
    if len(change) < 2:
        return ""
    mean = statistics.mean(change)
    half = scipy.stats.t.ppf(0.975, len(change) - 1) * statistics.stdev(change) / math.sqrt(len(change))
    return f"; mean {mean:+.1%}, 95% interval {mean - half:+.1%} to {mean + half:+.1%}"


def main() -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--every", default="teacher=4,distill=2,grow=1",
                        help="checkpoint interval in kimg per stage kind (all checkpoints are kept)")
    parser.add_argument("--no-train", action="store_true", help="only evaluate what the run has committed")
    parser.add_argument("--json", default=None, help="write the curves here")
    parser.add_argument("--seeds", type=int, default=0,
                        help="also score each stage's final checkpoint on this many noise draws, paired with its "
                             "reference (teacher / bicubic of the stage below)")
    args = parser.parse_args()

    every = parse_every(args.every)
    cfg = load_config(args.config, args.overrides)
    stages_of_kind = {kind: [spec.name for spec in chain(cfg) if spec.kind == kind]
                      for kind in ("teacher", "distill", "grow")}
    if not args.no_train:
        start = time.time()
        # One run per stage kind, each with its own checkpoint interval; steps already committed are skipped.
        for kind, interval in every.items():
            staged = load_config(args.config, [*args.overrides, f"logging.checkpoint_every_kimg={interval}",
                                               f"logging.log_every_kimg={interval}", "logging.keep_checkpoints=1000"])
            inputs = {"teacher": ["prepare"], "distill": ["precompute"], "grow": []}[kind]
            run_pipeline(staged, only=[*inputs, *stages_of_kind[kind]])
        print(f"[quality] training done in {time.time() - start:.0f} s", flush=True)

    torch.manual_seed(cfg.run.seed)
    results: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "num_images": cfg.eval.num_images,
                               "stages": {}, "floor": {}}
    with local_storage(cfg):
        data = held_out(cfg, cfg.eval.num_images)
        score = Scorer(cfg)
        g = torch.Generator().manual_seed(cfg.run.seed + 1)
        noise = torch.randn(cfg.eval.num_images, cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution,
                            generator=g)
        below = None
        report = []
        for spec in chain(cfg):
            stage, res = spec.name, spec.resolution
            if res not in results["floor"]:
                results["floor"][res] = score(downsample(data.real_floor, res), downsample(data.real, res),
                                              data.captions)
            rows, last = evaluate_checkpoints(cfg, spec, noise, data, score,
                                              below if res != cfg.model.resolution else None)
            results["stages"][stage] = rows
            reference = None
            if spec.kind == "distill":
                reference = ("final teacher", results["stages"]["teacher"][-1]["metrics"])
            elif spec.kind == "grow":
                reference = ("bicubic of below", rows[-1]["bicubic_from_below"])
            report.append(table(stage, res, rows, results["floor"][res], reference))
            if spec.kind != "teacher":
                below = last
        if args.seeds > 0:
            results["final_over_seeds"] = final_over_seeds(cfg, data, score, args.seeds)
            report.extend(seeds_table(stage, stage_spec(cfg, stage).resolution, rows)
                          for stage, rows in results["final_over_seeds"].items())
    print("\n".join(report))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"[quality] curves -> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
