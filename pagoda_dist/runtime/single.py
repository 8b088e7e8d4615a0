"""The smallest complete training loop: one process, plain optimizers, EMA; what the core tests drive stages with."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from pagoda_dist.config import TrainConfig
from pagoda_dist.interfaces import Batch, Stage

from .drivers import PlainDriver
from .ema import Ema
from .schedule import ema_beta


@dataclass
class LoopResult:
    history: list[dict[str, float]] = field(default_factory=list)  # the stage's metrics per optimizer step
    ema: nn.Module | None = None                                      # EMA of the first trainable network
    nimg: int = 0                                                     # images seen


def train_single_process(stage: Stage, batches: Iterable[Batch], steps: int,
                         train: TrainConfig | None = None) -> LoopResult:
    """Runs `steps` optimizer steps of `stage` on `batches` (`train.accumulation(1)` micro-batches per step) in this
    process."""
    train = train or TrainConfig()
    accum = train.accumulation(1)
    nets = stage.trainable()
    first = next(iter(nets))
    ema = Ema(nets[first], keep=True)
    driver = PlainDriver(nets, stage.optimizers(), grad_accum=accum, grad_clip=train.grad_clip)
    it = iter(batches)
    result = LoopResult(ema=ema.net)
    for _ in range(steps):
        driver.begin_step(result.nimg)
        seen, sums = 0, {}
        for _ in range(accum):
            batch = next(it)
            for key, value in stage.train_step(batch, driver, result.nimg).items():
                sums[key] = sums.get(key, 0.0) + float(value)
            seen += len(batch)
        result.nimg += seen
        ema.update(nets[first], ema_beta(result.nimg, seen, train.ema_halflife_kimg, train.ema_rampup),
                   driver.gathered)
        result.history.append({key: value / accum for key, value in sums.items()})
    return result
