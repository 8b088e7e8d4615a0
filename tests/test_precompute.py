"""Precompute: the CLIP text tower wrapper, validation before any actor, and whole runs on a local Ray with an
untrained tiny teacher (plumbing, not quality): class and caption data, S3 output, a crashing actor, re-runs that
do no work, a failed shard that is reported, and bit-identical latents across runs."""
from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pagoda_dist import storage
from pagoda_dist.config import Config, load_config
from pagoda_dist.data.manifest import read_manifest
from pagoda_dist.data.prepare import prepare
from pagoda_dist.data.shards import iter_shard
from pagoda_dist.models.text_encoder import TextEncoder, TextEncoderError
from pagoda_dist.models.unet import UNet
from pagoda_dist.precompute import PrecomputeError, PrecomputeFailed, run_precompute
from pagoda_dist.precompute import run as run_module
from pagoda_dist.precompute.teacher import commit_teacher

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.timeout(240)  # safety net; the Ray tests set their own
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")


# ------------------------------------------------------------------------------------------------- helpers
def make_config(root: str, *, text: bool = False, **overrides: object) -> Config:
    """A tiny class- (or text-) conditional setup on grey 32px Fashion-MNIST; the teacher runs at 16px."""
    items = {
        "run.root": root, "data.resolution": 32, "data.channels": 1, "model.in_channels": 1,
        "model.resolution": 16, "model.channels": 16, "model.channel_mult": "[1, 2]", "model.num_res_blocks": 1,
        "model.attn_resolutions": "[]", "precompute.steps": 5, "precompute.batch_size": 16,
        "precompute.psnr_samples": 4, "precompute.cpus_per_actor": 0.5, "precompute.min_actors": 1,
        "precompute.max_actors": 2, "precompute.max_retries": 1,
    }
    if text:
        items.update({"model.text_dim": 64, "precompute.clip_model": "pagoda-tiny-text",
                      "precompute.clip_random_init": True})
    else:
        items["model.num_classes"] = 10
    items.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def make_teacher(cfg: Config) -> None:
    """Commits an untrained teacher checkpoint in the runtime's layout (export.pt with the EMA weights)."""
    torch.manual_seed(0)
    commit_teacher(cfg.run_url, UNet(cfg.model), nimg=64)


def make_data(cfg: Config, limit: int, shard_size: int) -> None:
    prepare("builtin:fashion-mnist", cfg.shards_url, resolution=32, channels=1, shard_size=shard_size,
            limit=limit, workers=1, progress=False)


def pair_arrays(pairs_url: str) -> dict[str, dict[str, np.ndarray]]:
    """Every pair sample's arrays by (shard, key)."""
    manifest = read_manifest(pairs_url)
    out = {}
    for shards in manifest.splits.values():
        for info in shards:
            for s in iter_shard(storage.join(pairs_url, info.name)):
                out[f"{info.name}/{s.key}"] = s.arrays
    return out


@pytest.fixture
def no_actors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if precompute gets as far as starting Ray or its actors."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("validation should have failed before any actor started")
    monkeypatch.setattr(run_module, "_run_pool", refuse)
    monkeypatch.setattr(run_module, "ensure_ray", refuse)


# ------------------------------------------------------------------------------------------- text encoder
def test_text_encoder_tiny_arch(tmp_path: Path) -> None:
    import open_clip

    enc = TextEncoder("pagoda-tiny-text", None, random_init=True)
    out = enc(["a photo of a sneaker", "a bag", "a photo of a sneaker"])
    assert out.pooled.shape == (3, 64) and out.tokens.shape == (3, 32, 64) and out.mask.shape == (3, 32)
    assert out.mask.sum(1).tolist() == [7, 4, 7]  # start + words + end-of-text
    assert torch.equal(out.pooled[0], out.pooled[2])
    assert enc.describe()["random_init"] is True and enc.dim == 64
    # Every process builds the same random tower, and the pooled output is open_clip's encode_text.
    torch.manual_seed(0)
    ref = open_clip.create_model("pagoda-tiny-text")
    with torch.no_grad():
        expected = ref.encode_text(enc.tokenizer(["a bag"]))
    torch.testing.assert_close(out.pooled[1:2], expected, atol=1e-5, rtol=1e-5)
    # Weights from a local file; then the output says so.
    path = tmp_path / "tiny.pt"
    torch.save(ref.state_dict(), path)
    loaded = TextEncoder("pagoda-tiny-text", str(path))
    assert loaded.describe()["random_init"] is False and loaded.describe()["weights"] == str(path)
    torch.testing.assert_close(loaded(["a bag"]).pooled, expected, atol=1e-5, rtol=1e-5)


