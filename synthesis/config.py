"""Typed settings of the synthesis half (the `synthesis:` section of params.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.ranges import at_least, device_name, within


@dataclass
class DiffusionConfig:
    model: str | None = None  # local dir or Hub id of an inpainting checkpoint
    revision: str | None = None
    local_files_only: bool = True
    steps: int = field(default=10, metadata=at_least(1))
    guidance_scale: float = field(default=12.5, metadata=at_least(0))
    dtype: str = "auto"  # auto: fp32 on CPU, bf16/fp16 on GPU
    device: str = field(default="auto", metadata=device_name())
    compile: bool = False
    # low: harmonise the pasted real defect, keep its look
    few_shot_strength: float = field(default=0.3, metadata=within(0, 1, open_lo=True))
    # opt-in speed-up: decode only the mask's box grown by this many latent cells (8 px each), since
    # pixels outside the mask are pasted back anyway. The crop's GroupNorm statistics differ from the
    # whole image's, so the repainted pixels shift a little (like diffusers' tiled decoding). None:
    # decode the whole image, exactly as the pipeline does
    decode_context: int | None = field(default=None, metadata=at_least(0))


@dataclass
class SelectionConfig:
    clip_model: str | None = None  # local dir or Hub id; zero-shot diffusion candidates are scored with it
    local_files_only: bool = True
    # zero-shot without CLIP: "visibility" keeps the candidate that changed the surface most;
    # "strength_mix" keeps one strength drawn per request, so every strength is equally common
    zero_shot: str = "visibility"


@dataclass
class ForegroundConfig:
    model: str | None = None  # transformers segmentation model; classical when None
    local_files_only: bool = True
    min_fraction: float = field(default=0.05, metadata=within(0, 1))  # below this the whole image counts as foreground


@dataclass
class SynthesisConfig:
    backend: str = "auto"  # auto (diffusion when diffusion.model is set, else classical) | classical | diffusion
    images_per_type: int = field(default=40, metadata=at_least(1))
    shard_size: int = field(default=32, metadata=at_least(1))  # rows per Parquet shard = the unit of work and of resume
    batch_size: int = field(default=4, metadata=at_least(1))  # requests painted per backend call
    candidates: int = field(default=1, metadata=at_least(1))  # candidates per strength
    strengths: list[float] = field(default_factory=lambda: [0.4, 0.5, 0.6], metadata=within(0, 1, open_lo=True))
    # share of tasks made from real shots when there are any
    few_shot_fraction: float = field(default=0.5, metadata=within(0, 1))
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
