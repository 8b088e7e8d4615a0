"""Networks: the teacher UNet, the growable one-step generator, checkpoint safety and the discriminator."""
from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagoda_dist.config import ConfigError, DiscriminatorConfig, ModelConfig
from pagoda_dist.diffusion.edm import EDMPrecond, generator_output
from pagoda_dist.models.checkpoint_safety import (
    ArchitectureMismatchError,
    check_architecture,
    checkpoint_payload,
    load_checked,
    model_from_architecture,
)
from pagoda_dist.interfaces import NO_CLASS, Condition
from pagoda_dist.models.discriminator import Discriminator
from pagoda_dist.models.generator import OneStepGenerator, copy_matching_weights
from pagoda_dist.models.unet import UNet

pytestmark = pytest.mark.timeout(120)

TEXT_DIM, TOKENS, NUM_CLASSES = 12, 5, 10


def tiny_cfg(resolution: int = 8, kind: str = "none", **kw) -> ModelConfig:
    """A small UNet config; attention at half the resolution so that self- and cross-attention are exercised."""
    base = dict(resolution=resolution, channels=16, channel_mult=[1, 2], num_res_blocks=1,
                attn_resolutions=[resolution // 2], head_channels=8, channels_last=False,
                num_classes=NUM_CLASSES if kind == "class" else 0, text_dim=TEXT_DIM if kind == "text" else 0)
    base.update(kw)
    return ModelConfig(**base)


def randomize_(net: nn.Module, seed: int = 0) -> nn.Module:
    """Gives zero-initialised layers random weights: a fresh UNet outputs exactly 0, which would hide everything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net


def make_condition(kind: str, batch: int, seed: int = 0) -> Condition:
    gen = torch.Generator().manual_seed(seed)
    if kind == "class":
        return Condition(class_labels=torch.randint(0, NUM_CLASSES, (batch,), generator=gen))
    if kind == "text":
        mask = torch.ones(batch, TOKENS, dtype=torch.bool)
        mask[:, 3:] = False  # padded tail, as a tokenizer leaves it
        return Condition(text_pooled=torch.randn(batch, TEXT_DIM, generator=gen),
                         text_tokens=torch.randn(batch, TOKENS, TEXT_DIM, generator=gen), text_mask=mask)
    return Condition()


def assert_same_up_to_float_reordering(fast: torch.Tensor, ref: torch.Tensor) -> None:
    """Memory-format changes reorder float32 sums, so compare against the output's own scale.

    A real layout bug (a transposed or misread tensor) moves outputs by O(their size), far past 1e-4 of it.
    """
    scale = ref.abs().amax().item()
    assert (fast - ref).abs().amax().item() <= 1e-4 * scale, (fast - ref).abs().amax().item() / scale


def c_noise_of(sigma: float, batch: int) -> torch.Tensor:
    return torch.full((batch,), math.log(sigma) / 4)


# ------------------------------------------------------------------------------------------------------- UNet
@pytest.mark.parametrize("resolution", [8, 16, 32])
@pytest.mark.parametrize("kind", ["none", "class", "text"])
def test_unet_output_shape(resolution: int, kind: str) -> None:
    net = randomize_(UNet(tiny_cfg(resolution, kind)))
    x = torch.randn(2, 3, resolution, resolution)
    y = net(x, c_noise_of(1.0, 2), make_condition(kind, 2))
    assert y.shape == x.shape and y.is_contiguous() and torch.isfinite(y).all()


def test_unet_names_are_stable() -> None:
    net = UNet(tiny_cfg(8, "text"))
    names = {n for n, _ in net.named_children()}
    assert {"emb_noise", "emb_map", "emb_text", "enc", "mid", "dec", "out"} <= names
    keys = net.state_dict().keys()
    assert "enc.0.weight" in keys and "mid.0.xattn.null_kv" in keys and "out.conv.weight" in keys
    # enc: conv + 1 block + down + 1 block; dec: 2 blocks + up + 2 blocks (one skip per non-up block)
    assert len(net.enc) == 4 and len(net.dec) == 5 and len(net.mid) == 2


@pytest.mark.parametrize("kind", ["class", "text"])
def test_unet_gradients_reach_every_parameter(kind: str) -> None:
    net = randomize_(UNet(tiny_cfg(8, kind)))
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    cond = make_condition(kind, 4).drop(torch.tensor([True, False, False, True]))
    net(x, c_noise_of(0.5, 4), cond).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_class_and_text_conditioning_change_the_output() -> None:
    x = torch.randn(2, 3, 8, 8)
    net = randomize_(UNet(tiny_cfg(8, "class")))
    a = net(x, c_noise_of(1.0, 2), Condition(class_labels=torch.tensor([0, 1])))
    b = net(x, c_noise_of(1.0, 2), Condition(class_labels=torch.tensor([2, 3])))
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4

    net = randomize_(UNet(tiny_cfg(8, "text")))
    c1, c2 = make_condition("text", 2, seed=1), make_condition("text", 2, seed=2)
    a, b = net(x, c_noise_of(1.0, 2), c1), net(x, c_noise_of(1.0, 2), c2)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    # tokens alone matter too (cross-attention), not only the pooled vector
    b = net(x, c_noise_of(1.0, 2), Condition(text_pooled=c1.text_pooled, text_tokens=c2.text_tokens, text_mask=c1.text_mask))
    assert (a - b).abs().amax() > 1e-4


@pytest.mark.parametrize("kind", ["class", "text"])
def test_dropped_condition_equals_explicit_null(kind: str) -> None:
    net = randomize_(UNet(tiny_cfg(8, kind)))
    x, c = torch.randn(4, 3, 8, 8), c_noise_of(2.0, 4)
    cond = make_condition(kind, 4)
    drop = torch.tensor([True, False, True, False])
    dropped = net(x, c, cond.drop(drop))
    null = net(x, c, cond.null())
    missing = net(x, c, Condition())  # no condition at all is the unconditional input too
    conditional = net(x, c, cond)
    torch.testing.assert_close(dropped[drop], null[drop], rtol=0, atol=1e-6)
    torch.testing.assert_close(null, missing, rtol=0, atol=1e-6)
    torch.testing.assert_close(dropped[~drop], conditional[~drop], rtol=0, atol=1e-6)
    assert (null[~drop] - conditional[~drop]).abs().amax() > 1e-4
    if kind == "class":  # NO_CLASS is the last table row, distinct from every real class
        assert net._class_index(torch.tensor([NO_CLASS, 3]), 2, x.device).tolist() == [NUM_CLASSES, 3]


@pytest.mark.parametrize("kind", ["none", "class", "text"])
def test_no_nan_at_sigma_extremes(kind: str) -> None:
    net = randomize_(UNet(tiny_cfg(8, kind)))
    denoiser = EDMPrecond(net)
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    cond = make_condition(kind, 3).drop(torch.tensor([True, False, False]))
    outs = []
    for sigma in (0.002, 80.0):
        d = denoiser(x0 + sigma * torch.randn_like(x0), sigma, cond)
        assert torch.isfinite(d).all(), sigma
        outs.append(net.embed(c_noise_of(sigma, 3), cond, 3))
    assert (outs[0] - outs[1]).abs().amax() > 1e-3  # the two extremes embed differently


def test_channels_last_matches_contiguous() -> None:
    ref = randomize_(UNet(tiny_cfg(16, "text")))
    fast = UNet(tiny_cfg(16, "text", channels_last=True))
    fast.load_state_dict(ref.state_dict())
    assert fast.enc[0].weight.is_contiguous(memory_format=torch.channels_last)
    x, c, cond = torch.randn(2, 3, 16, 16), c_noise_of(0.3, 2), make_condition("text", 2)
    assert_same_up_to_float_reordering(fast(x, c, cond), ref(x, c, cond))


@pytest.mark.parametrize("kind", ["class", "text"])
def test_bf16_autocast_runs_and_stays_close(kind: str) -> None:
    net = randomize_(UNet(tiny_cfg(8, kind, channels_last=True)))
    x, cond = torch.randn(2, 3, 8, 8), make_condition(kind, 2).drop(torch.tensor([True, False]))
    ref = net(x, torch.tensor(0.1), cond)  # a 0-d c_noise is broadcast over the batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, torch.tensor(0.1), cond)
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_unet_rejects_wrong_resolution_and_text_width() -> None:
    net = UNet(tiny_cfg(8, "text"))
    with pytest.raises(ValueError, match="model.resolution"):
        net(torch.randn(1, 3, 16, 16), c_noise_of(1.0, 1))
    with pytest.raises(ValueError, match="text_dim"):
        net(torch.randn(1, 3, 8, 8), c_noise_of(1.0, 1), Condition(text_pooled=torch.randn(1, TEXT_DIM + 1)))


# ------------------------------------------------------------------------------------------------- generator
def grown_pair(kind: str = "class") -> tuple[UNet, OneStepGenerator]:
    teacher = randomize_(UNet(tiny_cfg(8, kind)))
    return teacher, OneStepGenerator.from_teacher(teacher, trainable_decoder_blocks=2)


def test_generator_reproduces_teacher_raw_output_at_sigma_max() -> None:
    teacher, gen = grown_pair("text")
    z = torch.randn(3, 3, 8, 8) * 80
    cond = make_condition("text", 3)
    assert torch.equal(gen(z, cond), generator_output(teacher, z, cond, 80.0))
    assert all(p.requires_grad for p in gen.parameters())  # distil stage: everything trains
    assert gen.stage == "distill" and gen.resolution == 8


def test_grow_doubles_resolution_twice_and_starts_near_the_upsampled_output() -> None:
    _, gen = grown_pair()
    z, cond = torch.randn(2, 3, 8, 8) * 80, make_condition("class", 2)
    g16 = gen.grow()
    g32 = g16.grow()
    with torch.no_grad():
        out16, out32 = g16(z, cond), g32(z, cond)
    assert out16.shape == (2, 3, 16, 16) and out32.shape == (2, 3, 32, 32)
    assert (g16.stage, g32.stage, g32.growth_resolutions) == ("grow-16", "grow-32", [16, 32])
    # new heads start at zero: each octave outputs exactly the bicubic upsampling of the octave below
    with torch.no_grad():
        out8 = gen(z, cond)
    up = lambda x: F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)  # noqa: E731
    torch.testing.assert_close(out16, up(out8), rtol=0, atol=1e-5)
    torch.testing.assert_close(out32, up(up(out8)), rtol=0, atol=1e-5)
    assert len(gen.growth) == 0 and len(g16.growth) == 1  # grow() returns a new module, self is unchanged



def test_a_detail_only_octave_keeps_the_2x2_means_of_the_bicubic_baseline_whatever_its_head_learns() -> None:
    _, gen = grown_pair()
    z, cond = torch.randn(2, 3, 8, 8) * 80, make_condition("class", 2)
    detail, plain = gen.grow(detail_only=True), gen.grow()
    g32 = detail.grow()  # a later plain octave keeps the earlier octave's kind
    with torch.no_grad():
        for g in (detail, plain):  # a trained head: its residual is far from zero
            g.growth_heads[0].conv.weight.normal_(0, 0.3)
            g.growth_heads[0].conv.bias.normal_(0, 0.3)
        base = F.interpolate(gen(z, cond), scale_factor=2, mode="bicubic", align_corners=False)
        means = lambda x: F.avg_pool2d(x, 2)  # noqa: E731
        torch.testing.assert_close(means(detail(z, cond)), means(base), rtol=0, atol=1e-5)
        assert (means(plain(z, cond)) - means(base)).abs().max() > 0.1  # the plain octave redraws them
        assert (detail(z, cond) - base).abs().max() > 0.1  # and the detail octave does add detail
    assert (detail.detail_resolutions, g32.detail_resolutions, plain.detail_resolutions) == ([16], [16], [])
    record = checkpoint_payload(g32)["architecture"]
    assert record["detail_resolutions"] == [16]
    assert "detail_resolutions" not in checkpoint_payload(plain)["architecture"]
    assert OneStepGenerator.from_architecture(record).detail_resolutions == [16]
    with pytest.raises(ArchitectureMismatchError, match="detail_resolutions"):
        load_checked(plain, checkpoint_payload(detail))  # a plain generator does not take a detail-only export
    with pytest.raises(ValueError, match="detail_resolutions \\[64\\] must be growth resolutions"):
        OneStepGenerator(gen.cfg, growth_resolutions=[16], detail_resolutions=[64])


def test_a_generator_grown_before_residual_heads_is_refused_by_name() -> None:
    """Grown exports from the earlier layout (base head on upsampled features) name the field that differs."""
    _, gen = grown_pair()
    payload = checkpoint_payload(gen.grow())
    del payload["architecture"]["growth_output"]
    with pytest.raises(ArchitectureMismatchError, match="growth_output: checkpoint '<absent>'"):
        load_checked(gen.grow(), payload)
    load_checked(gen, checkpoint_payload(gen))  # distilled generators keep their records: they still grow

def test_grow_copies_matching_weights() -> None:
    _, gen = grown_pair()
    g16 = gen.grow()
    src = gen.state_dict()
    dst = g16.state_dict()
    assert set(src) < set(dst)
    for name, value in src.items():
        assert torch.equal(dst[name], value), name
    g32 = g16.grow()
    for name, value in g16.state_dict().items():
        assert torch.equal(g32.state_dict()[name], value), name
    assert copy_matching_weights(UNet(gen.cfg), {"enc.0.weight": torch.zeros(1), "nope": torch.zeros(1)}) == []


def test_freeze_policy_and_optimizer_step() -> None:
    _, gen = grown_pair()
    g16 = randomize_(gen.grow(), seed=1)  # as after some training: new zero-init layers would get zero gradients
    trainable = {n for n, p in g16.named_parameters() if p.requires_grad}
    n_dec = len(g16.net.dec)
    for name, p in g16.named_parameters():
        should_train = (name.startswith(("growth.", "growth_heads.", "net.out."))
                        or any(name.startswith(f"net.dec.{i}.") for i in range(n_dec - 2, n_dec)))
        assert p.requires_grad == should_train, name
    assert any(n.startswith("net.dec.") for n in trainable) and not any(n.startswith("net.enc.") for n in trainable)

    before = {n: p.detach().clone() for n, p in g16.named_parameters()}
    opt = torch.optim.AdamW(g16.parameters(), lr=1e-2, weight_decay=0.1)
    z, cond = torch.randn(2, 3, 8, 8) * 80, make_condition("class", 2)
    loss = (g16(z, cond) - 0.5).square().mean()
    assert loss.item() > 0
    loss.backward()
    opt.step()
    for name, p in g16.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        assert moved == (name in trainable), name


def test_trainable_decoder_blocks_zero_keeps_only_new_parts() -> None:
    _, gen = grown_pair()
    g16 = gen.grow(trainable_decoder_blocks=0)
    names = {n.split(".")[0] + "." + n.split(".")[1] for n, p in g16.named_parameters() if p.requires_grad}
    assert names == {"growth.0", "growth_heads.0", "net.out"}


def test_freeze_below_trains_the_newest_octave_alone_and_keeps_the_image_below() -> None:
    _, gen = grown_pair()
    z, cond = torch.randn(2, 3, 8, 8) * 80, make_condition("class", 2)
    trained = lambda g: {".".join(n.split(".")[:2]) for n, p in g.named_parameters() if p.requires_grad}  # noqa: E731
    g16 = randomize_(gen.grow(trainable_decoder_blocks=0, freeze_below=True), seed=1)
    g32 = randomize_(g16.grow(), seed=2)  # the policy carries over to later octaves
    assert trained(g16) == {"growth.0", "growth_heads.0"} and trained(g32) == {"growth.1", "growth_heads.1"}
    assert trained(g16.grow(freeze_below=False)) == {"growth.0", "growth.1", "growth_heads.0", "growth_heads.1",
                                                     "net.out"}
    assert checkpoint_payload(g32)["architecture"]["freeze_below"] is True
    assert "freeze_below" not in checkpoint_payload(gen)["architecture"]  # a distilled generator's record is as before
    assert OneStepGenerator.from_architecture(checkpoint_payload(g32)["architecture"]).freeze_below
    with torch.no_grad():
        below = g16(z, cond)
    opt = torch.optim.SGD(g32.parameters(), lr=0.1)
    (g32(z, cond) - 0.5).square().mean().backward()
    opt.step()
    with torch.no_grad():  # a step of the 32 px stage leaves the 16 px image untouched
        g16.load_state_dict({k: v for k, v in g32.state_dict().items() if k in g16.state_dict()})
        torch.testing.assert_close(g16(z, cond), below, rtol=0, atol=0)


def test_generator_channels_last_growth_matches_contiguous() -> None:
    teacher = randomize_(UNet(tiny_cfg(8, "none")))
    fast_teacher = UNet(tiny_cfg(8, "none", channels_last=True))
    fast_teacher.load_state_dict(teacher.state_dict())
    slow = randomize_(OneStepGenerator.from_teacher(teacher).grow(), seed=3)
    fast = OneStepGenerator.from_teacher(fast_teacher).grow()
    fast.load_state_dict(slow.state_dict())
    z = torch.randn(2, 3, 8, 8) * 80
    assert_same_up_to_float_reordering(fast(z), slow(z))


# ----------------------------------------------------------------------------------------- checkpoint safety
def roundtrip(payload: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True): the architecture record must be plain data."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_checkpoint_roundtrip_and_rebuild() -> None:
    _, gen = grown_pair()
    g16 = randomize_(gen.grow(), seed=5)
    payload = roundtrip(checkpoint_payload(g16))
    rebuilt = model_from_architecture(payload["architecture"])
    load_checked(rebuilt, payload)
    z = torch.randn(1, 3, 8, 8) * 80
    assert torch.equal(rebuilt(z), g16(z))
    assert [p.requires_grad for p in rebuilt.parameters()] == [p.requires_grad for p in g16.parameters()]
    teacher = UNet(tiny_cfg(8))
    assert isinstance(model_from_architecture(roundtrip(checkpoint_payload(teacher))["architecture"]), UNet)


def test_mismatched_stage_error_names_stage_and_resolution() -> None:
    _, gen = grown_pair()
    g16 = gen.grow()
    with pytest.raises(ArchitectureMismatchError) as err:
        load_checked(gen, checkpoint_payload(g16))
    msg = str(err.value)
    assert "checkpoint was saved at stage grow-16 (resolution 16), model is stage distill (resolution 8)" in msg
    assert "growth_resolutions: checkpoint [16] vs model []" in msg


def test_mismatched_config_error_names_the_field() -> None:
    small, wide = UNet(tiny_cfg(8)), UNet(tiny_cfg(8, channels=24))
    with pytest.raises(ArchitectureMismatchError, match=r"model.channels: checkpoint 24 vs model 16"):
        load_checked(small, checkpoint_payload(wide))
    with pytest.raises(ArchitectureMismatchError, match="both stage teacher"):
        check_architecture(small.architecture(), wide.architecture())
    # settings that do not change the weights may differ (e.g. resuming with another dropout or memory format)
    load_checked(UNet(tiny_cfg(8, dropout=0.1, channels_last=True)), checkpoint_payload(small))
    with pytest.raises(ArchitectureMismatchError, match="no architecture record"):
        load_checked(small, small.state_dict())
    with pytest.raises(ArchitectureMismatchError, match="unknown network kind"):
        model_from_architecture({"kind": "vae"})


# --------------------------------------------------------------------------------------------- discriminator
@pytest.mark.parametrize("resolution,num_scales", [(8, 1), (8, 2), (16, 3), (32, 2)])
@pytest.mark.parametrize("kind", ["class", "text"])
def test_discriminator_shapes(resolution: int, num_scales: int, kind: str) -> None:
    cfg = DiscriminatorConfig(channels=8, num_scales=num_scales)
    disc = Discriminator(cfg, resolution, num_classes=NUM_CLASSES if kind == "class" else 0,
                         text_dim=TEXT_DIM if kind == "text" else 0)
    x = torch.randn(3, 3, resolution, resolution, requires_grad=True)
    logits = disc(x, make_condition(kind, 3))
    assert len(logits) == num_scales and all(t.shape == (3,) for t in logits)
    sum(t.sum() for t in logits).backward()
    assert x.grad.abs().sum() > 0


def test_discriminator_condition_changes_logits_and_unconditional_works() -> None:
    disc = Discriminator(DiscriminatorConfig(channels=8), 16, num_classes=NUM_CLASSES)
    x = torch.randn(2, 3, 16, 16)
    a = disc(x, Condition(class_labels=torch.tensor([0, 1])))
    b = disc(x, Condition(class_labels=torch.tensor([NO_CLASS, 2])))
    assert all((s - t).abs().min() > 0 for s, t in zip(a, b))
    plain = Discriminator(DiscriminatorConfig(channels=8), 16, in_channels=1)
    assert [t.shape for t in plain(torch.randn(2, 1, 16, 16))] == [(2,), (2,)]


def test_discriminator_rejects_too_many_scales() -> None:
    with pytest.raises(ValueError, match="num_scales=3 at resolution 8"):
        Discriminator(DiscriminatorConfig(num_scales=3), 8)
    with pytest.raises(ValueError, match="built for 16px"):
        Discriminator(DiscriminatorConfig(channels=8), 16)(torch.randn(1, 3, 8, 8))


def test_projected_discriminator_on_frozen_backbone() -> None:
    from pagoda_dist.models.efficientnet_lite0 import default_weights_path

    cfg = DiscriminatorConfig(channels=8, num_scales=2, backbone="efficientnet_lite0",
                              backbone_weights=str(default_weights_path()), backbone_input_size=64)
    disc = Discriminator(cfg, 16, num_classes=NUM_CLASSES)
    disc.train()
    assert not disc.backbone.training and not any(p.requires_grad for p in disc.backbone.parameters())
    frozen = {n: p.clone() for n, p in disc.backbone.state_dict().items()}
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    logits = disc(x, make_condition("class", 2))
    assert [t.shape for t in logits] == [(2,), (2,)]
    opt = torch.optim.SGD([p for p in disc.parameters() if p.requires_grad], lr=0.1)
    sum(t.mean() for t in logits).backward()
    opt.step()
    assert x.grad.abs().sum() > 0  # the generator gets gradients through the frozen backbone
    assert all(torch.equal(frozen[n], p) for n, p in disc.backbone.state_dict().items())


def test_pixel_scales_judge_the_images_own_pixels_beside_the_backbone() -> None:
    """discriminator.pixel_scales adds conv heads on the image itself after the backbone's (no resize between the
    pixels and them); the backbone's logits are the same as without them."""
    from pagoda_dist.models.efficientnet_lite0 import default_weights_path

    base = dict(channels=8, num_scales=2, backbone="efficientnet_lite0",
                backbone_weights=str(default_weights_path()), backbone_input_size=64)
    plain = Discriminator(DiscriminatorConfig(**base), 16, num_classes=NUM_CLASSES)
    disc = Discriminator(DiscriminatorConfig(**base, pixel_scales=2), 16, num_classes=NUM_CLASSES)
    missing = disc.load_state_dict(plain.state_dict(), strict=False).missing_keys  # the same backbone heads
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in missing} == {"pixel_scales.0", "pixel_scales.1",
                                                                          "heads.2", "heads.3"}
    assert [s.from_rgb.in_channels for s in disc.pixel_scales] == [3, 3] and len(disc.heads) == 4
    cond = make_condition("class", 2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    logits = disc(x, cond)
    assert [t.shape for t in logits] == [(2,)] * 4
    for a, b in zip(logits[:2], plain(x, cond)):
        torch.testing.assert_close(a, b)
    y = x.clone().requires_grad_(True)
    disc(y, cond)[2].sum().backward()
    assert y.grad.abs().sum() > 0  # the generator gets the pixel heads' gradients directly
    with pytest.raises(ConfigError, match=r"pixel_scales: adds pixel heads beside a backbone's"):
        DiscriminatorConfig(pixel_scales=1)
    with pytest.raises(ValueError, match=r"discriminator\.pixel_scales=3 at resolution 8"):
        Discriminator(DiscriminatorConfig(**base, pixel_scales=3), 8)


def test_dense_head_judges_where_things_lie_and_minibatch_std_how_varied_a_group_is() -> None:
    """conv_head=dense answers a pattern and the same pattern moved with unrelated features (the mean head, a mean
    over positions, with nearly the same ones); minibatch_std makes an image's logit depend on the images of its group
    and on no others, for any batch size."""
    x, blank = torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)
    x[:, :, 4:8, 4:8] = 1.0
    moved = torch.roll(x, shifts=(4, 4), dims=(2, 3))  # one cell of the last 4x4 map further
    for seed in range(3):
        similarity = {}
        for head in ("mean", "dense"):
            torch.manual_seed(seed)
            scale = Discriminator(DiscriminatorConfig(channels=8, num_scales=1, conv_head=head), 16).scales[0]
            with torch.no_grad():  # each response taken against the blank image's
                a, b = scale(x) - scale(blank), scale(moved) - scale(blank)
            similarity[head] = float(F.cosine_similarity(a, b).squeeze())
        assert similarity["mean"] > 0.75 and abs(similarity["dense"]) < 0.3, (seed, similarity)

    torch.manual_seed(0)
    disc = Discriminator(DiscriminatorConfig(channels=8, num_scales=2, minibatch_std=4), 16)
    plain = Discriminator(DiscriminatorConfig(channels=8, num_scales=2), 16)
    assert [s.final.in_channels for s in disc.scales] == [s.final.in_channels + 1 for s in plain.scales]
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    y = x.clone()
    y[5] = -y[5]  # another image in the second group of four
    a, b = torch.stack(disc(x)), torch.stack(disc(y))
    torch.testing.assert_close(a[:, :4], b[:, :4])  # the first group never sees it
    assert (a[:, 4] - b[:, 4]).abs().min() > 0  # its group-mates do
    a, b = torch.stack(plain(x)), torch.stack(plain(y))
    torch.testing.assert_close(a[:, 4], b[:, 4])  # without the channel an image is judged alone
    assert [t.shape for t in disc(x[:6])] == [(6,)] * 2  # 6 images: groups of 3
    torch.testing.assert_close(torch.stack(disc(x[:1])), torch.stack(disc(x[:1])))  # one image: a group of one
    with pytest.raises(ConfigError, match=r"minibatch_std: must be >= 0"):
        DiscriminatorConfig(minibatch_std=-1)


