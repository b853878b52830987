"""Diffusion inpainting backend (diffusers): repaint the mask with a text prompt, several strengths at once.

Why a custom denoising loop: diffusers' inpainting pipelines take ONE `strength` per call. With
`steps` scheduler steps, strength s runs the last int(steps * s) of the SAME timestep schedule,
so the schedules of all strengths are suffixes of the longest one and share their timestep at
every step. We therefore run one UNet call per step over every candidate whose schedule has
started (lower strengths join later), with one scheduler copy per strength so multistep
schedulers keep their own history. The text encoder runs once per request and the VAE encodes
each request once, not once per strength and candidate. The random draws per candidate are those
of the pipeline called with that candidate's generator, so the loop reproduces
`pipeline(strength=s)` (tests check it) while making far fewer model calls.

Why the VAE can decode only around the mask (`decode_context`, opt-in): every pixel outside the
mask is pasted back from the source, so a whole-image decode spends most of the decoder on pixels
that are thrown away. A crop with a few latent cells of context decodes the masked pixels nearly
as the whole image does, but not exactly: the decoder's GroupNorm statistics and mid-block
attention see only the crop (the approximation diffusers' tiled VAE decoding makes). Off by
default, so the default output is the pipeline's own.

Pipelines the loop does not cover (SDXL's extra conditioning, 4-channel UNets, LCM-style guidance
embeddings, transformer pipelines without a UNet such as SD3 and Flux) fall back to one pipeline
call per strength, all requests and candidates batched, with the pipeline's own defaults (no
negative prompt is sent as None, which SDXL encodes as zeros, not as "").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from core.errors import InputError
from core.ranges import DEVICE_NAMES, is_device_name
from synthesis.backends.base import Candidate, PaintRequest
from synthesis.config import DiffusionConfig
from synthesis.seeding import derive_seed, torch_generator


def resolve_device(name: str) -> torch.device:
    """auto: this process's current CUDA device (one per rank under `accelerate launch`), else CPU.
    A CUDA device asked for on a machine without it is one clear `InputError`, not a traceback."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if not is_device_name(name):
        raise InputError(f"unknown synthesis.diffusion.device {name!r}; use {DEVICE_NAMES}")
    device = torch.device(name)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise InputError(
            f"synthesis.diffusion.device {name!r} asked for, but this machine has {count} CUDA device(s)"
        )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (half precision is slow or unsupported there); bf16 on GPUs that have it, else fp16."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtypes = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
              "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in dtypes:
        raise InputError(f"unknown synthesis.diffusion.dtype {name!r}; use one of auto, {', '.join(dtypes)}")
    return dtypes[name]


