"""Data: prepare (folders, classes, captions, builtins) -> shards -> streaming reader, on real photos.

Real images come from the pip packages (scikit-image / scikit-learn photos) and, when installed, Debian's
dataset-fashion-mnist; S3 tests use the embedded SeaweedFS server of tests/conftest_s3.py.
"""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pagoda_dist import storage
from pagoda_dist.data import builtin
from pagoda_dist.data.manifest import Manifest, ManifestError, commit_manifest, read_manifest
from pagoda_dist.data.order import SampleOrder
from pagoda_dist.data.prepare import PrepareError, prepare, stored_image
from pagoda_dist.data.reader import LoaderBatch, StreamingReader, load_images
from pagoda_dist.data.samples import Sample, make_key, sample_from_members, sample_to_members
from pagoda_dist.data.shards import ShardWriter, iter_shard
from pagoda_dist.data.sources import SourceError, SourceItem
from pagoda_dist.data.tensors import downsample, to_tensor, to_uint8
from tests.damage import break_header, garble_image

pytestmark = pytest.mark.timeout(180)

CLASS_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png")
PER_CLASS = 24


# ------------------------------------------------------------------------------------------------ helpers
def photo(name: str) -> Image.Image:
    import skimage.data

    return Image.open(Path(skimage.data.__file__).parent / name).convert("RGB")


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageNet layout: one folder per photo, random crops of it in varied sizes, aspect ratios, modes, formats."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for name in CLASS_PHOTOS:
        img, folder = photo(name), root / name.split(".")[0]
        folder.mkdir()
        for i in range(PER_CLASS):
            w, h = int(rng.integers(40, 300)), int(rng.integers(40, 300))
            x, y = int(rng.integers(0, img.width - w)), int(rng.integers(0, img.height - h))
            crop = img.crop((x, y, x + w, y + h))
            if i == 0:
                crop = crop.convert("L")
            elif i == 1:
                crop = crop.convert("RGBA")
                crop.putalpha(128)
            if i % 3 == 2:
                crop.save(folder / f"{i:03d}.jpg", quality=90)
            else:
                crop.save(folder / f"{i:03d}.png")
    return root


TILES_VAL = 35 / 300  # of 300 tiles: 35 held out


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> str:
    """300 real photo tiles (265 train / 35 val) at 32 px in deliberately uneven shards of 37."""
    out = str(tmp_path_factory.mktemp("tiles") / "shards")
    prepare("builtin:photo-tiles", out, resolution=32, shard_size=37, limit=300, val_fraction=TILES_VAL, workers=2,
            progress=False)
    return out


def keys_of(batches: list[LoaderBatch]) -> list[str]:
    return [k for b in batches for k in b.keys]


def take(reader: StreamingReader, n: int) -> list[LoaderBatch]:
    out = []
    for batch in reader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def sources_by_ref(url: str) -> dict[str, str]:
    """'shard/key' -> the input it came from (the sample's json "source")."""
    manifest = read_manifest(url)
    return {f"{s.name}/{sample.key}": sample.meta["source"]
            for shards in manifest.splits.values() for s in shards
            for sample in iter_shard(storage.join(url, s.name))}


# ------------------------------------------------------------------------------------------- format units
def test_sample_members_round_trip() -> None:
    arrays = {"latent": np.arange(12, dtype=np.float16).reshape(3, 2, 2), "tok": np.ones((4, 8), np.float32),
              "emb": np.zeros(8, np.float32), "mask": np.array([1, 1, 0, 0], bool)}
    sample = Sample(make_key(42), b"\x89PNG-bytes", "png", cls=7, caption="a photo of a bag",
                    meta={"source": "x.png"}, arrays=arrays)
    members = sample_to_members(sample)
    assert [m for m, _ in members] == ["000000042.png", "000000042.cls", "000000042.txt", "000000042.json",
                                       "000000042.latent.npy", "000000042.emb.npy", "000000042.tok.npy",
                                       "000000042.mask.npy"]
    back = sample_from_members(members)
    assert (back.key, back.cls, back.caption, back.meta, back.image) == ("000000042", 7, "a photo of a bag",
                                                                          {"source": "x.png"}, b"\x89PNG-bytes")
    for name, arr in arrays.items():
        assert back.arrays[name].dtype == arr.dtype and np.array_equal(back.arrays[name], arr)
    with pytest.raises(ValueError, match="no dots"):
        sample_to_members(Sample("a.b", b"x"))


