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
from pagoda_dist.losses import adaptive_gan_weight, d_hinge_loss, diff_augment, g_hinge_loss
from pagoda_dist.models.adm_convert import adm_key_map
from pagoda_dist.models.generator import OneStepGenerator
from pagoda_dist.models.unet import UNet
from pagoda_dist.precompute.teacher import commit_teacher, find_teacher_export, load_teacher
from pagoda_dist.runtime.drivers import _Casting
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
    (["grow.adversarial.separate_real_stream=true"], "separate_real_stream", "independent_noise"),
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
        assert cfg.distill.adversarial.separate_real_stream and cfg.grow.adversarial.separate_real_stream
    for name in ("tiny.yaml", "tiny-text.yaml"):
        cfg = load_config(PACKAGE.parent / "configs" / name)
        assert cfg.data.hflip == "off" and not cfg.grow.split_steps and not cfg.grow.recon_discriminator
        assert not cfg.distill.adversarial.separate_real_stream and not cfg.grow.adversarial.separate_real_stream


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


# ------------------------------------------------------------------------------------ reference details (issue 20)
JOINT = ["grow.adversarial.gan_weight=0.7"]  # grow-32 without split steps: one joint update of rec + adaptive GAN


def test_joint_update_feeds_the_fresh_half_at_sigma_max_like_the_d_step(distilled: dict) -> None:
    """The joint update's fresh-noise half is sigma_max * eps (what the discriminator step judged and sampling
    feeds), not unit noise; with independent_noise it is a draw of its own, at the same scale."""
    batch = a_batch()
    for independent in (False, True):
        stage = grow_stage(small_config(*JOINT, f"grow.adversarial.independent_noise={independent}"), distilled)
        assert not stage.split_steps
        driver = RecordingDriver(stage.trainable())
        stage.train_step(batch, driver, nimg=0)
        d_fake_input, joint_input = driver.g_inputs
        assert torch.equal(joint_input[:2], batch.latent)
        fresh = joint_input[2:]
        assert 40 < fresh.std() < 120 and 40 < d_fake_input.std() < 120
        assert torch.equal(fresh, d_fake_input) != independent


def _reference_weight(stage: AdversarialStage, z: Tensor, batch: Batch, factor: float) -> Tensor:
    """The reference's adaptive weight, by plain autograd: ||d rec / d W|| / ||d gan / d W|| at the weight W of the
    generator's last layer (the last block's second conv), for the joint update's losses on G(z)."""
    G, D, n, cond = stage.generator, stage.discriminator, len(batch), batch.condition
    out = G(z, Condition.cat([cond, cond]))
    rec, gan = stage.rec_distance(out[:n], batch.image), g_hinge_loss(D(out[n:], cond))
    weight = G.last_layer[0].weight
    g_rec, g_gan = (torch.autograd.grad(loss, weight, retain_graph=True)[0] for loss in (rec, gan))
    return factor * g_rec.norm() / g_gan.norm()


def trained_head_stage(cfg: Config, distilled: dict) -> AdversarialStage:
    """grow-32 whose new head is no longer zero (a fresh one passes no gradient back to the last layer: there the
    reference's weight is 0, clipped to adaptive_clip's low end, until the first update moves the head)."""
    stage = grow_stage(cfg, distilled)
    for p in stage.generator.growth_heads.parameters():
        p.data.normal_(0, 0.05)
    return stage


