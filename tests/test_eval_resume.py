"""An evaluation stopped on SIGTERM keeps the slices it scored (committed under RUN/eval/slices/<fingerprint>) and
the same command scores only the rest, to the same metrics; a changed plan or a damaged slice is scored again."""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pagoda_dist import storage
from pagoda_dist.config import Config, load_config
from pagoda_dist.eval import slices
from pagoda_dist.eval.evaluate import evaluate_run
from pagoda_dist.eval.metrics import SetFeatures
from pagoda_dist.eval.slices import PAYLOAD, InProcess, Key, Plan, SliceScorer, StageJob, fingerprint
from pagoda_dist.runtime import preemption
from tests.test_eval_scale import commit_exports, only_metrics, run_config, shards  # noqa: F401 (a fixture)

STAGES = (StageJob("teacher", "teacher", 16, "unused"), StageJob("distill", "distill", 16, "unused"),
          StageJob("grow-32", "grow", 32, "unused"))


# ------------------------------------------------------------------------------- a fake plan, scored in a blink
def fake_outputs(plan: Plan, index: int) -> dict[Key, object]:
    """What a slice's outputs look like (features of every set, grid images, seconds), seeded by the slice."""
    rng = np.random.default_rng(index)

    def features(key: Key) -> SetFeatures | None:
        if key[0] in ("floor", "real-vs-floor") and index > 0:  # the floor set ends inside the first slice
            return None
        effnet = rng.standard_normal((6, 1280)).astype(np.float32)
        return SetFeatures([16, 8], effnet[1:5], None, [rng.standard_normal((9, 7, 7, 3)).astype(np.float32)],
                           rng.random(4, dtype=np.float32))

    out: dict[Key, object] = {}
    keys = plan.keys()
    for key in keys:
        if key[0] == "seconds":
            out[key] = {job.name: float(index) + 0.5 for job in plan.stages}
        elif key[0] == "grid":
            out[key] = torch.from_numpy(rng.random((2, 3, 16, 16), dtype=np.float32))[1:]
        else:
            out[key] = features(key)
    return out


