"""`pagoda report`: one self-contained HTML page per run, plus the same data as JSON.

Stage wall times and images seen, the compute ledger (training FLOPs per stage, and what training the teacher at
the base resolution saved against the same teacher at the final resolution), the evaluation metrics with their
floors and baselines, and the sample grids inlined.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pagoda_dist import storage
from pagoda_dist.chain import StageSpec, chain
from pagoda_dist.config import Config
from pagoda_dist.data.manifest import read_manifest
from pagoda_dist.interfaces import Condition
from pagoda_dist.models.unet import UNet
from pagoda_dist.runtime import CheckpointStore
from pagoda_dist.runtime.flops import forward_flops_per_image, training_flops_per_image
from pagoda_dist.stages.networks import stage_networks


def shape_condition(cfg: Config, n: int, device: torch.device) -> Condition:
    if cfg.model.num_classes:
        return Condition(class_labels=torch.zeros(n, dtype=torch.long, device=device))
    if cfg.model.text_dim:  # CLIP's 77-token context: cross-attention is counted at its usual length
        return Condition(text_pooled=torch.zeros(n, cfg.model.text_dim, device=device),
                         text_tokens=torch.zeros(n, 77, cfg.model.text_dim, device=device),
                         text_mask=torch.ones(n, 77, dtype=torch.bool, device=device))
    return Condition()


def unet(cfg: Config, resolution: int) -> UNet:
    """The teacher network of `cfg` run at `resolution`."""
    return UNet(dataclasses.replace(cfg.model, resolution=resolution))


def meta_networks(cfg: Config, spec: StageSpec) -> tuple[nn.Module, ...]:
    """`stages.networks.stage_networks` on torch's meta device: shapes only, no memory, any size."""
    with torch.device("meta"), warnings.catch_warnings():
        # a backbone's pretrained weights land on meta parameters as a no-op, which torch warns about per tensor
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        return stage_networks(cfg, spec)


def _unet_flops(cfg: Config, resolution: int, training: bool) -> float:
    with torch.device("meta"):  # FLOPs depend on shapes only: no memory, no compute, any size
        net = unet(cfg, resolution)
    count = training_flops_per_image if training else forward_flops_per_image
    return count(net, (cfg.model.in_channels, resolution, resolution),
                 lambda m, x: m(x, torch.zeros(len(x), device=x.device), shape_condition(cfg, len(x), x.device)))


def _adversarial_flops(cfg: Config, spec: StageSpec) -> float:
    """Per training image: G forward+backward on the latent, and on fresh noise when a GAN, distillation or CLIP
    term uses it (one update of both halves, or a split step's two updates: the same passes); with a GAN, D
    forward+backward three times (real and fake in its own step, fake in the generator's); with a reconstruction
    discriminator, it too three times (real and reconstruction in its own step, reconstruction in the generator's;
    its step reuses the reconstructions). The teacher's samples for the distillation term and the CLIP tower are
    not counted."""
    adv, resolution = spec.adversarial(cfg), spec.resolution
    g, *discriminators = meta_networks(cfg, spec)  # none for reconstruction alone; the main one, then the recon one
    g.requires_grad_(True)  # count the full backward through the frozen base too (it is computed for the input)
    c, base = cfg.model.in_channels, cfg.model.resolution
    g_flops = training_flops_per_image(g, (c, base, base), lambda m, x: m(x, shape_condition(cfg, len(x), x.device)))
    def d_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(m(x, shape_condition(cfg, len(x), x.device))).sum(0)

    d_flops = sum(training_flops_per_image(d, (c, resolution, resolution), d_forward)
                  for d in discriminators) if adv.uses_gan else 0.0
    return (2 if adv.uses_noise_half else 1) * g_flops + 3 * d_flops


def compute_ledger(cfg: Config, images_seen: dict[str, int]) -> dict[str, Any]:
    """Training FLOPs per stage, and the teacher's saving from training at the base resolution."""
    base = cfg.model.resolution
    final = cfg.grow.resolutions[-1] if cfg.grow.resolutions else base
    rows: dict[str, Any] = {}
    for spec in chain(cfg):
        per_image = _unet_flops(cfg, base, True) if spec.kind == "teacher" else _adversarial_flops(cfg, spec)
        rows[spec.name] = {"resolution": spec.resolution, "flops_per_image": per_image,
                           "images": images_seen.get(spec.name, 0), "flops": per_image * images_seen.get(spec.name, 0)}
    pre = cfg.precompute
    nfe = 2 * (pre.steps - 1) if pre.solver == "heun" else pre.steps - 1  # network evaluations per inversion
    inverted = images_seen.get("precompute", 0)
    rows["precompute"] = {"resolution": base, "nfe_per_image": nfe, "images": inverted,
                          "flops_per_image": nfe * _unet_flops(cfg, base, False)}
    rows["precompute"]["flops"] = rows["precompute"]["flops_per_image"] * inverted
    teacher_full = _unet_flops(cfg, final, True)
    saving = {"teacher_flops_per_image_at_base": rows["teacher"]["flops_per_image"],
              "teacher_flops_per_image_at_final": teacher_full, "final_resolution": final,
              "ratio": teacher_full / rows["teacher"]["flops_per_image"]}
    return {"stages": rows, "teacher_saving": saving}