def test_sample_order_is_a_partition_per_epoch() -> None:
    counts = (100, 37, 64, 5, 90, 1)
    for world in (1, 2, 3, 7):
        orders = [SampleOrder(counts, seed=4, rank=r, world_size=world, chunk_size=16, shuffle_window=40)
                  for r in range(world)]
        per_epoch = orders[0].samples_per_epoch
        assert per_epoch == sum(counts) // world
        for epoch in (0, 1):
            seen = [tuple(x) for o in orders for x in o.locate(np.arange(epoch * per_epoch, (epoch + 1) * per_epoch))]
            assert len(seen) == len(set(seen)) == per_epoch * world
            assert all(0 <= i < counts[s] for s, i in seen)
    first = SampleOrder(counts, seed=4, rank=0, world_size=1, chunk_size=16, shuffle_window=40)
    again = SampleOrder(counts, seed=4, rank=0, world_size=1, chunk_size=16, shuffle_window=40)
    other = SampleOrder(counts, seed=5, rank=0, world_size=1, chunk_size=16, shuffle_window=40)
    assert np.array_equal(again.locate(np.arange(297)), first.locate(np.arange(297)))
    assert not np.array_equal(other.locate(np.arange(297)), first.locate(np.arange(297)))
    assert not np.array_equal(first.locate(np.arange(297)), first.locate(np.arange(297, 594)))  # epochs differ


def test_downsample_matches_numpy_path() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    full = to_tensor(pixels)
    assert np.array_equal(to_uint8(full), pixels)
    for res in (16, 8, 24):
        assert torch.allclose(to_tensor(pixels, res), downsample(full, res), atol=1e-6)


