"""What a precompute run does, as plain picklable data: the job (settings every actor shares) and its shard tasks.

Output layout at `pairs_url` (one committed folder per input shard, then the set's manifest):

    train-000007/train-000007.tar        latent-pair samples (same keys and order as the input shard)
    train-000007/train-000007.idx.json   byte-range index (data.shards format)
    train-000007/COMMIT                  the shard's completion marker; its meta holds counts and PSNR
    manifest.json                        data.manifest format, kind "latent-pairs"; shard names are
                                         "train-000007/train-000007.tar", so readers join them to pairs_url
    COMMIT                               the set's marker, written last, only when every shard is committed

The `settings` dict decides whether existing output may be reused: it holds what changes the latents (inputs,
teacher checkpoint, ODE, flip, text tower), not knobs that only change speed (actors, threads, batch size).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagoda_dist import storage
from pagoda_dist.config import Config
from pagoda_dist.data.manifest import Manifest, fingerprint
from pagoda_dist.data.shards import Decoder, decode_members
from pagoda_dist.data.wds_source import sample_decoder, tar_root

LATENT_DTYPE = "float32"   # latents live at sigma_max scale (~80): float16 would keep only ~3 digits there
EMBED_DTYPE = "float16"    # text embeddings are O(1); the inversion is conditioned on exactly the stored values


@dataclass(frozen=True)
class TextSpec:
    """The text tower to embed captions with (text-conditioned teachers only)."""

    arch: str
    weights: str | None
    random_init: bool

    def describe(self) -> dict[str, Any]:
        return {"arch": self.arch, "weights": self.weights, "random_init": self.random_init}


@dataclass(frozen=True)
class PrecomputeJob:
    """Everything an actor needs besides its tasks; identical for all actors of a run."""

    teacher_url: str                 # the export of the committed teacher checkpoint
    teacher_arch: dict[str, Any]     # its UNet architecture record
    base_resolution: int             # the teacher's resolution: images are downsampled to it before inversion
    channels: int
    sigma_data: float
    solver: str
    steps: int
    sigma_min: float
    sigma_max: float
    rho: float
    clamp: bool
    flip: bool
    batch_size: int
    psnr_samples: int
    min_psnr_db: float               # a shard whose round-trip PSNR is NaN or lower is not committed
    text: TextSpec | None
    class_conditional: bool
    torch_threads: int               # fixed per actor: CPU float results depend on the thread count
    use_gpu: bool
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.settings)


@dataclass(frozen=True)
class ShardTask:
    """One input shard to turn into one committed pair shard."""

    split: str
    name: str          # input shard file name, e.g. train-000007.tar
    input_url: str     # full URL of the input shard
    output_prefix: str  # pairs_url/train-000007 (committed on its own)
    count: int         # samples in the input shard (from its manifest)
    tar_url: str = ""  # where the shard's tar is when not at input_url (WebDataset shards indexed in place)
    decode: Decoder = decode_members  # the tar's layout: ours, or img2dataset's (wds_source)
    resolution: int | None = None  # the manifest's image size: an image of another size is skipped and counted

    @property
    def output_name(self) -> str:
        """The pair shard's name relative to pairs_url, as the set's manifest lists it."""
        return f"{shard_stem(self.name)}/{self.name}"


def shard_stem(name: str) -> str:
    return name.removesuffix(".tar")


def torch_threads(cpus_per_actor: float) -> int:
    """Threads per actor: its whole CPUs, at least one (fractional actors share a core)."""
    return max(1, int(cpus_per_actor))


def make_settings(cfg: Config, inputs: Manifest, teacher_url: str, text: TextSpec | None) -> dict[str, Any]:
    """The settings that determine the pairs' content (compared with existing output on re-runs)."""
    pre, diff = cfg.precompute, cfg.diffusion
    return {
        "input": cfg.shards_url, "input_fingerprint": inputs.fingerprint, "teacher": teacher_url,
        "solver": pre.solver, "steps": pre.steps, "sigma_min": diff.sigma_min, "sigma_max": diff.sigma_max,
        "rho": diff.rho, "sigma_data": diff.sigma_data, "clamp": pre.clamp, "flip": pre.flip,
        "base_resolution": cfg.model.resolution, "latent_dtype": LATENT_DTYPE,
        "text_encoder": text.describe() if text else None, "embed_dtype": EMBED_DTYPE if text else None,
    }


def make_tasks(inputs: Manifest, shards_url: str, pairs_url: str) -> list[ShardTask]:
    """One task per input shard, in manifest order (splits in order, shards in order)."""
    root, decode = tar_root(inputs, shards_url), sample_decoder(inputs)
    return [ShardTask(split=split, name=info.name, input_url=storage.join(shards_url, info.name),
                      output_prefix=storage.join(pairs_url, shard_stem(info.name)), count=info.count,
                      tar_url=storage.join(root, info.name), decode=decode, resolution=inputs.resolution)
            for split, shards in inputs.splits.items() for info in shards]


__all__ = ["EMBED_DTYPE", "LATENT_DTYPE", "PrecomputeJob", "ShardTask", "TextSpec", "make_settings", "make_tasks",
           "shard_stem", "torch_threads"]
