"""The three PaGoDA stages driven by the 30-line single-process loop, on real photo tiles at 16 px."""
from __future__ import annotations

import itertools

import pytest
import torch

from pagoda_dist.chain import stage_spec
from pagoda_dist.config import Config, ConfigError, load_config
from pagoda_dist.diffusion import EDMPrecond, invert, sample
from pagoda_dist.interfaces import Condition
from pagoda_dist.interfaces import Batch
from pagoda_dist.models.checkpoint_safety import ArchitectureMismatchError
from pagoda_dist.runtime.single import train_single_process
from pagoda_dist.stages import AdversarialStage, build_distill, build_grow, build_teacher
from tests.real_images import real_images

SMALL = ["model.channels=16", "model.channel_mult=[1,2]", "model.attn_resolutions=[8]", "model.num_classes=10",
         "distill.adversarial.discriminator.channels=16", "grow.adversarial.discriminator.channels=16",
         "grow.resolutions=[32,64]", "data.resolution=64"]


def small_config(*extra: str) -> Config:
    return load_config(None, [*SMALL, *extra])


def batches(x: torch.Tensor, labels: torch.Tensor, size: int, latents: torch.Tensor | None = None, seed: int = 0):
    """Endless shuffled batches of (image, class, latent)."""
    g = torch.Generator().manual_seed(seed)
    for _ in itertools.count():
        idx = torch.randperm(len(x), generator=g)[:size]
        yield Batch(x[idx], Condition(class_labels=labels[idx]), None if latents is None else latents[idx])


def export_of(stage, net) -> dict:
    return {"architecture": stage.architecture(), "ema": net.state_dict()}


def distill_and_grow32(cfg: Config) -> tuple[AdversarialStage, AdversarialStage]:
    """The distil stage and grow-32 built on a randomly initialised teacher with trained-like weights (zero-initialised
    heads would block every gradient)."""
    teacher = build_teacher(cfg)
    for p in teacher.net.parameters():
        p.data.normal_(0, 0.05)
    distill = build_distill(cfg, export_of(teacher, teacher.net))
    return distill, build_grow(cfg, stage_spec(cfg, "grow-32"), export_of(distill, distill.generator))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).square().mean().item()
    return 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-20))).item()  # peak-to-peak 2 for [-1, 1]


@pytest.fixture(scope="module")
def trained_teacher():
    """A small teacher trained on 2000 real photo tiles at 16 px (~1 minute here); the tiles are unlabelled, so
    every sample carries the "no class" label of a class-conditional network."""
    torch.manual_seed(0)
    cfg = small_config("teacher.train.optimizer.lr=0.001")
    x, y = real_images("photo-tiles", 2000, 16)
    stage = build_teacher(cfg)
    result = train_single_process(stage, batches(x, y, 32), steps=200, train=cfg.teacher.train)
    return cfg, stage, result


def test_teacher_loss_falls(trained_teacher) -> None:
    _, _, result = trained_teacher
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-50:]) / 50 < 0.7 * sum(losses[:50]) / 50


def test_inversion_then_sampling_reconstructs_real_images(trained_teacher) -> None:
    cfg, stage, result = trained_teacher
    x, y = real_images("photo-tiles", 16, 16, split="val")
    denoiser, cond, d = EDMPrecond(result.ema), Condition(class_labels=y), cfg.diffusion
    scores = {}
    with torch.inference_mode():
        for steps in (6, 18, 40):
            z = invert(denoiser, x, cond, solver="heun", steps=steps, sigma_max=d.sigma_max).x
            back = sample(denoiser, z / d.sigma_max, cond, solver="heun", steps=steps, sigma_max=d.sigma_max).x
            scores[steps] = psnr(back, x)
    print("inversion round trip PSNR (dB) by Heun steps:", {k: round(v, 1) for k, v in scores.items()})
    assert scores[6] < scores[18] < scores[40]
    assert scores[40] > 35.0


def test_distilled_generator_beats_its_initialisation(trained_teacher) -> None:
    cfg, teacher, result = trained_teacher
    x, y = real_images("photo-tiles", 256, 16)
    with torch.inference_mode():
        latents = invert(EDMPrecond(result.ema), x, Condition(class_labels=y), solver="heun", steps=18).x
    stage = build_distill(cfg, export_of(teacher, result.ema))

    def rec_error(net) -> float:
        with torch.no_grad():
            return (net(latents[:64], Condition(class_labels=y[:64])) - x[:64]).square().mean().item()

    before = rec_error(stage.generator)
    out = train_single_process(stage, batches(x, y, 16, latents), steps=30, train=cfg.distill.train)
    after = rec_error(stage.generator)
    print(f"one-step reconstruction MSE from inverted latents: init {before:.4f} -> trained {after:.4f}")
    assert after < 0.8 * before
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in out.history)


