"""Results that outlive the machine: metrics.jsonl and the wandb folder copied under the run's URL (only what
changed, never a credential), one wandb run per stage resumed by its id and configured by the WANDB_* environment
first, evaluation metrics and grids in that run, and the report's loss and quality curves."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from pagoda_dist import storage
from pagoda_dist.config import load_config
from pagoda_dist.data.grid import save_grid
from pagoda_dist.eval.report import build_report, publish_evaluation, read_records
from pagoda_dist.runtime.results import ResultsSync, stage_results
from pagoda_dist.runtime.telemetry import WANDB_ID_FILE

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
FAKE_KEY = "k" * 12 + "0123456789abcdef"  # what a WANDB_API_KEY value looks like, and nothing else has


def test_sync_copies_what_changed_and_never_a_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    local = tmp_path / "local"
    run = local / "offline-run-1-abc"
    for rel, text in {"run-abc.wandb": "records", "files/config.yaml": "a: 1", "logs/debug.log": "host details",
                      "tmp/scratch": "x", "files/leak.txt": f"key={FAKE_KEY}"}.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    metrics = local / "metrics.jsonl"
    metrics.write_text('{"nimg": 16}\n')
    remote = tmp_path / "remote"
    sync = ResultsSync()
    sync.add(metrics, str(remote / "metrics.jsonl"))
    sync.add(run, str(remote / "wandb" / run.name), leave_out=("logs", "tmp"))
    sync.add(metrics, str(metrics))  # a local run folder already holds its own files: nothing to copy

    assert sorted(Path(u).relative_to(remote).as_posix() for u in sync.sync()) == [
        "metrics.jsonl", "wandb/offline-run-1-abc/files/config.yaml", "wandb/offline-run-1-abc/run-abc.wandb"]
    assert not (remote / "wandb" / run.name / "files" / "leak.txt").exists()  # it holds the API key
    assert sync.sync() == []  # nothing changed
    with metrics.open("a") as f:
        f.write('{"nimg": 32}\n')
    assert sync.sync() == [str(remote / "metrics.jsonl")]
    assert (remote / "metrics.jsonl").read_text() == metrics.read_text()


def test_a_failed_copy_is_reported_and_made_at_the_next_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"nimg": 16}\n')
    sync = ResultsSync()
    sync.add(metrics, str(tmp_path / "remote" / "metrics.jsonl"))
    write = storage.write_bytes

    def unavailable(url: str, data: bytes) -> None:
        raise storage.StorageUnavailable("endpoint down", url=url)

    monkeypatch.setattr(storage, "write_bytes", unavailable)
    assert sync.sync() == []  # training goes on: the checkpoint is committed, only the copy waits
    assert "could not copy" in capsys.readouterr().out
    monkeypatch.setattr(storage, "write_bytes", write)
    assert sync.sync() == [str(tmp_path / "remote" / "metrics.jsonl")]


def test_stage_run_resumes_by_id_and_logs_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two attempts of a stage and the evaluation after it: one wandb id, kept under the stage's URL; WANDB_PROJECT
    wins over the config's project; each attempt's folder lands under RUN_URL/STAGE/wandb/."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "from-environment")
    cfg = load_config(TINY, [f"run.root={tmp_path / 'root'}", "run.name=r", "logging.wandb_mode=offline",
                             "logging.wandb_project=from-config"])
    stage_url = storage.join(cfg.run_url, "teacher")
    local = tmp_path / "scratch"  # rank 0's local disk; the run's URL is elsewhere
    ids, projects = [], []
    for attempt in range(2):
        run, sync = stage_results(stage_url, local, wandb_mode="offline", wandb_project="from-config",
                                  run_name="r", stage="teacher", config={"attempt": attempt})
        run.log({"nimg": 16 * (attempt + 1), "loss": 1.0})
        ids.append(run.id)
        projects.append(run.project)
        run.finish()
        sync.sync()
    stored = json.loads(storage.read_bytes(storage.join(stage_url, WANDB_ID_FILE)))["id"]
    assert ids == [stored, stored] and projects == ["from-environment"] * 2

    grid = torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)
    storage.write_bytes(storage.join(cfg.run_url, "eval", "teacher.png"), save_grid(grid))
    publish_evaluation(cfg, {"stages": {"teacher": {"resolution": 16,
                                                    "metrics": {"swd/avg": 5.0, "FID-EffNetLite0": 7.5}}}})
    folders = sorted(Path(stage_url, "wandb").glob("offline-run-*"))
    assert len(folders) == 3 and all((p / f"run-{stored}.wandb").is_file() for p in folders), folders
    assert not any((p / "logs").exists() for p in folders[:2])  # copied from the scratch disk without them
    # The evaluation's attempt (written in place: this run's URL is a local folder) holds the metrics in its
    # records and the grid as a logged image.
    assert b"eval/FID-EffNetLite0" in (folders[-1] / f"run-{stored}.wandb").read_bytes()
    assert list((folders[-1] / "files" / "media" / "images").rglob("*.png"))


def test_report_draws_loss_and_quality_curves(tmp_path: Path) -> None:
    cfg = load_config(TINY, [f"run.root={tmp_path / 'root'}", "run.name=r", "logging.wandb_mode=disabled"])
    lines = [{"nimg": n, "kimg": n / 1000, "loss": 1.0 / (1 + n / 64), "images_per_s": 9.0} for n in (16, 32, 48)]
    # A resumed attempt replays 32 and 48 after a kill (its records win) and the kill cut a line short.
    replay = [{"nimg": n, "kimg": n / 1000, "loss": 0.25, "images_per_s": 9.0} for n in (32, 48, 64)]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"nimg": 6' + "\n" + \
        "".join(json.dumps(r) + "\n" for r in replay)
    url = storage.join(cfg.run_url, "teacher", "metrics.jsonl")
    storage.write_bytes(url, text.encode())
    assert [(r["nimg"], r["loss"]) for r in read_records(url)] == [(16, lines[0]["loss"]), (32, 0.25), (48, 0.25),
                                                                    (64, 0.25)]
    metrics = {"num_images": 16, "floor_images": 16,
               "stages": {"teacher": {"resolution": 16, "metrics": {"swd/16": 3.0, "swd/avg": 3.0,
                                                                    "FID-EffNetLite0": 40.0}},
                          "grow-32": {"resolution": 32, "metrics": {"swd/avg": 2.0, "FID-EffNetLite0": 30.0},
                                      "bicubic_from_below": {"swd/avg": 2.5, "FID-EffNetLite0": 35.0}}},
               "floor": {"16": {"swd/avg": 1.0, "FID-EffNetLite0": 10.0}}}
    storage.write_bytes(storage.join(cfg.run_url, "eval", "metrics.json"), json.dumps(metrics).encode())

    page = build_report(cfg, tmp_path / "out").read_text()
    assert page.count("<h2>Curves</h2>") == 1
    for name in ("loss", "quality"):
        png = storage.read_bytes(storage.join(cfg.run_url, "curves", f"{name}.png"))
        assert png == (tmp_path / "out" / "curves" / f"{name}.png").read_bytes()
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.width >= 400
    loss = Image.open(tmp_path / "out" / "curves" / "loss.png")
    quality = Image.open(tmp_path / "out" / "curves" / "quality.png")
    assert loss.width < quality.width  # one stage logged: one panel; two quality metrics: two panels


def test_pagoda_evaluate_publishes_as_pagoda_run_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pagoda evaluate` alone logs its metrics into each stage's wandb run under the run's URL, like the chain's
    evaluation step (the scoring itself is tests/test_eval*.py's; here it returns fixed metrics)."""
    pytest.importorskip("wandb")
    from pagoda_dist import cli
    from pagoda_dist.eval import evaluate

    monkeypatch.setenv("WANDB_MODE", "offline")
    results = {"stages": {"teacher": {"resolution": 16, "metrics": {"swd/avg": 5.0, "FID-EffNetLite0": 7.5}}}}
    monkeypatch.setattr(evaluate, "evaluate_run", lambda cfg: results)
    root = tmp_path / "root"
    assert cli.main(["evaluate", str(TINY), f"run.root={root}", "run.name=r", "logging.wandb_mode=offline",
                     "storage.embedded_s3=false"]) == 0
    cfg = load_config(TINY, [f"run.root={root}", "run.name=r"])
    [folder] = Path(storage.join(cfg.run_url, "teacher", "wandb")).glob("offline-run-*")
    assert b"eval/FID-EffNetLite0" in next(folder.glob("run-*.wandb")).read_bytes()