def _images_seen(cfg: Config) -> dict[str, int]:
    seen = {}
    for spec in chain(cfg):
        latest = CheckpointStore(cfg.run_url, spec.name).latest_committed()
        seen[spec.name] = latest.nimg if latest else 0
    if storage.is_committed(cfg.pairs_url):
        manifest = read_manifest(cfg.pairs_url)
        seen["precompute"] = sum(manifest.count(split) for split in manifest.splits)
    return seen


def teacher_origin(cfg: Config) -> str:
    """Where the run's teacher came from, in one sentence (its latest committed checkpoint's meta.json)."""
    spec = next(s for s in chain(cfg) if s.kind == "teacher")
    store = CheckpointStore(cfg.run_url, spec.name)
    latest = store.latest_committed()
    if latest is None:
        return "no committed teacher checkpoint"
    meta = store.read_meta(latest)
    if "origin" in meta:
        layout = {"adm": "an ADM-layout state dict, converted"}.get(meta["origin"]["layout"], "a teacher export")
        return f"imported from {meta['origin']['url']} ({layout}); not trained in this run"
    if meta.get("imported"):
        return "committed from outside the run (origin not recorded); not trained in this run"
    return f"trained in this run ({latest.nimg} images)"


def _read_json(url: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else {}


def build_report(cfg: Config, out_dir: Path) -> Path:
    """Writes report.html and report.json into `out_dir` and beside the run; returns the local HTML path."""
    timings = _read_json(storage.join(cfg.run_url, "timings.json"))
    metrics = _read_json(storage.join(cfg.run_url, "eval", "metrics.json"))
    ledger = compute_ledger(cfg, _images_seen(cfg))
    grids = {}
    for name in ["real", *(spec.name for spec in chain(cfg))]:
        url = storage.join(cfg.run_url, "eval", f"{name}.png")
        if storage.exists(url):
            grids[name] = storage.read_bytes(url)
    data = {"run": cfg.run.name, "run_url": cfg.run_url, "teacher_origin": teacher_origin(cfg), "timings_s": timings,
            "ledger": ledger, "metrics": metrics}
    page = _html(cfg, data, grids)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.html").write_text(page)
    (out_dir / "report.json").write_text(json.dumps(data, indent=1))
    for name, png in grids.items():
        (out_dir / f"{name}.png").write_bytes(png)
    storage.write_bytes(storage.join(cfg.run_url, "report.html"), page.encode())
    storage.write_bytes(storage.join(cfg.run_url, "report.json"), json.dumps(data, indent=1).encode())
    return out_dir / "report.html"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e4 or (value and abs(value) < 0.01) else f"{value:.2f}"
    return str(value)


def _html(cfg: Config, data: dict[str, Any], grids: dict[str, bytes]) -> str:
    ledger, metrics, timings = data["ledger"], data["metrics"], data["timings_s"]
    stage_rows = [[name, row["resolution"], row["images"], timings.get(name, 0.0), row["flops_per_image"],
                   row["flops"] / 1e12] for name, row in ledger["stages"].items()]
    saving = ledger["teacher_saving"]
    parts = [f"<h1>PaGoDA run {html.escape(cfg.run.name)}</h1><p>{html.escape(data['run_url'])}</p>",
             f"<p>Teacher: {html.escape(data['teacher_origin'])}.</p>",
             "<h2>Stages and compute</h2>",
             _table(["stage", "px", "images", "wall s", "FLOPs / image", "TFLOPs"], stage_rows),
             f"<p>Teacher training FLOPs per image: {saving['teacher_flops_per_image_at_base']:.3g} at "
             f"{cfg.model.resolution}px vs {saving['teacher_flops_per_image_at_final']:.3g} for the same network at "
             f"{saving['final_resolution']}px: <b>{saving['ratio']:.1f}x</b> less compute per image.</p>"]
    if metrics:
        parts.append(f"<h2>Quality ({metrics['num_images']} generated vs {metrics['num_images']} held-out real "
                     "images; SWD x1e3 per level, FID-EffNetLite0)</h2>")
        rows = []
        for res, floor in metrics["floor"].items():
            rows.append([f"real vs real ({res}px)", *[f"{k} {v:.1f}" for k, v in floor.items()]])
        for stage, entry in metrics["stages"].items():
            rows.append([stage, *[f"{k} {v:.1f}" for k, v in entry["metrics"].items()]])
            if "bicubic_from_below" in entry:
                rows.append([f"bicubic to {entry['resolution']}px",
                             *[f"{k} {v:.1f}" for k, v in entry["bicubic_from_below"].items()]])
        parts.append(_table(["set", "metrics"], [[r[0], "; ".join(r[1:])] for r in rows]))
    if grids:
        parts.append("<h2>Samples</h2>")
        for name, png in grids.items():
            src = "data:image/png;base64," + base64.b64encode(png).decode()
            parts.append(f"<figure><img src='{src}' style='image-rendering:pixelated;width:384px'>"
                         f"<figcaption>{html.escape(name)}</figcaption></figure>")
    style = ("<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:0.2em 0.5em}figure{display:inline-block}</style>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(cfg.run.name)}</title>{style}" \
           f"</head><body>{''.join(parts)}</body></html>"