def test_text_encoder_refuses_missing_weights(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(TextEncoderError, match=re.escape(str(missing))):
        TextEncoder("pagoda-tiny-text", str(missing))
    with pytest.raises(TextEncoderError, match="clip_random_init"):
        TextEncoder("pagoda-tiny-text", None)
    with pytest.raises(TextEncoderError, match="unknown open_clip architecture"):
        TextEncoder("no-such-arch", None, random_init=True)


# ------------------------------------------------------------------------------------------- validation
@needs_fashion
def test_validation_fails_before_any_actor(tmp_path: Path, no_actors: None) -> None:
    cfg = make_config(str(tmp_path))
    make_data(cfg, limit=40, shard_size=20)
    teacher_url = storage.join(cfg.run_url, "teacher")
    with pytest.raises(PrecomputeError, match=re.escape(f"no committed teacher checkpoint under {teacher_url}")):
        run_precompute(cfg, progress=False)
    # A checkpoint folder without its COMMIT marker (a save that died) is not a teacher.
    storage.write_bytes(storage.join(teacher_url, "step-000000064", "export.pt"), b"partial")
    with pytest.raises(PrecomputeError, match="uncommitted"):
        run_precompute(cfg, progress=False)
    # A text teacher with a CLIP path that does not exist.
    text_cfg = make_config(str(tmp_path), text=True, **{"run.name": "text",
                                                         "data.shards": cfg.shards_url,
                                                         "precompute.clip_weights": str(tmp_path / "clip.pt"),
                                                         "precompute.clip_random_init": False})
    make_teacher(text_cfg)
    with pytest.raises(PrecomputeError, match=re.escape(str(tmp_path / "clip.pt"))):
        run_precompute(text_cfg, progress=False)
    # Missing input shards.
    with pytest.raises(PrecomputeError, match="data.shards"):
        run_precompute(make_config(str(tmp_path), **{"data.shards": str(tmp_path / "none")}), progress=False)


# ------------------------------------------------------------------------------------------------ runs
@needs_fashion
@pytest.mark.slow  # its autoscaling check (1 -> 2 actors) depends on timing: a loaded machine may finish first
@pytest.mark.timeout(240)
def test_class_pairs_on_s3_survive_a_crash_rerun_and_are_deterministic(
        s3_env: str, local_ray: object, tmp_path: Path) -> None:
    cfg = make_config(s3_env.rstrip("/"), **{"precompute.flip": True})
    make_data(cfg, limit=96, shard_size=24)
    make_teacher(cfg)
    inputs = read_manifest(cfg.shards_url)
    n_shards = sum(len(s) for s in inputs.splits.values())
    assert n_shards >= 3

    crash = tmp_path / "crashed-once"
    report = run_precompute(cfg, progress=False, crash_once_marker=str(crash))
    assert crash.exists() and report.actor_deaths == 1 and report.retries >= 1
    assert report.committed and report.shards_computed == n_shards and not report.failed
    assert report.peak_actors == 2  # autoscaled from 1 to max_actors
    assert report.network_evals_per_latent == 2 * (5 - 1)  # Heun on 5 points
    assert report.quality.n == 4 * n_shards and np.isfinite(report.quality.mean)

    manifest = read_manifest(cfg.pairs_url)
    assert manifest.kind == "latent-pairs" and manifest.class_names == inputs.class_names
    assert {k: manifest.count(k) for k in manifest.splits} == {k: inputs.count(k) for k in inputs.splits}
    assert manifest.extra["psnr"]["images"] == 4 * n_shards
    for shards in manifest.splits.values():
        for info in shards:
            prefix = storage.join(cfg.pairs_url, info.name.split("/")[0])
            assert storage.verify(prefix) == [] and "psnr_mean" in storage.read_commit(prefix).meta
    pairs = pair_arrays(cfg.pairs_url)
    first = next(iter(pairs.values()))
    assert first["latent"].shape == (1, 16, 16) and first["latent"].dtype == np.float32
    assert first["latent_flip"].shape == (1, 16, 16)
    assert 20 < float(np.std(first["latent"])) < 200  # latents live at sigma_max = 80

    # The data reader streams the set like image shards.
    from pagoda_dist.data.reader import StreamingReader
    batch = next(iter(StreamingReader(cfg.pairs_url, batch_size=8, needs_latents=True, hflip=True)))
    assert batch.latent.shape == (8, 1, 16, 16) and batch.condition.class_labels is not None

    # A re-run finds the committed set and starts nothing.
    again = run_precompute(cfg, progress=False)
    assert again.reused and again.actors_started == 0 and again.images_computed == 0

    # Determinism: a clean run with one actor gives bit-identical latents to the run that lost an actor.
    other = make_config(s3_env.rstrip("/"), **{"precompute.flip": True, "precompute.max_actors": 1,
                                               "precompute.output": f"{s3_env.rstrip('/')}/pairs-again"})
    run_precompute(other, progress=False)
    redo = pair_arrays(other.pairs_url)
    assert redo.keys() == pairs.keys()
    for key, arrays in pairs.items():
        for name in ("latent", "latent_flip"):
            assert np.array_equal(arrays[name], redo[key][name]), f"{key} {name} differs between runs"


@needs_fashion
@pytest.mark.timeout(180)
def test_caption_pairs_record_text_embeddings(tmp_path: Path, local_ray: object) -> None:
    cfg = make_config(str(tmp_path), text=True, **{"precompute.max_actors": 1})
    make_data(cfg, limit=40, shard_size=20)
    make_teacher(cfg)
    report = run_precompute(cfg, progress=False)
    assert report.committed and report.text_encoder["random_init"] is True
    manifest = read_manifest(cfg.pairs_url)
    assert manifest.has_captions and manifest.extra["text_encoder"]["arch"] == "pagoda-tiny-text"
    assert any("RANDOMLY INITIALISED" in note for note in manifest.notes)

    enc = TextEncoder("pagoda-tiny-text", None, random_init=True)
    shard = manifest.splits["train"][0].name
    samples = list(iter_shard(storage.join(cfg.pairs_url, shard)))
    assert all(s.caption for s in samples)
    s = samples[0]
    assert s.arrays["emb"].shape == (64,) and s.arrays["emb"].dtype == np.float16
    assert s.arrays["tok"].shape == (32, 64) and s.arrays["mask"].dtype == bool
    # The stored embedding is the tower's output (rounded to float16, exactly what conditioned the teacher).
    expected = enc([s.caption]).pooled[0].to(torch.float16).numpy()
    np.testing.assert_allclose(s.arrays["emb"].astype(np.float32), expected.astype(np.float32), atol=2e-3)
    assert s.arrays["mask"].sum() == enc([s.caption]).mask.sum()


@needs_fashion
@pytest.mark.timeout(180)
def test_failed_shard_is_retried_then_reported_and_others_commit(tmp_path: Path, local_ray: object,
                                                                   capfd: pytest.CaptureFixture) -> None:
    """A shard that keeps failing is retried, then reported; the others commit. Once it is repaired, the same
    command computes that shard alone (with a progress bar showing rate and ETA) and commits the set."""
    cfg = make_config(str(tmp_path), **{"precompute.max_actors": 1})
    make_data(cfg, limit=40, shard_size=20)
    make_teacher(cfg)
    inputs = read_manifest(cfg.shards_url)
    bad = inputs.splits["train"][0].name
    bad_path = Path(storage.filesystem(storage.join(cfg.shards_url, bad))[1])
    original = bad_path.read_bytes()
    bad_path.write_bytes(b"\xff" * len(original))  # same size, so only decoding notices
    with pytest.raises(PrecomputeFailed, match=bad) as info:
        run_precompute(cfg, progress=False)
    report = info.value.report
    assert list(report.failed) == [bad] and report.retries == 1  # max_retries = 1
    assert not storage.is_committed(cfg.pairs_url)
    good = [t.name for shards in inputs.splits.values() for t in shards if t.name != bad]
    for name in good:
        assert storage.is_committed(storage.join(cfg.pairs_url, name[: -len(".tar")]))
    assert not storage.is_committed(storage.join(cfg.pairs_url, bad[: -len(".tar")]))

    bad_path.write_bytes(original)
    capfd.readouterr()
    rerun = run_precompute(cfg, progress=True)
    assert rerun.ok and rerun.committed and storage.is_committed(cfg.pairs_url)
    assert (rerun.shards_computed, rerun.shards_skipped) == (1, len(good))
    assert rerun.images_computed == inputs.splits["train"][0].count
    bar = capfd.readouterr().err
    assert "precompute" in bar and "img/s" in bar and "<" in bar, bar[-300:]  # tqdm: elapsed<remaining, rate
    shutil.rmtree(storage.filesystem(cfg.shards_url)[1])


@needs_fashion
@pytest.mark.timeout(120)
def test_actors_that_cannot_be_placed_are_refused(tmp_path: Path, local_ray: object) -> None:
    cfg = make_config(str(tmp_path), **{"precompute.min_actors": 3, "precompute.max_actors": 3,
                                        "precompute.cpus_per_actor": 1})
    make_data(cfg, limit=20, shard_size=20)
    make_teacher(cfg)
    with pytest.raises(PrecomputeError, match="min_actors=3"):  # 3 CPUs wanted, the local Ray has 2
        run_precompute(cfg, progress=False)


@needs_fashion
@pytest.mark.timeout(120)
def test_pool_gives_up_when_actors_cannot_start(tmp_path: Path, local_ray: object) -> None:
    import dataclasses

    from pagoda_dist.precompute import ActorPool, PoolError, PoolSpec, build_job
    from pagoda_dist.precompute.job import make_tasks

    cfg = make_config(str(tmp_path))
    make_data(cfg, limit=20, shard_size=20)
    make_teacher(cfg)
    job, inputs, _ = build_job(cfg)
    broken = dataclasses.replace(job, teacher_url=str(tmp_path / "gone" / "export.pt"))  # deleted after validation
    pool = ActorPool(broken, PoolSpec(min_actors=2, max_actors=2, cpus_per_actor=0.5, gpus_per_actor=0.0,
                                      max_retries=1))
    with pytest.raises(PoolError, match="died while starting.*gone/export.pt"):
        pool.run(make_tasks(inputs, cfg.shards_url, cfg.pairs_url))
    assert not pool.slots  # every actor it started is gone


def test_an_imported_teacher_feeds_both_precompute_and_distill(tmp_path: Path) -> None:
    """`commit_teacher` (importing a teacher trained elsewhere) writes the runtime's export layout: precompute loads
    it, and the distil stage builds its generator from it with the same weights."""
    from pagoda_dist.precompute.teacher import load_teacher
    from pagoda_dist.runtime import load_export
    from pagoda_dist.stages import build_distill

    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", "storage.embedded_s3=false"])
    net = UNet(cfg.model)
    ref = commit_teacher(cfg.run_url, net, nimg=64)
    export = load_export(storage.join(ref.url, "export.pt"))
    _, architecture = load_teacher(storage.join(ref.url, "export.pt"))
    assert architecture == net.architecture()
    generator = build_distill(cfg, export).generator
    torch.testing.assert_close(generator.net.enc[0].weight, net.enc[0].weight, rtol=0, atol=0)


# ------------------------------------------------------------------------- bad input, bad output (no Ray)
def rewrite_shard(shard_url: str, change: dict[str, bytes]) -> None:
    """Rewrites an image shard in place with the images of the keys in `change` replaced (index included)."""
    from pagoda_dist.data.samples import Sample
    from pagoda_dist.data.shards import ShardWriter

    samples = list(iter_shard(shard_url))
    folder, name = shard_url.rsplit("/", 1)
    writer = ShardWriter(folder, name)
    for s in samples:
        writer.write(Sample(key=s.key, image=change.get(s.key, s.image), image_ext=s.image_ext, cls=s.cls,
                            caption=s.caption, meta=s.meta))
    writer.close()


def first_task(cfg: Config, **job_changes: object) -> tuple[object, object]:
    """The validated job (with `job_changes`) and the task of the first input shard, for an in-process inverter."""
    from pagoda_dist.precompute.job import make_tasks

    job, inputs, _ = run_module.build_job(cfg)
    return dataclasses.replace(job, **job_changes), make_tasks(inputs, cfg.shards_url, cfg.pairs_url)[0]


@needs_fashion
def test_a_corrupt_sample_is_skipped_and_counted_not_fatal(tmp_path: Path) -> None:
    """As the training reader does: the sample that does not decode is left out and counted, the rest commit, and
    the batches of the others are those of a clean shard (their latents unchanged)."""
    from pagoda_dist.precompute import ShardInverter

    cfg = make_config(str(tmp_path))
    make_data(cfg, limit=24, shard_size=24)
    make_teacher(cfg)
    job, task = first_task(cfg, batch_size=8)
    clean = ShardInverter(job).process(task)
    clean_latents = {s.key: s.arrays["latent"] for s in iter_shard(storage.join(cfg.pairs_url, clean.name))}
    bad = sorted(clean_latents)[5]

    rewrite_shard(task.input_url, {bad: b"\x89PNG\r\n\x1a\n not an image"})
    result = ShardInverter(job).process(task)
    assert (result.count, result.skipped) == (clean.count - 1, 1)
    assert result.skipped_samples[0].startswith(f"{bad}: ") and "decode" in result.skipped_samples[0]
    assert storage.read_commit(storage.join(cfg.pairs_url, "train-000000")).meta["skipped"] == 1
    kept = {s.key: s.arrays["latent"] for s in iter_shard(storage.join(cfg.pairs_url, result.name))}
    assert set(kept) == set(clean_latents) - {bad}
    # batches of 8 usable samples: only the samples after the bad one move to other batches
    for key in sorted(kept)[:5]:
        assert np.array_equal(kept[key], clean_latents[key]), key


@needs_fashion
def test_quality_gate_refuses_low_psnr_and_nan_latents_and_commits_nothing(tmp_path: Path) -> None:
    from pagoda_dist.precompute import ShardInverter
    from pagoda_dist.precompute.worker import ShardRejected

    cfg = make_config(str(tmp_path), **{"precompute.min_psnr_db": 99})
    make_data(cfg, limit=8, shard_size=8)
    make_teacher(cfg)
    job, task = first_task(cfg)
    with pytest.raises(ShardRejected, match=r"inversion PSNR [\d.]+ dB \(mean of 4 images\) is below "
                                            r"precompute.min_psnr_db=99"):
        ShardInverter(job).process(task)
    assert not storage.exists(task.output_prefix)  # neither committed nor left half-written

    passing = ShardInverter(dataclasses.replace(job, min_psnr_db=0.0)).process(task)  # 0: only NaN fails
    assert passing.psnr_n == 4 and 0.0 < passing.latent_std < 2.0  # latent std / sigma_max of the shard
    storage.remove(task.output_prefix, recursive=True)

    net = UNet(cfg.model)
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    commit_teacher(cfg.run_url, net, nimg=128)  # a diverged teacher: the latest checkpoint
    job, task = first_task(cfg, min_psnr_db=0.0)
    with pytest.raises(ShardRejected, match="non-finite latent values"):
        ShardInverter(job).process(task)
    assert not storage.exists(task.output_prefix)


def test_min_psnr_db_is_validated() -> None:
    from pagoda_dist.config import ConfigError

    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ConfigError, match="precompute.min_psnr_db"):
            load_config(None, [f"precompute.min_psnr_db={bad}"])
    assert load_config(None, []).precompute.min_psnr_db == 20.0


def test_report_gives_latent_spread_per_shard_and_lists_skipped_samples() -> None:
    from pagoda_dist.precompute import PrecomputeReport, Quality, ShardResult

    shards = [ShardResult(split="train", name=f"train-{i:06d}/train-{i:06d}.tar", count=10, bytes=1, psnr_mean=40.0,
                          psnr_min=39.0, psnr_n=4, network_evals=22, seconds=1.0, latent_std=0.9 + i / 100,
                          skipped=i, skipped_samples=tuple(f"{k:06d}: stored image does not decode" for k in range(i)))
              for i in range(3)]
    report = PrecomputeReport(pairs_url="p", reused=False, shards_total=3, shards_computed=3, shards_skipped=0,
                              images_total=30, images_computed=30, latents_per_image=1, network_evals_per_latent=22,
                              quality=Quality.of(shards), elapsed_s=1.0, shards=shards)
    text = report.summary()
    assert "latent std / sigma_max per shard: train-000000 0.900, train-000001 0.910, train-000002 0.920" in text
    assert "skipped 3 corrupt input sample(s)" in text and "train-000002/train-000002.tar: 000001: stored" in text
