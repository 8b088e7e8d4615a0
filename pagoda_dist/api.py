"""Use what was trained: load an export from any storage URL and generate images, on the CPU or a GPU.

    from pagoda_dist import load_generator, save_grid
    model = load_generator("s3://bucket/runs/NAME/grow-64")     # a stage: its latest committed checkpoint
    images = model.generate(16, classes=[3], seed=0)          # (16, C, 64, 64) in [-1, 1], on the CPU
    save_grid(images, "samples.png")

`url` is a stage folder (RUN/STAGE, or RUN with `stage=`), a checkpoint folder (RUN/STAGE/step-N) or an export file:
.safetensors (loads without unpickling) or .pt. A folder gives its export.safetensors, or the export.pt of a
checkpoint saved before that file existed. What sampling needs comes from the export's record (the stage's
`export_metadata`): the architecture, the EDM noise levels, the teacher's PF-ODE sampler (a teacher export is sampled
with it; a guidance-aware generator takes its guidance scale as the default), the condition kind and, for text, the
CLIP text tower that embedded the training captions: prompts go through that tower and the same float16 rounding
(`TextEmbedding.stored_condition`). Exports written before the record existed take it from the run's config.
Object storage is reached as this process is configured (`storage.configure`, or the AWS_* environment).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pagoda_dist import storage
from pagoda_dist.config import Config, DiffusionConfig, SamplerConfig
from pagoda_dist.data.grid import save_grid
from pagoda_dist.interfaces import Condition
from pagoda_dist.models.checkpoint_safety import model_from_architecture
from pagoda_dist.models.generator import OneStepGenerator, with_sampling_guidance
from pagoda_dist.models.unet import UNet
from pagoda_dist.runtime.checkpoint import (EXPORT_NAME, EXPORT_SAFETENSORS, CheckpointStore, ExportUnreadable,
                                            export_record, load_export)
from pagoda_dist.runtime.worker import EXPORT_FORMAT
from pagoda_dist.stages.base import export_metadata
from pagoda_dist.stages.teacher import sample_teacher

EXPORT_SUFFIXES = (".safetensors", ".pt")


class GeneratorError(ValueError):
    """An export that cannot be loaded (missing, damaged, mismatched), or a request it cannot serve."""


def _one_line(err: BaseException) -> str:
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def resolve_export(url: str, stage: str | None = None) -> str:
    """The export file `url` names: the file itself, a checkpoint folder's export, or a stage's latest one."""
    url = storage.join(url, stage) if stage else url
    if url.endswith(EXPORT_SUFFIXES):
        return url
    if not storage.is_committed(url):  # not a checkpoint folder: a stage folder
        parent, name = url.rstrip("/").rsplit("/", 1) if "/" in url.rstrip("/") else (".", url)
        ref = CheckpointStore(parent, name).latest_committed()
        if ref is None:
            held = [u.rstrip("/").rsplit("/", 1)[-1] for u in storage.list_dir(url)]
            what = "it holds " + ", ".join(held[:5]) if held else "nothing is there"
            raise GeneratorError(f"{url}: no committed checkpoint there ({what}); "
                                 "give a stage folder (RUN/STAGE, or RUN with stage=), a checkpoint folder "
                                 f"(RUN/STAGE/step-N) or an export file ({' / '.join(EXPORT_SUFFIXES)})")
        url = ref.url
    parts = storage.read_commit(url).parts
    for name in (EXPORT_SAFETENSORS, EXPORT_NAME):
        if name in parts:
            return storage.join(url, name)
    raise GeneratorError(f"checkpoint {url} holds no export (parts: {', '.join(sorted(parts))})")


class ExportedModel:
    """The EMA network of an export with what sampling it needs; `generate` turns seeds and conditions into images.

    `sampler` (the teacher's PF-ODE settings and the default guidance scale) starts as recorded; replace it to sample
    otherwise, e.g. `model.sampler = dataclasses.replace(model.sampler, steps=40)`.
    """

    def __init__(self, net: UNet | OneStepGenerator, record: dict[str, Any], source: str,
                 clip_weights: str | None = None) -> None:
        self.net = net.eval().requires_grad_(False)
        self.record = record              # the export without its weights (stage, nimg, architecture, metadata)
        self.source = source              # the export file it came from
        self.clip_weights = clip_weights  # a local copy of the recorded text tower's weights (None: the recorded path)
        self._text_encoder: Any = None
        meta = record["metadata"]
        try:
            self.diffusion = DiffusionConfig(**meta["diffusion"])
            self.sampler = SamplerConfig(**meta["sampler"])
        except (TypeError, ValueError) as err:
            raise GeneratorError(f"{source}: unusable sampling record ({_one_line(err)})") from None

    # ------------------------------------------------------------------------------------------------ facts
    @property
    def stage(self) -> str:
        return str(self.record.get("stage", self.net.architecture()["stage"]))

    @property
    def nimg(self) -> int | None:
        """Images the network had seen when exported (None when the export does not say)."""
        return self.record.get("nimg")

    @property
    def resolution(self) -> int:
        return self.net.resolution if isinstance(self.net, OneStepGenerator) else self.net.cfg.resolution

    @property
    def is_teacher(self) -> bool:
        """A diffusion teacher (sampled with its PF-ODE sampler), not a one-step generator."""
        return isinstance(self.net, UNet)

    @property
    def condition(self) -> str:
        """'class', 'text' or 'none'."""
        return self.record["metadata"]["condition"]

    @property
    def num_classes(self) -> int:
        return self.net.cfg.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> ExportedModel:
        """Moves the network (and the text tower, once built) to `device`."""
        self.net.to(device)
        if self._text_encoder is not None:
            self._text_encoder.to(device)
        return self

    # ------------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, n: int | None = None, *, classes: int | Sequence[int] | Tensor | None = None,
                 prompts: str | Sequence[str] | None = None, guidance: float | None = None, seed: int = 0,
                 device: str | torch.device | None = None, batch_size: int = 64) -> Tensor:
        """`n` images (N, C, H, W) in [-1, 1] as float32 on the CPU, the same for the same seed on every device
        (up to float rounding): unit noise drawn on the CPU from `seed`, one step of a generator or the teacher's
        PF-ODE sampler.

        n:         how many (default: one per class or prompt given, else 1); classes and prompts repeat in turn.
        classes:   class ids of a class-conditional model (default: 0, 1, ... in turn).
        prompts:   captions of a text-conditioned model (required there).
        guidance:  classifier-free guidance scale of the teacher's sampler or of a guidance-aware generator
                   (default: the recorded teacher.sampler.guidance); other generators have no such input.
        device:    where to run (the model moves there and stays); default: where it is.
        """
        if device is not None:
            self.to(device)
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if n is None:
            n = len(prompts) if prompts is not None else len(_as_labels(classes)) if classes is not None else 1
        if n < 1 or batch_size < 1:
            raise GeneratorError(f"n={n} and batch_size={batch_size} must be >= 1")
        scale = self._guidance(guidance)
        cond = self._condition(n, classes, prompts)
        m = self.net.cfg
        noise = torch.randn(n, m.in_channels, m.resolution, m.resolution, generator=torch.Generator().manual_seed(seed))
        out = []
        for i in range(0, n, batch_size):
            z = noise[i:i + batch_size].to(self.device)
            c = cond if cond.is_empty else cond[i:i + batch_size].to(self.device)
            if isinstance(self.net, OneStepGenerator):
                images = self.net(z * self.net.sigma_max, with_sampling_guidance(self.net, c, scale)).clamp(-1, 1)
            else:
                images = sample_teacher(self.net, z, c, self.diffusion, self.sampler, scale)
            out.append(images.float().cpu())
        return torch.cat(out)

    def _guidance(self, guidance: float | None) -> float:
        if guidance is None:
            return self.sampler.guidance
        if guidance < 0:
            raise GeneratorError(f"guidance {guidance}: the guidance scale must be >= 0")
        if isinstance(self.net, OneStepGenerator) and not self.net.guidance_input:
            raise GeneratorError(f"guidance {guidance}: this generator was not trained guidance-aware "
                                 "(distill.adversarial.guidance_range); it has no guidance input")
        if self.condition == "none":
            raise GeneratorError(f"guidance {guidance}: an unconditional model has no condition to guide towards")
        return float(guidance)

    def _condition(self, n: int, classes: int | Sequence[int] | Tensor | None,
                   prompts: Sequence[str] | None) -> Condition:
        kind = self.condition
        if kind != "class" and classes is not None:
            raise GeneratorError(f"{self.stage} is {_KINDS[kind]}: it takes no classes")
        if kind != "text" and prompts is not None:
            raise GeneratorError(f"{self.stage} is {_KINDS[kind]}: it takes no prompts")
        order = torch.arange(n)
        if kind == "class":
            labels = order % self.num_classes if classes is None else _as_labels(classes)
            if len(labels) == 0 or labels.min() < 0 or labels.max() >= self.num_classes:
                raise GeneratorError(f"classes {labels.tolist()}: class ids run from 0 to {self.num_classes - 1}")
            return Condition(class_labels=labels[order % len(labels)])
        if kind == "text":
            if not prompts:
                raise GeneratorError(f"{self.stage} is text-conditioned: give prompts (one or more captions)")
            return self.embed(list(prompts))[order % len(prompts)]
        return Condition()

    def embed(self, prompts: list[str]) -> Condition:
        """The text condition of `prompts` as the stages were trained on it: the recorded CLIP text tower, float16
        rounding (`TextEmbedding.stored_condition`)."""
        return self.text_encoder()(prompts).stored_condition()

    def text_encoder(self) -> Any:
        """The recorded CLIP text tower (`models.text_encoder.TextEncoder`), built on first use."""
        if self._text_encoder is None:
            from pagoda_dist.models.text_encoder import TextEncoder, TextEncoderError

            spec = self.record["metadata"].get("text_encoder") or {}
            weights = self.clip_weights or spec.get("weights")
            random_init = bool(weights is None and spec.get("random_init"))
            try:
                encoder = TextEncoder(spec["arch"], weights, random_init)
            except (KeyError, TextEncoderError) as err:
                raise GeneratorError(f"{self.source}: the recorded text tower {spec} cannot be built "
                                     f"({_one_line(err)}); pass clip_weights= a local copy of its weights") from None
            if encoder.dim != self.net.cfg.text_dim:
                raise GeneratorError(f"the text tower {spec.get('arch')} embeds to {encoder.dim} dims, the model takes "
                                     f"{self.net.cfg.text_dim}: give the weights the captions were embedded with")
            self._text_encoder = encoder.to(self.device)
        return self._text_encoder


_KINDS = {"class": "class-conditional", "text": "text-conditioned", "none": "unconditional"}


def _as_labels(classes: int | Sequence[int] | Tensor) -> Tensor:
    return torch.as_tensor(classes, dtype=torch.long).flatten()


def _check_weights(net: torch.nn.Module, weights: dict[str, Tensor], source: str) -> None:
    """One line naming how the weights differ from the network their record describes (torch's strict load lists
    every key over many lines)."""
    own = net.state_dict()
    missing = sorted(own.keys() - weights.keys())
    unexpected = sorted(weights.keys() - own.keys())
    reshaped = sorted(k for k in own.keys() & weights.keys() if own[k].shape != weights[k].shape)
    found = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
             ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape")) if keys]
    if found:
        raise GeneratorError(f"{source}: the weights do not fit the recorded architecture ({', '.join(found)}): "
                             "the file was altered or mixes two exports")


def _sampling_record(export: dict[str, Any], config: Config | None, source: str) -> dict[str, Any]:
    """The export's sampling record, or (for exports without one) the run config's, checked against the network."""
    meta = export.get("metadata") or (export_metadata(config) if config is not None else None)
    if meta is None:
        raise GeneratorError(f"{source}: the export carries no sampling record (written before exports had one, or "
                             "imported); pass the run's config: load_generator(url, config=...) or `pagoda sample "
                             "CONFIG --export URL`")
    model = export["architecture"]["model"]
    kind = "class" if model.get("num_classes") else "text" if model.get("text_dim") else "none"
    if meta.get("condition") != kind:
        raise GeneratorError(f"{source}: the sampling record says condition {meta.get('condition')!r} but the network "
                             f"is {_KINDS[kind]}: the config does not belong to this export")
    return meta


def load_generator(url: str, *, stage: str | None = None, config: Config | None = None,
                   clip_weights: str | None = None, device: str | torch.device = "cpu") -> ExportedModel:
    """The network an export holds (the EMA weights), ready to `generate`.

    url:          an export file, a checkpoint folder, a stage folder, or a run with `stage`.
    stage:        with a run URL, the stage to load (teacher, distill, grow-RES).
    config:       the run's config, used only for exports that carry no sampling record of their own.
    clip_weights: a local copy of the recorded CLIP text tower's weights (the record names the training machine's).
    device:       where the network runs.
    """
    try:
        source = resolve_export(url, stage)
        export = load_export(source)
    except (ExportUnreadable, storage.StorageError) as err:
        raise GeneratorError(_one_line(err)) from None
    if not isinstance(export, dict) or not isinstance(export.get("architecture"), dict) \
            or not isinstance(export.get("ema"), dict):
        keys = sorted(export) if isinstance(export, dict) else type(export).__name__
        raise GeneratorError(f"{source}: not a pagoda export (it needs an 'architecture' record and 'ema' weights; "
                             f"found {keys})")
    if export.get("format", EXPORT_FORMAT) != EXPORT_FORMAT:
        raise GeneratorError(f"{source}: export format {export['format']!r}, this code reads {EXPORT_FORMAT}")
    try:
        net = model_from_architecture(export["architecture"])
    except (KeyError, TypeError, ValueError) as err:
        raise GeneratorError(f"{source}: its architecture record describes no network this code builds "
                             f"({_one_line(err)})") from None
    _check_weights(net, export["ema"], source)
    net.load_state_dict(export["ema"], strict=True)
    record = export_record(export)
    record["metadata"] = _sampling_record(export, config, source)
    return ExportedModel(net.float(), record, source, clip_weights).to(device)


__all__ = ["ExportedModel", "GeneratorError", "load_generator", "resolve_export", "save_grid"]
