"""The `pagoda` command line. Each subcommand validates its config first, then imports what it needs."""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pagoda_dist.config import (Config, ConfigError, RuntimeConfig, describe_keys, load_config, load_prepare_settings,
                                to_yaml)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.channels=64 run.name=try2")


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    if args.keys:
        for key, default, help_text in describe_keys():
            print(f"{key:<45} {default:<24} {help_text}")
        return 0
    if args.config is None:
        raise ConfigError("pagoda config: give a CONFIG file (or --keys for the reference)")
    print(to_yaml(_load(args)), end="")
    return 0


def cmd_s3(args: argparse.Namespace) -> int:
    from pagoda_dist.storage.s3_cli import s3_command

    cfg = load_config(args.config, args.overrides)  # the defaults when no --config, overrides still apply
    return s3_command(args.action, Path(cfg.storage.embedded_s3_dir), cfg.storage.embedded_s3_port,
                      buckets=args.bucket)


def cmd_prepare(args: argparse.Namespace) -> int:
    """`pagoda prepare CONFIG [overrides] [--src] [--out]` (a run's data.* settings) or `pagoda prepare SRC OUT
    [data.*|storage.* overrides]` (no run config)."""
    from pagoda_dist.data.prepare import PrepareError
    from pagoda_dist.data.sources import SourceError
    from pagoda_dist.pipeline import (local_ray, local_storage, prepare_data, prepare_from_config, s3_buckets,
                                      storage_session)
    from pagoda_dist.runtime import preemption
    from pagoda_dist.storage import StorageError

    try:
        if args.config.endswith((".yaml", ".yml")):
            cfg = load_config(args.config, args.overrides)
            with local_storage(cfg):
                if cfg.runtime.ray_address:  # a cluster: one Ray task per shard, spread over its nodes
                    with local_ray(cfg), preemption.stopping_on_sigterm(cfg.runtime.sigterm_grace_s):
                        prepare_from_config(cfg, src=args.src, out=args.out, on_ray=True)
                else:
                    with preemption.stopping_on_sigterm(cfg.runtime.sigterm_grace_s):
                        prepare_from_config(cfg, src=args.src, out=args.out)
            return 0
        if not args.overrides or "=" in args.overrides[0] or args.src or args.out:
            raise ConfigError(f"pagoda prepare {args.config}: expected `pagoda prepare SRC OUT [data.KEY=VALUE ...]` "
                              "(OUT is missing) or `pagoda prepare CONFIG.yaml [overrides] [--src SRC] [--out OUT]`")
        src, out = args.config, args.overrides[0]
        data, store = load_prepare_settings(args.overrides[1:])
        # SRC's bucket too: with the embedded server, an s3:// SRC is read from it even when OUT is local.
        with storage_session(store, s3_buckets(src, out)), \
                preemption.stopping_on_sigterm(RuntimeConfig().sigterm_grace_s):  # no run config: the default
            prepare_data(data, src, out)
    except (SourceError, PrepareError, StorageError) as err:  # bad input, not a bug: one line, no traceback
        print(f"pagoda prepare: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pagoda_dist.pipeline import run_pipeline

    if args.rehearse:
        from pagoda_dist.rehearsal import describe_changes, rehearsal_config

        cfg, changes = rehearsal_config(args.config, args.overrides)
        print(describe_changes(changes), flush=True)
    else:
        cfg = _load(args)
    if args.dry_run:
        from pagoda_dist.dry_run import describe

        print(describe(cfg, args.config))
        return 0
    from pagoda_dist.pipeline import Diverged
    from pagoda_dist.precompute import PrecomputeError, PrecomputeFailed
    from pagoda_dist.runtime.checkpoint import CheckpointDamaged
    from pagoda_dist.storage.lease import LeaseHeld

    try:
        records = run_pipeline(cfg, only=args.only, from_scratch=args.from_scratch)  # SIGTERM: `main` exits 143
    except PrecomputeError as err:  # e.g. `--only precompute` before the teacher is committed: found before any work
        print(f"pagoda: {err}", file=sys.stderr)
        return 2
    except (CheckpointDamaged, Diverged, LeaseHeld, PrecomputeFailed) as err:  # the run is as it was: one line
        print(f"pagoda: {err}", file=sys.stderr)
        return 1
    print(f"[pagoda] run {cfg.run.name} complete: {cfg.run_url}")
    for r in records:
        print(f"  {r.name:<12} {r.status:<8} {r.seconds:7.0f} s")
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from pagoda_dist.pipeline import local_services, precompute_step
    from pagoda_dist.precompute import PrecomputeError, PrecomputeFailed
    from pagoda_dist.runtime import preemption

    cfg = _load(args)
    try:
        # The stop handler after local_services: ray.init installs its own.
        with local_services(cfg), preemption.stopping_on_sigterm(cfg.runtime.sigterm_grace_s):
            precompute_step(cfg)
    except PrecomputeError as err:  # bad input, found before any work: one line, no traceback
        print(f"pagoda precompute: {err}", file=sys.stderr)
        return 2
    except PrecomputeFailed as err:  # the shards that failed, and why; a re-run redoes only those
        print(f"pagoda {err}", file=sys.stderr)
        return 1
    return 0


def _run_config(args: argparse.Namespace) -> Config:
    """RUN is a config file (+ overrides) or a run URL whose config.json `pagoda run` wrote."""
    if args.run.endswith((".yaml", ".yml")):
        return load_config(args.run, args.overrides)
    import json

    from pagoda_dist import storage
    from pagoda_dist.config import from_dict

    url = storage.join(args.run, "config.json")
    if not storage.exists(url):
        raise ConfigError(f"{args.run}: no config.json there; pass the run's YAML config or its run URL "
                          "(ROOT/runs/NAME)")
    return from_dict(json.loads(storage.read_bytes(url)))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pagoda_dist.pipeline import evaluate_step, local_storage
    from pagoda_dist.runtime.checkpoint import NoExport

    cfg = _run_config(args)
    try:
        with local_storage(cfg):
            evaluate_step(cfg)  # as in `pagoda run`: the metrics also reach each stage's wandb run
    except NoExport as err:  # a stage not trained yet: one line, no traceback
        print(f"pagoda evaluate: {err}", file=sys.stderr)
        return 2
    print(f"[pagoda] metrics in {cfg.run_url}/eval/metrics.json")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pagoda_dist.eval.report import build_report
    from pagoda_dist.pipeline import local_storage

    cfg = _run_config(args)
    with local_storage(cfg):
        path = build_report(cfg, Path(args.out or Path("work") / "reports" / cfg.run.name))
    print(f"[pagoda] report: {path}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Samples a stage of the run (or an export) through `pagoda_dist.api`; the run's config stands in for the
    sampling record of exports written before they carried one."""
    from pagoda_dist.api import GeneratorError, load_generator, save_grid
    from pagoda_dist.chain import stage_spec
    from pagoda_dist.pipeline import local_storage

    cfg = _run_config(args)
    if not args.export:
        try:
            stage_spec(cfg, args.stage)
        except ValueError as err:
            raise ConfigError(f"--stage: {err}") from None
    try:
        with local_storage(cfg):
            model = load_generator(args.export or cfg.run_url, stage=None if args.export else args.stage, config=cfg,
                                   clip_weights=args.clip_weights)
        if not args.export:  # the run's own stage: its config (overrides included) says how to sample it
            model.sampler = cfg.teacher.sampler
        images = model.generate(args.n, classes=None if args.label is None else [args.label],
                                prompts=args.prompt or None, guidance=args.guidance, seed=args.seed)
    except GeneratorError as err:
        print(f"pagoda sample: {err}", file=sys.stderr)
        return 2
    save_grid(images, args.out)
    print(f"[pagoda] {args.n} samples of {model.stage} ({images.shape[-1]}px) from {model.source} -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description="PaGoDA distributed training")
    try:
        installed = version("pagoda-dist")
    except PackageNotFoundError:
        installed = "unknown (not installed: pip install -e .)"
    parser.add_argument("--version", action="version", version=f"pagoda-dist {installed}",
                        help="print the installed pagoda-dist version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved, validated config")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--keys", action="store_true", help="list every key with its default and meaning")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("s3", help="the embedded S3 server (SeaweedFS on 127.0.0.1)")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--config", default=None, help="config whose storage.embedded_s3_* settings to use")
    p.add_argument("--bucket", action="append", default=[], help="create this bucket on `up` (repeatable)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_s3)

    p = sub.add_parser("prepare", help="turn images into WebDataset shards: `pagoda prepare SRC OUT [data.KEY=VALUE "
                                       "...]`, or with a run's data.* settings `pagoda prepare CONFIG.yaml`")
    p.add_argument("config", metavar="CONFIG.yaml | SRC", help="a run config, or the input images (a folder, class "
                   "folders, captioned images, a .jsonl manifest, builtin:photo-tiles, builtin:fashion-mnist)")
    p.add_argument("overrides", nargs="*", metavar="[OUT] KEY=VALUE", help="after SRC: OUT, then data.* / storage.* "
                   "settings; after CONFIG: dotted overrides")
    p.add_argument("--src", default=None, help="input images (default: data.source)")
    p.add_argument("--out", default=None, help="output URL (default: data.shards or ROOT/data/NAME-RES)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("run", help="the whole chain, resuming from what is committed")
    _add_config_args(p)
    p.add_argument("--only", action="append", default=None,
                   help="run only this step (prepare, teacher, precompute, distill, grow-RES, evaluate); repeatable")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and lay out every step (batches, steps, parameters, FLOPs); start nothing")
    p.add_argument("--from-scratch", action="store_true",
                   help="a stage whose committed checkpoints all fail to load starts again from zero instead of "
                        "refusing (the damaged ones stay under RUN/STAGE/damaged/)")
    p.add_argument("--rehearse", action="store_true",
                   help="run the config at toy size under NAME-rehearsal, every structural path kept (stages, "
                        "resolutions, conditioning, losses, ZeRO, precision, storage); lists what it shrank")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("precompute", help="DDIM-inversion latent pairs (and text embeddings) with a Ray actor pool")
    _add_config_args(p)
    p.set_defaults(func=cmd_precompute)

    for name, func, text in (("evaluate", cmd_evaluate, "SWD and FID-EffNetLite0 of every stage -> metrics.json"),
                             ("report", cmd_report, "one HTML page: timings, compute ledger, metrics, grids"),
                             ("sample", cmd_sample, "one-step (or teacher) samples as a PNG grid")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run", help="the run's YAML config or its run URL (ROOT/runs/NAME)")
        p.add_argument("overrides", nargs="*")
        p.set_defaults(func=func)
        if name == "report":
            p.add_argument("--out", default=None, help="local folder for the page (default work/reports/NAME)")
        if name == "sample":
            p.add_argument("--stage", default="distill", help="teacher, distill or grow-RES")
            p.add_argument("--export", default=None, help="an export file (.safetensors or .pt), checkpoint folder or "
                           "stage folder (path or URL) to sample instead of the run's --stage")
            p.add_argument("--n", type=int, default=64, help="number of samples")
            p.add_argument("--label", type=int, default=None, help="class id (default: all classes in turn)")
            p.add_argument("--prompt", action="append", default=[],
                           help="caption for a text-to-image model (repeatable; the samples take them in turn)")
            p.add_argument("--clip-weights", default=None, metavar="PATH",
                           help="local copy of the CLIP text tower weights the export records (text models)")
            p.add_argument("--guidance", type=float, default=None, metavar="W",
                           help="classifier-free guidance scale of the teacher or of a guidance-aware generator "
                                "(default: teacher.sampler.guidance)")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--out", default="samples.png", help="PNG file to write")

    from pagoda_dist.launch.cli import register

    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"pagoda: config error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # A step that stopped on SIGTERM with its work committed (runtime.preemption.Stopped; looked up only when
        # that module is loaded, as it must be to have raised, so that light commands do not import the runtime).
        preemption = sys.modules.get("pagoda_dist.runtime.preemption")
        if preemption is None or not isinstance(err, preemption.Stopped):
            raise
        print(f"pagoda: {err}", file=sys.stderr)
        return preemption.EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
