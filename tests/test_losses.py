"""Losses: reconstruction distances, hinge GAN, DiffAugment and the adaptive GAN weight on a toy problem."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagoda_dist.losses import (
    FeatureDistance,
    adaptive_gan_weight,
    conv_weight_grad,
    d_hinge_loss,
    diff_augment,
    distillation_loss,
    g_hinge_loss,
    generator_objective,
    image_pyramid,
    multiscale_l1_l2,
    pixel_l2,
    reconstruction_distance,
)

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------------------ reconstruction
def test_pixel_and_multiscale_distances_on_known_inputs() -> None:
    x, y = torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16)
    assert pixel_l2(x, y).item() == pytest.approx(1.0)
    assert multiscale_l1_l2(x, y).item() == pytest.approx(2.0)  # L1 1 + L2 1 at every level
    assert multiscale_l1_l2(y, y).item() == 0.0
    assert [t.shape[-1] for t in image_pyramid(x)] == [16, 8]
    assert [t.shape[-1] for t in image_pyramid(torch.zeros(1, 1, 4, 4))] == [4]
    # a checkerboard error averages out at the coarse level: only the fine level sees it
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1.0
    assert multiscale_l1_l2(checker.expand(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        multiscale_l1_l2(x, y[:, :, :8, :8])


def test_feature_distance_and_factory() -> None:
    torch.manual_seed(0)
    net = nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
    dist = FeatureDistance(lambda t: [net(t), F.avg_pool2d(net(t), 2)], input_size=16)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert dist(x, x.detach()).item() == pytest.approx(0.0, abs=1e-6)
    d = dist(x, target)
    d.backward()
    assert d.item() > 0 and x.grad.abs().sum() > 0 and target.grad is None
    assert reconstruction_distance("pixel") is pixel_l2
    assert reconstruction_distance("multiscale") is multiscale_l1_l2
    assert isinstance(reconstruction_distance("feature", lambda t: [t]), FeatureDistance)
    with pytest.raises(ValueError, match="discriminator.backbone"):
        reconstruction_distance("feature")
    with pytest.raises(ValueError, match="expected 'pixel'"):
        reconstruction_distance("lpips")


def test_feature_distance_is_blind_to_a_brightness_shift_that_the_added_multiscale_term_sees() -> None:
    """Channel-normalised features of a bias-free layer do not change when the image is scaled: the feature
    distance alone lets a reconstruction's brightness drift; rec_multiscale_weight adds the pixel term back."""
    from pagoda_dist.config import ConfigError, load_config

    torch.manual_seed(0)
    net = nn.Conv2d(3, 4, 3, padding=1, bias=False).requires_grad_(False)
    features = lambda t: [net(t)]  # noqa: E731
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    darker = 0.5 * x
    feature_only = reconstruction_distance("feature", features)
    combined = reconstruction_distance("feature", features, multiscale_weight=2.0)
    assert feature_only(darker, x).item() == pytest.approx(0.0, abs=1e-6)
    assert combined(darker, x).item() == pytest.approx(2.0 * multiscale_l1_l2(darker, x).item(), rel=1e-5)
    assert combined(darker, x).item() > 0.1
    with pytest.raises(ConfigError, match="rec_multiscale_weight"):
        load_config(None, ["distill.adversarial.rec_multiscale_weight=1.0"])  # rec_loss is multiscale


def test_distillation_loss_pools_grown_output_and_holds_teacher_constant() -> None:
    fake = torch.ones(2, 3, 16, 16, requires_grad=True)
    teacher = torch.zeros(2, 3, 8, 8, requires_grad=True)
    loss = distillation_loss(fake, teacher, pixel_l2)
    loss.backward()
    assert loss.item() == pytest.approx(1.0) and teacher.grad is None and fake.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="integer multiple"):
        distillation_loss(torch.zeros(1, 3, 12, 12), torch.zeros(1, 3, 8, 8))


