"""`pagoda run CONFIG --rehearse`: the paper-scale configs at toy size, every structural path kept.

The fast tests check what the rehearsal keeps and shrinks; the slow one runs `imagenet-512.yaml` rehearsed end to
end on a local 3-node Ray cluster (two training workers on two nodes), with the source images on the embedded S3
server in ImageNet's class-folder layout, through 64 -> 128 -> 256 -> 512 and evaluation, killed mid-grow and
finished by the same command; then `t2i-512.yaml` from a JSONL caption manifest over the same images through the
steps where text-to-image differs (CLIP text embeddings, the text-conditioned teacher, the guidance-aware student
with the CLIP term, a grown stage on text): its 256 and 512 stages are the ImageNet ones' code and settings.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pagoda_dist import storage
from pagoda_dist.chain import chain
from pagoda_dist.config import load_config
from pagoda_dist.launch.local_cluster import TRAIN_WORKER, LocalCluster
from pagoda_dist.rehearsal import SUFFIX, rehearsal_config
from pagoda_dist.runtime import CheckpointStore, load_export

ROOT = Path(__file__).resolve().parents[1]
PAPER = [ROOT / "configs/imagenet-512.yaml", ROOT / "configs/t2i-512.yaml"]
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")
# Source crops per photo: 64 images (half the rehearsal's 128, so half the inversions), half of them held out (the
# 16 evaluated, with a margin), in 16-image shards so that each split still has several for prepare and precompute.
CROPS = 16


def _structure(cfg) -> dict:
    """Everything a rehearsal must keep as configured."""
    adv = [(a.rec_loss, a.uses_gan, a.discriminator.backbone, a.diffaug, a.guidance_range, a.clip_loss_weight > 0,
            a.distill_loss_weight > 0) for a in (cfg.distill.adversarial, cfg.grow.adversarial)]
    return {"chain": [(s.kind, s.resolution, s.start_from, s.train.grad_accum) for s in chain(cfg)],
            "condition": (cfg.model.num_classes, bool(cfg.model.text_dim)), "adversarial": adv,
            "grow": (cfg.grow.split_steps, cfg.grow.recon_discriminator, cfg.grow.trainable_decoder_blocks),
            "flips": (cfg.data.hflip, cfg.precompute.flip), "zero": cfg.runtime.zero_stage,
            "precision": cfg.runtime.precision, "solvers": (cfg.precompute.solver, cfg.teacher.sampler.solver),
            "data": (cfg.data.source, cfg.data.source_kind, cfg.data.resolution, cfg.data.image_format),
            "storage": (cfg.run.root, cfg.storage.embedded_s3, cfg.runtime.ray_address),
            "model": (cfg.model.channel_mult, cfg.model.attn_resolutions, cfg.model.resolution)}


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_a_rehearsal_keeps_every_structural_path_and_lists_what_it_shrank(path: Path) -> None:
    full = load_config(path)
    small, changes = rehearsal_config(path, gpus=0)
    assert _structure(small) == _structure(full)
    assert small.run.name == full.run.name + SUFFIX and small.run_url != full.run_url
    changed = {c.key: (c.before, c.after) for c in changes}
    assert changed["model.channels"][1] < full.model.channels and small.model.num_res_blocks == 1
    assert changed["runtime.use_gpu"] == (True, False) and small.runtime.num_workers == 2
    assert all(s.train.batch_size == 2 * s.train.grad_accum and s.train.total_kimg * 1000 <= 4 * s.train.batch_size
               for s in chain(small))
    assert small.eval.num_images < full.eval.num_images and small.data.limit
    # every change is listed, and nothing else moved
    flat_full, flat_small = _flat(json.loads(json.dumps(_as_dict(full)))), _flat(_as_dict(small))
    assert {k for k in flat_full if flat_full[k] != flat_small[k]} == set(changed)


def test_an_override_wins_over_the_rehearsal(tmp_path: Path) -> None:
    small, changes = rehearsal_config(PAPER[0], ["runtime.num_workers=1", "model.channels=32"], gpus=0)
    assert small.runtime.num_workers == 1 and small.model.channels == 32
    assert not {"runtime.num_workers", "model.channels"} & {c.key for c in changes}


def test_rehearse_with_dry_run_lays_out_the_shrunk_chain(capsys: pytest.CaptureFixture) -> None:
    from pagoda_dist.cli import main

    # In this process, as tests/test_config.py runs the paper configs' dry runs: no second interpreter to start.
    assert main(["run", str(PAPER[1]), "--rehearse", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[pagoda] rehearsal:" in out and "model.channels" in out
    assert re.search(r"grow-512\s+512\s+0\.008\s+2\b", out), out


def _as_dict(cfg) -> dict:
    from pagoda_dist.config import to_dict

    return to_dict(cfg)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------- end to end, on 3 nodes
def _photo(name: str) -> Image.Image:
    import skimage.data

    return Image.open(Path(skimage.data.__file__).parent / name).convert("RGB")


def _upload_sources(bucket: str, tmp: Path) -> tuple[str, str]:
    """ImageNet's class-folder layout (train/nXXXXXXXX/*.JPEG) and a JSONL caption manifest over the same crops,
    on the S3 server: 16 crops of each of 4 photos (CROPS)."""
    rng = np.random.default_rng(0)
    tree, lines = tmp / "imagenet" / "train", []
    for c, name in enumerate(PHOTOS):
        img, folder = _photo(name), tree / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(CROPS):
            side = int(rng.integers(64, min(img.size)))
            x, y = int(rng.integers(0, img.width - side)), int(rng.integers(0, img.height - side))
            img.crop((x, y, x + side, y + side)).save(folder / f"n{c:08d}_{i}.JPEG", quality=90)
            lines.append(json.dumps({"image": f"train/n{c:08d}/n{c:08d}_{i}.JPEG",
                                     "caption": f"a photo of a {name.split('.')[0]}, crop {i}"}))
    (tmp / "imagenet" / "captions.jsonl").write_text("\n".join(lines) + "\n")
    storage.upload_dir(tmp / "imagenet", storage.join(bucket, "imagenet"))
    return storage.join(bucket, "imagenet", "train"), storage.join(bucket, "imagenet", "captions.jsonl")


def _rehearse(cluster: LocalCluster, config: Path, overrides: list[str], log: Path, cwd: Path,
              flags: tuple[str, ...] = ()) -> subprocess.Popen:
    """`pagoda run CONFIG --rehearse [FLAGS]` as a user starts it, joined to `cluster`."""
    env = {**os.environ, **cluster.client_env(), "WANDB_MODE": "disabled"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "pagoda_dist.cli", "run", str(config), *overrides,
                                 f"runtime.ray_address={cluster.address}", "--rehearse", *flags], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _finished(driver: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        code = driver.wait(timeout=timeout)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    output = log.read_text(errors="replace")
    assert code == 0, output[-6000:]
    return output


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_paper_configs_rehearse_end_to_end_on_three_nodes(s3_env: str, tmp_path: Path) -> None:
    classes, captions = _upload_sources(s3_env, tmp_path)
    # No Inception weights or ADM reference batches here (standard FID is left out); all else as configured.
    common = [f"run.root={s3_env}pagoda", "storage.embedded_s3=false", "eval.inception_weights=",
              "eval.reference_stats=", "logging.wandb_mode=disabled", "data.val_fraction=0.5", "data.shard_size=16"]
    imagenet = [*common, f"data.source={classes}",
                # more steps in grow-256 than a rehearsal takes (8, a checkpoint every 2), so the kill below lands
                # inside that stage
                "grow.train.total_kimg=0.016", "logging.checkpoint_every_kimg=0.004"]
    t2i = [*common, f"data.source={captions}"]
    cfg = rehearsal_config(PAPER[0], imagenet, gpus=0)[0]
    store = CheckpointStore(cfg.run_url, "grow-256")
    with LocalCluster(workers=2, cpus_per_node=1, object_store_mb=100) as cluster:  # one worker per node
        cluster.wait_for_nodes(alive=3)
        # 1. ImageNet, killed (SIGKILL to the driver's process group) once grow-256 has committed a checkpoint.
        log = tmp_path / "imagenet.log"
        driver = _rehearse(cluster, PAPER[0], imagenet, log, tmp_path)
        deadline = time.monotonic() + 900
        hosts: set[int] = set()
        while (latest := store.latest_committed()) is None:
            assert driver.poll() is None, log.read_text(errors="replace")[-6000:]
            assert time.monotonic() < deadline, "grow-256 committed no checkpoint in time"
            hosts |= {i for i, node in enumerate(cluster.nodes_started) if node.runs(TRAIN_WORKER)}
            time.sleep(0.3)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        assert latest.nimg < cfg.grow.train.total_kimg * 1000, "grow-256 finished before the kill"
        assert len(hosts) >= 2, hosts  # the two training workers ran on two different nodes
        first = log.read_text(errors="replace")
        assert "[pagoda] rehearsal:" in first and "model.channels" in first
        for step in ("prepare", "teacher", "precompute", "distill", "grow-128"):
            assert f"[pagoda] {step}: done" in first, first[-6000:]

        # 2. The same command resumes grow-256 from its checkpoint and finishes the chain.
        output = _finished(_rehearse(cluster, PAPER[0], imagenet, log, tmp_path), log, 900)
        resumed = output[len(first):]
        assert re.search(r"\[grow-256\] resumed from \S+ \((\d+) images seen\)", resumed), resumed[-6000:]
        assert "[pagoda] teacher: already committed, skipped" in resumed
        for stage in ("grow-256", "grow-512", "evaluate"):
            assert f"[pagoda] {stage}: done" in resumed, resumed[-6000:]
        metrics = json.loads(storage.read_bytes(storage.join(cfg.run_url, "eval", "metrics.json")))
        assert set(metrics["stages"]) == {"teacher", "distill", "grow-128", "grow-256", "grow-512"}

        # 3. Text-to-image, captions embedded by a small CLIP tower, the guidance-aware generator and the CLIP term,
        #    then a grown stage on text. (The steps after are the ImageNet rehearsal's, which ran above.)
        log = tmp_path / "t2i.log"
        steps = ("prepare", "teacher", "precompute", "distill", "grow-128")
        only = tuple(arg for step in steps for arg in ("--only", step))
        output = _finished(_rehearse(cluster, PAPER[1], t2i, log, tmp_path, only), log, 900)
        for step in steps:
            assert f"[pagoda] {step}: done" in output, output[-6000:]
        t2i_cfg = rehearsal_config(PAPER[1], t2i, gpus=0)[0]
        distill = load_export(CheckpointStore(t2i_cfg.run_url, "distill").latest_export()[0])
        assert distill["architecture"]["model"]["text_dim"] > 0, distill["architecture"]["model"]
        assert CheckpointStore(t2i_cfg.run_url, "grow-128").latest_committed() is not None