def test_grow_trains_only_new_and_late_layers() -> None:
    torch.manual_seed(0)
    cfg = small_config()
    _, grow32 = distill_and_grow32(cfg)
    g = grow32.generator
    assert grow32.name == "grow-32" and g.resolution == 32 and grow32.inputs.resolution == 32
    before = {n: p.detach().clone() for n, p in g.named_parameters()}
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    batch = Batch(x, Condition(class_labels=torch.arange(4)), torch.randn(4, 3, 16, 16) * 80)
    train_single_process(grow32, itertools.repeat(batch), steps=1, train=cfg.grow.train)
    frozen = [n for n, p in g.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in g.named_parameters() if p.requires_grad]
    assert frozen and trainable and any(n.startswith("growth.") for n in trainable)
    assert all(n.startswith(("net.enc", "net.mid", "net.emb", "net.map", "net.dec")) or "emb" in n for n in frozen)
    assert all(torch.equal(before[n], dict(g.named_parameters())[n]) for n in frozen)
    moved = [n for n in trainable if not torch.equal(before[n], dict(g.named_parameters())[n])]
    assert len(moved) > len(trainable) // 2

    grow64 = build_grow(cfg, stage_spec(cfg, "grow-64"), export_of(grow32, g))
    z = torch.randn(2, 3, 16, 16) * 80
    assert grow64.generator(z, Condition(class_labels=torch.tensor([0, 1]))).shape == (2, 3, 64, 64)
    assert grow64.sample(grow64.generator, torch.randn(2, 3, 16, 16),
                         Condition(class_labels=torch.tensor([0, 1]))).shape == (2, 3, 64, 64)


def test_reconstruction_only_growth_has_no_discriminator_and_counts_no_gan_flops() -> None:
    """gan_weight 0 (reconstruction alone, as configs/tiles.yaml's grow-64): no discriminator engine, a step that
    trains by reconstruction alone, and a compute ledger that counts one generator pass per image instead of two plus
    the discriminator's."""
    from pagoda_dist.eval.report import compute_ledger

    torch.manual_seed(0)
    cfg = small_config("grow.adversarial.gan_weight=0", "grow.adversarial.rec_loss=pixel")
    distill, grow32 = distill_and_grow32(cfg)
    assert grow32.discriminator is None
    assert set(grow32.trainable()) == set(grow32.optimizers()) == {"generator"}
    assert set(distill.trainable()) == {"generator", "discriminator"}  # distillation keeps its GAN term
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    batch = Batch(x, Condition(class_labels=torch.arange(4)), torch.randn(4, 3, 16, 16) * 80)
    result = train_single_process(grow32, itertools.repeat(batch), steps=3, train=cfg.grow.train)
    last = result.history[-1]
    assert "d_loss" not in last and last["gan_weight"] == 0 and last["loss"] == pytest.approx(last["rec"])

    with_gan = compute_ledger(small_config(), {})["stages"]
    without = compute_ledger(cfg, {})["stages"]
    assert without["distill"]["flops_per_image"] == with_gan["distill"]["flops_per_image"]
    for stage in ("grow-32", "grow-64"):
        # with the GAN: 2 G passes + 3 D passes; without: 1 G pass, so under half of it
        assert 0 < without[stage]["flops_per_image"] < 0.5 * with_gan[stage]["flops_per_image"]


def test_detail_only_and_freeze_below_reach_the_growth_stages_from_the_config() -> None:
    """grow.detail_only [64] and grow.freeze_below [64]: grow-32 is a plain octave whose base head trains, grow-64 a
    detail-only one that trains its own octave alone: two steps of it leave the 32 px image it grew from exactly as it
    was. The networks the memory estimate builds carry the same records."""
    from pagoda_dist.dry_run import describe
    from pagoda_dist.stages.networks import stage_networks

    torch.manual_seed(0)
    cfg = small_config("grow.detail_only=[64]", "grow.freeze_below=[64]", "grow.trainable_decoder_blocks=0")
    _, grow32 = distill_and_grow32(cfg)
    grow64 = build_grow(cfg, stage_spec(cfg, "grow-64"), export_of(grow32, grow32.generator))
    assert (grow32.generator.detail_resolutions, grow64.generator.detail_resolutions) == ([], [64])
    assert (grow32.generator.freeze_below, grow64.generator.freeze_below) == (False, True)
    assert grow32.generator.net.out.conv.weight.requires_grad and not grow64.generator.net.out.conv.weight.requires_grad
    for stage in (grow32, grow64):
        assert stage_networks(cfg, stage_spec(cfg, stage.name))[0].architecture() == stage.architecture()
    z = torch.randn(4, 3, 16, 16) * 80
    with torch.no_grad():
        before = grow32.generator(z, Condition(class_labels=torch.arange(4)))
    batch = Batch(torch.rand(4, 3, 64, 64) * 2 - 1, Condition(class_labels=torch.arange(4)), z)
    train_single_process(grow64, itertools.repeat(batch), steps=2, train=cfg.grow.train)
    below = grow32.generator
    below.load_state_dict({k: v for k, v in grow64.generator.state_dict().items() if k in below.state_dict()})
    with torch.no_grad():
        torch.testing.assert_close(below(z, Condition(class_labels=torch.arange(4))), before, rtol=0, atol=0)
    for key in ("detail_only", "freeze_below"):
        with pytest.raises(ConfigError, match=f"grow.{key}"):
            small_config(f"grow.{key}=[128]")
    text = describe(cfg, "test")
    assert "own octave: grow-64: trains its new octave alone" in text and "detail:     grow-64: adds detail" in text
    assert "own octave" not in describe(small_config(), "test")