def _record_backbone_inputs(disc: Discriminator) -> list[tuple[int, ...]]:
    """The shapes the discriminator's backbone is called with, from now on."""
    seen: list[tuple[int, ...]] = []
    features = disc.backbone.forward_features

    def recording(x: torch.Tensor) -> list[torch.Tensor]:
        seen.append(tuple(x.shape))
        return features(x)
    disc.backbone.forward_features = recording
    return seen


def test_projected_discriminator_resizes_to_the_configured_backbone_input() -> None:
    """discriminator.backbone_input_size is the side the backbone sees (the feature distance reuses it); a side the
    backbone cannot downsample 32x is refused with the key named."""
    from pagoda_dist.config import load_config

    for side in (64, 96):
        cfg = DiscriminatorConfig(channels=8, num_scales=2, backbone="efficientnet_lite0", backbone_input_size=side)
        disc = Discriminator(cfg, 16)
        seen = _record_backbone_inputs(disc)
        disc(torch.rand(2, 3, 16, 16) * 2 - 1)
        assert seen == [(2, 3, side, side)]
    with pytest.raises(ConfigError, match="backbone_input_size"):
        load_config(None, ["distill.adversarial.discriminator.backbone_input_size=100"])


def test_nearest_backbone_resize_hands_the_backbone_whole_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """discriminator.backbone_resize=nearest makes every pixel a k x k block for the discriminator and the feature
    distance alike, where bilinear x4 keeps 36% of a Nyquist pattern's energy, and adversarial.rec_feature_resize
    sets the feature distance's mode alone; a resolution that does not divide backbone_input_size is refused with
    the key named."""
    from pagoda_dist.losses import reconstruction_distance
    from pagoda_dist.models.blocks import backbone_input

    stripes = torch.tensor([(-1.0) ** j for j in range(16)]).expand(2, 3, 16, 16).contiguous()
    blocks = stripes.repeat_interleave(4, -1).repeat_interleave(4, -2)
    assert torch.equal(backbone_input(stripes, 64, "nearest"), blocks)
    assert torch.equal(backbone_input(stripes[:, :1], 64, "nearest"), blocks)  # grey reaches it as RGB
    assert backbone_input(stripes, 64, "bilinear").square().mean().item() == pytest.approx(0.3555, abs=1e-3)
    with pytest.raises(ValueError, match="not an integer upscale"):
        backbone_input(stripes, 40, "nearest")

    cfg = DiscriminatorConfig(channels=8, num_scales=2, backbone="efficientnet_lite0", backbone_input_size=64,
                              backbone_resize="nearest")
    disc = Discriminator(cfg, 16)
    features = disc.backbone.forward_features
    seen: list[torch.Tensor] = []
    disc.backbone.forward_features = lambda x: seen.append(x) or features(x)
    disc(stripes)
    assert torch.equal(seen[0], blocks)
    distance = reconstruction_distance("feature", disc.backbone.forward_features, 64, feature_resize="nearest")
    distance(stripes, -stripes)
    assert torch.equal(seen[1], -blocks) and torch.equal(seen[2], blocks)  # the target first, without gradients
    with pytest.raises(ValueError, match="backbone_resize=nearest: 24px images .* backbone_input_size=64"):
        Discriminator(cfg, 24)
    from pagoda_dist.config import load_config
    from pagoda_dist.models.generator import OneStepGenerator
    from pagoda_dist.stages.adversarial import AdversarialStage

    # adversarial.rec_feature_resize gives the feature distance its own mode: blocks for the distance while the
    # discriminator of the same stage keeps its smooth bilinear view.
    tiles = load_config(Path(__file__).parent.parent / "configs" / "tiles.yaml",
                        ["distill.adversarial.rec_feature_resize=nearest"])
    adv = tiles.distill.adversarial
    assert (adv.discriminator.backbone_resize, adv.feature_resize) == ("bilinear", "nearest")
    backbone_class = type(disc.backbone)  # recorded on the class: the stage's distance binds the method it builds
    unrecorded = backbone_class.forward_features
    monkeypatch.setattr(backbone_class, "forward_features", lambda self, x: seen.append(x) or unrecorded(self, x))
    stage = AdversarialStage(tiles, "distill", OneStepGenerator(tiles.model), adv, tiles.distill.train.optimizer)
    seen.clear()
    stage.rec_distance(stripes, -stripes)
    stage.discriminator(stripes)
    assert torch.equal(seen[0], -blocks) and torch.equal(seen[1], blocks)
    assert torch.allclose(seen[2], backbone_input(stripes, 64, "bilinear"))
    grow_d = "grow.adversarial.discriminator."
    with pytest.raises(ConfigError, match=r"grow\.adversarial\.discriminator\.backbone_resize: .* "
                                          r"backbone_input_size 96 is not a multiple of the 64px images"):
        load_config(Path(__file__).parent.parent / "configs" / "tiles.yaml",
                    [f"{grow_d}backbone=efficientnet_lite0", f"{grow_d}backbone_resize=nearest",
                     f"{grow_d}backbone_input_size=96"])
    with pytest.raises(ConfigError, match=r"grow\.adversarial\.rec_feature_resize: .* "
                                          r"backbone_input_size 96 is not a multiple of the 64px images"):
        load_config(Path(__file__).parent.parent / "configs" / "tiles.yaml",
                    [f"{grow_d}backbone=efficientnet_lite0", "grow.adversarial.rec_feature_resize=nearest",
                     f"{grow_d}backbone_input_size=96"])


