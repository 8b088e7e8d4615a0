"""Evaluation at scale: slices of image indices scored anywhere give the numbers of the whole sets; a pool of Ray
actors gives the same numbers with 1 and 2 workers; the held-out split is checked before anything trains; FID
reference statistics and every network's weights come from storage URLs (the embedded S3 server).

The run evaluated here is real in its parts (Fashion-MNIST shards written by `prepare`, committed exports of a
teacher UNet, its one-step generator and a grown generator) but untrained: these tests check plumbing and numbers,
not quality.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pagoda_dist import storage
from pagoda_dist.chain import chain
from pagoda_dist.config import Config, ConfigError, load_config
from pagoda_dist.data.prepare import prepare
from pagoda_dist.data.tensors import downsample
from pagoda_dist.eval.evaluate import evaluate_run, generate, held_out, load_network
from pagoda_dist.eval.fid import EFFNET_METRIC, INCEPTION_METRIC, FeatureStats, effnet_features, fid_effnet_lite0
from pagoda_dist.eval.inputs import feature_nets, read_held_out
from pagoda_dist.eval.preflight import check_held_out
from pagoda_dist.eval.slices import noise_states
from pagoda_dist.eval.swd import swd
from pagoda_dist.eval.weights import local_file
from pagoda_dist.models.efficientnet_lite0 import default_weights_path, load_efficientnet_lite0
from pagoda_dist.models.generator import OneStepGenerator
from pagoda_dist.models.unet import UNet
from pagoda_dist.runtime import CheckpointStore
from pagoda_dist.runtime.checkpoint import write_export

VAL = 100  # Fashion-MNIST keeps its official 6:1 split: data.limit 700 holds out 100 images
SMALL = [
    "storage.embedded_s3=false", "data.limit=700", "model.channels=16", "model.channel_mult=[1,2]",
    "model.attn_resolutions=[]", "teacher.sampler.steps=3", "grow.resolutions=[32]", "logging.grid_size=3",
    "logging.wandb_mode=disabled",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("data") / "fmnist-32")
    prepare("builtin:fashion-mnist", out, resolution=32, limit=700, shard_size=64, workers=1, progress=False)
    return out


def run_config(root: Path, shards: str, *overrides: str) -> Config:
    # The evaluation reads images and labels only, so the image shards can stand in for the latent pairs.
    return load_config("configs/tiny.yaml", [*SMALL, f"run.root={root}", f"data.shards={shards}",
                                             f"precompute.output={shards}", *overrides])


def commit_exports(cfg: Config) -> None:
    """A committed export for every stage of the chain: a seeded random teacher, the one-step generator made from it
    and the generators grown from that, as training would leave them."""
    torch.manual_seed(0)
    teacher = UNet(cfg.model)
    with torch.no_grad():  # EDM-style zero-initialised outputs would make every sample the same
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    nets = {"teacher": teacher}
    net = OneStepGenerator.from_teacher(teacher, sigma_max=cfg.diffusion.sigma_max, sigma_data=cfg.diffusion.sigma_data)
    for spec in chain(cfg)[1:]:
        net = net if spec.kind == "distill" else net.grow()
        nets[spec.name] = net
    for name, net in nets.items():
        store = CheckpointStore(cfg.run_url, name)
        folder = Path(cfg.run.root) / "staging" / name
        folder.mkdir(parents=True)
        write_export({"stage": name, "nimg": 1000, "architecture": net.architecture(), "ema": net.state_dict()}, folder)
        storage.upload_dir(folder, store.step_url(1000))
        storage.commit_existing(store.step_url(1000))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, shards: str) -> Config:
    cfg = run_config(tmp_path_factory.mktemp("run"), shards)
    commit_exports(cfg)
    return cfg


def with_eval(cfg: Config, **changes: object) -> Config:
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **changes))


def metrics(cfg: Config) -> dict:
    """What evaluate_run wrote, as read back from metrics.json."""
    evaluate_run(cfg)
    return json.loads(storage.read_bytes(storage.join(cfg.run_url, "eval", "metrics.json")))


# ------------------------------------------------------------------------------------------------ the noise
@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 4, 4), (3, 64, 64)])
def test_noise_of_an_image_does_not_depend_on_the_slicing(shape: tuple[int, int, int]) -> None:
    """Restored at a slice's start, the generator draws what one torch.randn over all images draws there: the
    evaluation's noise is the same for any slicing, and the same as before slicing existed."""
    n, per_image = 23, int(np.prod(shape))
    whole = torch.randn(n, *shape, generator=torch.Generator().manual_seed(7))
    starts = [0, 5, 6, 17]
    for start, stop, state in zip(starts, [*starts[1:], n], noise_states(7, per_image, starts)):
        g = torch.Generator()
        g.set_state(state)
        assert torch.equal(torch.randn(stop - start, *shape, generator=g), whole[start:stop])




