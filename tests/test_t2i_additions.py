"""The paper's text-to-image additions: a guidance-aware one-step generator (the guidance scale w is an input, learnt
from the teacher's classifier-free-guided samples) and the CLIP regulariser (a frozen CLIP image tower)."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagoda_dist.config import ConfigError, ModelConfig, load_config
from pagoda_dist.diffusion import EDMPrecond, sample
from pagoda_dist.diffusion.edm import generator_output
from pagoda_dist.eval.clip_score import clip_score, load_clip
from pagoda_dist.eval.evaluate import generate
from pagoda_dist.losses import clip_loss, generator_objective
from pagoda_dist.models.checkpoint_safety import (ArchitectureMismatchError, checkpoint_payload, load_checked,
                                                  model_from_architecture)
from pagoda_dist.chain import stage_spec
from pagoda_dist.interfaces import NO_CLASS, Condition
from pagoda_dist.interfaces import Batch
from pagoda_dist.models.clip_image import ClipImageEncoder
from pagoda_dist.models.generator import OneStepGenerator
from pagoda_dist.models.text_encoder import TextEncoder
from pagoda_dist.models.unet import UNet
from pagoda_dist.runtime.single import train_single_process
from pagoda_dist.stages import build_distill, build_grow, build_teacher

pytestmark = pytest.mark.timeout(120)

CLIP_ARCH = "pagoda-tiny-text"  # width 64, random init: fast, and the same model in every process
TEXT = ["model.channels=16", "model.channel_mult=[1,2]", "model.attn_resolutions=[8]", "model.num_classes=0",
        "model.text_dim=64", "precompute.clip_model=pagoda-tiny-text", "precompute.clip_random_init=true",
        "teacher.sampler.steps=2", "teacher.sampler.guidance=2.0",
        "distill.adversarial.discriminator.channels=16", "grow.adversarial.discriminator.channels=16",
        "grow.resolutions=[32]", "data.resolution=32"]
T2I = ["distill.adversarial.guidance_range=[1,4]", "distill.adversarial.distill_loss_weight=1.0",
       "distill.adversarial.clip_loss_weight=0.5"]


def tiny_model(**kw) -> ModelConfig:
    base = dict(resolution=8, channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
                head_channels=8, channels_last=False, num_classes=10)
    return ModelConfig(**{**base, **kw})


def randomized(net: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """Random weights everywhere: zero-initialised heads and embeddings would hide what a test looks for."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net


def labels(*ids: int) -> Condition:
    return Condition(class_labels=torch.tensor(ids))


@pytest.fixture(scope="module")
def captions() -> Condition:
    """Four captions embedded by the tiny random CLIP text tower (the precompute path); the last one dropped."""
    enc = TextEncoder(CLIP_ARCH, None, random_init=True)
    e = enc(["a photo of a sneaker", "a bag", "a red dress", "a coat"])
    cond = Condition(text_pooled=e.pooled.clone(), text_tokens=e.tokens.clone(), text_mask=e.mask.clone())
    return cond.drop(torch.tensor([False, False, False, True]))


# ------------------------------------------------------------------------------------------------- Condition
def test_condition_carries_guidance_through_drop_cat_slice_and_casts() -> None:
    cond = labels(1, 2, 3).with_guidance(torch.tensor([1.0, 2.5, 7.0]))
    dropped = cond.drop(torch.tensor([True, False, True]))
    assert dropped.class_labels.tolist() == [NO_CLASS, 2, NO_CLASS]
    assert torch.equal(dropped.guidance, cond.guidance) and torch.equal(cond.null().guidance, cond.guidance)
    assert cond[1:].guidance.tolist() == [2.5, 7.0]
    both = Condition.cat([cond, labels(4, 5, 6).with_guidance(3.0)])
    assert both.guidance.tolist() == [1.0, 2.5, 7.0, 3.0, 3.0, 3.0] and both.class_labels.shape == (6,)
    assert cond.to("cpu", torch.bfloat16).guidance.dtype == torch.float32  # w must match the teacher's target
    assert Condition().with_guidance(2.0, batch=2).is_empty  # a scale alone conditions nothing
    assert not cond.is_empty
    with pytest.raises(ValueError, match="different fields"):
        Condition.cat([cond, labels(4, 5, 6)])
    with pytest.raises(ValueError, match="one per sample"):
        labels(1, 2).with_guidance(torch.ones(3))


