"""The paper's training details that the shipped configs promise: horizontal flips with the flipped latents, the
split generator step of growth, the reconstruction discriminator; and no config key that nothing reads.

Pure torch on the CPU with small networks; the reader tests write a few latent-pair shards to a local folder.
"""
from __future__ import annotations

import ast
import io
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import Tensor, nn

import pagoda_dist
from pagoda_dist.chain import stage_spec
from pagoda_dist.config import Config, ConfigError, describe_keys, load_config
from pagoda_dist.data.manifest import Manifest, commit_manifest
from pagoda_dist.data.reader import reader_for
from pagoda_dist.data.samples import Sample
from pagoda_dist.data.shards import ShardWriter
from pagoda_dist.data.tensors import downsample, to_tensor
from pagoda_dist.dry_run import _training_detail_lines, describe
from pagoda_dist.eval.report import _adversarial_flops, meta_networks
from pagoda_dist.interfaces import Batch, Condition, StageInputs
from pagoda_dist.losses import adaptive_gan_weight, d_hinge_loss, g_hinge_loss
from pagoda_dist.runtime.flops import training_flops_per_image
from pagoda_dist.runtime.single import train_single_process
from pagoda_dist.stages import AdversarialStage, build_distill, build_grow, build_teacher

PACKAGE = Path(pagoda_dist.__file__).parent
CONFIGS = sorted((PACKAGE.parent / "configs").glob("*.yaml"))
# 16 px base grown to 32; no DiffAugment, so every loss is a deterministic function of the networks and inputs.
SMALL = ["model.channels=16", "model.channel_mult=[1,2]", "model.attn_resolutions=[8]", "model.num_classes=10",
         "distill.adversarial.discriminator.channels=16", "grow.adversarial.discriminator.channels=16",
         "grow.resolutions=[32]", "data.resolution=32", "grow.adversarial.diffaug=''",
         "grow.adversarial.gan_weight=0.7"]
SPLIT = ["grow.split_steps=[32]"]
RECON = [*SPLIT, "grow.recon_discriminator=[32]"]


def small_config(*extra: str) -> Config:
    return load_config(None, [*SMALL, *extra])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These networks are tiny: one intra-op thread runs them fastest, and far faster on a machine whose cores
    are busy (two threads then spend most of each op waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------ flips
N_PAIRS = 40


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, np.ndarray]:
    """Latent-pair shards of random 32 px images whose 'latents' are the images box-downsampled to 16 px: the
    latent of the image as stored, and (latent_flip) that of its mirror image, as precompute.flip writes them.
    Returns the folder and the images by key."""
    url = str(tmp_path_factory.mktemp("pairs"))
    images = np.random.default_rng(0).integers(0, 256, (N_PAIRS, 32, 32, 3), dtype=np.uint8)
    writer = ShardWriter(url, "train-000000.tar")
    for i, img in enumerate(images):
        png = io.BytesIO()
        Image.fromarray(img).save(png, format="PNG")
        latent, latent_flip = (to_tensor(a[None].copy(), 16)[0].numpy() for a in (img, img[:, ::-1]))
        writer.write(Sample(key=f"{i:04d}", image=png.getvalue(), cls=i % 10,
                            arrays={"latent": latent, "latent_flip": latent_flip}))
    commit_manifest(url, Manifest(kind="latent-pairs", resolution=32, channels=3, image_format="png",
                                  splits={"train": [writer.close()]}, class_names=[str(c) for c in range(10)]))
    return url, images


def _read(cfg: Config, inputs: StageInputs, batches: int) -> list:
    return list(itertools.islice(iter(reader_for(cfg, inputs, batch_size=8)), batches))


def _mirrored(batch, images: np.ndarray) -> Tensor:
    """Per sample of `batch`: True where its image is the mirror of the stored one (asserting it is one or other)."""
    stored = to_tensor([images[int(k.split("/")[-1])] for k in batch.keys], batch.image.shape[-1])
    flipped = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(batch.image, stored)])
    unflipped = torch.tensor([torch.equal(a, b) for a, b in zip(batch.image, stored)])
    assert bool((flipped | unflipped).all())
    return flipped


