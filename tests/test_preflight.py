"""The preflight: every refusal `pagoda run` makes before any work, and the dry run that predicts each of them.

Each case breaks one thing a run needs (the source, the held-out split, a weights file, the resources, the layout of
committed checkpoints), checks the dry run names it with what to do, and that `pagoda run` refuses with the same
line before training starts.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagoda_dist.config import ConfigError, load_config
from pagoda_dist.preflight import NodeResources, preflight, refuse_on_problems
from pagoda_dist.runtime import CheckpointStore
from pagoda_dist.runtime.checkpoint import SavePayload

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny.yaml"
PHOTOS = ("astronaut.png", "coffee.png")


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of 24 real photo crops each, in ImageNet's layout."""
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("src") / "train"
    for c, name in enumerate(PHOTOS):
        img = Image.open(Path(skimage.data.__file__).parent / name).convert("RGB")
        (root / f"n{c:08d}").mkdir(parents=True)
        for i in range(24):
            img.crop((8 * i, 8 * i, 8 * i + 96, 8 * i + 96)).save(root / f"n{c:08d}" / f"{i}.JPEG")
    return root


def _cfg(tmp_path: Path, source: Path | str, *extra: str):
    return load_config(TINY, [f"run.root={tmp_path}", f"data.source={source}", "storage.embedded_s3=false",
                              "eval.num_images=16", "eval.floor_images=0", "data.val_fraction=0.5", *extra])


def _refused(findings) -> dict[str, str]:
    return {f.check: f.message for f in findings if not f.ok}


CPU_NODE = [NodeResources(cpus=4, gpus=0)]


def test_a_sound_run_passes_every_check(tmp_path: Path, class_folders: Path) -> None:
    findings = preflight(_cfg(tmp_path, class_folders), CPU_NODE)
    assert _refused(findings) == {}
    assert {f.check for f in findings} >= {"data.source", "held-out images", "runtime.num_workers", "resume"}
    refuse_on_problems(findings)


def test_a_missing_source_is_refused(tmp_path: Path) -> None:
    refused = _refused(preflight(_cfg(tmp_path, tmp_path / "nowhere"), CPU_NODE))
    assert "does not exist" in refused["data.source"] and "not counted" in refused["held-out images"]


def test_a_held_out_split_too_small_is_refused(tmp_path: Path, class_folders: Path) -> None:
    refused = _refused(preflight(_cfg(tmp_path, class_folders, "eval.num_images=64"), CPU_NODE))
    assert "eval.num_images=64" in refused["held-out images"] and "data.val_fraction" in refused["held-out images"]


def test_a_missing_weights_file_is_refused(tmp_path: Path, class_folders: Path) -> None:
    missing = tmp_path / "inception.pth"
    refused = _refused(preflight(_cfg(tmp_path, class_folders, f"eval.inception_weights={missing}"), CPU_NODE))
    assert refused == {"eval.inception_weights": f"{missing} does not exist where this run reads it; copy the file "
                                                 "there or point eval.inception_weights at it (a local path or any "
                                                 "storage URL)"}
    missing.write_bytes(b"weights")
    assert _refused(preflight(_cfg(tmp_path, class_folders, f"eval.inception_weights={missing}"), CPU_NODE)) == {}


def test_workers_the_cluster_cannot_place_are_refused(tmp_path: Path, class_folders: Path) -> None:
    cfg = _cfg(tmp_path, class_folders, "runtime.use_gpu=true", "runtime.num_workers=2",
               "teacher.train.batch_size=64")
    refused = _refused(preflight(cfg, [NodeResources(cpus=8, gpus=1), NodeResources(cpus=8, gpus=0)]))
    assert "2 training worker(s) of 2 CPU + 1 GPU" in refused["runtime.num_workers"]  # tiny.yaml: 2 CPUs each
    assert "can place 1" in refused["runtime.num_workers"]
    assert _refused(preflight(cfg, [NodeResources(cpus=8, gpus=1)] * 2)) == {}
    big = _cfg(tmp_path, class_folders, "runtime.cpus_per_worker=16")
    assert "runtime.num_workers" in _refused(preflight(big, [NodeResources(cpus=8, gpus=0)] * 3))


class _NoEngines:
    def save_state(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)

    def load_state(self, directory: Path) -> None:
        raise NotImplementedError


