"""Losses of the distil and grow stages: reconstruction distances, hinge GAN, DiffAugment, adaptive GAN weight,
and the text-to-image CLIP regulariser.

Pure torch. The adaptive weight never differentiates with respect to network parameters: it takes gradients with
respect to a detached copy of the generator's output, which keeps it valid under DeepSpeed ZeRO (where
`autograd.grad` through an engine's parameters breaks the engine's backward bookkeeping).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagoda_dist.models.blocks import backbone_input

Distance = Callable[[Tensor, Tensor], Tensor]
"""distance(x, target) -> scalar loss, averaged over the batch."""

Logits = Tensor | Sequence[Tensor]
"""Discriminator output: one tensor, or one per scale (each scale's loss is averaged with equal weight)."""


# ----------------------------------------------------------------------------------------- reconstruction
def pixel_l2(x: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all pixels."""
    return F.mse_loss(x.float(), target.float())


def image_pyramid(x: Tensor, min_resolution: int = 8) -> list[Tensor]:
    """x, then 2x2-average-pooled copies down to `min_resolution` (at least x itself)."""
    levels = [x]
    while min(levels[-1].shape[-2:]) // 2 >= min_resolution:
        levels.append(F.avg_pool2d(levels[-1], 2))
    return levels


def multiscale_l1_l2(x: Tensor, target: Tensor, min_resolution: int = 8) -> Tensor:
    """L1 + L2 at every level of an average-pooling pyramid, averaged over levels.

    Coarse levels weigh layout and colour as much as the fine level weighs detail, so the reconstruction does not
    trade global structure for texture; L1 keeps gradients alive when errors are small.
    """
    if x.shape != target.shape:
        raise ValueError(f"multiscale_l1_l2: shapes differ, {tuple(x.shape)} vs {tuple(target.shape)}")
    losses = [F.l1_loss(a, b) + F.mse_loss(a, b)
              for a, b in zip(image_pyramid(x.float(), min_resolution), image_pyramid(target.float(), min_resolution))]
    return torch.stack(losses).mean()


class FeatureDistance:
    """Distance in the feature maps of a frozen network (LPIPS-like, without learned layer weights).

    Each map is unit-normalised along channels, then the squared difference is averaged per map and over maps.
    `features(x)` returns a list of (B, C, H, W) maps; images are resized to `input_size` first when given, the
    way `resize` names, grey images replicated to RGB (`backbone_input`).
    """

    def __init__(self, features: Callable[[Tensor], list[Tensor]], input_size: int | None = None,
                 resize: str = "bilinear") -> None:
        self.features = features
        self.input_size = input_size
        self.resize = resize

    def _prepare(self, x: Tensor) -> Tensor:
        return backbone_input(x, self.input_size, self.resize)

    def __call__(self, x: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad():
            target_feats = self.features(self._prepare(target))
        feats = self.features(self._prepare(x))
        dists = [(F.normalize(a.float(), dim=1) - F.normalize(b.float(), dim=1)).square().sum(1).mean()
                 for a, b in zip(feats, target_feats)]
        return torch.stack(dists).mean()


def reconstruction_distance(kind: str, feature_net: Callable[[Tensor], list[Tensor]] | None = None,
                            feature_input_size: int | None = None, multiscale_weight: float = 0.0,
                            feature_resize: str = "bilinear") -> Distance:
    """The distance named by `AdversarialConfig.rec_loss`: "pixel", "multiscale" or "feature" (needs feature_net;
    images reach it at `feature_input_size`, resized as `feature_resize` names), the feature distance plus
    `multiscale_weight` x `multiscale_l1_l2` when that weight is > 0."""
    if kind == "pixel":
        return pixel_l2
    if kind == "multiscale":
        return multiscale_l1_l2
    if kind == "feature":
        if feature_net is None:
            raise ValueError("rec_loss 'feature' needs a frozen feature network: set "
                             "adversarial.discriminator.backbone (or pass feature_net)")
        feature = FeatureDistance(feature_net, feature_input_size, feature_resize)
        if multiscale_weight <= 0:
            return feature
        return lambda x, target: feature(x, target) + multiscale_weight * multiscale_l1_l2(x, target)
    raise ValueError(f"rec_loss {kind!r}: expected 'pixel', 'multiscale' or 'feature'")


def distillation_loss(fake: Tensor, teacher_sample: Tensor, distance: Distance = multiscale_l1_l2) -> Tensor:
    """distance(G(z), teacher sample from the same noise), the teacher sample held constant.

    A grown generator's output is average-pooled to the teacher's (base) resolution first.
    """
    if fake.shape[-1] != teacher_sample.shape[-1]:
        factor = fake.shape[-1] // teacher_sample.shape[-1]
        if factor < 1 or fake.shape[-1] != factor * teacher_sample.shape[-1]:
            raise ValueError(f"distillation_loss: generator output {tuple(fake.shape)} is not an integer multiple of "
                             f"the teacher sample {tuple(teacher_sample.shape)}")
        fake = F.avg_pool2d(fake, factor)
    return distance(fake, teacher_sample.detach())


# ------------------------------------------------------------------------------------------------- CLIP
def clip_loss(images: Tensor, text_embed: Tensor, encode_image: Callable[[Tensor], Tensor],
              keep: Tensor | None = None) -> Tensor:
    """CLIP regulariser: mean over kept samples of 1 - cos(encode_image(images_i), text_embed_i).

    `encode_image` maps (B, C, H, W) images in [-1, 1] to the joint CLIP space (a frozen image tower with its own
    resizing and normalisation, e.g. `models.clip_image.ClipImageEncoder`); `text_embed` (B, D) is the projected
    text embedding of the same CLIP model (`Condition.text_pooled`, open_clip's `encode_text`), so the cosine is
    the CLIP score / 100 of each pair. `keep` (B,) bool leaves out samples whose caption was dropped. Gradients
    reach `images` (the generator) through the tower; the text side is held constant. With nothing kept the loss
    is an exact 0 that still depends on `images`, so it can be differentiated like any other.
    """
    if text_embed.shape[0] != images.shape[0]:
        raise ValueError(f"clip_loss: {images.shape[0]} images but {text_embed.shape[0]} text embeddings")
    img = F.normalize(encode_image(images).float(), dim=-1)
    txt = F.normalize(text_embed.detach().float(), dim=-1)
    if img.shape[-1] != txt.shape[-1]:
        raise ValueError(f"clip_loss: image embedding width {img.shape[-1]} vs text embedding width "
                         f"{txt.shape[-1]}: the image tower must belong to the CLIP model that embedded the captions")
    distance = 1 - (img * txt).sum(dim=-1)
    weight = torch.ones_like(distance) if keep is None else keep.to(distance.device, distance.dtype)
    return (distance * weight).sum() / weight.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------ hinge GAN
def _as_list(logits: Logits) -> list[Tensor]:
    return [logits] if isinstance(logits, Tensor) else list(logits)


def d_hinge_loss(real_logits: Logits, fake_logits: Logits) -> Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(real))) + mean(relu(1 + D(fake))), averaged over scales."""
    real, fake = _as_list(real_logits), _as_list(fake_logits)
    if len(real) != len(fake):
        raise ValueError(f"d_hinge_loss: {len(real)} real scales vs {len(fake)} fake scales")
    losses = [F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean() for r, f in zip(real, fake)]
    return torch.stack(losses).mean()


def g_hinge_loss(fake_logits: Logits) -> Tensor:
    """Generator loss: -mean(D(fake)), averaged over scales."""
    return -torch.stack([f.float().mean() for f in _as_list(fake_logits)]).mean()


# ----------------------------------------------------------------------------------------------- DiffAugment
DIFFAUG_POLICIES = ("color", "translation", "cutout")


def diff_augment(*images: Tensor, policy: str = "color,translation,cutout",
                 generator: torch.Generator | None = None, translation_ratio: float = 0.125,
                 cutout_ratio: float = 0.5) -> tuple[Tensor, ...]:
    """Differentiable augmentation (Zhao et al. 2020), the same random draw applied to every tensor passed.

    Each of `images` is (B, C, H, W) with the same B, H, W; sample i of every tensor gets the same brightness,
    saturation, contrast, shift and cutout. Deterministic given `generator` (which must live on the images'
    device); an empty policy returns the inputs unchanged.
    """
    if not images:
        return ()
    names = [p for p in policy.split(",") if p]
    unknown = set(names) - set(DIFFAUG_POLICIES)
    if unknown:
        raise ValueError(f"diffaug policy {sorted(unknown)} unknown; choose from {list(DIFFAUG_POLICIES)}")
    b, _, h, w = images[0].shape
    for x in images[1:]:
        if x.shape[0] != b or x.shape[-2:] != (h, w):
            raise ValueError(f"diff_augment: all tensors need the same batch and size, got {tuple(images[0].shape)} "
                             f"and {tuple(x.shape)}")
    device = images[0].device

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, device=device)

    out = list(images)
    for name in names:
        if name == "color":
            brightness, saturation, contrast = rand(b, 1, 1, 1) - 0.5, rand(b, 1, 1, 1) * 2, rand(b, 1, 1, 1) + 0.5
            out = [_color(x, brightness, saturation, contrast) for x in out]
        elif name == "translation":
            sy, sx = int(h * translation_ratio + 0.5), int(w * translation_ratio + 0.5)
            ty = (rand(b) * (2 * sy + 1)).long() - sy
            tx = (rand(b) * (2 * sx + 1)).long() - sx
            out = [_translate(x, ty, tx, sy, sx) for x in out]
        else:
            ch, cw = int(h * cutout_ratio + 0.5), int(w * cutout_ratio + 0.5)
            cy = (rand(b) * (h + 1 - ch % 2)).long()
            cx = (rand(b) * (w + 1 - cw % 2)).long()
            keep = _cutout_mask(b, h, w, cy, cx, ch, cw, device)
            out = [x * keep.to(x.dtype) for x in out]
    return tuple(out)


def _color(x: Tensor, brightness: Tensor, saturation: Tensor, contrast: Tensor) -> Tensor:
    x = x + brightness.to(x.dtype)
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * saturation.to(x.dtype) + mean_c
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * contrast.to(x.dtype) + mean


def _translate(x: Tensor, ty: Tensor, tx: Tensor, sy: int, sx: int) -> Tensor:
    """Shifts sample i by (ty[i], tx[i]) pixels, filling with zeros; a gather from the padded image."""
    b, _, h, w = x.shape
    padded = F.pad(x, [sx, sx, sy, sy])
    rows = (torch.arange(h, device=x.device)[None, :] - ty[:, None] + sy)  # (B, H) rows of the padded image
    cols = (torch.arange(w, device=x.device)[None, :] - tx[:, None] + sx)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _cutout_mask(b: int, h: int, w: int, cy: Tensor, cx: Tensor, ch: int, cw: int, device: torch.device) -> Tensor:
    """(B, 1, H, W): 0 inside a ch x cw square centred at (cy, cx) (clipped at the border), 1 elsewhere."""
    ys = torch.arange(h, device=device)[None, :] - (cy[:, None] - ch // 2)  # offset into the square
    xs = torch.arange(w, device=device)[None, :] - (cx[:, None] - cw // 2)
    inside = ((ys >= 0) & (ys < ch))[:, :, None] & ((xs >= 0) & (xs < cw))[:, None, :]
    return (~inside).unsqueeze(1)


# ------------------------------------------------------------------------------------- adaptive GAN weight
def adaptive_gan_weight(rec_loss: Tensor, gan_loss: Tensor, wrt: Tensor, *, factor: float = 1.0,
                        clip: Sequence[float] = (0.01, 10.0), eps: float = 1e-8) -> Tensor:
    """factor * clip(||d rec/d wrt|| / ||d gan/d wrt||, lo, hi), a detached scalar.

    `wrt` must be a detached leaf (`out.detach().requires_grad_()`) on which both losses were computed: the
    gradients then never reach network parameters (see the module docstring). Both graphs are kept.
    """
    _check_detached_leaf(wrt)
    g_rec, g_gan = _grads(rec_loss, gan_loss, wrt)
    return _weight(g_rec, g_gan, factor, clip, eps)


def _check_detached_leaf(wrt: Tensor) -> None:
    if wrt.grad_fn is not None or not wrt.requires_grad:
        raise ValueError("adaptive GAN weight: `wrt` must be a detached leaf, out.detach().requires_grad_(), with "
                         "both losses computed on it; differentiating through the generator's parameters breaks "
                         "DeepSpeed ZeRO")


def _grads(rec_loss: Tensor, gan_loss: Tensor, wrt: Tensor, retain_graph: bool = True) -> tuple[Tensor, Tensor]:
    (g_rec,) = torch.autograd.grad(rec_loss, wrt, retain_graph=retain_graph)
    (g_gan,) = torch.autograd.grad(gan_loss, wrt, retain_graph=retain_graph)
    return g_rec, g_gan


def _weight(g_rec: Tensor, g_gan: Tensor, factor: float, clip: Sequence[float], eps: float) -> Tensor:
    lo, hi = clip
    ratio = g_rec.float().norm() / (g_gan.float().norm() + eps)
    return (ratio.clamp(lo, hi) * factor).detach()


ADAPTIVE_WEIGHT_AT = ("output", "last_layer")


def conv_weight_grad(conv: nn.Conv2d, inputs: Tensor) -> Callable[[Tensor], Tensor]:
    """g -> the gradient at `conv.weight` of a loss whose gradient at the conv's output is g, given the conv's
    `inputs` of that forward. Only the weight's shape is read, so it holds under ZeRO-3 partitioning, and nothing
    is differentiated through the network (see the module docstring). Computed in the inputs' dtype."""
    shape = getattr(conv.weight, "ds_shape", conv.weight.shape)  # ZeRO-3 keeps the full shape here
    x = inputs.detach()

    def grad(g_out: Tensor) -> Tensor:
        return torch.nn.grad.conv2d_weight(x, shape, g_out.to(x.dtype), stride=conv.stride, padding=conv.padding,
                                           dilation=conv.dilation, groups=conv.groups)
    return grad


@dataclass
class GeneratorObjective:
    """The generator's loss for one step. `loss` has the value rec + weight * gan + reg and, by construction, the
    gradient g_rec + weight * g_gan + g_reg with respect to the generator output: backpropagate it (also through a
    DeepSpeed engine) like any loss. The other fields are detached, for logging (`reg` is 0 without a
    regulariser). `weight_output` and `weight_last_layer` are the adaptive weight by each formula (None when not
    computed); `weight` is the one applied."""

    loss: Tensor
    rec: Tensor
    gan: Tensor
    weight: Tensor
    rec_grad_norm: Tensor
    gan_grad_norm: Tensor
    reg: Tensor
    weight_output: Tensor | None = None
    weight_last_layer: Tensor | None = None


def generator_objective(out: Tensor, rec_fn: Callable[[Tensor], Tensor],
                        gan_fn: Callable[[Tensor], Tensor] | None, *, factor: float = 1.0,
                        clip: Sequence[float] = (0.01, 10.0), eps: float = 1e-8,
                        reg_fn: Callable[[Tensor], Tensor] | None = None,
                        last_layer_grad: Callable[[Tensor], Tensor] | None = None,
                        weight_at: str = "output") -> GeneratorObjective:
    """rec + adaptive_weight * gan (+ reg) for the generator output `out`, each loss evaluated once.

    rec_fn(o) and gan_fn(o) map an output to a scalar loss (the GAN one typically `g_hinge_loss(D(augment(o)))`,
    with D's parameters frozen during this step); `gan_fn=None` trains reconstruction only (before the GAN starts).
    Both losses run on od = out.detach().requires_grad_(); their gradients w.r.t. od are combined with the weight
    held constant and pushed into the generator through `out` by a linear surrogate. That equals backpropagating
    rec + weight * gan through `out`, without a second discriminator pass and without autograd.grad on parameters.

    reg_fn(o), optional, is a regulariser carrying its own weight (the CLIP term): it is added as it is and kept
    out of the adaptive weight's ratio, so turning it on does not change how hard the GAN term pushes.

    weight_at: where the gradient norms of the ratio are taken: "output" (at `out`), or "last_layer" (at the weight
    of the generator's last layer, VQGAN's and the reference's formula; needs `last_layer_grad`, which maps a
    gradient at `out` to the one at that weight, e.g. `conv_weight_grad`). The two differ by a data-dependent
    factor; given `last_layer_grad`, both are computed and returned for logging.
    """
    if weight_at not in ADAPTIVE_WEIGHT_AT:
        raise ValueError(f"weight_at {weight_at!r}: expected one of {list(ADAPTIVE_WEIGHT_AT)}")
    if weight_at == "last_layer" and last_layer_grad is None:
        raise ValueError("weight_at 'last_layer' needs last_layer_grad (the gradient at the last layer's weight)")
    od = out.detach().requires_grad_()
    rec = rec_fn(od)
    if gan_fn is None:
        (g_out,) = torch.autograd.grad(rec, od)
        gan = weight = g_gan_norm = rec.detach().new_zeros(())
        g_rec_norm = g_out.float().norm()
        weights: dict[str, Tensor] = {}
    else:
        gan = gan_fn(od)
        g_rec, g_gan = _grads(rec, gan, od, retain_graph=False)
        weights = {"output": _weight(g_rec, g_gan, factor, clip, eps)}
        if last_layer_grad is not None:
            weights["last_layer"] = _weight(last_layer_grad(g_rec), last_layer_grad(g_gan), factor, clip, eps)
        weight = weights[weight_at]
        g_out = g_rec + weight.to(g_gan.dtype) * g_gan
        g_rec_norm, g_gan_norm = g_rec.float().norm(), g_gan.float().norm()
    reg = rec.detach().new_zeros(())
    if reg_fn is not None:
        reg = reg_fn(od)
        (g_reg,) = torch.autograd.grad(reg, od)
        g_out = g_out + g_reg.to(g_out.dtype)
    surrogate = (out * g_out.detach()).sum()
    value = rec.detach() + weight * gan.detach() + reg.detach()
    loss = surrogate - surrogate.detach() + value  # the real loss's value, the surrogate's gradient
    return GeneratorObjective(loss, rec.detach(), gan.detach(), weight, g_rec_norm.detach(), g_gan_norm.detach(),
                              reg.detach(), weights.get("output"), weights.get("last_layer"))