@pytest.fixture
def computed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The slices scored (not loaded), in order; no feature network is loaded."""
    scored: list[int] = []

    def compute(self: SliceScorer, index: int) -> dict[Key, object]:
        scored.append(index)
        return fake_outputs(self.plan, index)
    monkeypatch.setattr(slices, "feature_nets", lambda cfg, device: None)
    monkeypatch.setattr(SliceScorer, "compute", compute)
    return scored


def fake_plan(root: Path, name: str) -> Plan:
    cfg = load_config("configs/tiny.yaml", [f"run.root={root}", "storage.embedded_s3=false"])
    return Plan(cfg, STAGES, tuple((i, i + 1) for i in range(5)), (), {},
                storage.join(cfg.run_url, "eval", "slices", name))


def assert_same(got: dict[Key, list], expected: dict[Key, list]) -> None:
    """Every output of every slice identical: values, dtypes, shapes."""
    assert got.keys() == expected.keys()
    for key, values in expected.items():
        for a, b in zip(got[key], values, strict=True):
            if isinstance(b, SetFeatures):
                assert a.heights == b.heights
                for x, y in zip([a.effnet, a.inception, a.clip, *a.swd], [b.effnet, b.inception, b.clip, *b.swd],
                                strict=True):
                    assert (x is None and y is None) or (x.dtype == y.dtype and np.array_equal(x, y)), key
            elif isinstance(b, torch.Tensor):
                assert a.dtype == b.dtype and torch.equal(a, b), key
            else:
                assert a == b, key


def test_a_stopped_evaluation_loads_its_committed_slices_and_scores_only_the_rest(
        tmp_path: Path, computed: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    plan = fake_plan(tmp_path, "resumed")
    monkeypatch.setattr(preemption, "stop_requested", lambda: len(computed) >= 2)
    with pytest.raises(preemption.Stopped, match="after 2 of 5 slices, which are committed"):
        InProcess().score_slices(plan)
    assert [u.rsplit("/", 1)[-1] for u in storage.committed_children(plan.slices_url)] == ["slice-00000",
                                                                                          "slice-00001"]
    monkeypatch.setattr(preemption, "stop_requested", lambda: False)
    computed.clear()
    resumed = InProcess().score_slices(plan)
    assert computed == [2, 3, 4]
    computed.clear()
    uninterrupted = InProcess().score_slices(fake_plan(tmp_path, "uninterrupted"))
    assert computed == [0, 1, 2, 3, 4]
    assert_same(resumed, uninterrupted)


def test_a_damaged_slice_is_scored_again_not_trusted(tmp_path: Path, computed: list[int]) -> None:
    """A payload changed in place, same size, still loadable: only its SHA-256 tells; it is scored again."""
    plan = fake_plan(tmp_path, "damaged")
    expected = InProcess().score_slices(plan)
    url = storage.join(plan.slices_url, "slice-00001", PAYLOAD)
    payload = torch.load(io.BytesIO(storage.read_bytes(url)), weights_only=True)
    payload["values"][1][0, 0, 0, 0] += 1.0  # a pixel of the real images' grid
    buf = io.BytesIO()
    torch.save(payload, buf)
    assert len(buf.getvalue()) == len(storage.read_bytes(url))
    storage.write_bytes(url, buf.getvalue())
    computed.clear()
    assert_same(InProcess().score_slices(plan), expected)
    assert computed == [1]
    computed.clear()
    InProcess().score_slices(plan)  # and committed again, whole
    assert computed == []


# ------------------------------------------------------------------------------------------- the fingerprint
def exports(cfg: Config, version: int) -> tuple[StageJob, ...]:
    """A committed checkpoint with an export for each stage (`version` in its bytes)."""
    jobs = []
    for job in STAGES:
        step = storage.join(cfg.run_url, job.name, "step-000001000")
        storage.remove(step, recursive=True)
        storage.write_committed(step, {"export.pt": f"{job.name} {version}".encode()})
        jobs.append(dataclasses.replace(job, export_url=storage.join(step, "export.pt")))
    return tuple(jobs)


def test_the_fingerprint_changes_with_everything_a_slice_depends_on(tmp_path: Path) -> None:
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", "storage.embedded_s3=false"])
    bounds = ((0, 10), (10, 20))
    stages = exports(cfg, 1)
    base = fingerprint(cfg, stages, bounds)
    assert fingerprint(cfg, stages, bounds) == base
    with_eval = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, workers=3))
    assert fingerprint(with_eval, stages, bounds) == base  # a slice is the same on any number of workers
    changed = [
        dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, swd_images=17)),
        dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=cfg.run.seed + 1)),
        dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, sampler=dataclasses.replace(
            cfg.teacher.sampler, steps=cfg.teacher.sampler.steps + 1))),
    ]
    for other in changed:
        assert fingerprint(other, stages, bounds) != base
    assert fingerprint(cfg, stages, ((0, 12), (12, 20))) != base
    assert fingerprint(cfg, exports(cfg, 2), bounds) != base  # a stage committed again


# ------------------------------------------------------------------------------ a real evaluation, stopped
def read_metrics(cfg: Config) -> dict:
    return json.loads(storage.read_bytes(storage.join(cfg.run_url, "eval", "metrics.json")))


@pytest.mark.timeout(900)
def test_a_real_evaluation_stopped_after_a_slice_resumes_to_the_same_metrics(
        tmp_path: Path, shards: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811 (the fixture)
    cfg = run_config(tmp_path / "run", shards, "grow.resolutions=[]", "eval.num_images=16", "eval.floor_images=16",
                     "eval.images_per_task=8")
    commit_exports(cfg)
    scored: list[int] = []
    compute = SliceScorer.compute

    def counting(self: SliceScorer, index: int) -> dict[Key, object]:
        scored.append(index)
        return compute(self, index)
    monkeypatch.setattr(SliceScorer, "compute", counting)
    slices_url = storage.join(cfg.run_url, "eval", "slices")

    evaluate_run(cfg)
    uninterrupted = only_metrics(read_metrics(cfg))
    assert scored == [0, 1] and storage.list_files(slices_url) == {}  # cleaned up after metrics.json

    scored.clear()
    monkeypatch.setattr(preemption, "stop_requested", lambda: len(scored) >= 1)
    with pytest.raises(preemption.Stopped, match="after 1 of 2 slices"):
        evaluate_run(cfg)
    monkeypatch.setattr(preemption, "stop_requested", lambda: False)
    scored.clear()
    evaluate_run(cfg)
    assert scored == [1]
    assert only_metrics(read_metrics(cfg)) == uninterrupted

    # Stopped again, then run with another evaluation setting: nothing of the old plan is reused (eval.swd_images
    # set explicitly stands for any change of an eval.* key; the fingerprint does not judge which ones matter).
    monkeypatch.setattr(preemption, "stop_requested", lambda: len(scored) >= 1)
    scored.clear()
    with pytest.raises(preemption.Stopped):
        evaluate_run(cfg)
    monkeypatch.setattr(preemption, "stop_requested", lambda: False)
    scored.clear()
    evaluate_run(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, swd_images=16)))
    assert scored == [0, 1] and storage.list_files(slices_url) == {}