@pytest.mark.parametrize("at", ["output", "last_layer"])
def test_adaptive_weight_at_the_last_layer_is_the_references_formula(distilled: dict, at: str) -> None:
    """Both weights are logged every joint step; gan_weight is the one adaptive_weight_at names, and the update's
    gradient is rec + that weight x gan."""
    stage = trained_head_stage(small_config(*JOINT, f"grow.adversarial.adaptive_weight_at={at}",
                                            "grow.adversarial.adaptive_clip=[0.0001,10000]"), distilled)  # unclipped
    G, D, batch = stage.generator, stage.discriminator, a_batch()
    driver = RecordingDriver(stage.trainable())
    metrics = stage.train_step(batch, driver, nimg=0)
    _, z = driver.g_inputs
    reference = _reference_weight(stage, z, batch, 0.7)
    assert metrics["gan_weight_last_layer"] == pytest.approx(reference.item(), rel=1e-4)
    assert metrics["gan_weight"] == metrics[f"gan_weight_{at}"]
    assert abs(metrics["gan_weight_output"] / metrics["gan_weight_last_layer"] - 1) > 0.01  # they do differ

    ((_, grads),) = driver.backwards("generator")
    n, cond = len(batch), batch.condition
    out = G(z, Condition.cat([cond, cond]))
    expected = grads_of(G, stage.rec_distance(out[:n], batch.image)
                        + metrics["gan_weight"] * g_hinge_loss(D(out[n:], cond)))
    assert grads.keys() == expected.keys()
    flat = [torch.cat([g[k].flatten() for k in sorted(g)]) for g in (grads, expected)]
    # As a whole: with the GAN term 40x the reconstruction's, parameters whose gradient cancels to ~1e-8 are noise.
    assert (flat[0] - flat[1]).norm() < 1e-5 * flat[1].norm()


def test_the_first_step_of_a_run_is_counted_with_the_last_layer_weight(distilled: dict) -> None:
    """A fresh run counts its first step's FLOPs (runtime.telemetry) under a mode whose module hooks watch the
    gradients of every module call: the last-layer map's own autograd.grad must go through it."""
    from torch.utils.flop_counter import FlopCounterMode

    stage = trained_head_stage(small_config(*JOINT), distilled)
    with FlopCounterMode(display=False) as counter:
        metrics = stage.train_step(a_batch(), RecordingDriver(stage.trainable()), nimg=0)
    assert counter.get_total_flops() > 0 and metrics["gan_weight_last_layer"] > 0


def test_split_steps_log_the_recon_weight_by_both_formulas(distilled: dict) -> None:
    stage = trained_head_stage(small_config(*RECON, "grow.adversarial.adaptive_weight_at=last_layer",
                                            "grow.adversarial.adaptive_clip=[0.0001,10000]"), distilled)
    metrics = stage.train_step(a_batch(), RecordingDriver(stage.trainable()), nimg=0)
    assert metrics["recon_weight"] == metrics["recon_weight_last_layer"] != metrics["recon_weight_output"]


def test_cutout_ratio_reaches_diffaugment(distilled: dict) -> None:
    stage = grow_stage(small_config("grow.adversarial.diffaug=cutout", "grow.adversarial.cutout_ratio=0.2"),
                       distilled)
    x = torch.ones(4, 3, 32, 32)
    torch.manual_seed(5)
    (got,) = stage._augment(x)
    for ratio, same in ((0.2, True), (0.5, False)):
        torch.manual_seed(5)
        assert torch.equal(got, diff_augment(x, policy="cutout", cutout_ratio=ratio)[0]) == same
    with pytest.raises(ConfigError, match="cutout_ratio"):
        small_config("grow.adversarial.cutout_ratio=0")


def test_imagenet_trains_the_references_decoder_blocks() -> None:
    """trainable_decoder_blocks in imagenet-512.yaml trains exactly ADM's output blocks 9-15 (--activate_from=9):
    the decoder entries whose weights come from those blocks (structure only: narrow channels)."""
    cfg = load_config(PACKAGE.parent / "configs" / "imagenet-512.yaml",
                      ["model.channels=16", "model.head_channels=8"])
    grown = OneStepGenerator(cfg.model, growth_resolutions=[128],
                             trainable_decoder_blocks=cfg.grow.trainable_decoder_blocks)
    adm = adm_key_map(grown.net)
    trained = {adm[k.removeprefix("net.")].split(".")[1] for k, p in grown.named_parameters()
               if p.requires_grad and k.startswith("net.dec.")}
    assert trained == {str(i) for i in range(9, 16)}


