"""`pagoda report`: one self-contained HTML page per run, plus the same data as JSON.

Stage wall times and images seen, the compute ledger (training FLOPs per stage, and what training the teacher at
the base resolution saved against the same teacher at the final resolution), the evaluation metrics with their
floors and baselines, curves (each stage's losses against its images seen, from RUN_URL/STAGE/metrics.jsonl; the
quality of each stage against the images the chain had seen up to it), and the sample grids inlined. Everything is
written beside the run (RUN_URL/report.html, report.json, curves/*.png) and into a local folder.

`publish_evaluation` adds the evaluation to each stage's wandb run: metrics and sample grid at the stage's images
seen, the run resumed by its id, its folder copied under RUN_URL/STAGE/wandb/.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
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
from pagoda_dist.runtime.results import METRICS_FILE, stage_results
from pagoda_dist.runtime.telemetry import NOT_LOSSES, finish_wandb, wandb_image
from pagoda_dist.runtime.trainer import default_local_dir
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
    curves = {name: png for name, png in (("loss", loss_curves(cfg)),
                                           ("quality", quality_curves(cfg, metrics, ledger))) if png is not None}
    page = _html(cfg, data, grids, curves)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.html").write_text(page)
    (out_dir / "report.json").write_text(json.dumps(data, indent=1))
    for name, png in grids.items():
        (out_dir / f"{name}.png").write_bytes(png)
    (out_dir / "curves").mkdir(exist_ok=True)
    for name, png in curves.items():
        (out_dir / "curves" / f"{name}.png").write_bytes(png)
        storage.write_bytes(storage.join(cfg.run_url, "curves", f"{name}.png"), png)
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


def _html(cfg: Config, data: dict[str, Any], grids: dict[str, bytes], curves: dict[str, bytes]) -> str:
    ledger, metrics, timings = data["ledger"], data["metrics"], data["timings_s"]
    stage_rows = [[name, row["resolution"], row["images"], timings.get(name, 0.0), row["flops_per_image"],
                   row["flops"] / 1e12] for name, row in ledger["stages"].items()]
    saving = ledger["teacher_saving"]
    parts = [f"<h1>PaGoDA run {html.escape(cfg.run.name)}</h1><p>{html.escape(data['run_url'])}</p>",
             f"<p>Teacher: {html.escape(data['teacher_origin'])}.</p>",
             "<h2>Stages and compute</h2>",
             _table(["stage", "px", "images", "wall s", "FLOPs / image", "TFLOPs"], stage_rows),
             (f"<p>Teacher training FLOPs per image: {saving['teacher_flops_per_image_at_base']:.3g} at "
              f"{cfg.model.resolution}px vs {saving['teacher_flops_per_image_at_final']:.3g} for the same network "
              f"at {saving['final_resolution']}px: <b>{saving['ratio']:.1f}x</b> less compute per image.</p>")]
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
    if curves:
        parts.append("<h2>Curves</h2>")
        for name, png in curves.items():
            parts.append(f"<figure><img src='{_data_url(png)}' style='max-width:100%'>"
                         f"<figcaption>{html.escape(CURVE_CAPTIONS[name])}</figcaption></figure>")
    if grids:
        parts.append("<h2>Samples</h2>")
        for name, png in grids.items():
            parts.append(f"<figure><img src='{_data_url(png)}' style='image-rendering:pixelated;width:384px'>"
                         f"<figcaption>{html.escape(name)}</figcaption></figure>")
    style = ("<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:0.2em 0.5em}figure{display:inline-block}</style>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(cfg.run.name)}</title>{style}" \
           f"</head><body>{''.join(parts)}</body></html>"


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


# ------------------------------------------------------------------------------------------------------ curves
CURVE_CAPTIONS = {
    "loss": "Each stage's losses (averaged over each log window) against its images seen",
    "quality": "Each stage's quality against the images the chain had seen up to it (lower is better except CLIP "
               "score); dashed: real vs real at the stage's resolution, hollow: bicubic from the stage below",
}
_PER_LEVEL = "swd/"  # per-level SWD is in the table; the curves show its average, swd/avg


def read_records(url: str) -> list[dict[str, float]]:
    """A stage's metrics.jsonl as records sorted by images seen, one per log point: where a resumed attempt
    replayed steps, its record (the one the run continued from) replaces the earlier one; a line cut short by a
    kill is skipped."""
    if not storage.exists(url):
        return []
    by_nimg: dict[int, dict[str, float]] = {}
    for line in storage.read_bytes(url).decode().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        by_nimg[int(record["nimg"])] = record
    return [by_nimg[n] for n in sorted(by_nimg)]


def _figure(panels: int) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:panels])


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def loss_curves(cfg: Config) -> bytes | None:
    """A PNG with one panel per stage that logged: its losses against its images seen (None: none logged)."""
    logged = {spec.name: records for spec in chain(cfg)
              if (records := read_records(storage.join(cfg.run_url, spec.name, METRICS_FILE)))}
    if not logged:
        return None
    fig, axes = _figure(len(logged))
    for ax, (name, records) in zip(axes, logged.items()):
        keys = [k for k in records[-1] if k not in NOT_LOSSES]
        kimg = [r["nimg"] / 1000 for r in records]
        # Loss weights (an adaptive GAN weight of 2 or 10) would squash the losses: they get an axis of their own.
        weights = [k for k in keys if "weight" in k]
        axis_of = {k: ax for k in keys if k not in weights}
        if weights:
            right = ax.twinx()
            right.set_ylabel("weight (dotted)")
            axis_of.update(dict.fromkeys(weights, right))
        for i, key in enumerate(keys):
            axis_of[key].plot(kimg, [r.get(key, float("nan")) for r in records], label=key, linewidth=1.2,
                              color=f"C{i}", linestyle=":" if key in weights else "-")
        ax.set(title=name, xlabel="kimg (images seen / 1000)", ylabel="loss")
        _tidy(ax)
        lines = [line for a in {id(a): a for a in axis_of.values()}.values() for line in a.get_lines()]
        ax.legend(lines, [line.get_label() for line in lines], fontsize=7)
    return _png(fig)


def _tidy(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # short runs give long tick labels that would overlap
    ax.grid(alpha=0.3)


def quality_curves(cfg: Config, metrics: dict[str, Any], ledger: dict[str, Any]) -> bytes | None:
    """A PNG with one panel per metric: each evaluated stage at the images the chain had seen up to and including
    it, the real-vs-real floor of its resolution and the bicubic baseline beside it (None: nothing evaluated)."""
    stages = metrics.get("stages", {})
    if not stages:
        return None
    seen, total = {}, 0
    for name, row in ledger["stages"].items():
        if name != "precompute":
            total += row["images"]
            seen[name] = total / 1000
    keys = [k for k in next(iter(stages.values()))["metrics"] if not k.startswith(_PER_LEVEL) or k == "swd/avg"]
    fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys):
        names = [n for n in stages if key in stages[n]["metrics"]]
        xs = [seen.get(n, 0.0) for n in names]
        ax.plot(xs, [stages[n]["metrics"][key] for n in names], "o-", color="C0", label="stage")
        for x, n in zip(xs, names):
            entry = stages[n]
            ax.annotate(f"{n} ({entry['resolution']}px)", (x, entry["metrics"][key]), fontsize=7,
                        textcoords="offset points", xytext=(3, 4))
            if key in entry.get("bicubic_from_below", {}):
                ax.plot([x], [entry["bicubic_from_below"][key]], "o", mfc="none", color="C1",
                        label="bicubic from below")
        for i, (res, floor) in enumerate(metrics.get("floor", {}).items()):
            if key in floor:
                ax.axhline(floor[key], linestyle="--", linewidth=1, color=f"C{2 + i}", label=f"real vs real {res}px")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        ax.set(title=key, xlabel="kimg seen by the chain")
        ax.margins(x=0.15, y=0.2)  # room for the stage labels
        _tidy(ax)
    return _png(fig)


# ------------------------------------------------------------------------------------------------------- wandb
def publish_evaluation(cfg: Config, results: dict[str, Any]) -> None:
    """Logs each stage's evaluation (metrics as eval/..., the sample grid as an image) into the stage's wandb run at
    its images seen, resuming the run by its id, and copies the run's folder under RUN_URL/STAGE/wandb/."""
    log = cfg.logging
    if log.wandb_mode == "disabled":
        return
    seen = _images_seen(cfg)
    for name, entry in results["stages"].items():
        run, sync = stage_results(storage.join(cfg.run_url, name), default_local_dir(cfg), wandb_mode=log.wandb_mode,
                                  wandb_project=log.wandb_project, run_name=cfg.run.name, stage=name)
        values: dict[str, Any] = {"nimg": seen.get(name, 0), **{f"eval/{k}": v for k, v in entry["metrics"].items()}}
        values.update({f"eval/bicubic/{k}": v for k, v in entry.get("bicubic_from_below", {}).items()})
        grid = storage.join(cfg.run_url, "eval", f"{name}.png")
        if storage.exists(grid):
            values["eval/samples"] = wandb_image(storage.read_bytes(grid))
        if run is not None:
            run.log(values)
            finish_wandb(run)
        sync.sync()
