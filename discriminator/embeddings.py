"""One embedding per anomaly type, the "queries" that pixel embeddings are matched against.

With a text encoder the types start from what their names mean (prompt-ensembled CLIP text
features, frozen and stored as a buffer so a checkpoint never needs the encoder again) and only
a linear projection into the model width is learned; without one each type is a free vector.
Normal has no embedding here: the discriminator treats it as "far from every anomaly type", or
measures each type against a normal embedding of its own (`DiscriminatorConfig.normal_embedding`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from discriminator.backbones import looks_like_path, model_load_error
from core.errors import InputError

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {type} defect",
    "a close-up photo of a {type} defect",
    "a photo of a {category} with a {type} defect",
    "a photo of a {type} on a {category}",
    "an industrial photo of a {category} with {type}",
)


class TypeEmbeddings(nn.Module):
    """Returns the (C, D) matrix of type embeddings, in class-id order."""

    num_types: int
    dim: int

    def forward(self) -> Tensor:
        raise NotImplementedError


class LearnedTypeEmbeddings(TypeEmbeddings):
    def __init__(self, num_types: int, dim: int):
        super().__init__()
        self.num_types, self.dim = num_types, dim
        self.weight = nn.Parameter(torch.randn(num_types, dim) * dim**-0.5)

    def forward(self) -> Tensor:
        return self.weight


class TextTypeEmbeddings(TypeEmbeddings):
    """Frozen text features (C, T) through a trainable projection to (C, D)."""

    def __init__(self, text_features: Tensor, dim: int):
        super().__init__()
        self.num_types, self.text_dim = text_features.shape
        self.dim = dim
        self.register_buffer("text_features", text_features.detach().float().clone())
        self.proj = nn.Linear(self.text_dim, dim)

    def forward(self) -> Tensor:
        return self.proj(self.text_features)

    @classmethod
    def from_text_encoder(
        cls,
        source: str,
        class_names: list[str],
        dim: int,
        category: str = "object",
        templates: tuple[str, ...] | list[str] = DEFAULT_TEMPLATES,
        local_files_only: bool = True,
    ) -> "TextTypeEmbeddings":
        return cls(encode_type_prompts(source, class_names, category, templates, local_files_only), dim)


def readable(name: str) -> str:
    """Dataset type names are identifiers ('broken_large', 'magnetic_tile'); prompts want words."""
    return name.replace("_", " ").replace("-", " ").lower()


def type_prompts(type_name: str, category: str, templates: tuple[str, ...] | list[str]) -> list[str]:
    return [t.format(type=readable(type_name), category=readable(category)) for t in templates]


@torch.no_grad()
def encode_type_prompts(
    source: str,
    class_names: list[str],
    category: str,
    templates: tuple[str, ...] | list[str] = DEFAULT_TEMPLATES,
    local_files_only: bool = True,
) -> Tensor:
    """(C, T): per type, the mean of its L2-normalised prompt embeddings, re-normalised."""
    if not class_names:
        raise InputError("no anomaly types to embed", source)
    tokenizer, model = load_text_encoder(source, local_files_only)
    features = []
    for name in class_names:
        batch = tokenizer(type_prompts(name, category, templates), padding=True, truncation=True, return_tensors="pt")
        emb = F.normalize(pooled_text_features(model, batch), dim=-1)
        features.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(features)


def load_text_encoder(source: str, local_files_only: bool):
    from transformers import AutoModel, AutoTokenizer

    if looks_like_path(source) and not Path(source).is_dir():
        raise model_load_error("text encoder", source, None, local_files_only)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        model = AutoModel.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError) as exc:
        raise model_load_error("text encoder (model + tokenizer)", source, exc, local_files_only) from exc
    return tokenizer, model.eval()


def pooled_text_features(model: nn.Module, batch) -> Tensor:
    """One vector per prompt: the joint-space projection for CLIP-like pairs, else the pooled output."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    if hasattr(model, "get_text_features"):
        out = model.get_text_features(**inputs)
    else:
        out = model(**inputs)
    if isinstance(out, Tensor):
        return out
    for key in ("text_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    mask = inputs["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1)
