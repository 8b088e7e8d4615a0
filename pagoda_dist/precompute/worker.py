"""The work of one shard, without Ray: read image samples, invert their base-resolution copies, write pairs.

`ShardInverter` loads the teacher (and the text tower) once and then turns any number of input shards into
committed pair shards. The Ray actor wraps it, and so does the benchmark's plain loop, so both run the same code.

Determinism: samples are processed in shard order in fixed batches of `batch_size` (the last one shorter),
captions are embedded per shard (never cached across shards, whose order differs between runs), and the actor
fixes its torch thread count. The output then depends only on the inputs and the settings.

Bad input and bad output. A corrupt sample (a damaged tar member, an image that does not decode, a missing class
label or caption) is left out of the pair shard and counted, as the training reader skips and counts it. A shard
whose latents are not all finite, or whose round-trip PSNR is NaN or below `min_psnr_db`, is `ShardRejected` and
never committed: distillation would learn from latents that do not invert the images.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pagoda_dist import storage
from pagoda_dist.data.imaging import UnreadableImage, decode_image
from pagoda_dist.data.samples import Sample
from pagoda_dist.data.shards import ShardWriter, index_name, iter_shard
from pagoda_dist.data.tensors import downsample, to_tensor
from pagoda_dist.diffusion import EDMPrecond, invert, sample
from pagoda_dist.interfaces import Condition
from pagoda_dist.models.text_encoder import TextEncoder

from .job import PrecomputeJob, ShardTask
from .teacher import load_teacher

Progress = Callable[[int], None]  # called with the number of images finished so far in the current shard
LISTED_SKIPS = 20  # corrupt samples a shard's record names; the count is always exact


class ShardRejected(ValueError):
    """A shard's latents failed the quality gate (non-finite, or PSNR NaN or below the floor): not committed, and
    not retried, since the same inputs and teacher give the same latents."""


@dataclass(frozen=True)
class ShardResult:
    """A committed pair shard, as its COMMIT marker's meta records it."""

    split: str
    name: str            # relative to pairs_url: train-000007/train-000007.tar
    count: int           # samples
    bytes: int           # size of the tar
    psnr_mean: float     # dB, sample(invert(x)) vs x on the first psnr_samples images (nan when none)
    psnr_min: float
    psnr_n: int
    network_evals: int   # teacher forward passes per latent (inversion only)
    seconds: float       # wall time of the shard
    cpu_seconds: float = 0.0  # CPU time of the worker process meanwhile (robust to a busy machine's wall time)
    reused: bool = False
    latent_std: float = float("nan")  # std of every latent value / sigma_max (a faithful inversion gives ~1)
    skipped: int = 0                  # corrupt input samples left out
    skipped_samples: tuple[str, ...] = ()  # the first LISTED_SKIPS of them, "key: reason"

    def to_meta(self) -> dict:
        return {"split": self.split, "name": self.name, "count": self.count, "bytes": self.bytes,
                "psnr_mean": _json_float(self.psnr_mean), "psnr_min": _json_float(self.psnr_min),
                "psnr_n": self.psnr_n, "network_evals": self.network_evals, "seconds": round(self.seconds, 3),
                "cpu_seconds": round(self.cpu_seconds, 3), "latent_std": _json_float(self.latent_std),
                "skipped": self.skipped, "skipped_samples": list(self.skipped_samples)}

    @staticmethod
    def from_meta(meta: dict, *, reused: bool) -> ShardResult:
        nan = float("nan")
        return ShardResult(split=meta["split"], name=meta["name"], count=int(meta["count"]),
                           bytes=int(meta["bytes"]), psnr_mean=_float(meta.get("psnr_mean"), nan),
                           psnr_min=_float(meta.get("psnr_min"), nan), psnr_n=int(meta.get("psnr_n", 0)),
                           network_evals=int(meta.get("network_evals", 0)), seconds=float(meta.get("seconds", 0)),
                           cpu_seconds=float(meta.get("cpu_seconds", 0)), reused=reused,
                           latent_std=_float(meta.get("latent_std"), nan), skipped=int(meta.get("skipped", 0)),
                           skipped_samples=tuple(meta.get("skipped_samples", ())))


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 4)