# ------------------------------------------------------------------------------------------------ generator
def test_fresh_guidance_aware_generator_equals_teacher_and_w_acts_once_trained() -> None:
    teacher = randomized(UNet(tiny_model()))
    plain = OneStepGenerator.from_teacher(teacher)
    aware = OneStepGenerator.from_teacher(teacher, guidance_input=True)
    assert teacher.state_dict().keys() == aware.net.state_dict().keys()  # the teacher's names are untouched
    z, cond = torch.randn(3, 3, 8, 8) * 80, labels(0, 4, 9)
    expected = generator_output(teacher, z, cond, 80.0)
    assert torch.equal(plain(z, cond), expected)
    for w in (1.0, 3.0, 8.0):  # the zero-initialised embedding adds exactly nothing, at any w
        assert torch.equal(aware(z, cond.with_guidance(w)), expected)
    assert torch.equal(aware(z, cond), expected)  # no w means w = 1
    assert torch.equal(plain(z, cond.with_guidance(5.0)), expected)  # a generator without the input ignores it

    randomized(aware.guidance_emb, seed=1, scale=0.5)  # as if trained
    at = {w: aware(z, cond.with_guidance(w)) for w in (1.0, 3.0)}
    assert not torch.allclose(at[1.0], at[3.0], atol=1e-4)
    assert torch.equal(aware(z, cond), at[1.0])
    per_sample = aware(z, cond.with_guidance(torch.tensor([1.0, 3.0, 1.0])))
    assert torch.allclose(per_sample[1], at[3.0][1], atol=1e-5) and torch.allclose(per_sample[0], at[1.0][0], atol=1e-5)
    with pytest.raises(ValueError, match="conditional model"):
        OneStepGenerator(tiny_model(num_classes=0), guidance_input=True)


def test_guidance_awareness_survives_architecture_roundtrip_checkpoints_and_growth() -> None:
    aware = OneStepGenerator(tiny_model(), guidance_input=True)
    randomized(aware, seed=2)
    arch = aware.architecture()
    assert arch["guidance_input"] is True
    assert "guidance_input" not in OneStepGenerator(tiny_model()).architecture()  # other records stay as they were
    rebuilt = model_from_architecture(arch)
    load_checked(rebuilt, checkpoint_payload(aware))
    z, cond = torch.randn(2, 3, 8, 8) * 80, labels(1, 2).with_guidance(torch.tensor([2.0, 6.0]))
    assert rebuilt.guidance_input and torch.equal(rebuilt(z, cond), aware(z, cond))
    # an older record without the field is a plain generator, and the two never load into each other
    old = {k: v for k, v in arch.items() if k != "guidance_input"}
    assert not OneStepGenerator.from_architecture(old).guidance_input
    with pytest.raises(ArchitectureMismatchError, match="guidance_input: checkpoint True vs model False"):
        load_checked(OneStepGenerator(tiny_model()), checkpoint_payload(aware))

    grown = aware.grow()
    assert grown.guidance_input and grown.architecture()["guidance_input"] is True
    assert torch.equal(grown.guidance_emb.proj.weight, aware.guidance_emb.proj.weight)
    assert not any(p.requires_grad for p in grown.guidance_emb.parameters())  # frozen like every embedding
    again = model_from_architecture(grown.grow().architecture())
    assert again.guidance_input and again.resolution == 32