def use_sdpa(pipeline) -> None:
    """Make sure every attention layer runs torch's scaled_dot_product_attention (fused kernels)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for name in ("unet", "vae"):
        module = getattr(pipeline, name, None)
        processors = getattr(module, "attn_processors", None)
        if processors and not all(isinstance(p, AttnProcessor2_0) for p in processors.values()):
            module.set_attn_processor(AttnProcessor2_0())


def tune_for_device(pipeline) -> None:
    """SDPA attention everywhere; on CPU the VAE takes one image at a time (diffusers' slicing),
    which measured faster per image there than a batch (its 256-px activations outgrow the caches)."""
    use_sdpa(pipeline)
    if pipeline._execution_device.type == "cpu" and hasattr(pipeline.vae, "use_slicing"):
        pipeline.vae.enable_slicing()


def load_inpaint_pipeline(cfg: DiffusionConfig):
    """The checkpoint's inpainting pipeline on the configured device/dtype; one InputError when missing."""
    from diffusers import AutoPipelineForInpainting, DiffusionPipeline

    if not cfg.model:
        raise InputError(
            "synthesis.diffusion.model is not set: give a local directory or a Hub id of an inpainting "
            "checkpoint (e.g. stable-diffusion-v1-5/stable-diffusion-inpainting)",
            path="params.yaml",
        )
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    hint = (
        "is not an inpainting checkpoint that can be loaded (a local directory with model_index.json, "
        "or a Hub id; set synthesis.diffusion.local_files_only: false to download it, or pre-fetch it "
        "with `huggingface-cli download`)"
    )
    try:
        index = DiffusionPipeline.load_config(
            cfg.model, revision=cfg.revision, local_files_only=cfg.local_files_only
        )
        kwargs = dict(revision=cfg.revision, local_files_only=cfg.local_files_only, dtype=dtype)
        if "safety_checker" in index:  # classifies whole images; useless on defect close-ups
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            pipeline = AutoPipelineForInpainting.from_pretrained(cfg.model, **kwargs)
        except ValueError:  # a class AutoPipeline does not map: trust model_index.json's _class_name
            pipeline = DiffusionPipeline.from_pretrained(cfg.model, **kwargs)
    except (OSError, ValueError) as err:
        raise InputError(f"{hint}: {err}", path=cfg.model) from err
    return pipeline.to(device)


@dataclass(frozen=True)
class _Job:
    """One candidate to render: which request, at which strength, under which seed key."""

    request: int
    strength: float
    index: int  # candidate index within the request: the seed key


@dataclass
class _Track:
    """The candidates sharing one strength: their scheduler copy, timesteps and latents."""

    jobs: list[int]  # positions in the job list
    scheduler: object
    timesteps: torch.Tensor
    latents: torch.Tensor


class DiffusionBackend:
    """`PaintBackend` on a diffusers inpainting pipeline (SD 1.5/2 inpainting batched; others per strength)."""

    name = "diffusion"

    def __init__(
        self,
        pipeline,
        *,
        steps: int = 10,
        guidance_scale: float = 12.5,
        few_shot_strength: float = 0.3,
        candidates: int = 1,
        batch_strengths: bool = True,
        decode_context: int | None = None,
        model_id: str | None = None,
        revision: str | None = None,
    ):
        self.pipeline = pipeline
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.few_shot_strength = few_shot_strength
        self.candidates = candidates
        self.batch_strengths = batch_strengths and self._loop_supports(pipeline)
        if decode_context is not None and decode_context < 0:
            raise ValueError(f"decode_context must be >= 0 latent cells or None, got {decode_context}")
        self.decode_context = decode_context
        self.model_id = model_id
        self.revision = revision
        pipeline.set_progress_bar_config(disable=True)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, candidates: int = 1) -> "DiffusionBackend":
        if cfg.decode_context is not None and cfg.decode_context < 0:  # before loading gigabytes
            raise InputError(
                f"synthesis.diffusion.decode_context must be latent cells >= 0 or null, got {cfg.decode_context}",
                path="params.yaml",
            )
        pipeline = load_inpaint_pipeline(cfg)
        tune_for_device(pipeline)
        if cfg.compile:
            denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
            if denoiser is not None:
                denoiser.compile()
        return cls(
            pipeline, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
            few_shot_strength=cfg.few_shot_strength, candidates=candidates,
            decode_context=cfg.decode_context, model_id=cfg.model, revision=cfg.revision,
        )

    @staticmethod
    def _loop_supports(pipeline) -> bool:
        """SD 1.5/2 inpainting with a 9-channel UNet and no guidance embedding. Anything else,
        transformer pipelines without a `unet` included (SD3, Flux), takes the pipeline's own call."""
        from diffusers import StableDiffusionInpaintPipeline

        unet = getattr(pipeline, "unet", None)
        return (
            isinstance(pipeline, StableDiffusionInpaintPipeline)
            and unet is not None
            and unet.config.in_channels == 9
            and unet.config.time_cond_proj_dim is None
        )

    # ---------------------------------------------------------------- public

    def paint(self, requests: Sequence[PaintRequest], strengths: Sequence[float]) -> list[list[Candidate]]:
        """Candidates per request: zero-shot one per (strength x candidate); few-shot the same count,
        all at `few_shot_strength` (they differ by seed; SSIM selection picks among them)."""
        # 1. check inputs and plan one job per candidate
        for request in requests:
            self._check_request(request)
        jobs = self._plan(requests, strengths)
        # 2. render per working size (a batch shares one latent shape)
        pixels: list[np.ndarray | None] = [None] * len(jobs)
        for size, positions in self._by_working_size(requests, jobs).items():
            sub_jobs = [jobs[p] for p in positions]
            render = self._render_batched if self.batch_strengths else self._render_per_strength
            for p, image in zip(positions, render(requests, sub_jobs, size)):
                pixels[p] = image
        # 3. back to the source size, pixels outside the mask exactly the source's
        out: list[list[Candidate]] = [[] for _ in requests]
        for job, image in zip(jobs, pixels):
            request = requests[job.request]
            out[job.request].append(
                Candidate(
                    image=_paste_back(image, request), mask=request.mask.copy(),
                    strength=job.strength, index=job.index,
                )
            )
        return out

    # ---------------------------------------------------------------- planning

    @staticmethod
    def _check_request(request: PaintRequest) -> None:
        h, w = request.image.shape[:2]
        if request.image.ndim != 3 or request.image.shape[2] != 3 or request.image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {request.image.shape} {request.image.dtype}")
        if request.mask.shape != (h, w):
            raise ValueError(f"mask shape {request.mask.shape} does not match image {(h, w)}")
        if request.reference is not None and request.reference.shape != request.image.shape:
            raise ValueError("reference must have the image's shape")

    def _plan(self, requests: Sequence[PaintRequest], strengths: Sequence[float]) -> list[_Job]:
        if not strengths:
            raise ValueError("need at least one strength")
        jobs = []
        for r, request in enumerate(requests):
            slots = [self.few_shot_strength] * len(strengths) if request.few_shot else list(strengths)
            for k, strength in enumerate(slots):
                self._steps_for(strength)  # fail early on a strength that runs no step
                for c in range(self.candidates):
                    jobs.append(_Job(request=r, strength=float(strength), index=k * self.candidates + c))
        return jobs

    def _steps_for(self, strength: float) -> int:
        """Denoising steps a strength runs: diffusers' rule (img2img `get_timesteps`)."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        steps = min(int(self.steps * strength), self.steps)
        if steps < 1:
            raise ValueError(f"strength {strength} with {self.steps} steps runs no denoising step")
        return steps

    def _size_multiple(self) -> int:
        """Image sides must divide by the VAE factor times the UNet's downsampling; for a
        transformer pipeline (SD3, Flux), by its image processor's factor (Flux's includes its 2x2
        latent packing) times the transformer's patch size."""
        pipe = self.pipeline
        unet = getattr(pipe, "unet", None)
        if unet is not None:
            return pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        processor = getattr(pipe, "image_processor", None)
        factor = getattr(getattr(processor, "config", None), "vae_scale_factor", None) or pipe.vae_scale_factor
        patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", None) or 1
        return factor * patch

    def _by_working_size(self, requests, jobs) -> dict[tuple[int, int], list[int]]:
        m = self._size_multiple()
        groups: dict[tuple[int, int], list[int]] = {}
        for p, job in enumerate(jobs):
            h, w = requests[job.request].image.shape[:2]
            size = (max(m, round(h / m) * m), max(m, round(w / m) * m))
            groups.setdefault(size, []).append(p)
        return groups

    def _generators(self, requests, jobs) -> list[torch.Generator]:
        # CPU generators: the same noise on CPU and GPU, whatever the batch
        return [torch_generator(derive_seed(requests[j.request].seed, j.index)) for j in jobs]

    # ---------------------------------------------------------------- inputs

    def _pipeline_inputs(self, requests, jobs, size):
        """Per request: the image to start from (the reference for few-shot), its mask, prompts."""
        used = sorted({j.request for j in jobs})
        images, masks, prompts, negatives = [], [], [], []
        for r in used:
            request = requests[r]
            start = request.reference if request.few_shot else request.image
            images.append(Image.fromarray(_resize(start, size, cv2.INTER_AREA)))
            masks.append(Image.fromarray(_latent_cover(request.mask, size, self.pipeline.vae_scale_factor)))
            prompts.append(request.prompt)
            # None stays None: SDXL (force_zeros_for_empty_prompt) uses zero embeddings for None, not ""
            negatives.append(request.negative_prompt)
        return used, images, masks, prompts, negatives

    # ---------------------------------------------------------------- rendering

    def _render_per_strength(self, requests, jobs, size) -> list[np.ndarray]:
        """One pipeline call per strength; every request and candidate of that strength batched."""
        used, images, masks, prompts, negatives = self._pipeline_inputs(requests, jobs, size)
        slot = {r: i for i, r in enumerate(used)}
        generators = self._generators(requests, jobs)
        out: list[np.ndarray | None] = [None] * len(jobs)
        # one call per strength, split by whether a negative prompt is set: the pipeline takes
        # negative_prompt=None (its own default) or a list of strings, not a mix
        calls: dict[tuple[float, bool], list[int]] = {}
        for p, job in enumerate(jobs):
            calls.setdefault((job.strength, negatives[slot[job.request]] is None), []).append(p)
        for (strength, no_negative), group in sorted(calls.items()):
            pick = [slot[jobs[p].request] for p in group]
            result = self.pipeline(
                prompt=[prompts[i] for i in pick],
                negative_prompt=None if no_negative else [negatives[i] for i in pick],
                image=[images[i] for i in pick], mask_image=[masks[i] for i in pick],
                height=size[0], width=size[1], strength=strength, num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale, generator=[generators[p] for p in group], output_type="np",
            ).images
            for p, image in zip(group, result):
                out[p] = _to_uint8(image)
        return out

    @torch.no_grad()
    def _render_batched(self, requests, jobs, size) -> list[np.ndarray]:
        """All strengths in one staggered denoising loop (see module docstring)."""
        pipe = self.pipeline
        device, dtype = pipe._execution_device, pipe.unet.dtype
        cfg = self.guidance_scale > 1.0
        used, images, masks, prompts, negatives = self._pipeline_inputs(requests, jobs, size)
        slots = [used.index(j.request) for j in jobs]  # job -> row of the per-request tensors
        slot = torch.tensor(slots, device=device)
        generators = self._generators(requests, jobs)

        # 1. encode prompts once per request (SD 1.5/2 encode a missing negative prompt as "")
        positive, negative = pipe.encode_prompt(prompts, device, 1, cfg, [n or "" for n in negatives])
        # 2. preprocess exactly as the pipeline does, encode each request's image and masked image once
        init = pipe.image_processor.preprocess(images, height=size[0], width=size[1]).to(torch.float32)
        mask_px = pipe.mask_processor.preprocess(masks, height=size[0], width=size[1])
        masked = init * (mask_px < 0.5)
        dists = pipe.vae.encode(torch.cat([init, masked]).to(device=device, dtype=pipe.vae.dtype)).latent_dist
        latent_hw = (size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor)
        mask_lat = torch.nn.functional.interpolate(mask_px, size=latent_hw).to(device=device, dtype=dtype)
        # 3. per candidate, the pipeline's draws in its order: image latent sample, noise, masked sample
        n_req = len(used)
        image_lat, noise, masked_lat = [], [], []
        for p, job in enumerate(jobs):
            s, gen = slots[p], generators[p]
            if job.strength < 1.0:
                image_lat.append(_sample(dists, s, gen))
            else:
                image_lat.append(None)
            noise.append(_randn((1, 4, *latent_hw), gen, device, dtype))
            masked_lat.append(_sample(dists, n_req + s, gen))
        scale = pipe.vae.config.scaling_factor
        masked_lat = (scale * torch.cat(masked_lat)).to(dtype)
        # 4. one track per strength: its own scheduler copy, timesteps and starting latents
        tracks = [
            self._start_track(
                strength, [p for p, j in enumerate(jobs) if j.strength == strength], image_lat, noise, scale, device
            )
            for strength in sorted({j.strength for j in jobs}, reverse=True)
        ]
        # 5. staggered denoising: at step i every started track shares the timestep
        longest = tracks[0].timesteps
        for i, t in enumerate(longest):
            active = [tr for tr in tracks if len(tr.timesteps) >= len(longest) - i]
            rows = torch.tensor([p for tr in active for p in tr.jobs], device=device)
            x = torch.cat([tr.scheduler.scale_model_input(tr.latents, t) for tr in active])
            x = torch.cat([x, mask_lat[slot[rows]], masked_lat[rows]], dim=1)
            text = positive[slot[rows]]
            if cfg:
                x = torch.cat([x, x])
                text = torch.cat([negative[slot[rows]], text])
            pred = pipe.unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
            if cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + self.guidance_scale * (cond - uncond)
            for tr, part in zip(active, pred.split([len(tr.jobs) for tr in active])):
                assert tr.timesteps[i - (len(longest) - len(tr.timesteps))] == t
                extra = pipe.prepare_extra_step_kwargs([generators[p] for p in tr.jobs], 0.0)
                tr.latents = tr.scheduler.step(part, t, tr.latents, **extra, return_dict=False)[0]
        # 6. decode the candidates that share a decode box in one batch (all of them when whole
        #    images are decoded); the pixels outside the mask are pasted back later
        latents: list[torch.Tensor | None] = [None] * len(jobs)
        for tr in tracks:
            for p, row in zip(tr.jobs, tr.latents.split(1)):
                latents[p] = row / scale
        boxes = [_decode_box(np.asarray(mask) > 0, pipe.vae_scale_factor, self.decode_context) for mask in masks]
        by_box: dict[tuple[int, int, int, int], list[int]] = {}
        for p in range(len(jobs)):
            by_box.setdefault(boxes[slots[p]], []).append(p)
        out: list[np.ndarray | None] = [None] * len(jobs)
        f = pipe.vae_scale_factor
        for (top, bottom, left, right), group in by_box.items():
            decoded = self._decode(torch.cat([latents[p] for p in group])[:, :, top:bottom, left:right])
            for p, pixels in zip(group, decoded):
                canvas = np.array(images[slots[p]].convert("RGB"))  # the working-size start image
                canvas[top * f : bottom * f, left * f : right * f] = pixels
                out[p] = canvas
        return out

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, 4, h, w) unscaled latents -> (B, h*f, w*f, 3) uint8, as the pipeline post-processes."""
        vae = self.pipeline.vae
        decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return _to_uint8((decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())

    def _start_track(self, strength, positions, image_lat, noise, scale, device) -> _Track:
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        scheduler.set_timesteps(self.steps, device=device)
        start = (self.steps - self._steps_for(strength)) * scheduler.order
        timesteps = scheduler.timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        track_noise = torch.cat([noise[p] for p in positions])
        if strength < 1.0:
            image = (scale * torch.cat([image_lat[p] for p in positions])).to(track_noise.dtype)
            latents = scheduler.add_noise(image, track_noise, timesteps[:1].repeat(len(positions)))
        else:  # pure noise, as the pipeline does at full strength
            latents = track_noise * scheduler.init_noise_sigma
        return _Track(jobs=positions, scheduler=scheduler, timesteps=timesteps, latents=latents)


# -------------------------------------------------------------------- pixel helpers


def _randn(shape, generator, device, dtype) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def _sample(dists, row: int, generator) -> torch.Tensor:
    """Row `row` of a batch of VAE posteriors, sampled like `latent_dist.sample(generator)` on that row alone."""
    mean, std = dists.mean[row : row + 1], dists.std[row : row + 1]
    return mean + std * _randn(mean.shape, generator, mean.device, mean.dtype)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Float [0, 1] HWC to uint8, rounding the way diffusers' `numpy_to_pil` does."""
    return (image * 255).round().astype(np.uint8)


