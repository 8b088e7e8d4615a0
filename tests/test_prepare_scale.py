"""Prepare at scale: sources on S3 (one recursive listing), shards built as Ray tasks, resumable, and the same
bytes whoever builds them. Real photos, the embedded S3 server (tests/conftest_s3.py), a real local Ray."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pagoda_dist import storage
from pagoda_dist.data import prepare as prepare_module
from pagoda_dist.data.manifest import read_manifest
from pagoda_dist.data.prepare import RECORDS, prepare
from pagoda_dist.data.shards import iter_shard
from pagoda_dist.data.sources import SourceError, open_source

pytestmark = pytest.mark.timeout(300)

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")
PER_CLASS = 20
TRUNCATED = "n00000001/n00000001_3.JPEG"
SETTINGS = dict(resolution=32, shard_size=16, val_fraction=0.2, seed=3, progress=False)


def photo(name: str) -> Image.Image:
    import skimage.data

    return Image.open(Path(skimage.data.__file__).parent / name).convert("RGB")


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageNet's layout, train/nXXXXXXXX/*.JPEG: crops of real photos, one class per photo, one JPEG truncated."""
    root = tmp_path_factory.mktemp("imagenet") / "train"
    rng = np.random.default_rng(0)
    for c, name in enumerate(PHOTOS):
        img, folder = photo(name), root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            w, h = int(rng.integers(40, 300)), int(rng.integers(40, 300))
            x, y = int(rng.integers(0, img.width - w)), int(rng.integers(0, img.height - h))
            img.crop((x, y, x + w, y + h)).save(folder / f"n{c:08d}_{i}.JPEG", quality=90)
    victim = root / TRUNCATED
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return root


@pytest.fixture
def s3_source(imagenet_like: Path, s3_env: str) -> str:
    """The same tree on the embedded S3 server."""
    url = storage.join(s3_env, "imagenet", "train")
    storage.upload_dir(imagenet_like, url)
    return url


def ray_runner(env: object | None = None) -> object:
    """The runner `pagoda run` uses, with the worker environment it hands its Ray workers."""
    from pagoda_dist.config import Config
    from pagoda_dist.prepare_ray import RayShards
    from pagoda_dist.runtime.ray_session import worker_env

    return RayShards(env or worker_env(Config()))


def shard_files(url: str) -> dict[str, bytes]:
    """Every shard and index of a prepared folder, by name."""
    return {rel: storage.read_bytes(storage.join(url, rel)) for rel in storage.list_files(url)
            if rel.endswith((".tar", ".idx.json"))}


