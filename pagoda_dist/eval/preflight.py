"""Is the held-out split big enough for the evaluation the config asks for? Checked before anything trains.

Evaluation reads `eval.num_images` held-out images as the real set (SWD and FID-EffNetLite0 compare equally sized
sets, and standard FID's real side too unless `eval.reference_stats` names a file) plus `eval.floor_images` more for
the real-vs-real floor. `pagoda run` calls `check_held_out` first: it counts the 'val' split of the latent pairs or
image shards where they are committed, and otherwise predicts it from the source and `data.val_fraction`, so a
run that could not be evaluated stops before hours of training rather than after. WebDataset tars whose sample
counts only the index's scan can tell defer the check (`HeldOutDeferred`) until `pagoda prepare` has indexed them.
"""
from __future__ import annotations

from pagoda_dist import storage
from pagoda_dist.config import Config, ConfigError

BUILTIN_PREFIX = "builtin:"


class HeldOutDeferred(Exception):
    """The held-out split cannot be counted before the prepare step has run (the message says why)."""


def held_out_needed(cfg: Config) -> int:
    """Held-out images an evaluation of `cfg` reads: the real set and the floor set."""
    return cfg.eval.num_images + cfg.eval.floor_count


def shortfall(cfg: Config, have: int, where: str, need: int | None = None) -> str:
    """The one-line refusal: what the config asks for (or a reader's own `need`), what `where` holds, and what to
    change."""
    e = cfg.eval
    asks = (f"eval.num_images={e.num_images} + eval.floor_images={e.floor_count} need {held_out_needed(cfg)}"
            if need is None else f"reading {need}")
    return (f"{asks} held-out images, but {where} {have}: raise data.val_fraction (now {cfg.data.val_fraction:g}) "
            "and prepare new shards, or lower eval.num_images, or eval.floor_images (0: no real-vs-real floor)")


def check_held_out(cfg: Config) -> str:
    """Raises ConfigError (one line) when the held-out split is too small, HeldOutDeferred when it cannot be
    counted before the prepare step; returns what was checked."""
    from pagoda_dist.data.manifest import ManifestError, read_manifest

    need = held_out_needed(cfg)
    for url in (cfg.pairs_url, cfg.shards_url):  # the pairs are what evaluation reads; the shards become them
        try:
            have = read_manifest(url).count("val")
        except (ManifestError, storage.StorageError):
            continue
        if have < need:
            raise ConfigError(shortfall(cfg, have, f"{url} holds in its 'val' split"))
        return f"{have} held-out images in {url} cover the {need} evaluation reads"
    if not cfg.data.source:
        return "no prepared data and no data.source yet: the held-out split is checked when evaluation starts"
    have = predicted_val_count(cfg)
    if have is None:
        raise HeldOutDeferred(f"data.source {cfg.data.source}: its held-out tars have no img2dataset "
                              "NNNNN_stats.json to count their samples, so they are counted once the prepare step "
                              "has indexed them, and the run stops there if too few")
    if have < need:
        raise ConfigError(shortfall(cfg, have, f"data.source {cfg.data.source} is predicted to give a 'val' split of"))
    return f"about {have} held-out images predicted from {cfg.data.source} cover the {need} evaluation reads"


def predicted_val_count(cfg: Config) -> int | None:
    """The size of the 'val' split `pagoda prepare` will make of data.source: exact for the builtins, which split
    themselves, and for WebDataset tars with img2dataset's stats files (None without them: their items are tars,
    not images); for other sources, which prepare splits by a hash of each group, the expected count."""
    from pagoda_dist.data import builtin
    from pagoda_dist.data.sources import open_source
    from pagoda_dist.data.wds_source import listed_val_count

    d = cfg.data
    if d.source_kind == "webdataset":
        return listed_val_count(d.source, d.val_fraction)
    if d.source.startswith(BUILTIN_PREFIX):
        source = builtin.build(d.source[len(BUILTIN_PREFIX):], resolution=d.resolution, val_fraction=d.val_fraction,
                               seed=cfg.run.seed, limit=d.limit)
        items = source.items  # builtins apply data.limit themselves
    else:
        source = open_source(d.source, d.source_kind)
        items = source.items[: d.limit]
    fixed = sum(item.split == "val" for item in items)
    return fixed + int(d.val_fraction * sum(item.split is None for item in items))