def test_flipped_pairs_carry_the_latent_of_the_mirror_image(pairs: tuple[str, np.ndarray]) -> None:
    """data.hflip=pairs: about half of the grow stage's samples are mirrored, and every sample's latent is that of
    the image it carries; image mirrored with the stored latent, or the reverse, fails. A resumed reader draws
    the same flips."""
    url, images = pairs
    cfg = small_config("data.hflip=pairs", "precompute.flip=true", f"precompute.output={url}", f"data.shards={url}",
                       "data.loader_workers=0", "data.shuffle_buffer=8")
    grow_inputs = StageInputs(resolution=32, needs_latents=True)
    epoch = _read(cfg, grow_inputs, N_PAIRS // 8)
    mirrored = torch.cat([_mirrored(b, images) for b in epoch])
    assert 0.3 < mirrored.float().mean() < 0.7  # p = 0.5, the reference's flip ratio
    for batch in epoch:
        assert torch.allclose(batch.latent, downsample(batch.image, 16), atol=1e-5)

    reader = reader_for(cfg, grow_inputs, batch_size=8)
    stream = iter(reader)
    next(stream)
    resumed = reader_for(cfg, grow_inputs, batch_size=8)
    resumed.load_state_dict(reader.state_dict())
    for a, b in zip(itertools.islice(stream, 2), itertools.islice(iter(resumed), 2)):
        assert a.keys == b.keys and torch.equal(a.image, b.image) and torch.equal(a.latent, b.latent)

    # The teacher streams image shards: mirrored under data.hflip=all only (EDM's ImageNet recipe does not flip).
    teacher_inputs = StageInputs(resolution=16, needs_latents=False)
    assert not any(bool(_mirrored(b, images).any()) for b in _read(cfg, teacher_inputs, 2))
    everything = small_config("data.hflip=all", "precompute.flip=true", f"precompute.output={url}",
                              f"data.shards={url}", "data.loader_workers=0", "data.shuffle_buffer=8")
    assert any(bool(_mirrored(b, images).any()) for b in _read(everything, teacher_inputs, 2))
    off = small_config(f"precompute.output={url}", "data.loader_workers=0", "data.shuffle_buffer=8")
    assert not any(bool(_mirrored(b, images).any()) for b in _read(off, grow_inputs, 2))


# -------------------------------------------------------------------------------------------------- stages
@pytest.fixture(scope="module")
def distilled() -> dict:
    """The export of a distilled generator of a random (non-degenerate) teacher; growth settings do not change it."""
    cfg = small_config()
    torch.manual_seed(0)
    teacher = build_teacher(cfg)
    for p in teacher.net.parameters():  # trained-like weights: zero-initialised heads would block every gradient
        p.data.normal_(0, 0.05)
    distill = build_distill(cfg, {"architecture": teacher.architecture(), "ema": teacher.net.state_dict()})
    return {"architecture": distill.architecture(), "ema": distill.generator.state_dict()}


def grow_stage(cfg: Config, export: dict) -> AdversarialStage:
    torch.manual_seed(0)
    return build_grow(cfg, stage_spec(cfg, "grow-32"), export)


def a_batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, Condition(class_labels=torch.tensor([3, 7])),
                 torch.randn(2, 3, 16, 16, generator=g) * 80)


class RecordingDriver:
    """A StepDriver that records every backward (loss and the gradients it left) and every step, and never changes
    a weight: the expected gradients can then be recomputed on the very same networks. It also records the input
    of every generator call."""

    def __init__(self, nets: dict[str, nn.Module]) -> None:
        self.nets, self.events, self.g_inputs = nets, [], []

    def module(self, name: str):
        if name != "generator":
            return self.nets[name]

        def generator(z: Tensor, cond: Condition) -> Tensor:
            self.g_inputs.append(z.detach().clone())
            return self.nets[name](z, cond)
        return generator

    def backward(self, name: str, loss: Tensor) -> None:
        loss.backward()
        grads = {n: p.grad.clone() for n, p in self.nets[name].named_parameters() if p.grad is not None}
        self.nets[name].zero_grad(set_to_none=True)
        self.events.append(("backward", name, loss.detach(), grads))

    def step(self, name: str) -> None:
        self.events.append(("step", name))

    def backwards(self, name: str) -> list[tuple[Tensor, dict[str, Tensor]]]:
        return [(e[2], e[3]) for e in self.events if e[0] == "backward" and e[1] == name]


