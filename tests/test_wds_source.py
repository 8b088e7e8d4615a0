"""Existing WebDataset shards in img2dataset's layout (KEY.jpg + KEY.txt + KEY.json, written by the real
`webdataset` TarWriter from real photo tiles) indexed in place and streamed by the reader: corrupt members
replaced and counted, exact resume, brace patterns on the embedded S3 server, and a teacher run that resumes
with identical losses."""
from __future__ import annotations

import functools
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pagoda_dist import storage
from pagoda_dist.config import ConfigError, load_config
from pagoda_dist.data.builtin import build
from pagoda_dist.data.imaging import decode_image, encode_image, fit_square
from pagoda_dist.data.manifest import read_manifest
from pagoda_dist.data.reader import StreamingReader
from pagoda_dist.data.samples import CorruptSample
from pagoda_dist.data.shards import decode_members, iter_shard
from pagoda_dist.data.sources import SourceError, expand_braces
from pagoda_dist.data.tensors import to_tensor
from pagoda_dist.data.wds_source import decode_webdataset, index_webdataset, scan_shard
from pagoda_dist.precompute.job import make_tasks

SHARDS, PER_SHARD, SIDE = 3, 40, 16
TRUNCATED = ("00000", 7)  # (shard, sample): its JPEG is cut short, the way an interrupted download leaves it


def caption_of(group: str, i: int) -> str:
    return f"a photo tile of the {group} picture, number {i}"


def write_img2dataset_shards(folder: Path) -> dict[str, tuple[str, bytes]]:
    """img2dataset's output: NNNNN.tar of KEY.jpg / KEY.txt / KEY.json, keys SSSSSIIII; returns {key: (caption,
    jpeg)} of every sample written."""
    import webdataset as wds

    source = build("photo-tiles", resolution=SIDE, val_fraction=0.0, seed=0, limit=SHARDS * PER_SHARD)
    folder.mkdir(parents=True)
    written = {}
    for s in range(SHARDS):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as tar:
            for i in range(PER_SHARD):
                item = source.items[s * PER_SHARD + i]
                jpeg, _ = encode_image(fit_square(Image.fromarray(item.pixels), SIDE), "jpeg", 90)
                key, caption = f"{s:05d}{i:04d}", caption_of(item.group, s * PER_SHARD + i)
                if (f"{s:05d}", i) == TRUNCATED:
                    jpeg = jpeg[: len(jpeg) * 2 // 3]
                meta = {"url": f"https://example.org/{item.name}", "caption": caption, "key": key,
                        "status": "success", "width": SIDE, "height": SIDE}
                tar.write({"__key__": key, "jpg": jpeg, "txt": caption, "json": meta})
                written[key] = (caption, jpeg)
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": PER_SHARD, "successes": PER_SHARD}))
    return written


@pytest.fixture(scope="module")
def img2dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[str, bytes]]]:
    folder = tmp_path_factory.mktemp("img2dataset") / "shards"
    return folder, write_img2dataset_shards(folder)


def take(reader: StreamingReader, n: int) -> list:
    out = []
    for batch in reader:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("the stream ended")


def reader(url: str) -> StreamingReader:
    return StreamingReader(url, batch_size=16, shuffle_window=32, seed=3, condition="none")


def test_index_in_place_streams_replaces_the_corrupt_member_and_resumes_exactly(img2dataset, tmp_path: Path) -> None:
    folder, written = img2dataset
    out = str(tmp_path / "index")
    report = index_webdataset(str(folder), out, val_fraction=0.05, progress=False)
    assert (report.shards, report.samples, report.resolution, report.reused) == (3, 120, SIDE, False)
    manifest = read_manifest(out)
    assert [s.source for s in manifest.skipped] == ["00000.tar/000000007"]  # found by the scan, kept in the index
    assert [s.name for s in manifest.splits["train"]] == ["00000.tar", "00001.tar"]
    assert [s.name for s in manifest.splits["val"]] == ["00002.tar"] and manifest.has_captions
    assert not list(Path(out).glob("*.tar"))  # an index, not a copy: the tars stay where they are

    # One epoch of the train split (80 samples): every sample once, the truncated one replaced and counted.
    first = reader(out)
    batches = take(first, 5)
    keys = [k.split("/")[1] for b in batches for k in b.keys]
    truncated = f"{TRUNCATED[0]}{TRUNCATED[1]:04d}"
    assert truncated not in keys and set(keys) == {k for k in written if k[:5] in ("00000", "00001")} - {truncated}
    assert first.corrupt_count == 1 and truncated in first.corrupt_keys[0]
    b = batches[0]
    key = b.keys[3].split("/")[1]
    assert b.captions[3] == written[key][0]
    assert torch.equal(b.image[3], to_tensor([decode_image(written[key][1], 3)])[0])  # the tar's JPEG, as stored

    # Exact resume: a reader restored from the state after two batches yields the next three unchanged.
    again = reader(out)
    take(again, 2)
    resumed = reader(out)
    resumed.load_state_dict(again.state_dict())
    for x, y in zip(batches[2:], take(resumed, 3)):
        assert x.keys == y.keys and torch.equal(x.image, y.image)
    assert resumed.corrupt_count == 1

    assert index_webdataset(str(folder), out, progress=False).reused  # the same shards: nothing to do

    # Precompute's view: each task reads its tar in place, in img2dataset's layout (its workers decode the images
    # and leave the truncated one out).
    task = make_tasks(manifest, out, str(tmp_path / "pairs"))[0]
    assert task.tar_url == str(folder / "00000.tar") and task.decode is decode_webdataset
    skipped: list[str] = []
    samples = list(iter_shard(task.input_url, lambda key, reason: skipped.append(key), tar_url=task.tar_url,
                              decode=task.decode))
    assert [s.key for s in samples] == [k for k in written if k[:5] == "00000"] and not skipped
    assert all(s.image == written[s.key][1] and s.caption == written[s.key][0] for s in samples)


