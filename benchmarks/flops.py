"""What PaGoDA saves, counted: teacher training FLOPs at the base vs the full resolution, and one-step generation
vs the teacher's Heun sampler.

1. Training FLOPs per image (forward + backward, torch.utils.flop_counter) of the teacher UNet at its base
   resolution and of the same network run at each target resolution, next to the paper's claim (~64x for
   64 -> 512: the pixel ratio r^2). Two readings of "the same network at r x the resolution": attention kept at
   the same pixel resolutions (the convolutions scale by r^2), or attention moved with the image (its cost grows
   with the square of the token count, so faster than r^2). Counted on the meta device: no compute, any size.
2. Generation at equal (base) resolution: the teacher's sampler (its config's solver, steps and guidance) vs the
   one-step generator G(z) = F(c_in z, c_noise(sigma_max)): wall-clock time per image, network evaluations, FLOPs.

    python benchmarks/flops.py                                  # configs/*.yaml + the paper's ImageNet-64 teacher
    python benchmarks/flops.py --configs configs/tiny.yaml --device cuda --json flops.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
from pagoda_dist.config import ModelConfig, SamplerConfig, load_config  # noqa: E402
from pagoda_dist.diffusion import EDMPrecond, generator_output, sample  # noqa: E402
from pagoda_dist.interfaces import Condition  # noqa: E402
from pagoda_dist.models.unet import UNet  # noqa: E402
from pagoda_dist.runtime.flops import forward_flops_per_image, training_flops_per_image  # noqa: E402

# The reference teacher (docs/PAGODA.md): EDM's ImageNet-64 ADM UNet, grown to 512 by PaGoDA.
PAPER_MODEL = ModelConfig(resolution=64, channels=192, channel_mult=[1, 2, 3, 4], num_res_blocks=3,
                          attn_resolutions=[32, 16, 8], head_channels=64, num_classes=1000, channels_last=False)
PAPER_TARGETS = [128, 256, 512]
PAPER_CLAIM = 64.0  # "the teacher trained at 8x lower resolution costs ~64x less compute"
SIGMA_MAX = 80.0


def dummy_condition(cfg: ModelConfig, batch: int, device: torch.device) -> Condition:
    """A condition of the right shape for the model: class labels, or a 77-token text embedding, or none."""
    if cfg.num_classes:
        return Condition(class_labels=torch.zeros(batch, dtype=torch.long, device=device))
    if cfg.text_dim:
        return Condition(text_pooled=torch.zeros(batch, cfg.text_dim, device=device),
                         text_tokens=torch.zeros(batch, 77, cfg.text_dim, device=device),
                         text_mask=torch.ones(batch, 77, dtype=torch.bool, device=device))
    return Condition()


def unet_call(cfg: ModelConfig):
    """The ForwardFn for the flop counter: F(x, c_noise, cond) with a condition built for x's batch."""
    def call(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net(x, torch.zeros(x.shape[0], device=x.device), dummy_condition(cfg, x.shape[0], x.device))
    return call


def at_resolution(cfg: ModelConfig, resolution: int, move_attention: bool) -> ModelConfig:
    factor = resolution // cfg.resolution
    attn = [a * factor for a in cfg.attn_resolutions] if move_attention else list(cfg.attn_resolutions)
    return dataclasses.replace(cfg, resolution=resolution, attn_resolutions=attn, channels_last=False)


def train_gflops(cfg: ModelConfig) -> float:
    with torch.device("meta"):
        net = UNet(cfg)
    return training_flops_per_image(net, (cfg.in_channels, cfg.resolution, cfg.resolution), unet_call(cfg),
                                    batch_size=1) / 1e9


def training_rows(name: str, cfg: ModelConfig, targets: list[int]) -> list[dict[str, Any]]:
    base = train_gflops(cfg)
    rows = []
    for res in targets:
        same_attn = train_gflops(at_resolution(cfg, res, move_attention=False))
        moved_attn = train_gflops(at_resolution(cfg, res, move_attention=True))
        rows.append({"config": name, "base_res": cfg.resolution, "target_res": res,
                     "base_train_gflop_per_img": base, "target_train_gflop_per_img_same_attn": same_attn,
                     "target_train_gflop_per_img_moved_attn": moved_attn,
                     "ratio_same_attn": same_attn / base, "ratio_moved_attn": moved_attn / base,
                     "pixel_ratio": (res / cfg.resolution) ** 2,
                     "paper_claim": PAPER_CLAIM if (cfg.resolution, res) == (64, 512) else None})
    return rows


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def generation_row(name: str, cfg: ModelConfig, sampler: SamplerConfig, batch: int, repeats: int,
                   device: torch.device) -> dict[str, Any]:
    """Teacher sampler vs one step at the base resolution, untrained weights (cost does not depend on them)."""
    torch.manual_seed(0)
    net = UNet(cfg).to(device).eval()
    denoiser = EDMPrecond(net)
    shape = (batch, cfg.in_channels, cfg.resolution, cfg.resolution)
    noise = torch.randn(shape, device=device)
    cond = dummy_condition(cfg, batch, device)
    null = Condition.null if sampler.guidance != 1.0 else None
    result = {}

    def teacher() -> None:
        result["ode"] = sample(denoiser, noise, cond, solver=sampler.solver, steps=sampler.steps,
                               guidance=sampler.guidance, null_cond=null, clamp=sampler.clamp)

    def one_step() -> None:
        generator_output(net, noise * SIGMA_MAX, cond, SIGMA_MAX)

    t_teacher = _median_seconds(teacher, repeats, device)
    t_one = _median_seconds(one_step, repeats, device)
    ode = result["ode"]
    fwd = forward_flops_per_image(net, shape[1:], unet_call(cfg), batch_size=1) / 1e9
    return {"config": name, "resolution": cfg.resolution, "device": str(device), "batch": batch,
            "sampler": f"{sampler.solver}-{sampler.steps} guidance {sampler.guidance}",
            "teacher_nfe": ode.nfe, "teacher_network_evals": ode.network_evals, "one_step_network_evals": 1,
            "teacher_ms_per_img": 1e3 * t_teacher / batch, "one_step_ms_per_img": 1e3 * t_one / batch,
            "speedup": t_teacher / t_one, "network_eval_ratio": ode.network_evals,
            "teacher_gflop_per_img": fwd * ode.network_evals, "one_step_gflop_per_img": fwd}


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(fmt(r[c]) for c in columns) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=sorted(str(p) for p in (ROOT / "configs").glob("*.yaml")),
                        help="YAML configs: base = model.resolution, targets = grow.resolutions (default: configs/)")
    parser.add_argument("--no-paper", action="store_true", help="skip the inline ImageNet-64 -> 512 teacher")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="images per generation call")
    parser.add_argument("--repeats", type=int, default=3, help="timed generation calls (median)")
    parser.add_argument("--time-paper", action="store_true",
                        help="also time generation with the paper-size teacher (slow on a CPU)")
    parser.add_argument("--json", type=Path, default=None, help="write all rows to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)

    models: list[tuple[str, ModelConfig, list[int], SamplerConfig | None]] = []
    for path in args.configs:
        cfg = load_config(path)
        targets = cfg.grow.resolutions or [cfg.data.resolution]
        models.append((Path(path).stem, cfg.model, targets, cfg.teacher.sampler))
    if not args.no_paper:
        paper_sampler = SamplerConfig(solver="heun", steps=18, guidance=1.0)
        models.append(("paper-imagenet64", PAPER_MODEL, PAPER_TARGETS, paper_sampler if args.time_paper else None))

    train = [row for name, cfg, targets, _ in models for row in training_rows(name, cfg, targets)]
    print("## Teacher training FLOPs per image: base vs target resolution")
    print_table(train, ["config", "base_res", "target_res", "base_train_gflop_per_img",
                        "target_train_gflop_per_img_same_attn", "ratio_same_attn", "ratio_moved_attn",
                        "pixel_ratio", "paper_claim"])

    gen = [generation_row(name, cfg, sampler, args.batch, args.repeats, device)
           for name, cfg, _, sampler in models if sampler is not None]
    print("\n## Generation at the base resolution: teacher sampler vs one step")
    print_table(gen, ["config", "resolution", "device", "sampler", "teacher_network_evals", "teacher_ms_per_img",
                      "one_step_ms_per_img", "speedup", "teacher_gflop_per_img", "one_step_gflop_per_img"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"training": train, "generation": gen}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