# ----------------------------------------------------------------------------------------------- S3 sources
def test_s3_class_folders_list_once_and_match_the_local_folder(imagenet_like: Path, s3_source: str, s3_env: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """One recursive listing enumerates an S3 class tree (no request per folder or per file), and the shards equal
    those of the same tree on local disk, from this process and from local decoding processes alike."""
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as counting:
        for name in ("list_files", "list_dir", "glob", "read_bytes", "info", "exists", "size"):
            real = getattr(storage, name)

            def counted(url: str, *args: object, _real: object = real, _name: str = name, **kw: object) -> object:
                if url.startswith(s3_source):
                    calls.append(_name)
                return _real(url, *args, **kw)  # type: ignore[operator]
            counting.setattr(storage, name, counted)
        source = open_source(s3_source)
    assert calls == ["list_files"]
    local = open_source(str(imagenet_like))
    assert (source.kind, source.class_names, source.digest) == ("classes", local.class_names, local.digest)
    assert [(i.name, i.cls) for i in source.items] == [(i.name, i.cls) for i in local.items]

    out_local = str(imagenet_like.parent / "shards-local")
    prepare(str(imagenet_like), out_local, workers=1, **SETTINGS)
    out_s3 = storage.join(s3_env, "shards")
    # The endpoint only in this process's storage settings, as storage.endpoint_url puts it there: the two spawned
    # decoding processes (80 inputs, workers=2) read the inputs with the settings their parent hands them.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    report = prepare(s3_source, out_s3, workers=2, **SETTINGS)
    assert shard_files(out_s3) == shard_files(out_local)
    assert report.skipped_count == 1 and report.skipped[0].source == TRUNCATED
    assert "truncated" in report.skipped[0].reason and sum(report.counts.values()) == 4 * PER_CLASS - 1


def test_s3_captions_and_jsonl_match_local(tmp_path: Path, s3_env: str) -> None:
    """(image, caption) pairs on S3, as .txt files beside the images or as a JSONL manifest, give the local shards;
    a missing or empty caption and a manifest line naming no object are skipped and reported."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    img = photo("rocket.jpg")
    for i in range(10):
        img.crop((i * 20, 0, i * 20 + 200, 150)).save(folder / f"img{i}.jpg")
        if i < 8:
            (folder / f"img{i}.txt").write_bytes(f"a rocket,\r\nview {i}\r\n".encode())  # read as text mode does
    (folder / "img8.txt").write_text("  \n")  # img9 has no caption file at all
    lines = [{"image": "pairs/img0.jpg", "caption": "first"}, {"image": "pairs/img1.jpg", "caption": "second"},
             {"image": "pairs/gone.jpg", "caption": "no such object"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    remote = storage.join(s3_env, "data")
    storage.upload_dir(tmp_path, remote)

    reasons = {}
    # No val split: a JSONL image's split follows its full path or URL (its group), which differs between copies.
    settings = {**SETTINGS, "val_fraction": 0.0}
    for src in ("pairs", "pairs.jsonl"):
        local_out, s3_out = str(tmp_path / f"out-{src}"), storage.join(s3_env, f"out-{src}")
        local = prepare(str(tmp_path / src), local_out, workers=1, **settings)
        on_s3 = prepare(storage.join(remote, src), s3_out, workers=1, **settings)
        assert shard_files(s3_out) == shard_files(local_out) and on_s3.counts == local.counts
        assert [(s.source, s.reason) for s in on_s3.skipped] == [(s.source, s.reason) for s in local.skipped]
        assert read_manifest(s3_out).has_captions
        reasons |= {s.source: s.reason for s in on_s3.skipped}
    # captions read as Python's text mode reads a file (CRLF -> LF), as prepare always has
    shards = str(tmp_path / "out-pairs")
    stored = {sample.meta["source"]: sample.caption for name in shard_files(shards) if name.endswith(".tar")
              for sample in iter_shard(storage.join(shards, name))}
    assert len(stored) == 8
    assert all(text == (folder / f"{Path(src).stem}.txt").read_text().strip() for src, text in stored.items())
    assert "is empty" in reasons["img8.jpg"] and "no caption file" in reasons["img9.jpg"]
    assert "image file does not exist" in reasons["pairs.jsonl:3 pairs/gone.jpg"] and "pairs.jsonl:4" in reasons


def test_object_deleted_after_the_listing_is_skipped(s3_source: str, s3_env: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    gone = storage.join(s3_source, "n00000002/n00000002_5.JPEG")

    def listed_then_deleted(src: str, kind: str) -> object:
        source = open_source(src, kind)
        storage.remove(gone, recursive=False)
        return source
    monkeypatch.setattr(prepare_module, "open_source", listed_then_deleted)
    report = prepare(s3_source, storage.join(s3_env, "out"), workers=1, **SETTINGS)
    reasons = {s.source: s.reason for s in report.skipped}
    assert report.skipped_count == 2 and "deleted after SRC was listed" in reasons["n00000002/n00000002_5.JPEG"]


# -------------------------------------------------------------------------------------------------- Ray tasks
def test_ray_tasks_build_the_same_shards_and_resume(s3_source: str, s3_env: str, local_ray: object,
                                                    capsys: pytest.CaptureFixture) -> None:
    """Shards built by 2 Ray tasks at once equal the 1-process shards; a rerun after losing a committed shard, or
    after dying before the commit, rebuilds only what is missing; a task's storage failure stops the prepare with
    that error."""
    from pagoda_dist.config import Config
    from pagoda_dist.runtime.ray_session import WorkerEnv, worker_env

    one = storage.join(s3_env, "one-process")
    prepare(s3_source, one, workers=1, **SETTINGS)
    expected = shard_files(one)

    out = storage.join(s3_env, "ray")
    good = worker_env(Config())
    refused = WorkerEnv(good.plain, {**good.secret, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    with pytest.raises(storage.AccessDenied) as refusal:  # the task's own error, without Ray's traceback text
        prepare(s3_source, out, workers=2, runner=ray_runner(refused), **SETTINGS)
    assert type(refusal.value) is storage.AccessDenied and "\n" not in str(refusal.value)  # one line for the CLI

    report = prepare(s3_source, out, workers=2, runner=ray_runner(good), **{**SETTINGS, "progress": True})
    assert shard_files(out) == expected
    assert report.skipped_count == 1 and report.skipped[0].source == TRUNCATED
    assert len(report.built) == sum(len(v) for v in report.shards.values()) > 2
    err = capsys.readouterr().err
    assert "img/s" in err and f"skipped 1 of {4 * PER_CLASS} inputs" in err and TRUNCATED in err

    lost = report.shards["train"][1]
    storage.remove(storage.join(out, lost), recursive=False)  # a committed folder loses a shard
    again = prepare(s3_source, out, workers=2, runner=ray_runner(good), **SETTINGS)
    assert again.built == [lost] and not again.reused and shard_files(out) == expected
    assert read_manifest(out).skipped_count == 1  # the kept shards' skipped inputs come from their records

    # a prepare that died before its commit: the manifest and one shard never landed
    for rel in (storage.COMMIT_MARKER, "manifest.json", "val-000000.tar"):
        storage.remove(storage.join(out, rel), recursive=False)
    resumed = prepare(s3_source, out, workers=2, runner=ray_runner(good), **SETTINGS)
    assert resumed.built == ["val-000000.tar"] and shard_files(out) == expected
    assert prepare(s3_source, out, workers=2, runner=ray_runner(good), **SETTINGS).reused
    assert all(rel.startswith(f"{RECORDS}/") for rel in set(storage.list_files(out)) - set(storage.list_files(one)))


def test_ray_runner_builds_a_local_source_on_this_machine(imagenet_like: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Local files can be read only here: the Ray runner builds them with local processes and starts no task."""
    import pagoda_dist.prepare_ray as prepare_ray

    def no_tasks(*args: object, **kwargs: object) -> None:
        raise AssertionError("a local SRC must not go to Ray tasks")
    runner = ray_runner()
    monkeypatch.setattr(prepare_ray.ray, "remote", no_tasks)
    prepare(str(imagenet_like), str(tmp_path / "runner"), workers=1, runner=runner, **SETTINGS)
    prepare(str(imagenet_like), str(tmp_path / "default"), workers=1, **SETTINGS)
    assert shard_files(str(tmp_path / "runner")) == shard_files(str(tmp_path / "default"))


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_sources_end_with_one_line_and_exit_code_2(tmp_path: Path, s3_env: str, s3_server: object,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    from pagoda_dist.cli import main

    endpoint = f"storage.endpoint_url={s3_server.endpoint}"  # type: ignore[attr-defined]
    out = str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    storage.write_bytes(storage.join(s3_env, "single.png"), b"not a folder")
    cases = {
        (str(tmp_path / "nonexistent"), out): "does not exist",
        (str(tmp_path / "empty"), out): "holds no files",
        (storage.join(s3_env, "images"), out, endpoint): "does not exist or holds no objects",
        (storage.join(s3_env, "single.png"), out, endpoint): "is an object, not a prefix",
        ("s3://no-such-bucket-pagoda/images", out, endpoint): "no-such-bucket-pagoda",
        (str(tmp_path / "empty"), out, "data.source_kind=imagenet"): "data.source_kind",
    }
    for argv, expected in cases.items():
        assert main(["prepare", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err, (argv, err)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")  # the CLI's configure() makes fresh clients
    assert main(["prepare", storage.join(s3_env, "images"), out, endpoint]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "access denied" in err, err
    assert not Path(out).exists()
    with pytest.raises(SourceError, match="is not one of"):
        open_source(str(tmp_path), "imagenet")