def test_a_damaged_tar_header_is_found_by_the_scan_and_counted_by_the_reader(img2dataset, tmp_path: Path) -> None:
    folder, _ = img2dataset
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    shard = damaged / "00001.tar"
    offsets = scan_shard(str(shard), "00001.tar").offsets
    raw = bytearray(shard.read_bytes())
    # The jpg member's header of sample 20 (after its pax header block and the pax data block).
    raw[offsets[20] + 2 * 512 + 5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    scan = scan_shard(str(shard), "00001.tar")
    assert len(scan.keys) == PER_SHARD and scan.offsets == offsets  # resynchronised: every later sample found
    assert list(scan.problems) == [20] and "damaged tar header" in scan.problems[20]

    out = str(tmp_path / "index")
    report = index_webdataset(str(damaged), out, val_fraction=0.05, progress=False)
    assert report.problems == 2 and read_manifest(out).skipped[1].source == "00001.tar/000010020"
    epoch = reader(out)
    take(epoch, 5)
    assert epoch.corrupt_count == 2 and any("000010020" in k for k in epoch.corrupt_keys)


def test_brace_patterns_and_bad_sources_fail_with_what_to_do(img2dataset, tmp_path: Path) -> None:
    folder, _ = img2dataset
    assert expand_braces("s3://b/{00000..00002}.tar") == ["s3://b/00000.tar", "s3://b/00001.tar", "s3://b/00002.tar"]
    assert expand_braces("d/{a,b}-{0..1}.tar") == ["d/a-0.tar", "d/a-1.tar", "d/b-0.tar", "d/b-1.tar"]
    with pytest.raises(SourceError, match=r"do not exist, e\.g\. .*00003\.tar; fix the pattern"):
        index_webdataset(f"{folder}/{{00000..00003}}.tar", str(tmp_path / "a"), progress=False)
    with pytest.raises(SourceError, match="holds no .tar shards"):
        index_webdataset(str(tmp_path), str(tmp_path / "b"), progress=False)


def test_members_decode_by_webdataset_rules_where_prepared_shards_would_refuse(img2dataset) -> None:
    """A .jpeg image, the caption only in the json, a class in .cls, a key with a folder: decoded as webdataset
    groups them; a run of bytes holding another key's members is corrupt, not silently merged."""
    import webdataset as wds

    _, written = img2dataset
    jpeg = written["000000000"][1]
    buf = io.BytesIO()
    with wds.TarWriter(buf) as tar:
        tar.write({"__key__": "part/000000001", "jpeg": jpeg, "json": {"caption": " two dogs "}, "cls": 3})
    raw = buf.getvalue()
    sample = decode_webdataset(raw, "part/000000001")
    assert not isinstance(sample, CorruptSample)
    assert (sample.image, sample.image_ext, sample.caption, sample.cls) == (jpeg, "jpg", "two dogs", 3)
    assert isinstance(decode_webdataset(raw, "part/000000002"), CorruptSample)
    assert isinstance(decode_members(raw, "part/000000001"), CorruptSample)  # the prepared layout's decoder


def _eval_config(folder: Path, root: Path, *extra: str):  # -> Config
    return load_config(None, [f"run.root={root}", f"data.shards={root / 'index'}", "storage.embedded_s3=false",
                              "data.source_kind=webdataset", f"data.source={folder}", "eval.num_images=32", *extra])


def test_the_held_out_images_are_counted_from_img2dataset_stats_or_checked_once_indexed(
        img2dataset, tmp_path: Path) -> None:
    """Before the scan, the held-out split is the held-out tars' samples (img2dataset's NNNNN_stats.json), not
    val_fraction x the number of tars; without stats files the check waits for the index, then refuses or passes."""
    from pagoda_dist.eval.preflight import HeldOutDeferred, check_held_out
    from pagoda_dist.preflight import Finding, NodeResources, preflight, recheck_after

    folder, _ = img2dataset
    assert "about 40 held-out images" in check_held_out(_eval_config(folder, tmp_path, "eval.floor_images=0"))
    with pytest.raises(ConfigError, match=r"need 64 held-out images, but data\.source .* 'val' split of 40:"):
        check_held_out(_eval_config(folder, tmp_path))

    bare = tmp_path / "bare"  # the tars alone: their sample counts are known only to the scan
    bare.mkdir()
    for tar in folder.glob("*.tar"):
        shutil.copy(tar, bare)
    nodes = [NodeResources(cpus=float("inf"), gpus=0.0)]

    def held_out(findings: list[Finding]) -> Finding:
        return next(f for f in findings if f.check == "held-out images")

    for extra, fits in ((["eval.floor_images=0"], True), ([], False)):
        cfg = _eval_config(bare, tmp_path / str(fits), *extra)
        with pytest.raises(HeldOutDeferred):
            check_held_out(cfg)
        findings = preflight(cfg, nodes)
        assert held_out(findings).ok and held_out(findings).after == "prepare", held_out(findings)
        assert recheck_after(cfg, findings, "teacher") == []
        index_webdataset(str(bare), cfg.shards_url, val_fraction=cfg.data.val_fraction, progress=False)
        (made,) = recheck_after(cfg, findings, "prepare")
        assert made.ok == fits and ("40 held-out images in" if fits else "holds in its 'val' split 40") in \
            made.message, made


def test_precompute_skips_and_counts_an_image_of_the_wrong_size(img2dataset, tmp_path: Path) -> None:
    """A wrong-size image in a tar (a different img2dataset --image_size) is left out and counted by precompute,
    like the truncated JPEG and as the training reader does, rather than failing its shard."""
    import webdataset as wds

    from pagoda_dist.models.unet import UNet
    from pagoda_dist.precompute import ShardInverter
    from pagoda_dist.precompute.run import build_job
    from pagoda_dist.precompute.teacher import commit_teacher

    _, written = img2dataset
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    big, _ = encode_image(Image.new("RGB", (SIDE + 8, SIDE + 8), (200, 80, 40)), "jpeg", 90)
    for s in range(2):
        with wds.TarWriter(str(mixed / f"{s:05d}.tar")) as tar:
            for i in range(8):
                key = f"{s:05d}{i:04d}"
                jpeg = big if key == "000000003" else written[key][1]
                tar.write({"__key__": key, "jpg": jpeg, "txt": written[key][0]})
    cfg = load_config(None, [f"run.root={tmp_path}", f"data.shards={tmp_path / 'index'}", "data.resolution=16",
                             "model.resolution=8", "model.channels=16", "model.channel_mult=[1,2]",
                             "model.attn_resolutions=[]", "model.num_res_blocks=1", "precompute.steps=3",
                             "precompute.batch_size=4", "precompute.psnr_samples=2", "precompute.min_psnr_db=0",
                             "storage.embedded_s3=false"])
    assert index_webdataset(str(mixed), cfg.shards_url, val_fraction=0.5, progress=False).problems == 2
    torch.manual_seed(0)
    commit_teacher(cfg.run_url, UNet(cfg.model), nimg=64)
    job, inputs, _ = build_job(cfg)
    task = make_tasks(inputs, cfg.shards_url, cfg.pairs_url)[0]
    result = ShardInverter(job).process(task)
    assert (result.count, result.skipped) == (6, 2), result  # with the truncated JPEG, sample 7
    assert result.skipped_samples[0].startswith("000000003: ") and f"{SIDE + 8}x{SIDE + 8}" in \
        result.skipped_samples[0]


def _teacher_overrides(shards: str, root: str) -> list[str]:
    return ["model.resolution=8", "data.resolution=8", "model.channels=16", "model.channel_mult=[1,2]",
            "model.attn_resolutions=[]", "model.num_res_blocks=1", "model.num_classes=0", "model.text_dim=64",
            "precompute.clip_model=pagoda-tiny-text", "precompute.clip_random_init=true",
            "data.loader_workers=0", "data.shuffle_buffer=32", "teacher.sampler.steps=4", "logging.grid_size=2",
            "logging.wandb_mode=disabled", "teacher.train.optimizer.lr=0.005", f"data.shards={shards}",
            f"run.root={root}", f"storage.endpoint_url={storage.settings.current().endpoint_url}",
            "runtime.num_workers=1", "runtime.max_failures=1", "teacher.train.batch_size=16",
            "teacher.train.total_kimg=0.128", "logging.log_every_kimg=0.016", "logging.checkpoint_every_kimg=0.048"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_teacher_trains_from_img2dataset_shards_on_s3_and_a_killed_run_resumes_exactly(
        local_ray, s3_env: str, img2dataset, tmp_path: Path) -> None:
    """`pagoda run`'s data step indexes the tars on S3 (a brace pattern) in place; a text-conditioned teacher
    streams them. A run whose worker is killed midway resumes from its last checkpoint and logs the same losses
    as an uninterrupted one; both count the truncated JPEG each time they meet it. Precompute then turns the same
    tars into latent pairs for the distil stage."""
    from pagoda_dist.pipeline import prepare_data, reader_source, teacher_stage
    from pagoda_dist.runtime import train_stage
    from tests.runtime_support import Fault, faulty

    folder, _ = img2dataset
    tars = storage.join(s3_env, "laion-like")
    storage.upload_dir(str(folder), tars)
    shards = storage.join(s3_env, "index")
    common = _teacher_overrides(shards, s3_env)
    cfg = load_config(None, [*common, "run.name=ref", "data.source_kind=webdataset",
                             f"data.source={tars}/{{00000..00002}}.tar"])
    report = prepare_data(cfg.data, cfg.data.source, cfg.shards_url)
    assert report.samples == SHARDS * PER_SHARD and read_manifest(shards).extra["webdataset"]["root"] == tars

    # The corrupt samples the first 128 images of the stream meet (the truncated JPEG, once per epoch met).
    probe = StreamingReader(shards, batch_size=16, resolution=8, shuffle_window=32, seed=cfg.run.seed,
                            condition="none")
    take(probe, 8)
    assert probe.corrupt_count >= 1

    ref = train_stage(cfg, teacher_stage, reader_source, stage_name="teacher", local_dir=tmp_path / "ref")
    assert ref.nimg == 128 and ref.metrics["corrupt_samples"] == probe.corrupt_count, ref.metrics

    kill = Fault("kill", nimg=80, rank=0, marker=str(tmp_path / "killed"))
    run_cfg = load_config(None, [*common, "run.name=killed"])
    resumed = train_stage(run_cfg, functools.partial(faulty, teacher_stage, kill), reader_source,
                          stage_name="teacher", local_dir=tmp_path / "run")
    assert Path(kill.marker).exists() and resumed.resumed_from == 48 and resumed.nimg == 128
    assert resumed.metrics["corrupt_samples"] == probe.corrupt_count
    records = [json.loads(line) for line in (tmp_path / "run" / "teacher" / "metrics.jsonl").open()]
    expected = {int(r["nimg"]): r["loss"] for r in ref.history}
    replayed = [r for r in records if int(r["nimg"]) > 48]
    assert replayed and all(r["loss"] == expected[int(r["nimg"])] for r in records), (records, expected)

    # Distil's inputs, still without re-sharding: precompute reads the tars in place through the index, embeds the
    # captions and inverts every image; the truncated JPEG is left out and counted.
    from pagoda_dist.precompute import run_precompute

    pre_cfg = load_config(None, [*common, "run.name=killed", "precompute.steps=5", "precompute.batch_size=16",
                                 "precompute.psnr_samples=4", "precompute.cpus_per_actor=0.5",
                                 "precompute.min_psnr_db=5"])
    run_precompute(pre_cfg, progress=False)
    pairs = read_manifest(pre_cfg.pairs_url)
    assert pairs.kind == "latent-pairs" and (pairs.count("train"), pairs.count("val")) == (79, 40)
    latent_pairs = StreamingReader(pre_cfg.pairs_url, batch_size=16, needs_latents=True, condition="text")
    batch = take(latent_pairs, 1)[0]
    assert batch.latent.shape == (16, 3, 8, 8) and batch.condition.text_pooled.shape == (16, 64)


def test_jpeg_fixture_really_is_truncated(img2dataset) -> None:
    """The corrupt member is corrupt for PIL too (else the tests above would count nothing)."""
    _, written = img2dataset
    jpeg = written[f"{TRUNCATED[0]}{TRUNCATED[1]:04d}"][1]
    with pytest.raises(OSError):
        Image.open(io.BytesIO(jpeg)).load()
    assert np.asarray(Image.open(io.BytesIO(written["000000000"][1]))).shape == (SIDE, SIDE, 3)