def _float(x: object, default: float) -> float:
    return default if x is None else float(x)  # type: ignore[arg-type]


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2, the same value as for [0, 1] images)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)


class ShardInverter:
    """Loads the teacher once; `process(task)` writes and commits one pair shard."""

    def __init__(self, job: PrecomputeJob, device: str = "cpu") -> None:
        self.job = job
        self.device = torch.device(device)
        net, _ = load_teacher(job.teacher_url)
        self.denoiser = EDMPrecond(net, sigma_data=job.sigma_data).to(self.device).eval()
        self.text = None
        if job.text is not None:
            self.text = TextEncoder(job.text.arch, job.text.weights, random_init=job.text.random_init).to(self.device)

    # ------------------------------------------------------------------------------------------- conditions
    def _text_arrays(self, captions: list[str]) -> list[dict[str, np.ndarray]]:
        """emb / tok / mask per caption; unique captions embedded once, in first-appearance order, in fixed
        chunks (so the result never depends on what else this actor has seen)."""
        assert self.text is not None
        unique = list(dict.fromkeys(captions))
        table: dict[str, dict[str, np.ndarray]] = {}
        for start in range(0, len(unique), self.job.batch_size):
            chunk = unique[start:start + self.job.batch_size]
            out = self.text(chunk)
            pooled = out.pooled.to(torch.float16).cpu().numpy()
            tokens = out.tokens.to(torch.float16).cpu().numpy()
            mask = out.mask.cpu().numpy()
            for i, caption in enumerate(chunk):
                table[caption] = {"emb": pooled[i], "tok": tokens[i], "mask": mask[i]}
        return [table[c] for c in captions]

    def _condition(self, samples: list[Sample], text: list[dict[str, np.ndarray]] | None) -> Condition:
        if text is not None:
            return Condition(
                text_pooled=torch.from_numpy(np.stack([t["emb"] for t in text])).float(),
                text_tokens=torch.from_numpy(np.stack([t["tok"] for t in text])).float(),
                text_mask=torch.from_numpy(np.stack([t["mask"] for t in text])))
        if self.job.class_conditional:
            return Condition(class_labels=torch.tensor([s.cls for s in samples], dtype=torch.long))
        return Condition()

    # ------------------------------------------------------------------------------------------ the math
    def _invert(self, x: Tensor, cond: Condition) -> tuple[Tensor, int]:
        j = self.job
        with torch.inference_mode():
            res = invert(self.denoiser, x.to(self.device), cond.to(self.device), solver=j.solver, steps=j.steps,
                         sigma_min=j.sigma_min, sigma_max=j.sigma_max, rho=j.rho, clamp=j.clamp)
        return res.x.float().cpu(), res.network_evals

    def _reconstruct(self, latents: Tensor, cond: Condition) -> Tensor:
        j = self.job
        with torch.inference_mode():
            res = sample(self.denoiser, latents.to(self.device) / j.sigma_max, cond.to(self.device),
                         solver=j.solver, steps=j.steps, sigma_min=j.sigma_min, sigma_max=j.sigma_max, rho=j.rho,
                         clamp=j.clamp)
        return res.x.float().cpu()

    def base_images(self, samples: list[Sample]) -> Tensor:
        """The teacher's input: each full-resolution image downsampled to the base resolution, in [-1, 1]."""
        return self._downsample([decode_image(s.image, self.job.channels) for s in samples])

    def _downsample(self, pixels: list[np.ndarray]) -> Tensor:
        return downsample(to_tensor(pixels), self.job.base_resolution)

    def _batches(self, samples: list[Sample], skipped: list[str],
                 resolution: int | None) -> Iterator[tuple[list[int], Tensor]]:
        """Consecutive batches of `batch_size` decodable samples (their indices in `samples`) and their base-resolution
        images; a sample that does not decode, or is not `resolution` px square, is appended to `skipped` and left
        out."""
        indices: list[int] = []
        pixels: list[np.ndarray] = []
        for i, s in enumerate(samples):
            try:
                pixels.append(decode_image(s.image, self.job.channels, resolution))
            except UnreadableImage as err:
                skipped.append(f"{s.key}: {err}")
                continue
            indices.append(i)
            if len(indices) == self.job.batch_size:
                yield indices, self._downsample(pixels)
                indices, pixels = [], []
        if indices:
            yield indices, self._downsample(pixels)

    def _invert_batch(self, x: Tensor, cond: Condition) -> tuple[Tensor, Tensor | None, int]:
        """Latents of x (and of its mirror image with flip, in the same network batch: fewer, larger matmuls)."""
        if not self.job.flip:
            latents, evals = self._invert(x, cond)
            return latents, None, evals
        both = cond if cond.is_empty else Condition.cat([cond, cond])
        latents, evals = self._invert(torch.cat([x, x.flip(-1)]), both)
        return latents[: x.shape[0]], latents[x.shape[0]:], evals

    def _read(self, task: ShardTask, skipped: list[str]) -> list[Sample]:
        """The shard's usable samples; corrupt ones (a damaged member, no class label or caption where the teacher
        needs one) are appended to `skipped` as "key: reason"."""
        samples = list(iter_shard(task.input_url, on_corrupt=lambda key, reason: skipped.append(f"{key}: {reason}"),
                                  tar_url=task.tar_url or None, decode=task.decode))
        if len(samples) + len(skipped) != task.count:
            raise ValueError(f"{task.input_url}: holds {len(samples) + len(skipped)} samples, its manifest says "
                             f"{task.count}")
        usable = []
        for s in samples:
            if self.job.class_conditional and s.cls is None:
                skipped.append(f"{s.key}: no class label (.cls) for the class-conditional teacher")
            elif self.text is not None and s.caption is None:
                skipped.append(f"{s.key}: no caption for the text-conditional teacher")
            else:
                usable.append(s)
        return usable

    # ------------------------------------------------------------------------------------------- a shard
    def process(self, task: ShardTask, progress: Progress | None = None) -> ShardResult:
        """Inverts every sample of `task`'s input shard and commits the pair shard.

        `progress(images_done)` runs after each batch is written (the actor also hangs its test hook there).
        """
        j, started, cpu_started = self.job, time.monotonic(), time.process_time()
        skipped: list[str] = []
        samples = self._read(task, skipped)
        text = self._text_arrays([s.caption or "" for s in samples]) if self.text is not None else None
        storage.remove(task.output_prefix, recursive=True)  # leftovers of an attempt that died before committing
        writer = ShardWriter(task.output_prefix, task.name)
        checked: list[tuple[Tensor, Tensor, Condition]] = []  # (x, latent, cond) of the PSNR subset
        evals = 0
        spread = _Spread()
        try:
            for indices, x in self._batches(samples, skipped, task.resolution):
                batch = [samples[i] for i in indices]
                batch_text = [text[i] for i in indices] if text is not None else None
                cond = self._condition(batch, batch_text)
                latents, flipped, evals = self._invert_batch(x, cond)
                spread.add(latents if flipped is None else torch.cat([latents, flipped]))
                quota = j.psnr_samples - sum(c[0].shape[0] for c in checked)
                if quota > 0:
                    checked.append((x[:quota], latents[:quota], cond if cond.is_empty else cond[:quota]))
                for i, s in enumerate(batch):
                    arrays = {"latent": latents[i].numpy().astype(np.float32)}
                    if flipped is not None:
                        arrays["latent_flip"] = flipped[i].numpy().astype(np.float32)
                    if batch_text is not None:
                        arrays.update(batch_text[i])
                    writer.write(Sample(key=s.key, image=s.image, image_ext=s.image_ext, cls=s.cls,
                                        caption=s.caption, meta=s.meta, arrays=arrays))
                if progress is not None:
                    progress(indices[-1] + 1)
            if not len(writer):
                raise ValueError(f"{task.input_url}: none of its {task.count} samples is usable (e.g. "
                                 f"{skipped[0] if skipped else 'empty'})")
            info = writer.close()
        except BaseException:
            writer.abort()
            raise
        psnr_mean, psnr_min, psnr_n = self._psnr(checked)
        result = ShardResult(split=task.split, name=task.output_name, count=info.count, bytes=info.bytes,
                             psnr_mean=psnr_mean, psnr_min=psnr_min, psnr_n=psnr_n, network_evals=evals,
                             seconds=time.monotonic() - started, cpu_seconds=time.process_time() - cpu_started,
                             latent_std=spread.std() / j.sigma_max, skipped=len(skipped),
                             skipped_samples=tuple(skipped[:LISTED_SKIPS]))
        try:
            self._gate(task, result, spread.nonfinite)
        except ShardRejected:
            storage.remove(task.output_prefix, recursive=True)  # written, never to be committed
            raise
        storage.commit_existing(task.output_prefix, meta={"settings_fingerprint": j.fingerprint, **result.to_meta()},
                                expected={task.name: info.bytes, index_name(task.name): -1})
        return result

    def _gate(self, task: ShardTask, result: ShardResult, nonfinite: int) -> None:
        """Raises ShardRejected when the latents hold NaN/inf or the round trip's PSNR is NaN or under the floor."""
        floor = self.job.min_psnr_db
        if nonfinite:
            raise ShardRejected(f"{task.input_url}: the inversion gave {nonfinite} non-finite latent values (NaN or "
                                "inf); the shard is not committed. Check the teacher checkpoint (a diverged EMA?) "
                                "and the precision of the inversion")
        if result.psnr_n and not result.psnr_mean >= floor:  # NaN fails too
            raise ShardRejected(f"{task.input_url}: inversion PSNR {result.psnr_mean:.2f} dB (mean of {result.psnr_n} "
                                f"images) is below precompute.min_psnr_db={floor:g}; the shard is not committed. "
                                "The teacher does not invert these images faithfully: train it longer, raise "
                                "precompute.steps, or lower the floor if this quality is expected")

    def _psnr(self, checked: list[tuple[Tensor, Tensor, Condition]]) -> tuple[float, float, int]:
        """Round trip sample(invert(x)) vs x on the subset, in one batch."""
        if not checked:
            return float("nan"), float("nan"), 0
        x = torch.cat([c[0] for c in checked])
        latents = torch.cat([c[1] for c in checked])
        conds = [c[2] for c in checked]
        cond = conds[0] if conds[0].is_empty else Condition.cat(conds)
        values = psnr(self._reconstruct(latents, cond), x)
        return float(values.mean()), float(values.min()), int(values.numel())


class _Spread:
    """Running standard deviation of every latent value of a shard (float64 sums), and its non-finite count."""

    def __init__(self) -> None:
        self.n, self.total, self.squares, self.nonfinite = 0, 0.0, 0.0, 0

    def add(self, latents: Tensor) -> None:
        finite = torch.isfinite(latents)
        self.nonfinite += int((~finite).sum())
        values = latents[finite].double()
        self.n += values.numel()
        self.total += float(values.sum())
        self.squares += float(values.square().sum())

    def std(self) -> float:
        if self.n < 2:
            return float("nan")
        mean = self.total / self.n
        return math.sqrt(max(self.squares / self.n - mean * mean, 0.0))


__all__ = ["LISTED_SKIPS", "ShardInverter", "ShardRejected", "ShardResult", "psnr"]