# ----------------------------------------------------------------------------------------------------- hinge
def test_hinge_losses_on_known_logits() -> None:
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1
    assert d_hinge_loss(real, fake).item() == pytest.approx(5 / 6 + 1)
    assert g_hinge_loss(fake).item() == pytest.approx(1 / 3)
    # several scales: each scale weighs the same, whatever its size
    assert d_hinge_loss([real, torch.full((7,), 5.0)], [fake, torch.full((7,), -5.0)]).item() == pytest.approx(
        (5 / 6 + 1) / 2)
    assert g_hinge_loss([fake, torch.tensor([4.0])]).item() == pytest.approx((1 / 3 - 4) / 2)
    with pytest.raises(ValueError, match="scales"):
        d_hinge_loss([real], [fake, fake])


# ----------------------------------------------------------------------------------------------- DiffAugment
def test_diffaugment_is_deterministic_given_a_generator() -> None:
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    a = diff_augment(x, generator=torch.Generator().manual_seed(1))[0]
    b = diff_augment(x, generator=torch.Generator().manual_seed(1))[0]
    c = diff_augment(x, generator=torch.Generator().manual_seed(2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    assert diff_augment(x, policy="")[0] is x
    with pytest.raises(ValueError, match="unknown"):
        diff_augment(x, policy="color,rotate")


def test_diffaugment_applies_one_draw_to_real_and_fake() -> None:
    real = torch.rand(4, 3, 16, 16)
    aug_real, aug_same = diff_augment(real, real.clone(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(aug_real, aug_same)
    # translation and cutout are linear: the same draw maps 2x to twice the output
    fake = 2 * real
    r, f = diff_augment(real, fake, policy="translation,cutout", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(f, 2 * r)
    # but samples within a batch get different draws
    tiled = real[:1].expand(4, -1, -1, -1)
    out = diff_augment(tiled, generator=torch.Generator().manual_seed(0))[0]
    assert not torch.equal(out[0], out[1])


def test_translation_is_a_zero_filled_shift_within_range() -> None:
    x = torch.rand(6, 1, 16, 16) + 1  # strictly positive, so zero fill is visible
    (out,) = diff_augment(x, policy="translation", generator=torch.Generator().manual_seed(4))
    padded = F.pad(x, [2, 2, 2, 2])
    for i in range(6):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(out[i], padded[i, :, 2 - dy:18 - dy, 2 - dx:18 - dx])]
        assert len(matches) == 1, i


def test_cutout_zeroes_one_square() -> None:
    x = torch.ones(8, 3, 16, 16)
    (out,) = diff_augment(x, policy="cutout", generator=torch.Generator().manual_seed(5))
    for img in out:
        zero = (img[0] == 0)
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert 0 < zero.sum() <= 64
        assert zero.sum() == len(rows) * len(cols)  # a (clipped) axis-aligned rectangle
        assert (img[:, zero] == 0).all()  # same mask on every channel


def test_diffaugment_is_differentiable() -> None:
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    diff_augment(x, generator=torch.Generator().manual_seed(0))[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------- adaptive GAN weight
class Toy(nn.Module):
    """out = W x: a 'generator' whose output gradients are known in closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[1.0, 2.0], [0.5, -1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.T


def toy_problem(gan_scale: float = 1.0):
    net, x, y = Toy(), torch.tensor([[1.0, 1.0], [2.0, -1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    a = torch.tensor([[1.0, -2.0], [0.5, 3.0]]) * gan_scale
    rec_fn = lambda o: (o - y).square().sum()  # noqa: E731 - grad 2(o - y)
    gan_fn = lambda o: (a * o).sum()  # noqa: E731 - grad a
    return net, x, y, a, rec_fn, gan_fn


def test_adaptive_weight_equals_hand_computed_ratio_and_is_clipped() -> None:
    net, x, y, a, rec_fn, gan_fn = toy_problem()
    out = net(x)
    expected = (2 * (out - y)).norm() / a.norm()
    od = out.detach().requires_grad_()
    w = adaptive_gan_weight(rec_fn(od), gan_fn(od), od, factor=0.2, clip=(0.01, 10.0))
    assert w.item() == pytest.approx(0.2 * expected.item(), rel=1e-6) and not w.requires_grad
    assert net.w.grad is None  # no gradient ever reached the generator's parameters

    for scale, bound in ((1e-6, 10.0), (1e6, 0.01)):
        *_, a2, rec_fn2, gan_fn2 = toy_problem(scale)
        od = net(x).detach().requires_grad_()
        assert adaptive_gan_weight(rec_fn2(od), gan_fn2(od), od, factor=0.5).item() == pytest.approx(0.5 * bound)

    with pytest.raises(ValueError, match="detached leaf"):
        adaptive_gan_weight(rec_fn(out), gan_fn(out), out)


def test_generator_objective_backpropagates_rec_plus_weighted_gan() -> None:
    net, x, y, a, rec_fn, gan_fn = toy_problem()
    out = net(x)
    obj = generator_objective(out, rec_fn, gan_fn, factor=0.2, clip=(0.01, 10.0))
    assert net.w.grad is None  # computing the weight touched no parameter gradient
    weight = 0.2 * (2 * (out - y)).norm() / a.norm()
    assert obj.weight.item() == pytest.approx(weight.item(), rel=1e-6)
    assert obj.loss.item() == pytest.approx((rec_fn(out) + weight * gan_fn(out)).item(), rel=1e-6)
    assert obj.rec_grad_norm.item() == pytest.approx((2 * (out - y)).norm().item(), rel=1e-6)
    obj.loss.backward()

    ref = Toy()
    out_ref = ref(x)
    (rec_fn(out_ref) + weight.detach() * gan_fn(out_ref)).backward()
    torch.testing.assert_close(net.w.grad, ref.w.grad)


def test_generator_objective_without_gan_is_plain_reconstruction() -> None:
    net, x, _, _, rec_fn, _ = toy_problem()
    obj = generator_objective(net(x), rec_fn, None)
    obj.loss.backward()
    ref = Toy()
    rec_fn(ref(x)).backward()
    torch.testing.assert_close(net.w.grad, ref.w.grad)
    assert obj.weight.item() == 0.0 and obj.gan.item() == 0.0


# ------------------------------------------------------------------------- adaptive weight at the last layer
@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0)])
def test_conv_weight_grad_is_the_gradient_at_the_weight(stride: int, padding: int) -> None:
    """From the conv's input and the gradient at its output alone: what autograd gives at the weight."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, stride=stride, padding=padding)
    x = torch.randn(2, 4, 9, 9)
    out = conv(x)
    g = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, conv.weight, g)
    torch.testing.assert_close(conv_weight_grad(conv, x)(g), expected)


def test_generator_objective_weight_at_the_last_layer() -> None:
    """weight_at 'last_layer': ||d rec / d W|| / ||d gan / d W|| at the last layer's weight W (the reference's
    formula), which differs from the ratio at the output; both are returned; the update uses the chosen one."""
    torch.manual_seed(0)
    body, head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)
    x, y, a = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    rec_fn = lambda o: (o - y).square().mean()  # noqa: E731
    gan_fn = lambda o: (a * o).mean()  # noqa: E731
    h = torch.relu(body(x))
    out = head(h)
    g_rec, g_gan = (torch.autograd.grad(f(out), head.weight, retain_graph=True)[0] for f in (rec_fn, gan_fn))
    reference = 0.2 * g_rec.norm() / g_gan.norm()

    obj = generator_objective(out, rec_fn, gan_fn, factor=0.2, last_layer_grad=conv_weight_grad(head, h),
                              weight_at="last_layer")
    assert obj.weight.item() == pytest.approx(reference.item(), rel=1e-5) == obj.weight_last_layer.item()
    at_output = generator_objective(out, rec_fn, gan_fn, factor=0.2)
    assert obj.weight_output.item() == pytest.approx(at_output.weight.item(), rel=1e-6)
    assert abs(obj.weight_output.item() / reference.item() - 1) > 0.05  # the two formulas do differ
    assert at_output.weight_last_layer is None
    obj.loss.backward()
    got = head.weight.grad.clone()
    head.zero_grad()
    body.zero_grad()
    (rec_fn(head(torch.relu(body(x)))) + reference * gan_fn(head(torch.relu(body(x))))).backward()
    torch.testing.assert_close(got, head.weight.grad)
    with pytest.raises(ValueError, match="last_layer_grad"):
        generator_objective(out, rec_fn, gan_fn, weight_at="last_layer")