# ------------------------------------------------------------------------------------------ teacher sampler
def test_teacher_sampler_takes_per_sample_guidance() -> None:
    cfg = load_config(None, ["model.resolution=8", "model.channels=16", "model.channel_mult=[1,2]",
                             "model.num_res_blocks=1", "model.attn_resolutions=[4]", "model.num_classes=10",
                             "teacher.sampler.steps=3", "teacher.sampler.guidance=3.0"])
    stage = build_teacher(cfg)
    randomized(stage.net, seed=3)
    noise, cond = torch.randn(3, 3, 8, 8), labels(0, 4, 7)
    batch_w = stage.sample(stage.net, noise, cond)  # teacher.sampler.guidance = 3
    # Equal up to float32 rounding: per-sample scales take another path through the network's batches, and over
    # three Heun steps the rounding moves values of ~1 by a few 1e-6 (2.3e-6 seen in a loaded full run).
    torch.testing.assert_close(stage.sample(stage.net, noise, cond, guidance=torch.full((3,), 3.0)), batch_w,
                               rtol=0, atol=1e-5)
    scales = torch.tensor([1.0, 3.0, 6.0])
    mixed = stage.sample(stage.net, noise, cond, guidance=scales)
    for i, w in enumerate(scales.tolist()):  # row i is the batch sampled at the single scale w_i
        torch.testing.assert_close(mixed[i], stage.sample(stage.net, noise, cond, guidance=w)[i], rtol=0, atol=1e-5)
    assert not torch.allclose(mixed[0], batch_w[0], atol=1e-3)  # w = 1 differs from w = 3
    result = sample(EDMPrecond(stage.net), noise, cond, steps=3, guidance=scales, null_cond=Condition.null)
    assert result.network_evals == 2 * result.nfe  # per-sample scales always cost both passes
    with pytest.raises(ValueError, match="scales for a batch"):
        sample(EDMPrecond(stage.net), noise, cond, steps=3, guidance=scales[:2], null_cond=Condition.null)


# ----------------------------------------------------------------------------------------------- CLIP loss
def test_clip_loss_is_one_minus_the_clip_score_cosine(captions: Condition) -> None:
    """The regulariser's cosine is the evaluation's CLIP score: precompute's pooled text embedding is open_clip's
    encode_text, and the regulariser's tower is encode_image of the same (here random) model."""
    tower = ClipImageEncoder(CLIP_ARCH, None, random_init=True)
    model, tokenizer = load_clip(CLIP_ARCH, random_init=True)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    texts = ["a photo of a sneaker", "a bag", "a red dress"]
    for i in range(3):
        cos = 1 - clip_loss(images[i:i + 1], captions.text_pooled[i:i + 1], tower).item()
        score = clip_score(images[i:i + 1], texts[i:i + 1], model, tokenizer)
        assert abs(100 * max(cos, 0.0) - score) < 1e-3, (i, cos, score)
    assert tower.dim == 64 and not any(p.requires_grad for p in tower.parameters())


def test_clip_loss_skips_dropped_captions_and_reaches_the_images() -> None:
    proj = torch.randn(3 * 4 * 4, 8)
    encode = lambda x: x.flatten(1) @ proj  # noqa: E731 - a linear stand-in for the image tower
    images = torch.randn(3, 3, 4, 4, requires_grad=True)
    text = torch.randn(3, 8)
    keep = torch.tensor([True, False, True])
    loss = clip_loss(images, text, encode, keep)
    cos = F.cosine_similarity(encode(images), text, dim=-1)
    torch.testing.assert_close(loss, 1 - (cos[0] + cos[2]) / 2)
    (grad,) = torch.autograd.grad(loss, images)
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() == 0
    nothing = clip_loss(images, text, encode, torch.zeros(3, dtype=torch.bool))
    assert nothing.item() == 0 and nothing.requires_grad
    with pytest.raises(ValueError, match="the CLIP model that embedded the captions"):
        clip_loss(images, torch.randn(3, 5), encode)


