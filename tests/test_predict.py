"""Predictor decisions on hand-made logits, and `run_predict` end to end on a saved checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from discriminator.model import Discriminator, DiscriminatorConfig, DiscriminatorOutput
from discriminator.predict import Predictor, channel_argmax, top_k_scores
from core.errors import InputError
from core.images import read_image, write_png
from pipelines.predict import run_predict

LOGIT = {0.9: 2.1972246, 0.8: 1.3862944, 0.6: 0.4054651, 0.1: -2.1972246}  # logit(p)


class FixedModel(nn.Module):
    """Returns the same logits for every image: decisions can be checked by hand."""

    def __init__(self, probabilities: list[list[float]], type_probs: list[list[list[float]]], **thresholds):
        super().__init__()
        self.config = DiscriminatorConfig(category="tile", class_names=["scratch", "spot"], **thresholds)
        self.detection = torch.logit(torch.tensor(probabilities))[None, None]
        self.classes = torch.log(torch.tensor(type_probs)).permute(2, 0, 1)[None]

    def forward(self, images: torch.Tensor) -> DiscriminatorOutput:
        b = len(images)
        return DiscriminatorOutput(self.classes.expand(b, -1, -1, -1), self.detection.expand(b, -1, -1, -1))


# a 2x2 image; type probabilities per pixel over (scratch, spot)
MAP = [[0.9, 0.8], [0.6, 0.1]]
TYPES = [[[0.55, 0.45], [0.55, 0.45]], [[0.01, 0.99], [0.99, 0.01]]]


def predict(**thresholds):
    return Predictor(FixedModel(MAP, TYPES, **thresholds), device="cpu")(torch.zeros(1, 3, 2, 2))


def test_maps_types_and_scores_follow_the_thresholds():
    p = predict(pixel_threshold=0.5, image_threshold=0.7, image_top_k=2)
    torch.testing.assert_close(p.anomaly_maps[0], torch.tensor(MAP))
    # above 0.5 every pixel takes the image's type (scratch, from the top-2 pixels), normal (0) elsewhere
    assert p.type_maps[0].tolist() == [[1, 1], [1, 0]]
    # per pixel: each flagged pixel its own argmax type
    per_pixel = predict(pixel_threshold=0.5, image_threshold=0.7, image_top_k=2, pixel_types="pixel")
    assert per_pixel.type_maps[0].tolist() == [[1, 1], [2, 0]] and per_pixel.types.tolist() == [1]
    assert p.scores[0].item() == pytest.approx(0.85)  # mean of the top 2 pixels
    assert p.anomalous.tolist() == [True]
    # typed by the top-2 pixels, those of the score (0.9, 0.8): scratch 1.10 vs spot 0.90
    assert p.types.tolist() == [1]


def test_image_type_is_the_type_of_the_top_k_pixels():
    # top 3 (0.9, 0.8, 0.6): by pixel votes scratch wins 2:1, but summed probability picks spot
    # (1.89 vs 1.11); the 0.1 pixel, which would make it scratch again, is not among them
    assert predict(pixel_threshold=0.5, image_threshold=0.5, image_top_k=3).types.tolist() == [2]
    assert predict(pixel_threshold=0.5, image_threshold=0.05, image_top_k=4).types.tolist() == [1]  # 2.1 vs 1.9
    # the pixel threshold plays no part in the image type
    assert predict(pixel_threshold=0.95, image_threshold=0.5, image_top_k=3).types.tolist() == [2]


def test_normal_image_has_type_zero_whatever_its_pixels():
    p = predict(pixel_threshold=0.5, image_threshold=0.9, image_top_k=2)
    assert p.anomalous.tolist() == [False] and p.types.tolist() == [0]
    assert p.type_maps.any()  # the pixel map still shows what is above the pixel threshold


def test_anomalous_image_without_anomalous_pixel_still_gets_a_type():
    p = predict(pixel_threshold=0.95, image_threshold=0.5, image_top_k=2)
    assert p.anomalous.tolist() == [True] and not p.type_maps.any()
    assert p.types.tolist() in ([1], [2])


def test_top_k_scores_is_mean_of_largest():
    maps = torch.tensor([[[0.0, 1.0], [0.5, 0.25]]])
    assert top_k_scores(maps, 2).tolist() == [0.75]
    assert top_k_scores(maps, 100).tolist() == [0.4375]  # k capped at the pixel count


def test_channel_argmax_is_torch_argmax_with_first_index_on_ties():
    x = torch.rand(2, 5, 7, 9, generator=torch.Generator().manual_seed(0))
    x[:, 3, :2] = x[:, 1, :2] = 2.0  # ties: the first index wins, as in torch
    assert torch.equal(channel_argmax(x), x.argmax(dim=1))
    assert channel_argmax(x)[:, :2].eq(1).all()


@pytest.fixture()
def checkpoint(tmp_path):
    config = DiscriminatorConfig(category="tile", class_names=["scratch", "spot"], width=16, image_size=64,
                                 backbone={"name": "efficientnet_lite0", "pretrained": False}, image_top_k=10)
    Discriminator(config).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_run_predict_yields_one_record_and_overlay_per_image(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for folder in ("a", "b"):  # the same file name in two folders must not share an overlay
        path = tmp_path / folder / "part.png"
        write_png(path, rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        paths.append(str(path))
    records = list(run_predict(paths, checkpoint, out_dir=tmp_path / "overlays", device="cpu", batch_size=1))
    assert [r["path"] for r in records] == paths
    assert len({r["overlay"] for r in records}) == 2
    for record in records:
        json.dumps(record)  # JSON lines for scripts
        assert record["type"] in ("normal", "scratch", "spot") and 0 <= record["score"] <= 1
        assert (record["type"] == "normal") == (not record["anomalous"])
        assert read_image(record["overlay"]).shape == (64, 64, 3)  # at the checkpoint's resolution
    assert list(run_predict(paths[:1], checkpoint))[0]["overlay"] is None


def test_a_bad_file_gets_an_error_record_and_the_rest_of_its_batch_is_scored(checkpoint, tmp_path):
    rng = np.random.default_rng(1)
    good = [tmp_path / f"good{i}.png" for i in range(3)]
    for path in good:
        write_png(path, rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    paths = [str(good[0]), str(broken), str(good[1]), str(tmp_path / "missing.png"), str(good[2])]
    records = list(run_predict(paths, checkpoint, device="cpu", batch_size=2))
    assert [r["path"] for r in records] == paths
    assert "cannot decode image" in records[1]["error"] and "error" not in records[0]
    assert "missing.png" not in records[3]["error"] and records[3]["error"]  # the path is its own field
    alone = [next(run_predict([str(p)], checkpoint, device="cpu")) for p in good]
    assert [records[i]["score"] for i in (0, 2, 4)] == [r["score"] for r in alone]
    assert list(run_predict([str(broken)], checkpoint))[0]["path"] == str(broken)  # a batch of only bad files
    with pytest.raises(InputError):
        list(run_predict([str(broken)], tmp_path / "no_model"))


def test_cli_predict_goes_on_after_a_bad_file_and_exits_2(checkpoint, tmp_path, monkeypatch, capsys):
    from tests.test_cli import run_main

    good = tmp_path / "good.png"
    write_png(good, np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "broken.png").write_text("not an image")
    code, stderr, stdout = run_main(["predict", "broken.png", "good.png", "--model", str(checkpoint),
                                     "--device", "cpu"], tmp_path, monkeypatch, capsys)
    assert code == 2
    broken, scored = [json.loads(line) for line in stdout.splitlines()]
    assert broken["path"] == "broken.png" and "cannot decode image" in broken["error"]
    assert scored["path"] == "good.png" and 0 <= scored["score"] <= 1
    assert stderr.strip().splitlines() == ['error: 1 of 2 images could not be scored (see their "error" lines)']


def test_cli_predict_with_an_unknown_device_is_one_line(checkpoint, tmp_path, monkeypatch, capsys):
    from tests.test_cli import run_main

    code, stderr, stdout = run_main(["predict", "x.png", "--model", str(checkpoint), "--device", "gpu0"],
                                    tmp_path, monkeypatch, capsys)
    assert code == 2 and stdout == ""
    assert stderr.strip().splitlines() == ["error: unknown device 'gpu0'; use auto, cpu, cuda, cuda:N, mps or xpu"]