@pytest.mark.parametrize("overrides, key", [
    (["eval.floor_images=8"], "eval.floor_images"), (["eval.floor_images=300"], "eval.floor_images"),
    (["eval.swd_images=300"], "eval.swd_images"), (["eval.workers=-1"], "eval.workers"),
    (["eval.images_per_task=0"], "eval.images_per_task"),
    (["eval.reference_stats=s3://b/ref.npz"], "eval.reference_stats"),  # without Inception weights
    (["eval.inception_weights=/w.pth", "eval.reference_stats=s3://b/{res}.npz"], "eval.reference_stats"),
])
def test_the_evaluation_keys_are_checked(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/tiny.yaml", overrides)


# ---------------------------------------------------------------------------------- the held-out preflight
def test_the_held_out_split_is_checked_against_the_evaluation(tmp_path: Path, shards: str) -> None:
    cfg = run_config(tmp_path, shards, "eval.num_images=64")
    with pytest.raises(ConfigError) as err:
        check_held_out(cfg)
    line = str(err.value)
    assert "\n" not in line
    for words in ("eval.num_images=64", "eval.floor_images=64", "need 128", f"{shards} holds", str(VAL),
                  "data.val_fraction"):
        assert words in line
    # A smaller floor set (or none) is what makes it fit.
    assert "cover the 80" in check_held_out(run_config(tmp_path, shards, "eval.num_images=64",
                                                       "eval.floor_images=16"))


def test_the_training_split_is_read_by_index_like_the_held_out_one(tmp_path: Path, shards: str) -> None:
    """Measurements that need more real images than the held-out split holds read the training split the same way:
    by index in a fixed order, disjoint from the held-out images, with a one-line refusal past its end."""
    cfg = run_config(tmp_path, shards)
    val = read_held_out(cfg, 0, 16).images
    train = read_held_out(cfg, 0, 24, split="train").images
    assert torch.equal(read_held_out(cfg, 8, 16, split="train").images, train[8:])
    assert not any(torch.equal(a, b) for a in train for b in val)
    with pytest.raises(ValueError, match=r"^reading 100000 images, but \S+ holds in its 'train' split \d+$"):
        read_held_out(cfg, 0, 100000, split="train")


def test_the_held_out_split_is_predicted_before_prepare(tmp_path: Path) -> None:
    missing = f"data.shards={tmp_path / 'not-prepared'}"
    builtin = load_config("configs/tiny.yaml", [*SMALL, f"run.root={tmp_path}", missing, "eval.num_images=64"])
    with pytest.raises(ConfigError, match=rf"predicted to give a 'val' split of {VAL}: raise data\.val_fraction"):
        check_held_out(builtin)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(folder / f"{i:02d}.png")
    photos = [*SMALL, f"run.root={tmp_path}", missing, f"data.source={folder}", "data.limit=null",
              "data.val_fraction=0.5", "model.num_classes=0", "eval.num_images=16"]
    with pytest.raises(ConfigError, match=r"need 32 held-out images, but data\.source .* of 20"):
        check_held_out(load_config("configs/tiny.yaml", photos))
    assert "about 20" in check_held_out(load_config("configs/tiny.yaml", [*photos, "eval.floor_images=0"]))


def test_pagoda_run_refuses_before_it_trains(tmp_path: Path, shards: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pagoda_dist import pipeline

    def went_on(cfg: Config) -> None:
        raise AssertionError("the run went on past its checks")

    monkeypatch.setattr(pipeline, "_save_config", went_on)  # the first write after the checks, before any step
    cfg = run_config(tmp_path, shards, "eval.num_images=64", "runtime.cpus_per_worker=1")
    with pytest.raises(ConfigError, match=r"eval\.num_images=64 \+ eval\.floor_images=64 need 128"):
        pipeline.run_pipeline(cfg)
    assert not storage.exists(storage.join(cfg.run_url, "config.json"))


# ------------------------------------------------------------------------------------------ weights by URL
def test_weights_from_s3_are_copied_once(s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = storage.join(s3_env, "weights", "effnet.pth")
    storage.copy_file(str(default_weights_path()), url)
    cache = tmp_path / "cache"
    path = local_file(url, cache, "eval.effnet_weights")
    assert path.read_bytes() == default_weights_path().read_bytes() and path.name == "effnet.pth"
    load_efficientnet_lite0(path)  # loads strictly, with weights_only=True

    def no_download(*args: object) -> None:
        raise AssertionError("downloaded again")

    monkeypatch.setattr(storage, "copy_file", no_download)
    assert local_file(url, cache, "eval.effnet_weights") == path  # the cached copy
    assert local_file(str(path), cache, "eval.effnet_weights") == path  # a local path is used where it lies
    with pytest.raises(FileNotFoundError, match=r"eval\.clip_weights: s3://.*missing\.bin does not exist"):
        local_file(storage.join(s3_env, "missing.bin"), cache, "eval.clip_weights")
    with pytest.raises(FileNotFoundError, match=r"eval\.inception_weights: .*nowhere\.pth does not exist"):
        local_file(str(tmp_path / "nowhere.pth"), cache, "eval.inception_weights")


def test_clip_weights_from_s3(s3_env: str, tmp_path: Path, shards: str) -> None:
    from pagoda_dist.models.text_encoder import create_clip_model

    model = create_clip_model("pagoda-tiny-text", None, random_init=True)
    local = tmp_path / "clip.pt"
    torch.save(model.state_dict(), local)
    url = storage.join(s3_env, "clip", "tiny.pt")
    storage.copy_file(str(local), url)
    cfg = run_config(tmp_path, shards, "model.num_classes=0", "model.text_dim=64", "precompute.clip_random_init=true",
                     "eval.clip_model=pagoda-tiny-text", f"eval.clip_weights={url}",
                     f"eval.weights_cache={tmp_path / 'cache'}")
    clip, _ = feature_nets(cfg).clip
    for name, value in model.state_dict().items():
        assert torch.equal(clip.state_dict()[name], value), name


# ---------------------------------------------------------------------------------- reference statistics
def test_reference_statistics_in_guided_diffusion_format(tmp_path: Path) -> None:
    features = np.random.default_rng(0).standard_normal((40, 8))
    stats = FeatureStats.of(features)
    path = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(path, arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu=stats.mu, sigma=stats.cov)
    loaded = FeatureStats.load(path)
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.cov, stats.cov) and loaded.count == 0
    np.savez(path, arr_0=np.zeros(3))
    with pytest.raises(ValueError, match=r"holds \['arr_0'\]; feature statistics need 'mu' and 'sigma'"):
        FeatureStats.load(path)
    np.savez(path, mu=stats.mu, sigma=stats.cov[:4])
    with pytest.raises(ValueError, match="not a"):
        FeatureStats.load(path)


def test_reference_statistics_apply_at_the_final_resolution_unless_templated(run: Config) -> None:
    from pagoda_dist.eval.slices import make_plan

    def urls(value: str) -> dict[int, str]:
        return make_plan(with_eval(run, inception_weights="/w.pth", reference_stats=value)).reference_urls

    assert urls("s3://b/ref.npz") == {32: "s3://b/ref.npz"}
    assert urls("s3://b/ref{resolution}.npz") == {16: "s3://b/ref16.npz", 32: "s3://b/ref32.npz"}


# ------------------------------------------------------------------------------------- slices vs whole sets
def direct_evaluation(cfg: Config) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metrics computed the direct way, on whole sets in memory (one torch.randn for all the noise, the public
    `swd` and `fid_effnet_lite0` on each pair of sets, the SWD sets capped at eval.swd_images, the floor set
    compared with as many real images), and the first grid_size^2 images of each stage."""
    e, seed = cfg.eval, cfg.run.seed
    n, floor_n, s = e.num_images, e.floor_count, e.swd_count
    data = held_out(cfg, n, floor_n)
    noise = torch.randn(n, cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution,
                        generator=torch.Generator().manual_seed(seed + 1))
    effnet = load_efficientnet_lite0()
    stats: dict[int, tuple[torch.Tensor, FeatureStats]] = {}  # each set's EfficientNet statistics, computed once

    def of(images: torch.Tensor) -> FeatureStats:
        if id(images) not in stats:
            stats[id(images)] = (images, FeatureStats.of(effnet_features(images, effnet)))
        return stats[id(images)][1]

    def row(reference: torch.Tensor, other: torch.Tensor, size: int) -> dict:
        return {**swd(reference[:size], other[:size], seed=seed).to_dict(),
                EFFNET_METRIC: fid_effnet_lite0(of(reference), of(other))}

    out: dict = {"stages": {}, "floor": {}}
    images = {"real": data.real[: cfg.logging.grid_size ** 2]}
    below = None
    for spec in chain(cfg):
        real = downsample(data.real, spec.resolution)
        if floor_n:
            head = real if floor_n == n else real[:floor_n]
            out["floor"][str(spec.resolution)] = row(downsample(data.real_floor, spec.resolution), head,
                                                     min(floor_n, s))
        fake = generate(cfg, load_network(cfg, spec.name), noise, data.condition)
        images[spec.name] = fake[: cfg.logging.grid_size ** 2]
        out["stages"][spec.name] = {"metrics": row(real, fake, s)}
        if spec.kind == "grow":
            up = torch.nn.functional.interpolate(below, size=spec.resolution, mode="bicubic").clamp(-1, 1)
            out["stages"][spec.name]["bicubic_from_below"] = row(real, up, s)
        below = fake if spec.kind != "teacher" else below
    return out, images


def only_metrics(results: dict) -> dict:
    return {"floor": results["floor"],
            "stages": {name: {k: v for k, v in entry.items() if k in ("metrics", "bicubic_from_below")}
                       for name, entry in results["stages"].items()}}


def grid_bytes(cfg: Config) -> dict[str, bytes]:
    return {name: storage.read_bytes(storage.join(cfg.run_url, "eval", f"{name}.png"))
            for name in ("real", "teacher", "distill", "grow-32")}


@dataclasses.dataclass
class Sliced:
    """One evaluation in this process, in slices, as evaluate_run left it: its config, metrics.json and grids."""

    cfg: Config
    got: dict
    grids: dict[str, bytes]


@pytest.fixture(scope="module")
def sliced(run: Config) -> Sliced:
    """24 images in slices of 10: the floor set (16) ends inside the second slice, the SWD sets (22) inside the
    third, the 5 x 5 sample grids span two slices. One CPU per Ray actor, for the Ray test that repeats it. Both
    tests below check this one evaluation (read back before either reruns it in the same run folder)."""
    cfg = with_eval(dataclasses.replace(run, logging=dataclasses.replace(run.logging, grid_size=5),
                                        runtime=dataclasses.replace(run.runtime, cpus_per_worker=1)),
                    num_images=24, floor_images=16, swd_images=22, images_per_task=10)
    got = metrics(cfg)
    return Sliced(cfg, got, grid_bytes(cfg))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_slices_give_the_numbers_of_the_whole_sets(sliced: Sliced) -> None:
    """Every number of the sliced evaluation equals the direct computation on whole sets to the last bit: per-image
    features and samples do not depend on which images share a batch (on the CPU)."""
    from pagoda_dist.data.grid import save_grid

    expected, images = direct_evaluation(sliced.cfg)
    assert sliced.got["floor_images"] == 16 and set(sliced.got["floor"]) == {"16", "32"}
    assert only_metrics(sliced.got) == expected
    assert sliced.grids == {name: save_grid(x) for name, x in images.items()}


def same_up_to_blas(got: dict, expected: dict) -> None:
    """SWD values equal to the last bit; Frechet distances to 1e-5 relative (see the Ray test)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            same_up_to_blas(got[key], value)
        else:
            assert got[key] == (value if key.startswith("swd/") else pytest.approx(value, rel=1e-5)), key


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ray_workers_give_the_numbers_of_one_process(sliced: Sliced) -> None:
    """The same evaluation on one Ray actor and on two: identical metrics and grids, to the last bit (each slice is
    computed the same wherever it runs, and each set is reduced from its slices in order, in a one-CPU task).
    Against this process (the sliced evaluation): identical SWD and samples; Frechet distances agree to float
    rounding only, because the driver's BLAS runs on all its cores and the covariances' products and eigenvalues
    round differently with the number of threads (amplified here, where 24 images give rank-deficient 1280 x 1280
    covariances)."""
    import ray

    cfg, here, grids = sliced.cfg, only_metrics(sliced.got), sliced.grids
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        one = only_metrics(metrics(with_eval(cfg, workers=1)))
        assert grid_bytes(cfg) == grids
        two = only_metrics(metrics(with_eval(cfg, workers=2)))
        assert grid_bytes(cfg) == grids
    finally:
        ray.shutdown()
    assert one == two
    same_up_to_blas(one, here)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fid_against_reference_statistics_from_s3(s3_env: str, tmp_path: Path, shards: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Standard FID against guided-diffusion-style reference statistics, with every file read through s3://: the
    statistics, the (random: plumbing only) Inception weights and the EfficientNet-Lite0 weights."""
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("torch_fidelity")
    from pagoda_dist.eval import inception
    from pagoda_dist.eval.fid import frechet_distance, inception_features

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    local = tmp_path / "inception.pth"
    torch.save(net.state_dict(), local)
    monkeypatch.setattr(inception, "SHA256_PREFIX", inception.sha256_of(local)[:8])  # a random net: not the FID file
    reference = FeatureStats.of(np.random.default_rng(0).standard_normal((64, 2048)) * 0.1 + 0.3)
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 16, 16, 3), np.uint8), mu=reference.mu, sigma=reference.cov)
    urls = {}
    for name, path in (("inception", local), ("effnet", default_weights_path()), ("ref", tmp_path / "ref.npz")):
        urls[name] = storage.join(s3_env, "eval", path.name)
        storage.copy_file(str(path), urls[name])
    cfg = run_config(tmp_path / "run", shards, "grow.resolutions=[]", "eval.num_images=16", "eval.floor_images=16",
                     f"eval.inception_weights={urls['inception']}", f"eval.effnet_weights={urls['effnet']}",
                     f"eval.reference_stats={urls['ref']}", f"eval.weights_cache={tmp_path / 'cache'}")
    commit_exports(cfg)
    got = metrics(cfg)
    assert got["fid_reference"] == {"16": urls["ref"]}

    nets = feature_nets(cfg)
    data = read_held_out(cfg, 0, 16)
    with pytest.raises(ValueError, match=r"^reading 100000 held-out images, but \S+ holds in its 'val' split \d+: "):
        read_held_out(cfg, 0, 100000)  # the refusal names what this reader asked for, not the config's need
    noise = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(cfg.run.seed + 1))
    for name in ("teacher", "distill"):
        fake = generate(cfg, load_network(cfg, name), noise, data.condition)
        stats = FeatureStats.of(inception_features(fake, nets.inception))
        assert got["stages"][name]["metrics"][INCEPTION_METRIC] == frechet_distance(reference, stats)
    real = FeatureStats.of(inception_features(downsample(data.images, 16), nets.inception))
    assert got["floor"]["16"][INCEPTION_METRIC] == frechet_distance(reference, real)  # held-out images vs the file
