"""Typed settings of the synthesis half (the `synthesis:` section of params.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DiffusionConfig:
    model: str | None = None  # local dir or Hub id of an inpainting checkpoint
    revision: str | None = None
    local_files_only: bool = True
    steps: int = 10
    guidance_scale: float = 12.5
    dtype: str = "auto"  # auto: fp32 on CPU, bf16/fp16 on GPU
    device: str = "auto"
    compile: bool = False
    few_shot_strength: float = 0.3  # low: harmonise the pasted real defect, keep its look
    # opt-in speed-up: decode only the mask's box grown by this many latent cells (8 px each), since
    # pixels outside the mask are pasted back anyway. The crop's GroupNorm statistics differ from the
    # whole image's, so the repainted pixels shift a little (like diffusers' tiled decoding). None:
    # decode the whole image, exactly as the pipeline does
    decode_context: int | None = None


@dataclass
class SelectionConfig:
    clip_model: str | None = None  # local dir or Hub id; zero-shot diffusion candidates are scored with it
    local_files_only: bool = True


@dataclass
class ForegroundConfig:
    model: str | None = None  # transformers segmentation model; classical when None
    local_files_only: bool = True
    min_fraction: float = 0.05  # below this the whole image counts as foreground


@dataclass
class SynthesisConfig:
    backend: str = "auto"  # auto (diffusion when diffusion.model is set, else classical) | classical | diffusion
    images_per_type: int = 40
    shard_size: int = 32  # rows per Parquet shard = the unit of work and of resume
    batch_size: int = 4  # requests painted per backend call
    candidates: int = 1  # candidates per strength
    strengths: list[float] = field(default_factory=lambda: [0.4, 0.5, 0.6])
    few_shot_fraction: float = 0.5  # share of tasks made from real shots when there are any
    # per anomaly type: prior names ("ellipse", "brush:tiny", "rectangle:small", ...); "default" for the rest
    priors: dict[str, list[str]] = field(default_factory=dict)
    # per anomaly type: classical recipe name; missing types get one by keyword of their name
    recipes: dict[str, str] = field(default_factory=dict)
    # per anomaly type: prompts, one drawn per task; missing types get "a photo of a {category} with a {type}"
    prompts: dict[str, list[str]] = field(default_factory=dict)
    negative_prompt: str | None = None
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    foreground: ForegroundConfig = field(default_factory=ForegroundConfig)