def grads_of(net: nn.Module, loss: Tensor) -> dict[str, Tensor]:
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True, retain_graph=True)
    return {n: g for (n, _), g in zip(named, grads) if g is not None}


def assert_same_grads(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-8, msg=name)


def test_split_steps_update_reconstruction_then_gan_at_the_fixed_weight(distilled: dict) -> None:
    """grow.split_steps: two generator updates per batch; the first's gradient is the reconstruction loss's alone
    (no GAN term), the second's is gan_weight x the GAN loss on fresh noise at sigma_max (not adaptive)."""
    stage = grow_stage(small_config(*SPLIT), distilled)
    assert stage.split_steps and stage.recon_discriminator is None
    G, D, batch = stage.generator, stage.discriminator, a_batch()
    driver = RecordingDriver(stage.trainable())
    metrics = stage.train_step(batch, driver, nimg=0)
    assert [e[:2] for e in driver.events] == [("backward", "discriminator"), ("step", "discriminator"),
                                              ("backward", "generator"), ("step", "generator"),
                                              ("backward", "generator"), ("step", "generator")]
    (_, rec_grads), (_, gan_grads) = driver.backwards("generator")
    d_fake_input, rec_input, gan_input = driver.g_inputs
    assert torch.equal(rec_input, batch.latent) and torch.equal(gan_input, d_fake_input)
    assert 40 < gan_input.std() < 120  # sigma_max * eps, as sampling feeds the generator

    cond = batch.condition
    rec = stage.rec_distance(G(batch.latent, cond), batch.image)
    gan = 0.7 * g_hinge_loss(D(G(gan_input, cond), cond))
    expected_rec, expected_gan = grads_of(G, rec), grads_of(G, gan)
    assert_same_grads(rec_grads, expected_rec)
    assert_same_grads(gan_grads, expected_gan)
    # The two terms are far from negligible against each other, so a mixed-up update cannot pass the checks above.
    norm = lambda g: torch.sqrt(sum(t.square().sum() for t in g.values()))  # noqa: E731
    assert 0.01 < norm(expected_gan) / norm(expected_rec) < 100
    assert metrics["gan_weight"] == 0.7 and metrics["loss"] == pytest.approx(metrics["rec"] + 0.7 * metrics["gan"])


def test_split_steps_before_the_gan_starts_update_reconstruction_only(distilled: dict) -> None:
    stage = grow_stage(small_config(*RECON, "grow.adversarial.gan_start_kimg=1"), distilled)
    driver = RecordingDriver(stage.trainable())
    stage.train_step(a_batch(), driver, nimg=0)
    assert [e[:2] for e in driver.events] == [("backward", "generator"), ("step", "generator")]