def test_guidance_scale_stays_exact_through_a_bf16_engine() -> None:
    """A bf16 engine's input cast leaves Condition.guidance in float32 (7.77 would become 7.78125) and casts the
    rest."""
    seen = []

    class Recorder(nn.Module):
        def forward(self, z: Tensor, cond: Condition) -> Tensor:
            seen.append(cond)
            return z

    cond = Condition(text_pooled=torch.randn(2, 4)).with_guidance(torch.tensor([7.77, 1.0]))
    _Casting(Recorder(), torch.bfloat16)(torch.zeros(2, 3), cond)
    (got,) = seen
    assert got.guidance.dtype == torch.float32 and torch.equal(got.guidance, cond.guidance)
    assert got.text_pooled.dtype == torch.bfloat16


def test_loading_the_teacher_for_inversion_turns_tf32_off(tmp_path: Path) -> None:
    cfg = small_config(f"run.root={tmp_path}")
    commit_teacher(cfg.run_url, UNet(cfg.model))
    url, _ = find_teacher_export(cfg.run_url)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        load_teacher(url)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_teacher_churn_for_evaluation_never_for_a_distillation_target() -> None:
    """teacher.sampler.churn samples stochastically, reproducibly from the noise alone (any batch); the distillation
    target (deterministic=True) stays the PF-ODE sample of its noise."""
    common = ["teacher.sampler.steps=6", "teacher.sampler.guidance=1.0"]
    plain, churned = (build_teacher(small_config(*common, *extra))
                      for extra in ([], ["teacher.sampler.churn=20"]))
    churned.net.load_state_dict(plain.net.state_dict())
    for p in plain.net.parameters():
        p.data.normal_(0, 0.05)
    churned.net.load_state_dict(plain.net.state_dict())
    noise, cond = torch.randn(3, 3, 16, 16), Condition(class_labels=torch.tensor([1, 2, 3]))
    deterministic = plain.sample(plain.net, noise, cond)
    assert torch.equal(churned.sample(churned.net, noise, cond, deterministic=True), deterministic)
    stochastic = churned.sample(churned.net, noise, cond)
    assert not torch.allclose(stochastic, deterministic, atol=1e-3)
    torch.testing.assert_close(churned.sample(churned.net, noise[1:], cond[1:]), stochastic[1:])
    with pytest.raises(ConfigError, match="churn"):
        small_config("teacher.sampler.solver=ddim", "teacher.sampler.churn=1")


@pytest.mark.parametrize("overrides, key", [
    (["grow.adversarial.adaptive_weight_at=last_layer", "runtime.zero_stage=3"],
     "grow.adversarial.adaptive_weight_at"),
    (["distill.adversarial.adaptive_weight_at=last_layer", "model.attn_resolutions=[16]"],
     "distill.adversarial.adaptive_weight_at"),
])
def test_last_layer_weight_where_it_cannot_be_computed_is_refused(overrides: list[str], key: str,
                                                                   distilled: dict) -> None:
    with pytest.raises(ConfigError, match=key):
        small_config(*overrides)
    assert grow_stage(small_config("runtime.zero_stage=3"), distilled).last_layer is None  # nor logged there


# ------------------------------------------------------------------------- the discriminator's own reals (issue 20)
SEPARATE = [*JOINT, "grow.adversarial.independent_noise=true", "grow.adversarial.separate_real_stream=true"]


def _gan_source(url: str, *, rank: int = 0, world_size: int = 1, batch_size: int = 8, state: dict | None = None):
    from pagoda_dist.data.source import ReaderSource

    cfg = small_config(*SEPARATE, f"precompute.output={url}", "data.loader_workers=0", "data.shuffle_buffer=8")
    return ReaderSource(cfg, StageInputs(resolution=32, needs_latents=True, gan_reals=True), batch_size=batch_size,
                        rank=rank, world_size=world_size, state=state, global_batch=8)


