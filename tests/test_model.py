"""Discriminator model, type embeddings and checkpoints, on 64 px images and tiny random models."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from discriminator.backbones import build_backbone
from discriminator.embeddings import LearnedTypeEmbeddings, TextTypeEmbeddings, encode_type_prompts, type_prompts
from discriminator.losses import discriminator_loss
from discriminator.model import CONFIG_NAME, WEIGHTS_NAME, Discriminator, DiscriminatorConfig
from core.errors import InputError
from tests.test_backbones import save_tiny_vision_model
from tests.tiny_models import VOCAB_SIZE, get_dummy_clip, get_dummy_tokenizer

TYPES = ["blowhole", "crack", "fray"]
RANDOM_LITE0 = {"name": "efficientnet_lite0", "pretrained": False}


def make_config(**overrides) -> DiscriminatorConfig:
    return DiscriminatorConfig(**{"category": "magnetic_tile", "class_names": TYPES, "backbone": RANDOM_LITE0,
                                  "width": 16, **overrides})


def images(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def save_tiny_text_encoder(directory: Path, full_clip: bool) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel

    if full_clip:
        model, processor = get_dummy_clip()
        tokenizer = processor.tokenizer
    else:
        torch.manual_seed(0)
        model = CLIPTextModel(CLIPTextConfig(
            bos_token_id=VOCAB_SIZE - 2, eos_token_id=VOCAB_SIZE - 1, pad_token_id=VOCAB_SIZE - 1, hidden_size=24,
            intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB_SIZE,
        ))
        tokenizer = get_dummy_tokenizer()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model() -> Discriminator:
    return Discriminator(make_config()).eval()


# --- forward ----------------------------------------------------------------------------------

def test_output_shapes_and_mean_logit_detection(model):
    out = model(images())
    assert out.class_logits.shape == (2, 3, 64, 64)
    assert out.detection_logits.shape == (2, 1, 64, 64)
    assert torch.allclose(out.detection_logits, out.class_logits.mean(dim=1, keepdim=True), atol=1e-5)
    # cosine / temperature bounds every logit by 1 / 0.07
    assert out.class_logits.abs().max() <= 1 / 0.07 + 1e-4


def test_normal_embedding_measures_each_type_logit_against_normal(tmp_path):
    plain = Discriminator(make_config()).eval()
    with_normal = Discriminator(make_config(normal_embedding=True)).eval()
    # the same seed gives the same shared weights; the normal embedding is one more trainable vector
    assert set(with_normal.state_dict()) - set(plain.state_dict()) == {"normal_embedding"}
    with_normal.load_state_dict({**plain.state_dict(), "normal_embedding": with_normal.normal_embedding.detach()})
    x = images()
    with torch.no_grad():
        _, fused, _ = plain.embed_and_type(x)
        pixels = torch.nn.functional.normalize(plain.embed(fused), dim=1)
        normal = torch.nn.functional.normalize(with_normal.normal_embedding, dim=0)
        shift = torch.einsum("bdhw,d->bhw", pixels, normal).unsqueeze(1) / plain.temperature
        assert torch.allclose(with_normal.embed_and_type(x)[2], plain.embed_and_type(x)[2] - shift, atol=1e-5)
    # the per-pixel shift leaves the type ranking alone; the checkpoint keeps the embedding
    out_plain, out_normal = plain(x), with_normal(x)
    assert torch.equal(out_plain.class_logits.argmax(1), out_normal.class_logits.argmax(1))
    with_normal.save_pretrained(tmp_path / "ckpt")
    loaded = Discriminator.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.normal_embedding
    assert_same_outputs(with_normal, loaded)


def test_evidence_branch_feeds_the_knn_evidence_and_leaves_the_type_logits(tmp_path):
    plain = Discriminator(make_config(detection_head="knn")).eval()
    branched = Discriminator(make_config(detection_head="knn", evidence_branch=True)).eval()
    # the same seed gives the same shared weights; the branch is a module of its own
    extra = set(branched.state_dict()) - set(plain.state_dict())
    assert extra and all(key.startswith("evidence_branch.") for key in extra)
    assert set(plain.state_dict()) <= set(branched.state_dict())
    x = images()
    for model in (plain, branched):
        model.build_memory(list(images(2, seed=1)))
    with torch.no_grad():
        features, _, class_logits = branched.embed_and_type(x)
        assert torch.equal(class_logits, plain.embed_and_type(x)[2])  # types as without the branch
        assert plain.evidence_logits(features, class_logits) is class_logits
        evidence = branched.evidence_logits(features, class_logits)
        expected = branched.evidence_branch([features[i] for i in branched.levels])
        assert torch.equal(evidence, expected) and not torch.allclose(evidence, class_logits)
        # the branch measures its types against its own normal embedding
        branch = branched.evidence_branch
        levels = [features[i] for i in branched.levels]
        pixels = torch.nn.functional.normalize(branch.embed(branch.fusion(levels)), dim=1)
        normal = torch.nn.functional.normalize(branch.normal_embedding, dim=0)
        types = torch.nn.functional.normalize(branch.type_embeddings(), dim=-1)
        by_hand = (torch.einsum("bdhw,cd->bchw", pixels, types)
                   - torch.einsum("bdhw,d->bhw", pixels, normal).unsqueeze(1)) / branch.temperature
        assert torch.allclose(evidence, by_hand, atol=1e-5)
        assert torch.allclose(branched.raw_evidence(x), evidence.logsumexp(dim=1, keepdim=True), atol=1e-5)
    # training sees the branch's logits for its loss; inference does not carry them
    assert branched(x).evidence_logits is None and plain.train()(x).evidence_logits is None
    assert branched.train()(x).evidence_logits.shape == (2, 3, 64, 64)
    branched.eval()
    # with the learned evidence on, the pixel map reads the branch
    shots = list(images(2, seed=1))
    for model in (plain, branched):
        model.build_learned_evidence(shots, 0.25)
    with torch.no_grad():
        assert not torch.allclose(branched(x).detection_logits, plain(x).detection_logits)
    # with type prototypes the branch's logits get them too, over its own temperature
    branched.build_prototypes([(images(1, seed=3)[0], (images(1, seed=3)[0, 0] > 0.8).long())])
    branch_temperature = branched.evidence_branch.temperature
    with torch.no_grad():
        features, _, class_logits = branched.embed_and_type(x)
        raw = branched.evidence_branch([features[i] for i in branched.levels])
        prototypes = branched.prototype_logits(features, raw, branch_temperature, branched.type_prototypes,
                                               branched.prototype_valid)
        assert torch.allclose(branched.evidence_logits(features, class_logits), raw + prototypes)
    # ... or prototypes of its own (training's: the recipe-made rows), and the type logits keep theirs
    branched.build_prototypes([_shot(4, 2), _shot(5, 3)], for_branch=True)
    assert branched.config.branch_prototypes and branched.branch_prototype_valid.tolist() == [False, True, True]
    assert not torch.equal(branched.branch_prototypes[2], branched.type_prototypes[2])
    with torch.no_grad():
        features, _, after = branched.embed_and_type(x)
        assert torch.equal(after, class_logits)
        own = branched.prototype_logits(features, raw, branch_temperature, branched.branch_prototypes,
                                        branched.branch_prototype_valid)
        assert not torch.allclose(own, prototypes)
        assert torch.allclose(branched.evidence_logits(features, class_logits), raw + own)
    branched.save_pretrained(tmp_path / "ckpt")
    loaded = Discriminator.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.evidence_branch and loaded.config.branch_prototypes and not loaded.config.normal_embedding
    assert torch.equal(loaded.branch_prototypes, branched.branch_prototypes)
    assert_same_outputs(branched, loaded)
    with pytest.raises(ValueError, match="branch prototypes need an evidence branch"):
        plain.build_prototypes([_shot(4, 2)], for_branch=True)
    with pytest.raises(InputError, match="branch_prototypes needs evidence_branch"):
        make_config(branch_prototypes=True)
    with pytest.raises(InputError, match="evidence_branch needs the knn detection head"):
        make_config(evidence_branch=True)


def test_memory_backbone_feeds_the_memory_alone_and_round_trips(tmp_path):
    """A second backbone (`memory_backbone`) is what the normal-shot memory reads; the type logits,
    fusion and prototypes keep reading the main one."""
    lite2 = {"name": "efficientnet_lite2", "pretrained": False}
    model = Discriminator(make_config(backbone=lite2, memory_backbone=RANDOM_LITE0, detection_head="knn")).eval()
    single = Discriminator(make_config(backbone=lite2, detection_head="knn")).eval()
    x, shots = images(), list(images(2, seed=1))
    for m in (model, single):
        m.build_memory(shots)
    lite0_dim = sum(build_backbone(RANDOM_LITE0, load_weights=False).channels[i] for i in model.memory.levels)
    assert model.memory.bank.shape[-1] == lite0_dim != single.memory.bank.shape[-1]
    with torch.no_grad():
        features = model.backbone_features(x)
        memory_features = model.memory_features(x, features)
        assert [f.shape[1] for f in memory_features] == model.memory_backbone.channels != [f.shape[1] for f in features]
        assert all(torch.equal(a, b) for a, b in zip(memory_features, model.memory_backbone(x)))
        assert single.memory_features(x, features) is features
        # the detection map is the memory backbone's distance; the type logits do not see that backbone
        out = model(x)
        expected = model.detection_head(None, model.embed_and_type(x)[2], memory_features)
        assert torch.allclose(out.detection_logits, F.interpolate(expected[:, :1], size=x.shape[-2:], mode="bilinear",
                                                                   align_corners=False), atol=1e-6)
        torch.manual_seed(5)
        for parameter in model.memory_backbone.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
        changed = model(x)
        assert torch.equal(changed.class_logits, out.class_logits)
        assert not torch.allclose(changed.detection_logits, out.detection_logits)
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())["memory_backbone"] == RANDOM_LITE0
    loaded = Discriminator.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.memory_backbone == RANDOM_LITE0
    assert_same_outputs(model, loaded)
    with pytest.raises(InputError, match="memory_backbone needs a detection head with a normal-shot memory"):
        make_config(memory_backbone=RANDOM_LITE0, detection_head="conv")


def test_conv_detection_head_and_level_subset():
    model = Discriminator(make_config(detection_head="conv", levels=[1, 2])).eval()
    out = model(images(size=48))
    assert out.class_logits.shape == (2, 3, 48, 48) and out.detection_logits.shape == (2, 1, 48, 48)
    assert not torch.allclose(out.detection_logits, out.class_logits.mean(dim=1, keepdim=True))
    assert len(model.fusion.necks) == 2 and model.fusion.necks[0][0].in_channels == 40


def test_bad_config_is_an_input_error():
    with pytest.raises(InputError, match="detection_head"):
        make_config(detection_head="max")
    with pytest.raises(InputError, match="duplicates"):
        make_config(class_names=["crack", "crack"])
    with pytest.raises(InputError, match="levels"):
        Discriminator(make_config(levels=[4]))


def test_only_the_head_trains_and_the_backbone_stays_frozen():
    model = Discriminator(make_config()).train()
    assert not model.backbone.training
    stats_before = model.backbone.net._bn0.running_mean.clone()
    out = model(images())
    discriminator_loss(out, torch.randint(0, 4, (2, 64, 64))).total.backward()
    assert torch.equal(model.backbone.net._bn0.running_mean, stats_before)
    assert all(p.grad is None for p in model.backbone.parameters())
    trainable = model.trainable_parameters()
    assert trainable and all(p.grad is not None for p in trainable)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert not backbone_ids & {id(p) for p in trainable}


def test_initialisation_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = Discriminator(make_config(seed=3)), Discriminator(make_config(seed=3))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.trainable_parameters(), b.trainable_parameters()))
    c = Discriminator(make_config(seed=4))
    assert not torch.equal(a.type_embeddings.weight, c.type_embeddings.weight)
    # a backbone passed in (however it consumed randomness) does not change the head's init
    torch.manual_seed(123)
    d = Discriminator(make_config(seed=3), backbone=build_backbone(RANDOM_LITE0))
    assert all(torch.equal(p, q) for p, q in zip(a.trainable_parameters(), d.trainable_parameters()))


def test_a_few_steps_on_a_toy_problem_reduce_the_loss():
    """Bright squares are type 1, dark squares type 2, on grey: the heads must learn both."""
    # stride 4/8 levels only: the backbone stops early, which keeps this test fast
    model = Discriminator(make_config(class_names=["bright", "dark"], width=32, levels=[0, 1])).train()
    x = torch.full((4, 3, 64, 64), 0.5)
    type_map = torch.zeros(4, 64, 64, dtype=torch.long)
    for i, (r, c) in enumerate([(8, 8), (32, 16), (16, 40), (40, 40)]):
        x[i, :, r : r + 16, c : c + 16] = 1.0 if i % 2 == 0 else 0.0
        type_map[i, r : r + 16, c : c + 16] = 1 if i % 2 == 0 else 2
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = discriminator_loss(model(x), type_map)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
        losses.append(loss.total.item())
    assert losses[-1] < 0.6 * losses[0]
    model.eval()
    with torch.no_grad():
        out = model(x)
    predicted = out.class_logits.argmax(1) + 1
    inside = type_map > 0
    assert (predicted[inside] == type_map[inside]).float().mean() > 0.9


# --- type embeddings --------------------------------------------------------------------------

def test_prompts_use_readable_names():
    prompts = type_prompts("broken_large", "magnetic_tile", ["a {type} on a {category}"])
    assert prompts == ["a broken large on a magnetic tile"]


@pytest.mark.parametrize("full_clip", [False, True])
def test_text_embeddings_from_a_tiny_clip(tmp_path, full_clip):
    source = save_tiny_text_encoder(tmp_path / "clip", full_clip)
    features = encode_type_prompts(str(source), TYPES, "magnetic_tile")
    assert features.shape == (3, 16 if full_clip else 24)  # joint space for a CLIP pair, pooled text otherwise
    assert torch.allclose(features.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(features[0], features[1])
    emb = TextTypeEmbeddings.from_text_encoder(str(source), TYPES, dim=8, category="magnetic_tile")
    assert emb().shape == (3, 8)
    assert [n for n, _ in emb.named_parameters()] == ["proj.weight", "proj.bias"]  # text features stay frozen
    assert torch.equal(emb.text_features, features)


def test_missing_text_encoder_names_the_path(tmp_path):
    with pytest.raises(InputError, match="no-clip"):
        encode_type_prompts(str(tmp_path / "no-clip"), TYPES, "tile")


def test_learned_embeddings_shape():
    emb = LearnedTypeEmbeddings(4, 8)
    assert emb().shape == (4, 8) and emb.weight.requires_grad


# --- checkpoints ------------------------------------------------------------------------------

def assert_same_outputs(a: Discriminator, b: Discriminator, size: int = 64) -> None:
    x = images(size=size, seed=1)
    with torch.no_grad():
        out_a, out_b = a.eval()(x), b.eval()(x)
    assert torch.equal(out_a.class_logits, out_b.class_logits)
    assert torch.equal(out_a.detection_logits, out_b.detection_logits)


def test_round_trip_is_exact_and_safetensors_only(tmp_path, model):
    with torch.no_grad():
        model.log_temperature.fill_(-2.0)  # a trained value must survive too
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert config["class_names"] == TYPES and config["category"] == "magnetic_tile"
    assert config["backbone"] == RANDOM_LITE0 and config["pixel_threshold"] == 0.5
    loaded = Discriminator.from_pretrained(tmp_path / "ckpt", expected_category="magnetic_tile",
                                           expected_backbone="efficientnet_lite0")
    assert_same_outputs(model, loaded)


def test_round_trip_with_transformers_backbone_and_text_types(tmp_path):
    """Neither the vision model nor the text encoder is needed to load the checkpoint."""
    vision = save_tiny_vision_model(tmp_path / "vit", "dinov2")
    text = save_tiny_text_encoder(tmp_path / "clip", full_clip=False)
    config = make_config(backbone={"name": "transformers", "model": str(vision), "layers": [2, 4]},
                         text_encoder=str(text), detection_head="conv")
    model = Discriminator(config)
    model.config.pixel_threshold = 0.3  # what training's calibration does
    model.save_pretrained(tmp_path / "ckpt")
    for directory in (vision, text):
        for f in directory.iterdir():
            f.unlink()
    loaded = Discriminator.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.pixel_threshold == 0.3 and loaded.config.text_dim == 24
    assert isinstance(loaded.type_embeddings, TextTypeEmbeddings)
    assert_same_outputs(model, loaded, size=32)


def test_bad_checkpoints_name_the_directory(tmp_path, model):
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    with pytest.raises(InputError, match="other_category") as err:
        Discriminator.from_pretrained(ckpt, expected_category="other_category")
    assert str(ckpt) in str(err.value)
    with pytest.raises(InputError, match="backbone"):
        Discriminator.from_pretrained(ckpt, expected_backbone="facebook/dinov2-small")
    with pytest.raises(InputError, match="not found"):
        Discriminator.from_pretrained(tmp_path / "nowhere")

    wider = json.loads((ckpt / CONFIG_NAME).read_text())
    wider["width"] = 32
    (ckpt / CONFIG_NAME).write_text(json.dumps(wider))
    with pytest.raises(InputError, match="does not match") as err:
        Discriminator.from_pretrained(ckpt)
    assert str(ckpt) in str(err.value)

    (ckpt / WEIGHTS_NAME).unlink()
    with pytest.raises(InputError, match=WEIGHTS_NAME):
        Discriminator.from_pretrained(ckpt)


def test_config_copied_from_another_checkpoint_is_refused(tmp_path, model):
    """Same architecture, other weights and thresholds: the recorded weights digest catches it;
    a checkpoint saved before the digest existed still loads."""
    model.save_pretrained(tmp_path / "a")
    other = Discriminator(make_config(seed=1))
    other.config.pixel_threshold = 0.3
    other.save_pretrained(tmp_path / "b")
    recorded = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["weights_sha256"]
    assert recorded == hashlib.sha256((tmp_path / "a" / WEIGHTS_NAME).read_bytes()).hexdigest()

    shutil.copy(tmp_path / "b" / CONFIG_NAME, tmp_path / "a" / CONFIG_NAME)
    refused = r"model\.safetensors is not the file this config\.json was saved with"
    with pytest.raises(InputError, match=refused) as err:
        Discriminator.from_pretrained(tmp_path / "a")
    assert str(tmp_path / "a") in str(err.value) and "\n" not in str(err.value)

    legacy = json.loads((tmp_path / "b" / CONFIG_NAME).read_text())
    del legacy["weights_sha256"]
    (tmp_path / "b" / CONFIG_NAME).write_text(json.dumps(legacy))
    assert Discriminator.from_pretrained(tmp_path / "b").config.pixel_threshold == 0.3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda(tmp_path, model):
    model.save_pretrained(tmp_path / "ckpt")
    cuda_model = Discriminator.from_pretrained(tmp_path / "ckpt", device="cuda")
    out = cuda_model(images().cuda())
    assert out.class_logits.device.type == "cuda"
    assert torch.allclose(out.class_logits.cpu(), model.eval()(images()).class_logits, atol=1e-3)


# --- few-shot type prototypes -----------------------------------------------------------------

def _shot(seed: int, type_id: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A random image whose left half is the defect of `type_id`."""
    type_map = torch.zeros(size, size, dtype=torch.long)
    type_map[:, : size // 2] = type_id
    return images(1, size, seed)[0], type_map


def test_prototypes_are_the_shots_region_features_and_pull_their_own_type(tmp_path):
    model = Discriminator(make_config()).eval()
    shots = [_shot(1, 1), _shot(2, 3)]  # blowhole and fray have a shot, crack has none
    model.build_prototypes(shots)
    assert model.config.prototypes and model.prototype_valid.tolist() == [True, False, True]
    # the prototype is the area-weighted mean feature over the defect region
    with torch.no_grad():
        feats = model_patch_features(model, shots[0][0])
    expected = feats[:, :, : feats.shape[-1] // 2].mean(dim=(1, 2))
    torch.testing.assert_close(model.type_prototypes[0], expected, rtol=1e-4, atol=1e-5)
    # each shot's own image: its defect region votes for its own type under the prototype logits
    with torch.no_grad():
        for (image, type_map), own in zip(shots, (0, 2)):
            logits = model.prototype_logits(model.backbone(image[None]), torch.zeros(1, 3, 64, 64),
                                            model.temperature, model.type_prototypes, model.prototype_valid)
            assert int(logits[0][:, type_map > 0].mean(dim=1).argmax()) == own
            # the type without a prototype sits at the mean of the others: no pull either way
            torch.testing.assert_close(logits[0, 1], logits[0, [0, 2]].mean(dim=0))
    # buffers travel in the checkpoint and the loaded model scores alike
    model.save_pretrained(tmp_path / "ckpt")
    loaded = Discriminator.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.prototypes and torch.equal(loaded.type_prototypes, model.type_prototypes)
    assert_same_outputs(model, loaded)


def test_centred_prototypes_compare_departures_from_the_normal_mean(tmp_path):
    model = Discriminator(make_config()).eval()
    shots, normals = [_shot(1, 1), _shot(2, 3)], [images(1, 64, 5)[0], images(1, 64, 6)[0]]
    model.build_prototypes(shots, normals=normals)
    assert model.config.prototype_center
    with torch.no_grad():
        center = torch.stack([model_patch_features(model, n).mean(dim=(1, 2)) for n in normals]).mean(dim=0)
        torch.testing.assert_close(model.normal_center, center, rtol=1e-4, atol=1e-5)
        # the logits are the cosines of (pixel - centre) and (prototype - centre), over the temperature
        image = shots[0][0]
        feats = model_patch_features(model, image)
        logits = model.prototype_logits(model.backbone(image[None]), torch.zeros(1, 3, *feats.shape[-2:]),
                                        model.temperature, model.type_prototypes, model.prototype_valid)
        pixels = torch.nn.functional.normalize(feats - center[:, None, None], dim=0)
        expected = torch.einsum("dhw,d->hw", pixels, torch.nn.functional.normalize(model.type_prototypes[0] - center, dim=0))
        torch.testing.assert_close(logits[0, 0], expected / model.temperature, rtol=1e-4, atol=1e-4)
        for (image, type_map), own in zip(shots, (0, 2)):
            logits = model.prototype_logits(model.backbone(image[None]), torch.zeros(1, 3, 64, 64),
                                            model.temperature, model.type_prototypes, model.prototype_valid)
            assert int(logits[0][:, type_map > 0].mean(dim=1).argmax()) == own
    # the centre travels in the checkpoint; a checkpoint without one loads uncentred
    model.save_pretrained(tmp_path / "ckpt")
    loaded = Discriminator.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.prototype_center and torch.equal(loaded.normal_center, model.normal_center)
    assert_same_outputs(model, loaded)
    plain = Discriminator(make_config()).eval()
    plain.build_prototypes(shots)
    assert not plain.config.prototype_center and not hasattr(plain, "normal_center")


def test_without_anomaly_shots_no_prototypes_are_added():
    model = Discriminator(make_config()).eval()
    before = model(images()).class_logits
    model.build_prototypes([(images(1)[0], torch.zeros(64, 64, dtype=torch.long))])
    assert not model.config.prototypes and not hasattr(model, "type_prototypes")
    torch.testing.assert_close(model(images()).class_logits, before)


def model_patch_features(model: Discriminator, image: torch.Tensor) -> torch.Tensor:
    from discriminator.memory import patch_features

    return patch_features(model.backbone(image[None]), model.prototype_levels)[0]