def test_reconstruction_discriminator_is_trained_on_reconstructions_and_used_by_the_generator(distilled: dict) -> None:
    """grow.recon_discriminator: its own network and optimizer; the reconstruction update adds its hinge term at
    recon_discriminator_weight x the adaptive weight; its own step judges real images vs. those reconstructions."""
    cfg = small_config(*RECON, "grow.recon_discriminator_weight=0.3")
    stage = grow_stage(cfg, distilled)
    R, G, batch, cond = stage.recon_discriminator, stage.generator, a_batch(), a_batch().condition
    assert R is not None and R is not stage.discriminator
    assert set(stage.trainable()) == set(stage.optimizers()) == {"generator", "discriminator", "recon_discriminator"}
    assert stage.optimizers()["recon_discriminator"] == cfg.grow.adversarial.discriminator.optimizer

    driver = RecordingDriver(stage.trainable())
    metrics = stage.train_step(batch, driver, nimg=0)
    assert [e[:2] for e in driver.events][2:5] == [("backward", "recon_discriminator"),
                                                   ("step", "recon_discriminator"), ("backward", "generator")]
    (rec_loss, rec_grads), _ = driver.backwards("generator")
    out = G(batch.latent, cond)
    rec, recon_gan = stage.rec_distance(out, batch.image), g_hinge_loss(R(out, cond))
    od = out.detach().requires_grad_()
    weight = adaptive_gan_weight(stage.rec_distance(od, batch.image), g_hinge_loss(R(od, cond)), od, factor=0.3,
                                 clip=cfg.grow.adversarial.adaptive_clip)
    assert metrics["recon_weight"] == pytest.approx(weight.item())
    assert_same_grads(rec_grads, grads_of(G, rec + weight * recon_gan))
    with pytest.raises(AssertionError):  # the term is used: without it the gradient differs
        assert_same_grads(rec_grads, grads_of(G, rec))

    ((r_loss, r_grads),) = driver.backwards("recon_discriminator")
    expected = d_hinge_loss(R(batch.image, cond), R(out.detach(), cond))  # real vs. the reconstructions
    assert r_loss.item() == pytest.approx(expected.item(), rel=1e-5) == metrics["recon_d_loss"]
    assert_same_grads(r_grads, grads_of(R, expected))

    before = {n: p.detach().clone() for n, p in R.named_parameters() if p.requires_grad}
    (history,) = train_single_process(stage, itertools.repeat(batch), steps=1, train=cfg.grow.train).history
    assert "recon_d_loss" in history and "recon_gan" in history
    moved = [n for n, p in R.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert len(moved) > len(before) // 2  # all but e.g. the embeddings of classes absent from the batch


def _deepspeed_worker(rank: int, init_method: str, out: str) -> None:
    """Two split steps of grow-32 with the reconstruction discriminator on three DeepSpeed ZeRO-2 engines."""
    import json

    import torch.distributed as dist

    from pagoda_dist.runtime.drivers import DeepSpeedDriver, deepspeed_config

    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="1")  # what a launcher sets for DeepSpeed
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=1)
    cfg = small_config(*RECON, "runtime.zero_stage=2", "grow.train.batch_size=2")
    stage = grow_stage(cfg, distilled.__wrapped__())
    nets = stage.trainable()
    before = {name: [p.detach().clone() for p in net.parameters() if p.requires_grad] for name, net in nets.items()}
    driver = DeepSpeedDriver(nets, stage.optimizers(), deepspeed_config(cfg.grow.train, cfg.runtime, 1))
    metrics = {}
    for step in range(2):
        driver.begin_step(2 * step)
        metrics = stage.train_step(a_batch(), driver, nimg=2 * step)
    moved = {name: sum(not torch.equal(a, b) for a, b in
                       zip(before[name], [p for p in driver.live(name).parameters() if p.requires_grad]))
             for name in nets}
    Path(out, "result.json").write_text(json.dumps({"metrics": sorted(metrics), "moved": moved}))
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_three_engines_train_under_deepspeed(tmp_path: Path) -> None:
    """Under ZeRO the reconstruction discriminator must take its own step before the generator's update runs
    through it (the first backward through an engine that is not its own fails); both generator updates step."""
    import json

    torch.multiprocessing.spawn(_deepspeed_worker, args=(f"file://{tmp_path}/store", str(tmp_path)), nprocs=1)
    result = json.loads((tmp_path / "result.json").read_text())
    assert {"d_loss", "recon_d_loss", "rec", "gan", "recon_gan", "recon_weight"} <= set(result["metrics"])
    assert all(count > 0 for count in result["moved"].values()) and len(result["moved"]) == 3


def test_the_ledger_and_the_dry_run_count_and_show_the_details() -> None:
    plain, recon = small_config(), small_config(*RECON, "data.hflip=pairs", "precompute.flip=true")
    spec = stage_spec(recon, "grow-32")
    g, d, r = meta_networks(recon, spec)
    assert type(r) is type(d) and len(meta_networks(plain, spec)) == 2
    r_flops = training_flops_per_image(r, (3, 32, 32), lambda m, x: torch.stack(
        m(x, Condition(class_labels=torch.zeros(len(x), dtype=torch.long, device=x.device)))).sum(0))
    with_r, without = (_adversarial_flops(c, spec) for c in (recon, plain))
    assert with_r - without == pytest.approx(3 * r_flops)  # its own step (real, reconstruction) + the generator's

    text = describe(recon, "test")
    assert "flips:      p = 0.5 per sample (distil, grow)" in text
    assert "split step: grow-32" in text and "recon. D:   grow-32" in text and "x0.5 adaptive" in text
    assert _training_detail_lines(plain) == []