def test_reconstruction_only_turns_the_gan_off_at_the_listed_growth_resolutions_alone() -> None:
    """grow.reconstruction_only [64]: grow-32 keeps grow.adversarial's GAN (its discriminator, its second stream of
    reals), grow-64 trains by reconstruction alone with neither, and the ledger counts each stage as it runs."""
    from pagoda_dist.eval.report import compute_ledger

    torch.manual_seed(0)
    gan = ["grow.adversarial.gan_weight=1.0", "grow.adversarial.independent_noise=true",
           "grow.adversarial.separate_real_stream=true"]
    cfg = small_config(*gan, "grow.reconstruction_only=[64]")
    _, grow32 = distill_and_grow32(cfg)
    assert grow32.discriminator is not None and grow32.inputs.gan_reals and grow32.adv.gan_weight == 1.0
    grow64 = build_grow(cfg, stage_spec(cfg, "grow-64"), export_of(grow32, grow32.generator))
    assert grow64.discriminator is None and not grow64.inputs.gan_reals
    assert set(grow64.trainable()) == {"generator"}
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    batch = Batch(x, Condition(class_labels=torch.arange(4)), torch.randn(4, 3, 16, 16) * 80)
    last = train_single_process(grow64, itertools.repeat(batch), steps=2, train=cfg.grow.train).history[-1]
    assert "d_loss" not in last and last["loss"] == pytest.approx(last["rec"])

    everywhere = compute_ledger(small_config(*gan), {})["stages"]
    listed = compute_ledger(cfg, {})["stages"]
    assert listed["grow-32"]["flops_per_image"] == everywhere["grow-32"]["flops_per_image"]
    assert 0 < listed["grow-64"]["flops_per_image"] < 0.5 * everywhere["grow-64"]["flops_per_image"]
    with pytest.raises(ConfigError, match="grow.reconstruction_only: \\[64\\] also in split_steps"):
        small_config(*gan, "grow.reconstruction_only=[64]", "grow.split_steps=[64]")
    with pytest.raises(ConfigError, match="grow.reconstruction_only"):
        small_config(*gan, "grow.reconstruction_only=[128]")


def test_mismatched_exports_are_refused_with_the_difference() -> None:
    cfg = small_config()
    teacher = build_teacher(cfg)
    wider = small_config("model.channels=24")
    with pytest.raises(ArchitectureMismatchError, match="channels"):
        build_distill(wider, export_of(teacher, teacher.net))
    with pytest.raises(ValueError, match="one-step generator"):
        build_grow(cfg, stage_spec(cfg, "grow-32"), export_of(teacher, teacher.net))
    distill = build_distill(cfg, export_of(teacher, teacher.net))
    with pytest.raises(ValueError, match="growth doubles"):
        build_grow(cfg, stage_spec(cfg, "grow-64"), export_of(distill, distill.generator))


def test_conditioning_changes_samples_and_guidance_one_is_conditional() -> None:
    torch.manual_seed(0)
    cfg = small_config("teacher.sampler.steps=4", "teacher.sampler.guidance=1.0")
    stage = build_teacher(cfg)
    for p in stage.net.parameters():  # a random but non-degenerate network (zero-init heads would hide conditions)
        p.data.normal_(0, 0.05)
    noise = torch.randn(2, 3, 16, 16)
    a = stage.sample(stage.net, noise, Condition(class_labels=torch.tensor([0, 0])))
    b = stage.sample(stage.net, noise, Condition(class_labels=torch.tensor([5, 5])))
    assert not torch.allclose(a, b)
    plain = sample(EDMPrecond(stage.net), noise, Condition(class_labels=torch.tensor([0, 0])), solver="heun",
                   steps=4, clamp=True).x.clamp(-1, 1)
    assert torch.equal(a, plain)


def test_distill_loss_on_teacher_samples_is_optional_and_used() -> None:
    cfg = small_config("distill.adversarial.distill_loss_weight=1.0", "teacher.sampler.steps=2")
    teacher = build_teacher(cfg)
    stage = build_distill(cfg, export_of(teacher, teacher.net))
    batch = Batch(torch.rand(2, 3, 16, 16) * 2 - 1, Condition(class_labels=torch.tensor([1, 2])),
                  torch.randn(2, 3, 16, 16) * 80)
    with_distill = train_single_process(stage, itertools.repeat(batch), steps=1).history[0]["rec"]
    plain = build_distill(small_config(), export_of(teacher, teacher.net))
    without = train_single_process(plain, itertools.repeat(batch), steps=1).history[0]["rec"]
    assert with_distill > without  # the distillation term adds to the reconstruction objective