def _resize(image: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    if image.shape[:2] == size:
        return image
    return cv2.resize(image, (size[1], size[0]), interpolation=interpolation)


def _latent_cover(mask: np.ndarray, size: tuple[int, int], factor: int) -> np.ndarray:
    """The mask grown to whole latent cells (uint8 0/255 at `size`).

    The pipeline samples the pixel mask once per latent cell, so a thin scratch can fall between
    samples and never be repainted; covering every touched cell guarantees it is.
    """
    resized = _resize(mask.astype(np.uint8) * 255, size, cv2.INTER_NEAREST) > 0
    h, w = size
    cells = resized.reshape(h // factor, factor, w // factor, factor).any(axis=(1, 3))
    return np.repeat(np.repeat(cells, factor, axis=0), factor, axis=1).astype(np.uint8) * 255


def _decode_box(cover: np.ndarray, factor: int, context: int | None) -> tuple[int, int, int, int]:
    """Latent cells (top, bottom, left, right) to decode: the mask's bounding box grown by `context`
    cells and clipped to the image; the whole latent when `context` is None or the mask is empty."""
    h, w = cover.shape[0] // factor, cover.shape[1] // factor
    rows, cols = np.nonzero(cover)
    if context is None or rows.size == 0:
        return 0, h, 0, w
    return (
        max(0, rows.min() // factor - context), min(h, rows.max() // factor + 1 + context),
        max(0, cols.min() // factor - context), min(w, cols.max() // factor + 1 + context),
    )


def _paste_back(generated: np.ndarray, request: PaintRequest) -> np.ndarray:
    """Generated pixels inside the request mask, the source's everywhere else (the VAE alters all)."""
    h, w = request.image.shape[:2]
    generated = _resize(generated, (h, w), cv2.INTER_CUBIC)
    return np.where(request.mask[:, :, None], generated, request.image)
