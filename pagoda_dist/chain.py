"""The PaGoDA chain, defined once: which training stages a run has, at which resolutions, each starting from which.

    teacher (base px) -> distill (base px) -> grow-2r -> grow-4r -> ...   (grow.resolutions, each twice the last)

`chain(cfg)` is read by everything that walks the stages: the pipeline, the config's checks, the dry run,
evaluation, the report and the CLI. Stage names are labels for folders and logs; code reads a `StageSpec`'s fields
and never parses a name back into a number. This module imports no other part of the package at run time, so the
config module can use it while it validates itself.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pagoda_dist.config import AdversarialConfig, Config, TrainConfig

StageKind = Literal["teacher", "distill", "grow"]


@dataclass(frozen=True)
class StageSpec:
    """One training stage of the chain."""

    name: str                   # folder and log label: teacher, distill, grow-RES
    kind: StageKind
    resolution: int             # the resolution it generates (and trains against)
    start_from: str | None      # the stage whose committed export it starts from (None: trained from scratch)
    train: TrainConfig          # its train section, with a growth stage's own batch size from grow.batch_sizes
    batch_key: str              # the config key of that batch size, for messages

    def adversarial(self, cfg: Config) -> AdversarialConfig | None:
        """The reconstruction + GAN settings of a distil or grow stage (None for the teacher): a growth resolution
        in grow.reconstruction_only gets grow.adversarial with the GAN off (and so no second stream of reals)."""
        if self.kind == "teacher":
            return None
        if self.kind == "distill":
            return cfg.distill.adversarial
        if self.resolution in cfg.grow.reconstruction_only:
            return dataclasses.replace(cfg.grow.adversarial, gan_weight=0.0, separate_real_stream=False)
        return cfg.grow.adversarial


def chain(cfg: Config) -> list[StageSpec]:
    """The training stages of `cfg`, in the order they run."""
    base = cfg.model.resolution
    stages = [StageSpec("teacher", "teacher", base, None, cfg.teacher.train, "teacher.train.batch_size"),
              StageSpec("distill", "distill", base, "teacher", cfg.distill.train, "distill.train.batch_size")]
    g = cfg.grow
    for i, res in enumerate(g.resolutions):
        train, key = g.train, "grow.train.batch_size"
        if g.batch_sizes:
            train, key = dataclasses.replace(g.train, batch_size=g.batch_sizes[i]), f"grow.batch_sizes[{i}]"
        stages.append(StageSpec(f"grow-{res}", "grow", res, stages[-1].name, train, key))
    return stages


def stage_spec(cfg: Config, name: str) -> StageSpec:
    """The stage called `name`; ValueError naming the stages this run has when there is none."""
    for spec in chain(cfg):
        if spec.name == name:
            return spec
    raise ValueError(f"stage {name!r}: not a stage of this run; its stages are "
                     + ", ".join(s.name for s in chain(cfg)))
