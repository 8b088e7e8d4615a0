"""Time in images seen (EDM2's `cur_nimg`): learning-rate warm-up, EMA decay and interval crossings."""
from __future__ import annotations


def lr_factor(nimg: int, warmup_kimg: float) -> float:
    """Linear warm-up from 0 to 1 over `warmup_kimg` thousand images (1 when warm-up is off)."""
    if warmup_kimg <= 0:
        return 1.0
    return min(nimg / (warmup_kimg * 1000.0), 1.0)


def ema_beta(nimg: int, batch_size: int, halflife_kimg: float, rampup: float) -> float:
    """Per-step EMA decay for a half-life in images (EDM): the half-life grows with `rampup` x images seen.

    A half-life of 0 disables averaging (beta 0: the EMA copies the network).
    """
    halflife_nimg = halflife_kimg * 1000.0
    if rampup > 0:
        halflife_nimg = min(halflife_nimg, nimg * rampup)
    if halflife_nimg <= 0:
        return 0.0
    return 0.5 ** (batch_size / halflife_nimg)


def crossed(before: int, after: int, every_kimg: float) -> bool:
    """True when an interval of `every_kimg` thousand images ends in (before, after]."""
    every = max(int(round(every_kimg * 1000)), 1)
    return after // every > before // every


def steps_for(total_kimg: float, batch_size: int) -> int:
    """Optimizer steps needed to see at least `total_kimg` thousand images."""
    total = int(round(total_kimg * 1000))
    return -(-total // batch_size)