def test_measurements_read_real_tiles_with_their_own_inversion_latents(pairs: tuple[str, np.ndarray]) -> None:
    """read_held_out(latents=True), as swd_resolution --inverted uses it: each image beside the latent of that image,
    never a mirror (evaluation does not flip, whatever data.hflip says), by index like the images alone."""
    from pagoda_dist.eval.inputs import read_held_out

    url, images = pairs
    cfg = small_config("data.hflip=pairs", "precompute.flip=true", f"precompute.output={url}", f"data.shards={url}",
                       "data.shuffle_buffer=8")
    whole = read_held_out(cfg, 0, 24, split="train", latents=True)
    assert whole.latent is not None and whole.latent.shape == (24, 3, 16, 16)
    assert torch.allclose(whole.latent, downsample(whole.images, 16), atol=1e-5)
    stored = {tuple(img.flatten()[:12]) for img in to_tensor(images, 32).numpy().round(5)}
    assert all(tuple(img.flatten()[:12]) in stored for img in whole.images.numpy().round(5))  # none mirrored
    part = read_held_out(cfg, 8, 8, split="train", latents=True)
    assert torch.equal(part.latent, whole.latent[8:16]) and torch.equal(part.images, whole.images[8:16])
    assert read_held_out(cfg, 0, 8, split="train").latent is None


def test_separate_real_stream_reads_other_reals_and_resumes_them(pairs: tuple[str, np.ndarray]) -> None:
    """Each batch carries a second stream's reals (no latents, an order of their own: over an epoch they are not
    the reconstruction batch's), whose position the state carries: a resumed source, on the same or another world
    size, continues with the same reals."""
    url, images = pairs
    source = _gan_source(url)
    stream = iter(source)
    epoch = [next(stream) for _ in range(N_PAIRS // 8)]
    for batch in epoch:
        assert batch.gan_real is not None and batch.gan_real.latent is None and len(batch.gan_real) == len(batch)
        stored = to_tensor([images[int(k.split("/")[-1])] for k in batch.gan_real.keys], 32)
        assert torch.equal(batch.gan_real.image, stored)  # the keys' own images (data.hflip is off)
        labels = [int(k.split("/")[-1]) % 10 for k in batch.gan_real.keys]
        assert batch.gan_real.condition.class_labels.tolist() == labels
    assert sum(b.keys != b.gan_real.keys for b in epoch) >= len(epoch) - 1
    assert sorted(k for b in epoch for k in b.gan_real.keys) == sorted(k for b in epoch for k in b.keys)

    state = source.state()
    assert state["gan_reals"]["position"] == N_PAIRS
    ahead = [next(stream) for _ in range(2)]
    resumed = iter(_gan_source(url, state=state))
    for a, b in zip(ahead, itertools.islice(resumed, 2)):
        assert a.keys == b.keys and a.gan_real.keys == b.gan_real.keys
        assert torch.equal(a.gan_real.image, b.gan_real.image)
    halves = [list(itertools.islice(iter(_gan_source(url, rank=r, world_size=2, batch_size=4, state=state)), 2))
              for r in range(2)]
    for k, whole in enumerate(ahead):  # world size 2: each global batch shared out between the ranks
        assert sorted(halves[0][k].gan_real.keys + halves[1][k].gan_real.keys) == sorted(whole.gan_real.keys)

    with pytest.raises(ValueError, match="separate_real_stream"):
        _gan_source(url, state={k: v for k, v in state.items() if k != "gan_reals"})


def test_separate_real_stream_feeds_the_discriminator_the_second_streams_reals(distilled: dict) -> None:
    """The discriminator step judges Batch.gan_real's images (and its fakes get their condition), the generator's
    update reconstructs the batch's own images; without a second stream's batch the step refuses."""
    stage = grow_stage(small_config(*SEPARATE), distilled)
    assert stage.inputs.gan_reals
    batch = a_batch()
    g = torch.Generator().manual_seed(2)
    batch.gan_real = Batch(torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, Condition(class_labels=torch.tensor([5, 1])))
    seen: list[tuple[Tensor, Condition]] = []
    handle = stage.discriminator.register_forward_hook(lambda _m, args, _out: seen.append((args[0], args[1])))
    try:
        stage.train_step(batch, RecordingDriver(stage.trainable()), nimg=0)
    finally:
        handle.remove()
    (d_real, real_cond), (_, fake_cond) = seen[:2]
    assert torch.equal(d_real, batch.gan_real.image)  # diffaug is off in these configs
    assert real_cond.class_labels.tolist() == fake_cond.class_labels.tolist() == [5, 1]
    with pytest.raises(ValueError, match="separate_real_stream"):
        stage.train_step(a_batch(), RecordingDriver(stage.trainable()), nimg=0)