def test_projected_discriminator_runs_with_bf16_weights_and_fp32_statistics() -> None:
    """DeepSpeed's bf16 mode casts the parameters, the frozen backbone's included, but not its batch-norm running
    statistics: the projected discriminator must still run (a bf16 paper config stopped there), on the CPU too."""
    cfg = DiscriminatorConfig(channels=8, num_scales=2, backbone="efficientnet_lite0", backbone_input_size=64)
    disc = Discriminator(cfg, 32, num_classes=NUM_CLASSES)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    reference = disc(x, make_condition("class", 2))
    for p in disc.parameters():  # what DeepSpeed's bf16 engine does to a module's parameters
        p.data = p.data.to(torch.bfloat16)
    assert {b.dtype for b in disc.backbone.buffers() if b.is_floating_point()} == {torch.float32}
    x16 = x.to(torch.bfloat16).requires_grad_(True)
    logits = disc(x16, make_condition("class", 2))
    sum(t.float().mean() for t in logits).backward()
    assert x16.grad.abs().sum() > 0
    for a, b in zip(logits, reference):
        torch.testing.assert_close(a.float(), b, rtol=0.1, atol=0.1)


def test_feature_distance_runs_on_a_bf16_backbone_with_fp32_images() -> None:
    """rec_loss=feature calls the discriminator's frozen backbone outside the bf16 engine, with fp32 images."""
    from pagoda_dist.losses import reconstruction_distance

    cfg = DiscriminatorConfig(channels=8, num_scales=2, backbone="efficientnet_lite0", backbone_input_size=64)
    disc = Discriminator(cfg, 32, num_classes=NUM_CLASSES)
    for p in disc.parameters():
        p.data = p.data.to(torch.bfloat16)
    distance = reconstruction_distance("feature", disc.backbone.forward_features, 64)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    loss = distance(x, torch.rand(2, 3, 32, 32) * 2 - 1)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and x.grad.abs().sum() > 0