def test_checkpoints_of_another_layout_are_refused(tmp_path: Path, class_folders: Path) -> None:
    cfg = _cfg(tmp_path, class_folders)
    meta = {"world_size": 2, "zero_stage": cfg.runtime.zero_stage, "precision": cfg.runtime.precision}
    weights = {"w": torch.zeros(2)}
    CheckpointStore(cfg.run_url, "distill").save(SavePayload(64, _NoEngines(), {}, meta, weights,
                                                             {"ema": weights, "architecture": {"kind": "fake"}}))
    refused = _refused(preflight(cfg, CPU_NODE))
    assert "world_size=2 but this run has world_size=1" in refused["resume distill"]
    assert "Set runtime.num_workers=2 to resume" in refused["resume distill"]


def test_the_dry_run_predicts_the_refusal_that_pagoda_run_makes(tmp_path: Path, class_folders: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """The same problem, seen by both commands: the dry run lists it and exits 0; `pagoda run` stops with it before
    prepare, and exits 2 with no traceback."""
    from pagoda_dist.cli import main

    args = [str(TINY), f"run.root={tmp_path}", f"data.source={class_folders}", "storage.embedded_s3=false",
            "eval.num_images=16", "eval.floor_images=0", "data.val_fraction=0.5",
            f"eval.inception_weights={tmp_path / 'none.pth'}"]
    # The dry run in this process (as tests/test_config.py runs it); `pagoda run` below in its own, for its exit
    # status and stderr.
    assert main(["run", *args, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    line = next(x for x in dry.splitlines() if x.lstrip().startswith("REFUSED"))
    assert "eval.inception_weights" in line and "none.pth does not exist" in line
    run = subprocess.run([sys.executable, "-m", "pagoda_dist.cli", "run", *args, "runtime.num_workers=1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "none.pth does not exist" in run.stderr and "prepare: starting" not in run.stdout
    assert not (tmp_path / "data").exists()  # nothing was prepared


def test_a_partial_run_refuses_what_its_left_out_steps_would_have_made(tmp_path: Path, class_folders: Path) -> None:
    """`pagoda run --only STEP` prepares nothing: a step that reads image shards that are not committed is refused
    before any work, with what to do; so is `--only precompute` before the teacher is committed (one line each, no
    traceback). `--only distill` reads the latent pairs, not the shards: nothing about the shards is refused."""
    from pagoda_dist.pipeline import _reads_unprepared_shards, plan, prepare_from_config

    cfg = _cfg(tmp_path, class_folders)
    refused = _refused(preflight(cfg, CPU_NODE, reads_unprepared=True))
    assert refused["data"] == (f"no committed shards at {cfg.shards_url}, and --only leaves out prepare: add `--only "
                               "prepare`, or set data.shards to prepared shards")
    args = [sys.executable, "-m", "pagoda_dist.cli", "run", str(TINY), f"run.root={tmp_path}",
            f"data.source={class_folders}", "storage.embedded_s3=false", "eval.num_images=16", "eval.floor_images=0",
            "data.val_fraction=0.5", "runtime.num_workers=1", "--only", "precompute"]
    run = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "--only leaves out prepare" in run.stderr and "precompute: starting" not in run.stdout
    prepare_from_config(cfg)
    run = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "precompute: starting" in run.stdout and "teacher" in run.stderr.strip().splitlines()[-1], run.stderr
    assert not (tmp_path / "runs" / "tiny" / "pairs").exists()
    other = load_config(TINY, [f"run.root={tmp_path / 'other'}", f"data.source={class_folders}",
                               "storage.embedded_s3=false"])
    steps = [s for s in plan(other) if s.name in ("teacher", "distill")]
    assert _reads_unprepared_shards(other, steps) and not _reads_unprepared_shards(other, steps[1:])


def test_refusals_are_one_config_error_listing_each(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, tmp_path / "nowhere", f"eval.inception_weights={tmp_path / 'x.pth'}")
    with pytest.raises(ConfigError) as err:
        refuse_on_problems(preflight(cfg, CPU_NODE))
    lines = str(err.value).splitlines()
    assert lines[0] == "the run cannot start:" and any("eval.inception_weights" in x for x in lines[1:])