def test_generator_objective_adds_the_regulariser_outside_the_adaptive_weight() -> None:
    out = torch.randn(4, 3, 4, 4, requires_grad=True)
    rec_fn = lambda o: o.square().mean()  # noqa: E731
    gan_fn = lambda o: -o.mean()  # noqa: E731
    reg_fn = lambda o: 0.5 * o[2:].abs().mean()  # noqa: E731
    plain = generator_objective(out, rec_fn, gan_fn, factor=0.2)
    with_reg = generator_objective(out, rec_fn, gan_fn, factor=0.2, reg_fn=reg_fn)
    assert torch.equal(with_reg.weight, plain.weight)
    torch.testing.assert_close(with_reg.reg, reg_fn(out).detach())
    torch.testing.assert_close(with_reg.loss, plain.loss + with_reg.reg)
    (g_plain,) = torch.autograd.grad(plain.loss, out)
    (g_reg,) = torch.autograd.grad(with_reg.loss, out)
    (expected,) = torch.autograd.grad(reg_fn(out), out)
    torch.testing.assert_close(g_reg - g_plain, expected)


# ---------------------------------------------------------------------------------------- the distill stage
def test_distill_step_with_guidance_and_clip(captions: Condition) -> None:
    torch.manual_seed(0)
    cfg = load_config(None, [*TEXT, *T2I])
    teacher = build_teacher(cfg)
    randomized(teacher.net, seed=4)
    stage = build_distill(cfg, {"architecture": teacher.architecture(), "ema": teacher.net.state_dict()})
    g, tower = stage.generator, stage.clip_image
    assert g.guidance_input and tower is not None
    trainable = {id(p) for net in stage.trainable().values() for p in net.parameters()}
    assert not trainable & {id(p) for p in tower.parameters()}  # no optimizer, EMA or checkpoint for the tower
    tower_before = {k: v.clone() for k, v in tower.state_dict().items()}

    seen: list[Condition] = []
    target = stage.teacher_sample

    def spy(noise: torch.Tensor, cond: Condition) -> torch.Tensor:
        seen.append(cond)
        return target(noise, cond)

    stage.teacher_sample = spy
    batch = Batch(torch.rand(4, 3, 16, 16) * 2 - 1, captions, torch.randn(4, 3, 16, 16) * 80)
    history = train_single_process(stage, itertools.repeat(batch), steps=1, train=cfg.distill.train).history
    metrics = history[0]
    assert {"clip", "rec", "gan", "d_loss"} <= metrics.keys()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert 0.0 <= metrics["clip"] <= 2.0
    # the teacher's target was guided per sample, at scales drawn from guidance_range
    w = seen[0].guidance
    assert w.shape == (4,) and bool(((w >= 1) & (w <= 4)).all()) and len(set(w.tolist())) == 4
    # the guidance embedding learnt (it starts at zero), so w now changes the output; the CLIP tower did not
    assert g.guidance_emb.proj.weight.abs().sum() > 0
    z = torch.randn(2, 3, 16, 16) * 80
    assert not torch.allclose(g(z, captions[:2].with_guidance(1.0)), g(z, captions[:2].with_guidance(4.0)))
    assert all(p.grad is None and not p.requires_grad for p in tower.parameters())
    assert all(torch.equal(v, tower_before[k]) for k, v in tower.state_dict().items())
    assert not tower.training and not tower.train().training

    # sampling: the run's default scale, as grids and evaluation draw it
    noise = torch.randn(2, 3, 16, 16)
    expected = g(noise * 80, captions[:2].with_guidance(2.0)).clamp(-1, 1)
    assert torch.equal(stage.sample(g, noise, captions[:2]), expected)
    assert torch.equal(generate(cfg, g, noise, captions[:2]), expected)
    assert not torch.equal(generate(cfg, g, noise, captions[:2], guidance=4.0), expected)

    # growing keeps the guidance input; the grown stage trains at w = 1 and still works
    grown = build_grow(cfg, stage_spec(cfg, "grow-32"), {"architecture": stage.architecture(), "ema": g.state_dict()})
    assert grown.generator.guidance_input and grown.clip_image is None
    big = Batch(torch.rand(4, 3, 32, 32) * 2 - 1, captions, torch.randn(4, 3, 16, 16) * 80)
    out = train_single_process(grown, itertools.repeat(big), steps=1, train=cfg.grow.train).history[0]
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    assert grown.sample(grown.generator, noise, captions[:2]).shape == (2, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides,key", [
    (["distill.adversarial.guidance_range=[1,4]"], "distill.adversarial.guidance_range"),  # no distill_loss_weight
    (["distill.adversarial.guidance_range=[0.5,4]", "distill.adversarial.distill_loss_weight=1"],
     "distill.adversarial.guidance_range"),
    (["distill.adversarial.guidance_range=[4,2]", "distill.adversarial.distill_loss_weight=1"],
     "distill.adversarial.guidance_range"),
    (["distill.adversarial.guidance_range=[1,4]", "distill.adversarial.distill_loss_weight=1", "model.num_classes=0"],
     "distill.adversarial.guidance_range"),  # an unconditional model
    (["distill.adversarial.guidance_range=[1,4]", "distill.adversarial.distill_loss_weight=1",
      "teacher.sampler.guidance=6"], "teacher.sampler.guidance"),  # the default sampling w was never trained
    (["grow.adversarial.guidance_range=[1,4]", "grow.adversarial.distill_loss_weight=1"],
     "grow.adversarial.guidance_range"),
    (["distill.adversarial.clip_loss_weight=0.5"], "distill.adversarial.clip_loss_weight"),  # class-conditional
    (["grow.adversarial.clip_loss_weight=0.5"], "grow.adversarial.clip_loss_weight"),
    (["distill.adversarial.clip_loss_weight=-1"], "distill.adversarial.clip_loss_weight"),
])
def test_config_errors_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ":"):
        load_config(None, ["model.num_classes=10", "teacher.sampler.guidance=2.0", *overrides])


