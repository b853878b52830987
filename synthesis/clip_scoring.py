"""Zero-shot candidate score: does the painted region look like THIS anomaly type to CLIP?

Each candidate's mask region is cropped with context and compared with one text embedding per
class: this type, every other type of the category, and "a photo of a normal {category}". The
cosine similarities are scaled by CLIP's learned `logit_scale.exp()` (without it cosines sit
within ~0.1 of each other and the softmax is nearly uniform) and softmaxed; the score is the
probability of the request's type. The normal class is always a negative, so a category with a
single anomaly type still gets a meaningful score instead of a constant 1.0.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from core.errors import InputError
from synthesis.backends.base import Candidate, PaintRequest


def region_crop(image: np.ndarray, mask: np.ndarray, context: float = 0.5, min_side: int = 16) -> np.ndarray:
    """A square crop around the mask's box, grown by `context` x its size (CLIP judges a defect by its surroundings)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return image
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) * (1 + 2 * context)
    side = int(min(max(side, min_side), h, w))
    top = int(np.clip(round(cy - side / 2), 0, h - side))
    left = int(np.clip(round(cx - side / 2), 0, w - side))
    return image[top : top + side, left : left + side]


def _features(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput (projected features in pooler_output), 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipRegionScorer:
    """`CandidateScorer`: probability of the request's anomaly type for the candidate's masked region.

    `source` is a local dir / Hub id, or an already-built `(CLIPModel, CLIPProcessor)` pair.
    `type_prompts` maps each anomaly type of `category` to one or more prompts (ensembled: the
    mean of their normalised embeddings); an empty list means "a photo of a {category} with a {type}".
    """

    def __init__(
        self,
        source: str | tuple,
        type_prompts: Mapping[str, Sequence[str]],
        category: str,
        *,
        local_files_only: bool = True,
        context: float = 0.5,
    ):
        if not type_prompts:
            raise ValueError("need prompts for at least one anomaly type")
        self.model, self.processor = self._load(source, local_files_only) if isinstance(source, str) else source
        self.model.eval()
        self.category = category
        self.context = context
        self.classes = list(type_prompts) + ["normal"]
        # a type listed without prompts gets the config's default wording
        prompts = [list(type_prompts[t]) or [f"a photo of a {category} with a {t}"] for t in type_prompts]
        prompts.append([f"a photo of a normal {category}"])
        self.text_embeddings = self._encode_classes(prompts)  # (classes, dim), unit norm

    @staticmethod
    def _load(model_id_or_dir: str, local_files_only: bool):
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(model_id_or_dir, local_files_only=local_files_only)
            processor = CLIPProcessor.from_pretrained(model_id_or_dir, local_files_only=local_files_only)
        except (OSError, ValueError) as err:
            raise InputError(
                "cannot load the CLIP model for candidate selection (a local directory with a CLIP "
                "checkpoint, or a Hub id with synthesis.selection.local_files_only: false): " + str(err),
                path=model_id_or_dir,
            ) from err
        return model, processor

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _encode_classes(self, prompts: list[list[str]]) -> torch.Tensor:
        flat = [p for group in prompts for p in group]
        tokens = self.processor(text=flat, return_tensors="pt", padding=True, truncation=True)
        tokens = {k: v.to(self._device) for k, v in tokens.items()}
        embeds = torch.nn.functional.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1)
        per_class = torch.stack([chunk.mean(0) for chunk in embeds.split([len(g) for g in prompts])])
        return torch.nn.functional.normalize(per_class, dim=-1)

    @torch.no_grad()
    def class_probabilities(self, candidates: Sequence[Candidate]) -> np.ndarray:
        """(candidates, classes) softmax of logit_scale x cosine(region, class text); classes as `self.classes`."""
        crops = [region_crop(c.image, c.mask, self.context) for c in candidates]
        pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"]
        param = next(self.model.parameters())
        image = _features(self.model.get_image_features(pixel_values=pixels.to(param.device, param.dtype)))
        image = torch.nn.functional.normalize(image.float(), dim=-1)
        logits = self.model.logit_scale.exp().float() * image @ self.text_embeddings.T
        return logits.softmax(dim=-1).cpu().numpy()

    def score(self, request: PaintRequest, candidates: Sequence[Candidate]) -> list[float]:
        if request.anomaly_type not in self.classes[:-1]:
            raise ValueError(f"no prompts for anomaly type {request.anomaly_type!r}; known: {self.classes[:-1]}")
        column = self.classes.index(request.anomaly_type)
        return [float(p) for p in self.class_probabilities(candidates)[:, column]]
