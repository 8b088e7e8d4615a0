"""Resume without Ray: a log window cut by a checkpoint continues, through the store, in the resumed run; the
micro-batch setting and which world-size changes a checkpoint accepts.

The end-to-end checks (a killed Ray worker, one DataLoader worker per rank, checkpoints inside log windows, the
teacher and the two-engine distil stage) are the slow tests of tests/test_runtime.py; the loader seed that keeps
a stage's random numbers independent of the worker count and of a resume is tested in tests/test_data.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagoda_dist.runtime.checkpoint import CheckpointMismatch, CheckpointStore, SavePayload, check_resumable
from pagoda_dist.runtime.comm import SoloComm
from pagoda_dist.runtime.telemetry import Telemetry


class _NoEngines:
    """A driver without networks (the store only needs save_state / load_state)."""

    def save_state(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)

    def load_state(self, directory: Path) -> None:
        pass


def _telemetry(start_nimg: int) -> Telemetry:
    return Telemetry(SoloComm(), stage="teacher", start_nimg=start_nimg, total_nimg=64)


def test_a_log_window_cut_by_a_resume_is_averaged_over_all_its_steps(tmp_path: Path) -> None:
    """A checkpoint 3 steps into a 4-step log window: the resumed run's log averages all 4 steps, as an
    uninterrupted run's does (not only the one taken after the resume)."""
    steps = [{"loss": 0.91, "rec": 0.3}, {"loss": 0.77, "rec": 0.2}, {"loss": 0.65, "rec": 0.1},
             {"loss": 0.6, "rec": 0.05}]
    straight = _telemetry(0)
    for losses in steps:
        straight.add(losses)
    expected = straight.log(64)

    first = _telemetry(0)
    for losses in steps[:3]:
        first.add(losses)
    store = CheckpointStore(str(tmp_path / "run"), "teacher", scratch=tmp_path / "scratch")
    ref = store.save(SavePayload(48, _NoEngines(), {"position": 48}, {}, ema={},
                                 export={"ema": {"w": torch.zeros(1)}}, window=first.window()))
    loaded = store.load(ref, _NoEngines())

    resumed = _telemetry(48)
    resumed.resume_window(loaded.window)
    resumed.add(steps[3])
    got = resumed.log(64)
    assert (got["loss"], got["rec"]) == (expected["loss"], expected["rec"])
    assert resumed.log(64).keys() == {*expected.keys()} - {"loss", "rec"}  # the next window starts empty


def test_micro_batch_derives_the_accumulation_and_is_validated() -> None:
    from pagoda_dist.config import ConfigError, load_config

    cfg = load_config(None, ["runtime.num_workers=2", "teacher.train.batch_size=24", "teacher.train.micro_batch=4"])
    assert [cfg.teacher.train.accumulation(w) for w in (1, 2, 3, 6)] == [6, 3, 2, 1]
    assert load_config(None, ["teacher.train.grad_accum=2"]).teacher.train.accumulation(5) == 2  # unchanged default
    with pytest.raises(ConfigError, match="micro_batch.*not both"):
        load_config(None, ["teacher.train.micro_batch=4", "teacher.train.grad_accum=2"])
    with pytest.raises(ConfigError, match="teacher.train.batch_size.*runtime.num_workers x micro_batch = 2 x 5"):
        load_config(None, ["runtime.num_workers=2", "teacher.train.batch_size=24", "teacher.train.micro_batch=5"])


def test_another_world_size_is_accepted_only_where_it_can_be_honoured() -> None:
    """Same global batch and ZeRO-1/2 state (or fp32 ZeRO-0): accepted; otherwise refused with the reason and the
    key that resumes it as saved."""
    saved = {"world_size": 2, "zero_stage": 2, "precision": "bf16", "batch_size": 24}
    check_resumable({**saved, "world_size": 3}, saved, "URL")
    check_resumable({**saved, "world_size": 1, "zero_stage": 0, "precision": "fp32"},
                    {**saved, "zero_stage": 0, "precision": "fp32"}, "URL")
    refusals = {"ZeRO stage 3 with bf16": {"zero_stage": 3}, "ZeRO stage 1 with bf16": {"zero_stage": 1},
                "does not record its global batch": {"batch_size": None},
                "global batch changed from 24 to 48": {"expected_batch": 48}}
    for reason, change in refusals.items():
        before = {**saved, **{k: v for k, v in change.items() if k != "expected_batch"}}
        expected = {**before, "world_size": 3, "batch_size": change.get("expected_batch", before["batch_size"])}
        with pytest.raises(CheckpointMismatch, match=f"world_size=2 but this run has world_size=3.*{reason}.*"
                                                     "Set runtime.num_workers=2 to resume"):
            check_resumable(expected, before, "URL")