def test_text_to_image_configs_validate() -> None:
    cfg = load_config(None, [*TEXT, *T2I])
    assert cfg.distill.adversarial.guidance_range == [1.0, 4.0] and cfg.distill.adversarial.clip_loss_weight == 0.5
    paper = load_config("configs/t2i-512.yaml")
    adv = paper.distill.adversarial
    assert adv.guidance_range and adv.distill_loss_weight > 0 and adv.clip_loss_weight > 0
    assert adv.guidance_range[0] <= paper.teacher.sampler.guidance <= adv.guidance_range[1]


# ------------------------------------------------------------------------------------------------------- CLI
def test_pagoda_sample_takes_a_guidance_scale(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from pagoda_dist.cli import main

    overrides = ["storage.embedded_s3=false", f"run.root={tmp_path}", "model.channels=16"]
    cfg = load_config("configs/tiny.yaml", overrides)
    aware = randomized(OneStepGenerator(cfg.model, guidance_input=True), seed=6)
    plain = OneStepGenerator(cfg.model)
    for name, net in (("aware", aware), ("plain", plain)):
        torch.save({"architecture": net.architecture(), "ema": net.state_dict()}, tmp_path / f"{name}.pt")

    def run(export: str, *extra: str) -> tuple[int, Path]:
        out = tmp_path / f"{export}{'-'.join(extra)}.png"
        code = main(["sample", "configs/tiny.yaml", *overrides, "--export", str(tmp_path / f"{export}.pt"), "--n", "4",
                     "--out", str(out), *extra])
        return code, out

    default, at_default = run("aware")  # teacher.sampler.guidance of tiny.yaml: 1.5
    same, at_same = run("aware", "--guidance", "1.5")
    other, at_other = run("aware", "--guidance", "4")
    assert default == same == other == 0
    pixels = {p: Image.open(p).tobytes() for p in (at_default, at_same, at_other)}
    assert pixels[at_default] == pixels[at_same] != pixels[at_other]
    assert run("plain", "--guidance", "4")[0] == 2  # a generator without the input refuses the option
    assert "not trained guidance-aware" in capsys.readouterr().err
