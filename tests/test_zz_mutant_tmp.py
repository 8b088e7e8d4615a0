import pytest
from tests.test_eval_scale import *  # noqa
from tests.test_eval_scale import shards, test_pagoda_run_refuses_before_it_trains as original  # noqa


def test_mutant(tmp_path, shards, monkeypatch):
    from pagoda_dist.eval import preflight
    monkeypatch.setattr(preflight, "check_held_out", lambda cfg: "unchecked")
    original(tmp_path, shards, monkeypatch)