# -------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, key, words", [
    (["data.hflip=pairs"], "data.hflip", "precompute.flip"),
    (["data.hflip=all"], "data.hflip", "precompute.flip: true"),
    (["grow.recon_discriminator=[32]"], "grow.recon_discriminator", "split_steps"),
    (["grow.split_steps=[64]"], "grow.split_steps", "grow.resolutions"),
    (["grow.split_steps=true"], "grow.split_steps", "expected a list"),
    ([*SPLIT, "grow.adversarial.gan_weight=0"], "grow.split_steps", "gan_weight > 0"),
    ([*SPLIT, "grow.train.grad_accum=2", "grow.train.batch_size=64"], "grow.split_steps", "grad_accum 1"),
    ([*RECON, "grow.recon_discriminator_weight=0"], "grow.recon_discriminator_weight", "> 0"),
])
def test_combinations_that_cannot_work_are_refused(overrides: list[str], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        small_config(*overrides)
    assert key in str(err.value) and words in str(err.value)


def test_shipped_configs_say_what_the_reference_does() -> None:
    """res64to256.sh / res64to512.sh: flipped pairs at p = 0.5, separate updates at 256 and 512, the reconstruction
    discriminator (weight 0.5) at 512 only; the text-to-image config inherits them; the tiny demos keep all off."""
    for name in ("imagenet-512.yaml", "t2i-512.yaml"):
        cfg = load_config(PACKAGE.parent / "configs" / name)
        assert cfg.data.hflip == "pairs" and cfg.precompute.flip
        assert cfg.grow.split_steps == [256, 512] and cfg.grow.recon_discriminator == [512]
        assert cfg.grow.recon_discriminator_weight == 0.5 and cfg.grow.adversarial.gan_weight == 1.0
    for name in ("tiny.yaml", "tiny-text.yaml"):
        cfg = load_config(PACKAGE.parent / "configs" / name)
        assert cfg.data.hflip == "off" and not cfg.grow.split_steps and not cfg.grow.recon_discriminator


# ------------------------------------------------------------------------------------------------ dead keys
# Keys that no `.field` read consumes because a generic mechanism does, each with the reason. Nothing else is
# excused: a key listed here must say what reads it.
GENERIC_KEYS = {
    "base": "a YAML file's inheritance key, not a Config field: config._read_yaml merges the file it names",
}


def _attributes_read() -> set[str]:
    """Every attribute name read (`x.name` in a load context) in pagoda_dist outside config.py, plus those that a
    config property or method reads when code outside config.py uses it (`eval.floor_count` reads `floor_images`)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
    for node in ast.walk(ast.parse((PACKAGE / "config.py").read_text())):
        if isinstance(node, ast.FunctionDef) and node.name in names:
            names |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)}
    return names


def _yaml_leaves(data: dict, prefix: str = "") -> list[str]:
    leaves = []
    for key, value in data.items():
        if isinstance(value, dict):
            leaves += _yaml_leaves(value, f"{prefix}{key}.")
        else:
            leaves.append(f"{prefix}{key}")
    return leaves


def test_every_config_key_is_read_outside_the_config_module() -> None:
    """A key that only config.py mentions does nothing. The scan matches attribute names, so a key whose name is
    also a common attribute (name, lr, steps) passes on any read of that name; distinctive names (split_steps,
    recon_discriminator, hflip) are caught."""
    read = _attributes_read()
    keys = {key for key, _, _ in describe_keys()}
    for path in CONFIGS:
        keys |= set(_yaml_leaves(yaml.safe_load(path.read_text()) or {}))
    dead = sorted(k for k in keys if k not in GENERIC_KEYS and k.rsplit(".", 1)[-1] not in read)
    assert not dead, f"config keys nothing in pagoda_dist reads (outside config.py): {dead}"