# -------------------------------------------------------------------------------- prepare -> stream round trip
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_prepare_stream_round_trip(backend: str, class_folder: Path, tmp_path: Path,
                                   request: pytest.FixtureRequest) -> None:
    out = str(tmp_path / "shards") if backend == "local" else storage.join(request.getfixturevalue("s3_env"), "c")
    report = prepare(str(class_folder), out, resolution=32, shard_size=20, val_fraction=0.2, workers=2, seed=1,
                     progress=False)
    assert report.class_names == ["astronaut", "chelsea", "coffee"]
    assert sum(report.counts.values()) == 3 * PER_CLASS and report.counts["val"] > 0 and report.skipped_count == 0
    assert report.shards["train"][0] == "train-000000.tar"
    manifest = read_manifest(out)
    assert (manifest.resolution, manifest.channels, manifest.kind) == (32, 3, "images")
    source_of = sources_by_ref(out)

    n = report.counts["train"]
    reader = StreamingReader(out, batch_size=10, num_workers=0, seed=3, chunk_size=8, shuffle_window=24)
    low = StreamingReader(out, batch_size=10, num_workers=0, seed=3, chunk_size=8, shuffle_window=24,
                          resolution=16)
    batches, low_batches = take(reader, -(-n // 10)), take(low, -(-n // 10))
    assert keys_of(low_batches) == keys_of(batches)  # the same order at any resolution
    full = [(b, i) for b in batches for i in range(len(b))][:n]
    small = torch.cat([b.image for b in low_batches])[:n]
    refs = [b.keys[i] for b, i in full]
    assert len(set(refs)) == n and all(r.startswith("train-") for r in refs)  # one epoch: every sample once
    for (b, i), low_image in zip(full, small):
        rel = source_of[b.keys[i]]
        expected = np.asarray(stored_image(SourceItem(rel, path=str(class_folder / rel)), 32, 3))
        assert np.array_equal(to_uint8(b.image[i:i + 1])[0], expected), rel  # PNG: exact pixels
        assert int(b.condition.class_labels[i]) == report.class_names.index(rel.split("/")[0])
        assert torch.allclose(low_image, downsample(b.image[i:i + 1], 16)[0], atol=1e-6)
    assert small.shape[1:] == (3, 16, 16)
    assert b.captions is None and b.latent is None and b.corrupt == 0


def test_cli_prepare_src_out_with_jpeg_quality(class_folder: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """`pagoda prepare SRC OUT data.KEY=VALUE ...` needs no run config; JPEG shards decode close to the stored
    image, and the quality setting trades bytes for fidelity."""
    from pagoda_dist.cli import main

    def prepared(quality: int) -> tuple[str, float, int]:
        out = str(tmp_path / f"q{quality}")
        assert main(["prepare", str(class_folder), out, "data.resolution=32", "data.image_format=jpeg",
                     f"data.jpeg_quality={quality}", "data.shard_size=20", "data.val_fraction=0.2"]) == 0
        manifest = read_manifest(out)
        assert (manifest.image_format, manifest.resolution) == ("jpeg", 32)
        assert manifest.count("train") + manifest.count("val") == 3 * PER_CLASS
        with tarfile.open(Path(out) / "train-000000.tar") as tar:
            suffixes = {name.rsplit(".", 1)[1] for name in tar.getnames()}
        assert "jpg" in suffixes and "png" not in suffixes, suffixes
        source_of = sources_by_ref(out)
        batch = take(StreamingReader(out, batch_size=16, num_workers=0, seed=0), 1)[0]
        errors = []
        for i, key in enumerate(batch.keys):
            rel = source_of[key]
            want = np.asarray(stored_image(SourceItem(rel, path=str(class_folder / rel)), 32, 3)).astype(np.float64)
            errors.append(np.mean((to_uint8(batch.image[i:i + 1])[0].astype(np.float64) - want) ** 2))
        psnr = 10 * np.log10(255.0**2 / np.mean(errors))
        size = sum(shard.bytes for split in manifest.splits.values() for shard in split)
        return out, psnr, size

    _, psnr_high, bytes_high = prepared(95)
    _, psnr_low, bytes_low = prepared(20)
    assert psnr_high > 30 and psnr_high > psnr_low + 3, (psnr_high, psnr_low)
    assert bytes_low < bytes_high
    assert main(["prepare", str(class_folder)]) == 2  # OUT missing
    assert main(["prepare", str(class_folder), str(tmp_path / "x"), "model.channels=8"]) == 2  # not a data knob
    assert main(["prepare", str(class_folder), str(tmp_path / "x"), "data.jpeg_quality=0"]) == 2
    err = capsys.readouterr().err
    assert "OUT is missing" in err and "data.* and storage.* settings only" in err and "data.jpeg_quality" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_captions_folder_and_jsonl(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    def out_url(name: str) -> str:
        return str(tmp_path / name) if backend == "local" else storage.join(request.getfixturevalue("s3_env"), name)

    img = photo("rocket.jpg")
    folder = tmp_path / "captioned"
    folder.mkdir()
    captions = {}
    for i in range(12):
        img.crop((i * 20, 0, i * 20 + 200, 150)).save(folder / f"img{i}.jpg")
        if i < 11:  # img11 has no caption: reported, skipped
            captions[f"img{i}.jpg"] = f"a rocket, view {i}"
            (folder / f"img{i}.txt").write_text(captions[f"img{i}.jpg"] + "\n")
    out = out_url("shards")
    report = prepare(str(folder), out, resolution=16, val_fraction=0.0, workers=1, progress=False)
    assert report.counts == {"train": 11} and report.skipped_count == 1
    assert "img11.jpg" in report.skipped[0].source and "caption" in report.skipped[0].reason
    source_of = sources_by_ref(out)
    batch = take(StreamingReader(out, batch_size=11), 1)[0]
    assert batch.captions == [captions[source_of[k]] for k in batch.keys]
    assert batch.condition.is_empty

    lines = [json.dumps({"image": "captioned/img0.jpg", "caption": "first caption"}),
             json.dumps({"image": "captioned/img0.jpg", "caption": "same image, second caption"}),
             json.dumps({"image": "captioned/img1.jpg", "caption": "third"}),
             json.dumps({"image": "captioned/missing.jpg", "caption": "gone"}),
             "{not json"]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    out2 = out_url("jsonl-shards")
    report = prepare(str(tmp_path / "pairs.jsonl"), out2, resolution=16, val_fraction=0.0, workers=1,
                     progress=False)
    assert report.counts == {"train": 3} and report.skipped_count == 2
    batch = take(StreamingReader(out2, batch_size=3), 1)[0]
    assert sorted(batch.captions) == ["first caption", "same image, second caption", "third"]


def test_fashion_mnist_builtin(tmp_path: Path) -> None:
    if not (builtin.FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed ({builtin.INSTALL_FASHION})")
    images = {"train": builtin.read_idx(builtin.FASHION_DIR / "train-images-idx3-ubyte.gz", 300),
              "val": builtin.read_idx(builtin.FASHION_DIR / "t10k-images-idx3-ubyte.gz", 50)}
    for channels in (1, 3):
        out = str(tmp_path / f"fm{channels}")
        report = prepare("builtin:fashion-mnist", out, resolution=32, channels=channels, limit=350,
                         shard_size=100, progress=False)
        assert report.counts == {"train": 300, "val": 50} and report.class_names[7] == "Sneaker"
        source_of = sources_by_ref(out)
        for split in ("train", "val"):
            batch = take(StreamingReader(out, split=split, batch_size=25, seed=2), 1)[0]
            assert batch.image.shape == (25, channels, 32, 32)
            for i, key in enumerate(batch.keys):
                _, src_split, index = source_of[key].split("/")
                assert src_split == split
                expected = np.pad(images[split][int(index)], 2)  # 28 -> 32, black border
                got = to_uint8(batch.image[i:i + 1])[0]
                assert all(np.array_equal(got[..., c], expected) for c in range(channels))
                label = int(batch.condition.class_labels[i])
                assert batch.captions[i] == builtin.fashion_caption(label)
    assert builtin.fashion_caption(9) == "a photo of an ankle boot"


def test_photo_tiles_hold_out_a_share_of_every_photo(tiles: str) -> None:
    """The held-out tiles come from every photo in proportion (so they look like the training set), never a tile of
    both splits."""
    manifest = read_manifest(tiles)
    group = {p.name: p.group for p in builtin.installed_photos()}
    per_photo: dict[str, dict[str, set[str]]] = {}
    for ref, source in sources_by_ref(tiles).items():
        photo = group[source.split("/s")[0]]
        per_photo.setdefault(photo, {"train": set(), "val": set()})[ref.split("-")[0]].add(source)
    assert len(per_photo) == 4
    for photo, splits in per_photo.items():
        assert not splits["train"] & splits["val"], photo
        size = len(splits["train"]) + len(splits["val"])
        assert abs(len(splits["val"]) - TILES_VAL * size) <= 1, (photo, len(splits["val"]), size)
    assert manifest.count("train") == 265 and manifest.count("val") == 35
    assert [s.count for s in manifest.splits["train"]][:2] == [37, 37]
    assert manifest.resolution == 32 and manifest.class_names is None


def test_webdataset_reads_the_shards(tiles: str) -> None:
    import webdataset as wds

    url = storage.join(tiles, "val-000000.tar")
    samples = list(wds.WebDataset(url, shardshuffle=False))
    assert len(samples) == 35 and {"png", "json"} <= set(samples[0]) and samples[0]["__key__"] == make_key(0)


# ------------------------------------------------------------------------------- determinism, resume, ranks
def test_determinism_and_workers_do_not_change_the_stream(tiles: str, tmp_path: Path) -> None:
    def run(workers: int, seed: int) -> list[str]:
        return keys_of(take(StreamingReader(tiles, batch_size=16, num_workers=workers, seed=seed), 12))

    first = run(2, 0)
    assert first == run(2, 0) == run(0, 0)
    assert first != run(2, 1)
    # prepare's bytes do not depend on its worker count either
    again = str(tmp_path / "again")
    prepare("builtin:photo-tiles", again, resolution=32, shard_size=37, limit=300, val_fraction=TILES_VAL, workers=1,
            progress=False)
    for name in ("train-000000.tar", "train-000007.tar", "val-000000.tar"):
        assert storage.read_bytes(storage.join(again, name)) == storage.read_bytes(storage.join(tiles, name))


def test_the_callers_random_numbers_do_not_depend_on_workers_or_a_resume(tiles: str) -> None:
    """A training stream draws its loader seed from torch's RNG once, whatever its worker count (torch's DataLoader
    draws one per start, and none without workers), and a stream resumed from its state draws none."""
    def after(workers: int, state: dict | None = None, batches: int = 3) -> tuple[list[str], float]:
        torch.manual_seed(11)
        reader = StreamingReader(tiles, batch_size=8, num_workers=workers, seed=0, draw_loader_seed=True)
        if state is not None:
            reader.load_state_dict(state)
        keys = keys_of(take(reader, batches))
        return keys, float(torch.rand(()))

    keys, draw = after(1)
    assert after(0) == after(2) == (keys, draw)
    head = StreamingReader(tiles, batch_size=8, num_workers=1, seed=0, draw_loader_seed=True)
    take(head, 1)
    tail, resumed = after(1, json.loads(json.dumps(head.state_dict())), batches=2)
    torch.manual_seed(11)
    assert tail == keys[8:] and resumed == float(torch.rand(()))  # no draw: the seed came with the state


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
@pytest.mark.parametrize("priority", ["idle", "normal"])
def test_loader_priority_sets_the_workers_scheduling_class(tiles: str, priority: str) -> None:
    """With loader_priority=idle every thread of the DataLoader worker (its fetch threads too) is SCHED_IDLE."""
    stream = iter(StreamingReader(tiles, batch_size=8, num_workers=1, seed=0, loader_priority=priority))
    try:
        next(stream)  # the worker is up and its fetch threads have started
        me, command = str(os.getpid()), Path("/proc/self/cmdline").read_bytes()
        # Forked DataLoader workers: children of this process with its command line (not e.g. an S3 server).
        children = [pid for pid in os.listdir("/proc") if pid.isdigit()
                    and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == me
                    and Path(f"/proc/{pid}/cmdline").read_bytes() == command]
        policies = {os.sched_getscheduler(int(tid)) for pid in children for tid in os.listdir(f"/proc/{pid}/task")}
    finally:
        stream.close()
    assert children
    assert policies == ({os.SCHED_IDLE} if priority == "idle" else {os.SCHED_OTHER})


def test_idle_priority_falls_back_to_nice_and_never_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sandbox that refuses SCHED_IDLE gets nice 19; one that refuses both leaves the worker running as it is."""
    from pagoda_dist.data.reader import lower_to_idle_priority

    def refuse(*args: object) -> int:
        raise PermissionError("refused by the sandbox")

    increments: list[int] = []
    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    monkeypatch.setattr(os, "nice", lambda inc: increments.append(inc) or 4 + inc)
    lower_to_idle_priority(0)
    assert increments == [0, 15]  # from nice 4 up to 19
    monkeypatch.setattr(os, "nice", refuse)
    lower_to_idle_priority(0)


def test_exact_resume_two_ranks_two_workers_on_s3(s3_env: str, tiles: str) -> None:
    url = storage.join(s3_env, "tiles")
    storage.upload_dir(storage.filesystem(tiles)[1], url)  # the committed folder, COMMIT included
    batch, world = 8, 2
    epoch_refs = []
    for rank in range(world):
        def reader(workers: int = 2) -> StreamingReader:
            return StreamingReader(url, batch_size=batch, rank=rank, world_size=world, num_workers=workers, seed=7)

        straight = reader(workers=0)  # the stream does not depend on the worker count (tested above)
        per_epoch = straight.samples_per_epoch
        n = -(-per_epoch // batch) + 1  # past the epoch boundary
        expected = keys_of(take(straight, n))
        head = reader()
        before = keys_of(take(head, 5))  # odd: the resumed reader restarts on the other worker
        state = head.state_dict()
        assert state["position"] == 5 * batch
        tail = reader()
        tail.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
        after = keys_of(take(tail, n - 5))
        assert before + after == expected  # nothing lost, nothing repeated
        epoch_refs += expected[:per_epoch]
    assert len(epoch_refs) == len(set(epoch_refs)) == 2 * (265 // 2)


def test_uneven_shards_give_every_rank_equal_batches(tiles: str, tmp_path: Path) -> None:
    # 265 train samples in 2 shards (200 + 65) for 3 ranks: assigning shards would starve a rank.
    out = str(tmp_path / "two-shards")
    prepare("builtin:photo-tiles", out, resolution=32, shard_size=200, limit=300, val_fraction=TILES_VAL, workers=1,
            progress=False)
    assert [s.count for s in read_manifest(out).splits["train"]] == [200, 65]
    readers = [StreamingReader(out, batch_size=8, rank=r, world_size=3, seed=1) for r in range(3)]
    assert {r.samples_per_epoch for r in readers} == {88}
    steps = 11  # = 88 / 8: one epoch on every rank, in lock step
    refs = [keys_of(take(r, steps)) for r in readers]
    assert all(len(x) == 88 for x in refs)
    flat = [k for x in refs for k in x]
    assert len(set(flat)) == len(flat) == 264  # disjoint; one sample (265 mod 3) sits this epoch out
    with pytest.raises(ValueError, match="world size 3 in the middle of a step"):
        StreamingReader(out, batch_size=12, rank=0, world_size=2, seed=1).load_state_dict(
            {**readers[0].state_dict(), "position": 9})


def test_elastic_resume_keeps_every_global_batch(tiles: str) -> None:
    """A run laid out for 2 ranks resumes on 3, then on 1 (same global batch of 24, other micro-batches): every step
    reads the same 24 samples as the uninterrupted 2-rank run, across an epoch boundary (132 per rank), and a state
    it cannot carry over (mid-step, another global batch, no global batch saved) is refused."""
    def readers(world: int, micro: int) -> list[StreamingReader]:
        return [StreamingReader(tiles, batch_size=micro, rank=r, world_size=world, seed=4, global_batch=24)
                for r in range(world)]

    def steps(group: list[StreamingReader], n: int) -> list[list[str]]:
        per_step = 24 // (len(group) * group[0].batch_size)
        streams = [iter(r) for r in group]
        return [sorted(k for s in streams for _ in range(per_step) for k in next(s).keys) for _ in range(n)]

    expected = steps(readers(2, 12), 14)
    group = readers(2, 6)
    got = steps(group, 5)
    for world, micro, n in ((3, 4, 5), (1, 12, 4)):
        states = [json.loads(json.dumps(r.state_dict())) for r in group]
        group = readers(world, micro)
        for r in group:
            r.load_state_dict(states[r._spec.rank] if r._spec.rank < len(states) else states[0])
        got += steps(group, n)
    assert got == expected

    state = readers(2, 6)[0].state_dict()
    with pytest.raises(ValueError, match="in the middle of a step"):
        readers(3, 4)[0].load_state_dict({**state, "position": 6})
    with pytest.raises(ValueError, match="global batch of 24 samples, this run has 48"):
        StreamingReader(tiles, batch_size=8, world_size=3, seed=4, global_batch=48).load_state_dict(state)
    with pytest.raises(ValueError, match="resume with that world size"):
        readers(3, 4)[0].load_state_dict({k: v for k, v in state.items() if k != "global_batch"})


# ------------------------------------------------------------------------------------------------ corrupt data
def test_corrupt_inputs_are_counted_reported_and_skipped(class_folder: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "mixed"
    src.mkdir()
    for i, path in enumerate(sorted((class_folder / "coffee").iterdir())[:10]):
        (src / f"good{i}{path.suffix}").write_bytes(path.read_bytes())
    jpeg = next(p for p in sorted((class_folder / "coffee").iterdir()) if p.suffix == ".jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (src / "notes.png").write_text("this is not an image")
    (src / "empty.jpg").write_bytes(b"")
    (src / "noise.bin").write_bytes(os.urandom(3000))
    out = str(tmp_path / "shards")
    report = prepare(str(src), out, resolution=16, val_fraction=0.0, workers=2, progress=True)
    assert report.counts == {"train": 10} and report.skipped_count == 4
    reasons = {s.source: s.reason for s in report.skipped}
    assert set(reasons) == {"truncated.jpg", "notes.png", "empty.jpg", "noise.bin"}
    assert "truncated" in reasons["truncated.jpg"] and "not an image" in reasons["notes.png"]
    assert {s.source for s in read_manifest(out).skipped} == set(reasons)
    err = capsys.readouterr().err
    assert "skipped 4 of 14 inputs" in err and "truncated.jpg" in err and "img/s" in err  # report + progress bar


def test_corrupt_shard_members_are_replaced_and_counted(tiles: str, tmp_path: Path) -> None:
    out = tmp_path / "damaged"
    storage.upload_dir(storage.filesystem(tiles)[1], str(out))
    shard = out / "train-000001.tar"
    # (1) an image whose bytes are garbage (tar intact); (2) a sample whose tar header checksum is broken
    bad = {garble_image(shard, 3), break_header(shard, 10)}

    reader = StreamingReader(str(out), batch_size=5, seed=2, chunk_size=16, shuffle_window=64)
    batches = take(reader, 53)  # 265 = 53 x 5: exactly one epoch
    refs = keys_of(batches)
    assert all(len(b) == 5 for b in batches) and len(refs) == 265
    assert reader.corrupt_count == sum(b.corrupt for b in batches) == 2
    assert not bad & set(refs) and len(set(refs)) == 263  # each replaced by a repeat of a valid sample
    assert any("does not decode" in k for k in reader.corrupt_keys)
    assert any("checksum" in k for k in reader.corrupt_keys), list(reader.corrupt_keys)


# ---------------------------------------------------------------------------------------- errors, idempotency
def test_bad_src_or_empty_folder_writes_nothing(tmp_path: Path, s3_env: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(SourceError, match="does not exist"):
        prepare(str(tmp_path / "nope"), str(out), progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_text("x")
    with pytest.raises(SourceError, match="holds no files"):
        prepare(str(tmp_path / "empty"), str(out), progress=False)
    bad = tmp_path / "all-bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"x{i}.png").write_text("not a png")
    with pytest.raises(PrepareError, match="none of the 3 inputs"):
        prepare(str(bad), str(out), progress=False)
    assert not out.exists() or not any(out.iterdir())
    remote = storage.join(s3_env, "out")
    with pytest.raises(SourceError):
        prepare(str(tmp_path / "empty"), remote, progress=False)
    with pytest.raises(PrepareError):
        prepare(str(bad), remote, progress=False)
    assert storage.list_files(s3_env) == {}
    with pytest.raises(ManifestError, match="not a committed shard folder"):
        StreamingReader(remote, batch_size=4)


def test_rerun_is_idempotent_and_refuses_other_settings(tmp_path: Path) -> None:
    out = str(tmp_path / "shards")
    args = dict(resolution=32, shard_size=40, limit=100, workers=1, progress=False)
    first = prepare("builtin:photo-tiles", out, **args)
    stamps = {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir()}
    again = prepare("builtin:photo-tiles", out, **args)
    assert again.reused and not first.reused and again.counts == first.counts
    assert {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir()} == stamps  # nothing rewritten
    with pytest.raises(PrepareError, match="resolution: 32 -> 16"):
        prepare("builtin:photo-tiles", out, **{**args, "resolution": 16})
    rebuilt = prepare("builtin:photo-tiles", out, **{**args, "resolution": 16}, overwrite=True)
    assert not rebuilt.reused and read_manifest(out).resolution == 16
    (Path(out) / "COMMIT").unlink()  # a prepare that died before committing: rebuilt, not trusted
    assert not prepare("builtin:photo-tiles", out, **args).reused
    (Path(out) / "COMMIT").unlink()
    (Path(out) / "my-notes.doc").write_text("keep me")
    with pytest.raises(PrepareError, match="not a shard folder"):
        prepare("builtin:photo-tiles", out, **args)
    assert (Path(out) / "my-notes.doc").exists()


# ------------------------------------------------------------------------------------------------ latent pairs
def test_latent_pair_shards(tiles: str, tmp_path: Path) -> None:
    """Pairs written the way precompute writes them (ShardWriter + sample helpers) stream with their latents."""
    source = read_manifest(tiles)
    pairs = str(tmp_path / "pairs")
    written = []
    for shard in source.splits["train"]:
        writer = ShardWriter(pairs, shard.name)
        for sample in iter_shard(storage.join(tiles, shard.name)):
            k = float(int(sample.key))
            latent = np.full((3, 8, 8), k, np.float16)
            sample.arrays = {"latent": latent, "latent_flip": -latent, "emb": np.full(16, k, np.float32),
                             "tok": np.full((5, 16), k, np.float32)}
            writer.write(sample)
        written.append(writer.close())
    commit_manifest(pairs, Manifest(kind="latent-pairs", resolution=source.resolution, channels=source.channels,
                                    image_format=source.image_format, splits={"train": written},
                                    settings={"source": tiles, "teacher": "test"}))
    with pytest.raises(ValueError, match="latent-pair shards"):
        StreamingReader(tiles, batch_size=4, needs_latents=True)
    plain = take(StreamingReader(pairs, batch_size=16, needs_latents=True, resolution=16, seed=5), 2)
    flipped = take(StreamingReader(pairs, batch_size=16, needs_latents=True, resolution=16, seed=5, hflip=True), 2)
    assert keys_of(plain) == keys_of(flipped)
    n_flipped = 0
    for b, f in zip(plain, flipped):
        assert b.latent.shape == (16, 3, 8, 8) and b.latent.dtype == torch.float32
        ids = torch.tensor([float(int(k.split("/")[1])) for k in b.keys])
        assert torch.equal(b.latent[:, 0, 0, 0], ids)
        assert torch.equal(b.condition.text_pooled[:, 0], ids) and b.condition.text_tokens.shape == (16, 5, 16)
        assert bool(b.condition.text_mask.all()) and b.condition.class_labels is None
        flip = f.latent[:, 0, 0, 0] == -ids
        assert torch.equal(f.image[flip], b.image[flip].flip(-1)) and torch.equal(f.image[~flip], b.image[~flip])
        n_flipped += int(flip.sum())
    assert 0 < n_flipped < 32


def test_transient_s3_failures_are_retried(s3_env: str, tiles: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = storage.join(s3_env, "tiles")
    storage.upload_dir(storage.filesystem(tiles)[1], url)
    expected = take(StreamingReader(url, batch_size=16, seed=3), 3)
    fs, _ = storage.filesystem(url)
    real, failures = fs.cat_file, []

    def flaky(path: str, start: int | None = None, end: int | None = None, **kw: object) -> bytes:
        if len(failures) < 3 and path.endswith(".tar"):
            failures.append(path)
            raise ConnectionResetError("connection reset by peer (injected)")
        return real(path, start=start, end=end, **kw)

    monkeypatch.setattr(fs, "cat_file", flaky)
    got = take(StreamingReader(url, batch_size=16, seed=3), 3)
    assert len(failures) == 3
    assert keys_of(got) == keys_of(expected)
    assert all(torch.equal(a.image, b.image) for a, b in zip(got, expected))


def test_load_images_for_evaluation(tiles: str) -> None:
    images = load_images(tiles, count=30, split="val", resolution=16)
    assert images.shape == (30, 3, 16, 16) and -1 <= float(images.min()) and float(images.max()) <= 1
    assert len({tuple(x.flatten()[:64].tolist()) for x in images}) == 30
    with pytest.raises(ValueError, match="has 35 'val' images"):
        load_images(tiles, count=36)
