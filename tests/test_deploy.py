"""Export to ONNX / OpenVINO and the inferencers: the exported graph must give PyTorch's decisions.

Tolerance: anomaly maps and image scores within 1e-4 absolute of PyTorch's. Both are sigmoid
outputs in [0, 1] of the same float32 graph; the runtimes only reorder float32 sums (BatchNorm
folded into convolutions, other conv / matmul kernels), which moves them by ~1e-7 (measured on
the demo model). 1e-4 leaves room for other CPUs' kernels while staying far below anything a
decision sees (the type histogram has 1/1024 bins). The discrete outputs (decisions, types, type
maps) must be equal except where a value lies within that tolerance of its threshold.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.errors import InputError
from core.images import write_png
from discriminator.deploy.export import export_model
from discriminator.deploy.inferencers import OnnxInferencer, OpenVINOInferencer, TorchInferencer, load_inferencer
from discriminator.model import Discriminator, DiscriminatorConfig
from discriminator.predict import Predictor
from pipelines.predict import run_predict

ATOL = 1e-4
SIZE = 64


def textured_images(count: int, seed: int, defects: bool) -> torch.Tensor:
    """Smooth random textures; with `defects`, a dark square on each, so maps are not flat."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, SIZE // 8, SIZE // 8, generator=g)
    images = torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    images = (0.6 * images + 0.4 * torch.rand(count, 3, SIZE, SIZE, generator=g)).clamp(0, 1)
    if defects:
        for i in range(count):
            y, x = torch.randint(0, SIZE - 16, (2,), generator=g).tolist()
            images[i, :, y : y + 12, x : x + 12] = 0.05
    return images


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random-weight `knn` checkpoint (self-similarity, exposure matching, centred
    prototypes, the learned evidence in both maps and, as a few-shot model has it, the defect memory
    in both maps and the evidence branch with its own prototypes, as shipped; and the zero-shot model's normal embedding) with
    a filled memory and thresholds inside its value range (so decisions go both ways), and its two
    exports."""
    root = tmp_path_factory.mktemp("deploy")
    config = DiscriminatorConfig(category="tile", class_names=["scratch", "spot", "stain"], width=16, image_size=SIZE,
                                 backbone={"name": "efficientnet_lite0", "pretrained": False},
                                 detection_head="knn", self_similarity=True, exposure_match=True, image_top_k=20,
                                 normal_embedding=True, evidence_branch=True)
    model = Discriminator(config).eval()
    normals = list(textured_images(2, seed=1, defects=False))
    model.set_exposure_reference(normals)
    model.build_memory(normals)
    defect = textured_images(1, seed=3, defects=True)[0]
    model.build_defect_memory([(defect, (defect[0] < 0.1).long())], normals)
    model.build_prototypes([(defect, (defect[0] < 0.1).long())], normals=normals)
    recipe = textured_images(1, seed=4, defects=True)[0]  # the branch's own, as training builds them
    model.build_prototypes([(recipe, (recipe[0] < 0.1).long() * 2)], for_branch=True)
    assert model.config.branch_prototypes
    model.build_learned_evidence(normals, 0.25, image_weight=1.0)
    assert model.memory.defect_entries > 0 and model.config.learned_weight == 0.25
    assert model.config.image_evidence_weight == 1.0
    images = textured_images(6, seed=2, defects=True)
    with torch.no_grad():  # a random model's evidence stays below the shots' maximum: lower the ceiling
        features, _, class_logits = model.embed_and_type(images)  # so that the exports' hinge works
        z = model.detection_head.evidence(model.evidence_logits(features, class_logits))
        model.detection_head.evidence_ceiling.fill_(float(z.median()))
        at_ceiling = model(images).image_logits  # and the defect term's ceiling, below what the dark squares reach
        model.memory.defect_ceiling.fill_(0.0)
        assert not torch.allclose(model(images).image_logits, at_ceiling)
    first = Predictor(model, device="cpu")(images)
    model.config.pixel_threshold = float(first.anomaly_maps.quantile(0.9))
    model.config.image_threshold = float(first.scores.median())
    model.save_pretrained(root / "model")
    onnx_path = export_model(root / "model", "onnx")
    openvino_dir = export_model(root / "model", "openvino", root / "ov")
    return {"model": root / "model", "onnx": onnx_path, "openvino": openvino_dir, "images": images}


def near(values: torch.Tensor, threshold: float) -> torch.Tensor:
    return (values - threshold).abs() <= ATOL


@pytest.mark.parametrize("form", ["onnx", "openvino"])
def test_export_matches_pytorch_within_tolerance(exported, form):
    reference = load_inferencer(exported["model"], device="cpu")
    runtime = load_inferencer(exported[form])
    assert isinstance(reference, TorchInferencer)
    assert isinstance(runtime, OnnxInferencer if form == "onnx" else OpenVINOInferencer)
    # the metadata carried by the export is the checkpoint's
    assert runtime.class_names == reference.class_names == ["normal", "scratch", "spot", "stain"]
    assert runtime.metadata == reference.metadata
    images = exported["images"][:5]  # a batch size the export never saw
    ours, theirs = reference(images), runtime(images)
    for name in ("anomaly_maps", "scores", "type_mass", "class_ids", "type_maps", "anomalous", "types"):
        assert getattr(theirs, name).dtype == getattr(ours, name).dtype, name
        assert getattr(theirs, name).shape == getattr(ours, name).shape, name
    assert float((ours.anomaly_maps - theirs.anomaly_maps).abs().max()) <= ATOL
    assert float((ours.scores - theirs.scores).abs().max()) <= ATOL
    assert ours.anomalous.any() and not ours.anomalous.all()  # the thresholds are exercised
    meta = reference.metadata
    settled = ~near(ours.scores, meta.image_threshold)
    assert torch.equal(ours.anomalous[settled], theirs.anomalous[settled])
    assert torch.equal(ours.types[settled], theirs.types[settled])
    pixel_settled = ~near(ours.anomaly_maps, meta.pixel_threshold)
    agree = ours.class_ids == theirs.class_ids
    assert float(agree.float().mean()) > 0.999  # argmax differs only at near-ties
    same_type_map = ours.type_maps == theirs.type_maps
    assert bool(same_type_map[pixel_settled & agree].all())
    # the type histogram holds the same probability mass; a pixel may only change bin at a boundary
    assert torch.allclose(ours.type_mass.sum(dim=1), theirs.type_mass.sum(dim=1), rtol=1e-4, atol=1e-3)


def test_openvino_streams_split_the_batch_and_gather_it_in_order(exported):
    one = OpenVINOInferencer(exported["openvino"])
    two = OpenVINOInferencer(exported["openvino"], streams=2)
    assert len(two.requests) == 2
    for images in (exported["images"][:5], exported["images"][:1]):  # uneven halves; fewer images than streams
        a, b = one(images), two(images)
        for name in ("anomaly_maps", "scores", "types", "type_maps"):
            assert getattr(b, name).shape == getattr(a, name).shape, name
        torch.testing.assert_close(b.anomaly_maps, a.anomaly_maps, atol=ATOL, rtol=0)
        torch.testing.assert_close(b.scores, a.scores, atol=ATOL, rtol=0)
    with pytest.raises(InputError, match="streams"):
        OpenVINOInferencer(exported["openvino"], streams=0)


def test_predict_gives_the_same_json_lines_from_every_form(exported, tmp_path):
    paths = []
    for i, image in enumerate(exported["images"][:3]):
        path = tmp_path / f"part{i}.png"
        write_png(path, (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        paths.append(str(path))
    records = {form: list(run_predict(paths, exported[form], device="cpu", batch_size=2))
               for form in ("model", "onnx", "openvino")}
    records["openvino-xml"] = list(run_predict(paths, exported["openvino"] / "model.xml", batch_size=2))
    for form, lines in records.items():
        assert [json.loads(json.dumps(r))["path"] for r in lines] == paths, form
        for line, ref in zip(lines, records["model"]):
            assert abs(line["score"] - ref["score"]) <= ATOL, form
            assert set(line) == set(ref)


def test_export_never_overwrites_what_it_did_not_make(exported, tmp_path):
    foreign = tmp_path / "notes.onnx"
    foreign.write_text("mine")
    with pytest.raises(InputError, match="refusing to overwrite"):
        export_model(exported["model"], "onnx", foreign)
    assert foreign.read_text() == "mine"
    folder = tmp_path / "ov"
    folder.mkdir()
    (folder / "photo.png").write_bytes(b"x")
    with pytest.raises(InputError, match="refusing to overwrite"):
        export_model(exported["model"], "openvino", folder)
    assert (folder / "photo.png").exists()
    with pytest.raises(InputError, match="unknown export format"):
        export_model(exported["model"], "tflite")


def test_a_file_that_is_not_our_export_is_input_error(exported, tmp_path):
    import onnx

    proto = onnx.load(str(exported["onnx"]))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(InputError, match="metadata"):
        load_inferencer(bare)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_text("not onnx")
    with pytest.raises(InputError, match="garbage.onnx"):
        load_inferencer(garbage)
    with pytest.raises(InputError, match="not a model"):
        load_inferencer(tmp_path)


def test_exports_in_a_fresh_process_one_after_another(exported, tmp_path):
    """A process whose first self-similarity call is made while exporting (`uniadc export`,
    `bench_predict.py` exporting ONNX then OpenVINO) must not keep the tracer's tensors: the second
    export failed with "fake tensor in the exported program constant's list"."""
    from discriminator.memory import _reference_mask_on

    _reference_mask_on.cache_clear()  # as in a fresh process
    first = export_model(exported["model"], "onnx", tmp_path / "a.onnx")
    second = export_model(exported["model"], "onnx", tmp_path / "b.onnx")
    images = exported["images"]
    a, b = OnnxInferencer(first)(images), OnnxInferencer(second)(images)
    torch.testing.assert_close(a.anomaly_maps, b.anomaly_maps)
    eager = Predictor(Discriminator.from_pretrained(exported["model"]), device="cpu")(images)
    assert (a.anomaly_maps - eager.anomaly_maps).abs().max() <= ATOL


def test_a_memory_backbone_exports_with_the_memory(tmp_path):
    """With `memory_backbone` the exported graph holds both backbones and gives PyTorch's maps and scores."""
    config = DiscriminatorConfig(category="tile", class_names=["scratch", "spot"], width=16, image_size=SIZE,
                                 backbone={"name": "efficientnet_lite2", "pretrained": False},
                                 memory_backbone={"name": "efficientnet_lite0", "pretrained": False},
                                 detection_head="knn", self_similarity=True, exposure_match=True, image_top_k=20)
    model = Discriminator(config).eval()
    normals = list(textured_images(2, seed=1, defects=False))
    model.set_exposure_reference(normals)
    model.build_memory(normals)
    model.save_pretrained(tmp_path / "model")
    images = textured_images(3, seed=2, defects=True)
    ours = load_inferencer(tmp_path / "model", device="cpu")(images)
    theirs = load_inferencer(export_model(tmp_path / "model", "onnx"))(images)
    assert float((ours.anomaly_maps - theirs.anomaly_maps).abs().max()) <= ATOL
    assert float((ours.scores - theirs.scores).abs().max()) <= ATOL
