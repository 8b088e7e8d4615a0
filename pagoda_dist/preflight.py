"""What a run needs from the world before it starts, checked once: `pagoda run` refuses on the first problem before
any work, and `pagoda run --dry-run` lists every finding, so the dry run predicts each refusal the real run makes.

- the data: the source lists in its layout (or the prepared shards are committed);
- the held-out split covers the evaluation (`eval.preflight`);
- every weights file and reference-statistics file the config names can be read;
- the cluster can place the workers: each training worker and precompute actor fits on some node, and the run's
  GPUs exist (Ray would otherwise wait for them forever);
- committed checkpoints of the run can be resumed by this layout (world size, ZeRO stage, precision).
Reads only: listings, manifests and the existence of files; starts nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

from pagoda_dist import storage
from pagoda_dist.chain import chain
from pagoda_dist.config import Config, ConfigError


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    message: str  # what was found; for a refusal, also what to do
    after: str = ""  # a check that cannot be made yet: the step after which `pagoda run` makes it (`recheck_after`)


@dataclass(frozen=True)
class NodeResources:
    """What one Ray node offers (logical CPUs and GPUs)."""

    cpus: float
    gpus: float


def preflight(cfg: Config, nodes: list[NodeResources] | None = None, *,
              reads_unprepared: bool = False) -> list[Finding]:
    """Every finding for `cfg`; `nodes`: the cluster's nodes (None: this machine, where a local Ray would run);
    `reads_unprepared`: the run reads image shards but will not prepare them (`--only` steps without prepare), so
    data.source cannot stand in for shards that are not committed."""
    data = _data(cfg, reads_unprepared)
    held_out = _held_out(cfg) if all(f.ok for f in data) else \
        Finding("held-out images", False, "not counted: the data cannot be read (above)")
    return [*data, held_out, *_files(cfg), *_resources(cfg, nodes if nodes is not None else [local_node()]),
            *_resumable(cfg)]


def refuse_on_problems(findings: list[Finding]) -> None:
    """Raises ConfigError with every refusal, one per line."""
    problems = [f"{f.check}: {f.message}" for f in findings if not f.ok]
    if problems:
        raise ConfigError("the run cannot start:\n  " + "\n  ".join(problems))


def recheck_after(cfg: Config, findings: list[Finding], step: str) -> list[Finding]:
    """The checks among `findings` deferred until `step` has run, made now (only the held-out count defers)."""
    return [_held_out(cfg) for f in findings if f.after == step]


def describe(findings: list[Finding]) -> list[str]:
    return [f"  {'ok' if f.ok else 'REFUSED':<8} {f.check}: {f.message}" for f in findings]


# ------------------------------------------------------------------------------------------------ the checks
def _data(cfg: Config, reads_unprepared: bool) -> list[Finding]:
    from pagoda_dist.data.manifest import ManifestError, read_manifest

    try:
        manifest = read_manifest(cfg.shards_url)
        return [Finding("data", True, f"prepared shards at {cfg.shards_url}: {manifest.count('train')} train, "
                                      f"{manifest.count('val')} held out")]
    except (ManifestError, storage.StorageError, FileNotFoundError, ValueError):
        pass
    if not cfg.data.source:
        return [Finding("data", False, f"no committed shards at {cfg.shards_url} and no data.source to prepare them "
                                       "from: set data.source, or data.shards to prepared shards")]
    if reads_unprepared:
        return [Finding("data", False, f"no committed shards at {cfg.shards_url}, and --only leaves out prepare: "
                                       "add `--only prepare`, or set data.shards to prepared shards")]
    from pagoda_dist.data.sources import SourceError, open_source

    if cfg.data.source.startswith("builtin:"):
        return [Finding("data", True, f"{cfg.data.source} (a builtin dataset)")]
    try:
        source = open_source(cfg.data.source, cfg.data.source_kind)
    except (SourceError, storage.StorageError) as err:
        return [Finding("data.source", False, str(err))]
    return [Finding("data.source", True, f"{len(source.items)} images in {cfg.data.source} ({source.kind})")]


def _held_out(cfg: Config) -> Finding:
    from pagoda_dist.data.sources import SourceError
    from pagoda_dist.eval.preflight import HeldOutDeferred, check_held_out

    try:
        return Finding("held-out images", True, check_held_out(cfg))
    except HeldOutDeferred as err:
        return Finding("held-out images", True, f"deferred: {err}", after="prepare")
    except ConfigError as err:
        return Finding("held-out images", False, str(err))
    except (SourceError, storage.StorageError) as err:  # the data finding above already says what is wrong
        return Finding("held-out images", False, f"cannot be counted: {err}")


def _named_files(cfg: Config) -> list[tuple[str, str]]:
    e, pre = cfg.eval, cfg.precompute
    named = [("teacher.init_from", cfg.teacher.init_from), ("eval.inception_weights", e.inception_weights),
             ("eval.effnet_weights", e.effnet_weights), ("eval.clip_weights", e.clip_weights),
             ("precompute.clip_weights", pre.clip_weights),
             ("distill.adversarial.discriminator.backbone_weights", cfg.distill.adversarial.discriminator.backbone_weights),
             ("grow.adversarial.discriminator.backbone_weights", cfg.grow.adversarial.discriminator.backbone_weights)]
    if e.reference_stats:
        resolutions = sorted({s.resolution for s in chain(cfg)})
        named += [("eval.reference_stats", e.reference_stats.format(resolution=r)) for r in resolutions]
    return [(key, url) for key, url in named if url]


def _files(cfg: Config) -> list[Finding]:
    found = []
    for key, url in _named_files(cfg):
        try:
            ok = storage.exists(url)
        except storage.StorageError as err:
            found.append(Finding(key, False, f"{url} cannot be read: {err}"))
            continue
        found.append(Finding(key, True, url) if ok else
                     Finding(key, False, f"{url} does not exist where this run reads it; copy the file there or "
                                         f"point {key} at it (a local path or any storage URL)"))
    return found


def local_node() -> NodeResources:
    """This machine as a local Ray sees it: CPUs are oversubscribed as needed (see `ensure_ray`), GPUs are not."""
    import torch

    return NodeResources(cpus=float("inf"), gpus=float(torch.cuda.device_count()))


def cluster_nodes() -> list[NodeResources]:
    """The alive nodes of the Ray cluster this process is connected to."""
    import ray

    return [NodeResources(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
            for n in ray.nodes() if n.get("Alive")]


def _placeable(nodes: list[NodeResources], cpus: float, gpus: float) -> int:
    """How many bundles of (cpus, gpus) the nodes can host at once."""
    total = 0
    for n in nodes:
        fits = [n.cpus / cpus if cpus else float("inf"), n.gpus / gpus if gpus else float("inf")]
        total += int(min(min(fits), 1e6))
    return total


def _resources(cfg: Config, nodes: list[NodeResources]) -> list[Finding]:
    rt, pre = cfg.runtime, cfg.precompute
    asks = [("runtime.num_workers", "training worker", rt.num_workers, rt.cpus_per_worker, 1.0 if rt.use_gpu else 0.0,
             "runtime.use_gpu / runtime.cpus_per_worker"),
            ("precompute.min_actors", "precompute actor", pre.min_actors, pre.cpus_per_actor, pre.gpus_per_actor,
             "precompute.gpus_per_actor / precompute.cpus_per_actor")]
    offered = (f"{len(nodes)} node(s) with {', '.join(_node_text(n) for n in nodes)}" if nodes else "no alive node")
    found = []
    for key, what, count, cpus, gpus, knobs in asks:
        fits = _placeable(nodes, cpus, gpus)
        need = f"{count} {what}(s) of {cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
        if fits >= count:
            found.append(Finding(key, True, f"{need}: the cluster offers {offered}"))
        else:
            found.append(Finding(key, False, f"{need}, but the cluster ({offered}) can place {fits}: Ray would wait "
                                             f"for resources that never come; lower {key} or {knobs}, or add nodes"))
    return found


def _node_text(n: NodeResources) -> str:
    cpus = "any CPUs" if n.cpus == float("inf") else f"{n.cpus:g} CPU"
    return f"{cpus} + {n.gpus:g} GPU"


def _resumable(cfg: Config) -> list[Finding]:
    from pagoda_dist.runtime.checkpoint import CheckpointMismatch
    from pagoda_dist.runtime.trainer import check_latest_resumable

    found = []
    for spec in chain(cfg):
        try:
            check_latest_resumable(cfg, spec.name, cfg.run_url)
        except CheckpointMismatch as err:
            found.append(Finding(f"resume {spec.name}", False, str(err)))
        except storage.StorageError as err:
            return [Finding("resume", False, f"the run's checkpoints cannot be read: {err}")]
    return found or [Finding("resume", True, "no committed checkpoint of another layout")]
