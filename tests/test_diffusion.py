from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler,
    StableDiffusionInpaintPipeline,
)
from PIL import Image

from core.errors import InputError
from synthesis.backends.base import PaintRequest
from synthesis.backends.diffusion import (
    DiffusionBackend, _decode_box, _latent_cover, _to_uint8, resolve_dtype, tune_for_device,
)
from synthesis.config import DiffusionConfig
from synthesis.seeding import derive_seed, torch_generator
from tests.tiny_models import (
    get_dummy_inpaint_pipeline, get_dummy_sd3_inpaint_pipeline, get_dummy_sdxl_inpaint_pipeline,
)

SIZE = 64
STRENGTHS = [0.4, 0.6, 1.0]


@pytest.fixture(scope="module")
def pipeline():
    return get_dummy_inpaint_pipeline()


def _request(seed: int, few_shot: bool = False, size: int = SIZE, mask: np.ndarray | None = None) -> PaintRequest:
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 200, (size, size, 3), dtype=np.uint8)
    if mask is None:
        mask = np.zeros((size, size), bool)
        mask[size // 4 : size // 2 + 3, size // 3 : size // 2 + 9] = True
    reference = None
    if few_shot:
        reference = image.copy()
        reference[mask] = (250, 20, 20)
    return PaintRequest(
        image=image, mask=mask, anomaly_type="scratch", prompt="a photo of a tile with a scratch",
        seed=seed, negative_prompt="blurry", reference=reference,
    )


def _backend(pipeline, **kwargs) -> DiffusionBackend:
    kwargs.setdefault("steps", 5)
    return DiffusionBackend(pipeline, **kwargs)


def test_zero_shot_gives_one_candidate_per_strength_and_candidate(pipeline):
    out = _backend(pipeline, candidates=2).paint([_request(1), _request(2)], STRENGTHS)
    assert len(out) == 2
    for request_out in out:
        assert [c.strength for c in request_out] == [0.4, 0.4, 0.6, 0.6, 1.0, 1.0]
        assert [c.index for c in request_out] == list(range(6))
        for c in request_out:
            assert c.image.shape == (SIZE, SIZE, 3) and c.image.dtype == np.uint8
    # different seeds and strengths give different pixels inside the mask
    images = [c.image for c in out[0]]
    assert not np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])


def test_pixels_outside_mask_are_the_source_exactly(pipeline):
    request = _request(3)
    for candidate in _backend(pipeline).paint([request], STRENGTHS)[0]:
        assert np.array_equal(candidate.image[~request.mask], request.image[~request.mask])
        assert np.array_equal(candidate.mask, request.mask)
        assert np.abs(candidate.image[request.mask].astype(int) - request.image[request.mask]).mean() > 1


# Single-step (DDIM, Euler) and multistep (PNDM, DPM++ 2M) schedulers: a scheduler state shared
# across strengths passes on DDIM alone (max 0) but gives a max of 213 on PNDM and an IndexError
# on Euler and DPM++; each strength needs its own copy.
SCHEDULERS = {
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "pndm": lambda config: PNDMScheduler.from_config(config, skip_prk_steps=True),
    "dpm++2m": lambda config: DPMSolverMultistepScheduler.from_config(config),
    "euler": lambda config: EulerDiscreteScheduler.from_config(config),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_batched_strengths_reproduce_one_pipeline_call_per_strength(pipeline, scheduler):
    pipe = StableDiffusionInpaintPipeline(
        **{**pipeline.components, "scheduler": SCHEDULERS[scheduler](pipeline.scheduler.config)}
    )
    requests = [_request(4), _request(5, few_shot=True)]
    # two candidates per slot on DDIM check the per-candidate draws; they do not depend on the
    # scheduler, so one keeps the other schedulers' runs short
    candidates = 2 if scheduler == "ddim" else 1
    batched = _backend(pipe, candidates=candidates, decode_context=None).paint(requests, STRENGTHS)
    per_strength_backend = _backend(pipe, candidates=candidates, batch_strengths=False)
    assert not per_strength_backend.batch_strengths
    per_strength = per_strength_backend.paint(requests, STRENGTHS)
    for a_list, b_list in zip(batched, per_strength):
        for a, b in zip(a_list, b_list):
            assert (a.strength, a.index) == (b.strength, b.index)
            # Why one level: same draws, same maths in fp32; only the batch shapes (hence the float
            # reduction order, ~1e-7 relative) differ, far below a level of 255 even after the
            # denoising steps amplify it, so a pixel moves by one level at most, where the value
            # sits on a rounding edge. Any real divergence (a draw, a timestep, a scheduler state)
            # moves pixels by tens of levels.
            assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1


def _masked_difference(requests, a_out, b_out) -> float:
    """Mean absolute pixel difference inside the masks, over every candidate of every request."""
    return float(np.mean([
        np.abs(a.image.astype(int) - b.image.astype(int))[request.mask].mean()
        for request, a_list, b_list in zip(requests, a_out, b_out) for a, b in zip(a_list, b_list)
    ]))


def test_half_precision_takes_the_same_loop(pipeline):
    """bf16 as on a GPU (CPU kernels here): the loop's dtype plumbing matches the pipeline's."""
    pipe = get_dummy_inpaint_pipeline().to(dtype=torch.bfloat16)
    requests = [_request(4), _request(5, few_shot=True)]
    batched = _backend(pipe).paint(requests, [0.4, 1.0])
    per_strength = _backend(pipe, batch_strengths=False).paint(requests, [0.4, 1.0])
    for request, a_list in zip(requests, batched):
        for a in a_list:
            assert np.array_equal(a.image[~request.mask], request.image[~request.mask])
    # Why this bound: bf16 keeps 8 bits of mantissa, and its rounding depends on the batch shape
    # and the CPU's kernels (thread count, AVX2/AVX-512), so the loop (one batch for all
    # strengths) and the pipeline (one per strength) cannot match to a fixed pixel count: guidance
    # 12.5 amplifies the rounding, and a fixed bound of 6 failed on another machine at 6.06. The
    # scale of that rounding on this model is what bf16 does to the pipeline itself (bf16 against
    # fp32, same calls: ~13 here, the weights themselves are rounded). The loop may differ from the
    # pipeline by rounding of that size (~3 measured) but not more; a plumbing error (a draw in the
    # wrong order or dtype, a wrong mask or guidance) differs by as much as another seed (~60).
    fp32 = _backend(pipeline, batch_strengths=False).paint(requests, [0.4, 1.0])
    assert _masked_difference(requests, batched, per_strength) < _masked_difference(requests, per_strength, fp32)


def test_same_seed_same_pixels_whatever_the_batch(pipeline):
    backend = _backend(pipeline, candidates=2)
    alone = backend.paint([_request(6)], STRENGTHS)[0]
    again = backend.paint([_request(6)], STRENGTHS)[0]
    in_batch = backend.paint([_request(7), _request(6)], STRENGTHS)[1]
    for a, b, c in zip(alone, again, in_batch):
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.image, c.image)
    other_seed = backend.paint([replace(_request(6), seed=99)], STRENGTHS)[0]
    assert not np.array_equal(alone[0].image, other_seed[0].image)


def test_few_shot_repaints_reference_at_few_shot_strength(pipeline):
    request = _request(8, few_shot=True)
    out = _backend(pipeline, few_shot_strength=0.4).paint([request], STRENGTHS)[0]
    assert len(out) == len(STRENGTHS)
    assert {c.strength for c in out} == {0.4}
    assert not np.array_equal(out[0].image, out[1].image)  # the slots differ by seed
    # it is the zero-shot rendering of the pasted reference at 0.4, source pixels outside the mask
    as_zero_shot = replace(request, image=request.reference, reference=None)
    expected = _backend(pipeline).paint([as_zero_shot], [0.4] * len(STRENGTHS))[0]
    for c, e in zip(out, expected):
        assert np.array_equal(c.image[request.mask], e.image[request.mask])
        assert np.array_equal(c.image[~request.mask], request.image[~request.mask])


def test_odd_sizes_are_rendered_at_a_valid_working_size(pipeline):
    request = _request(9, size=50)
    candidate = _backend(pipeline).paint([request], [0.6])[0][0]
    assert candidate.image.shape == (50, 50, 3)
    assert np.array_equal(candidate.image[~request.mask], request.image[~request.mask])


def test_latent_cover_keeps_thin_masks():
    mask = np.zeros((64, 64), bool)
    mask[:, 13] = True  # a one-pixel scratch between the pipeline's nearest-neighbour samples
    cover = _latent_cover(mask, (64, 64), 8) > 0
    assert cover[mask].all()
    assert cover[:, 8:16].all() and not cover[:, :8].any() and not cover[:, 16:].any()


def test_decode_box_grows_the_mask_box_by_the_context_and_clips():
    cover = np.zeros((128, 128), bool)
    cover[40:64, 48:56] = True  # latent cells rows 5..7, column 6
    assert _decode_box(cover, 8, 0) == (5, 8, 6, 7)
    assert _decode_box(cover, 8, 2) == (3, 10, 4, 9)
    assert _decode_box(cover, 8, 9) == (0, 16, 0, 16)  # clipped to the image
    assert _decode_box(cover, 8, None) == (0, 16, 0, 16)
    assert _decode_box(np.zeros_like(cover), 8, 2) == (0, 16, 0, 16)


def _small_mask_request(seed: int = 11, size: int = 128) -> PaintRequest:
    mask = np.zeros((size, size), bool)
    mask[40:60, 50:75] = True
    return _request(seed, size=size, mask=mask)


def test_crop_decode_decodes_only_around_the_mask(pipeline):
    request = _small_mask_request()
    shapes = []
    decode = pipeline.vae.decode
    pipeline.vae.decode = lambda z, *a, **k: (shapes.append(tuple(z.shape[2:])), decode(z, *a, **k))[1]
    try:
        _backend(pipeline, decode_context=2).paint([request], [0.6, 1.0])
        _backend(pipeline, decode_context=None).paint([request], [0.6])
    finally:
        del pipeline.vae.decode
    # mask rows 40..59 -> cells 5..7, columns 50..74 -> cells 6..9; two cells of context each side
    assert shapes == [(7, 8), (16, 16)]


def test_crop_decode_is_close_to_the_whole_decode_inside_the_mask(pipeline):
    request = _small_mask_request()
    whole = _backend(pipeline, decode_context=None).paint([request], [0.6])[0][0].image
    covering = _backend(pipeline, decode_context=16).paint([request], [0.6])[0][0].image
    assert np.array_equal(covering, whole)  # a box over the whole latent is the whole decode
    crop = _backend(pipeline, decode_context=4).paint([request], [0.6])[0][0].image
    assert np.array_equal(crop[~request.mask], request.image[~request.mask])
    inside = request.mask
    repaint = np.abs(whole.astype(int) - request.image.astype(int))[inside].mean()
    error = np.abs(crop.astype(int) - whole.astype(int))[inside].mean()
    assert 0 < error < 0.25 * repaint  # no context at all misses by about as much as the repaint


def test_negative_decode_context_is_rejected_before_loading(tmp_path):
    with pytest.raises(InputError, match="decode_context"):
        DiffusionBackend.from_config(DiffusionConfig(model=str(tmp_path / "never_read"), decode_context=-1))
    with pytest.raises(ValueError, match="decode_context"):
        DiffusionBackend(get_dummy_inpaint_pipeline(), decode_context=-2)


def test_tune_for_device_slices_the_vae_on_cpu():
    pipe = get_dummy_inpaint_pipeline()
    assert not pipe.vae.use_slicing
    tune_for_device(pipe)
    assert pipe.vae.use_slicing


def test_strength_that_runs_no_step_is_rejected(pipeline):
    with pytest.raises(ValueError, match="no denoising step"):
        _backend(pipeline, steps=5).paint([_request(1)], [0.1])


def test_from_config_loads_a_saved_pipeline_offline(pipeline, tmp_path):
    pipeline.save_pretrained(tmp_path / "inpaint")
    cfg = DiffusionConfig(model=str(tmp_path / "inpaint"), local_files_only=True, steps=5, device="cpu")
    backend = DiffusionBackend.from_config(cfg, candidates=1)
    assert backend.model_id == str(tmp_path / "inpaint") and backend.revision is None
    assert backend.batch_strengths
    assert backend.pipeline.unet.dtype == torch.float32
    loaded = backend.pipeline
    assert type(loaded) is type(pipeline)
    for name in ("unet", "vae", "text_encoder"):  # the very weights, bit for bit
        saved, got = getattr(pipeline, name).state_dict(), getattr(loaded, name).state_dict()
        assert saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)
    assert type(loaded.scheduler) is type(pipeline.scheduler)
    assert {k: v for k, v in loaded.scheduler.config.items() if not k.startswith("_")} == {
        k: v for k, v in pipeline.scheduler.config.items() if not k.startswith("_")
    }
    prompt = _request(10).prompt
    assert loaded.tokenizer(prompt).input_ids == pipeline.tokenizer(prompt).input_ids
    # Why one level and not bit-equal: from_config also tunes the pipeline (a sliced VAE) and the
    # loaded weights live in other memory, so the same maths may round differently in the last
    # float bit (seen with one thread or AVX2 kernels); fp32 noise that small moves a pixel by at
    # most one level when it crosses a rounding edge. A wrong weight, scheduler or prompt moves
    # the repaint by tens of levels.
    expected = _backend(pipeline).paint([_request(10)], [0.6])[0][0].image
    got = backend.paint([_request(10)], [0.6])[0][0].image
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_sdxl_checkpoint_loads_its_own_class_and_paints_one_call_per_strength(tmp_path):
    get_dummy_sdxl_inpaint_pipeline().save_pretrained(tmp_path / "sdxl")
    backend = DiffusionBackend.from_config(DiffusionConfig(model=str(tmp_path / "sdxl"), steps=4, device="cpu"))
    assert type(backend.pipeline).__name__ == "StableDiffusionXLInpaintPipeline"  # read from model_index.json
    assert not backend.batch_strengths  # the staggered loop does not build SDXL's extra conditioning
    request = _request(12)
    out = backend.paint([request], [0.5, 1.0])[0]
    assert [c.strength for c in out] == [0.5, 1.0]
    for candidate in out:
        assert np.array_equal(candidate.image[~request.mask], request.image[~request.mask])
        assert (candidate.image[request.mask] != request.image[request.mask]).any()
    assert np.array_equal(backend.paint([request], [0.5])[0][0].image, out[0].image)  # seeded


def test_sdxl_without_negative_prompt_is_the_pipelines_own_call():
    """SDXL encodes negative_prompt=None as zeros (force_zeros_for_empty_prompt) and "" as text:
    with none set, the fallback must send None to give the pipeline's own output."""
    pipe = get_dummy_sdxl_inpaint_pipeline()
    assert pipe.config.force_zeros_for_empty_prompt
    backend = _backend(pipe, steps=4)
    assert not backend.batch_strengths
    request = replace(_request(12), negative_prompt=None)

    def own_call(negative_prompt):
        cover = _latent_cover(request.mask, (SIZE, SIZE), pipe.vae_scale_factor)
        image = pipe(
            prompt=[request.prompt], negative_prompt=negative_prompt, image=[Image.fromarray(request.image)],
            mask_image=[Image.fromarray(cover)], height=SIZE, width=SIZE, strength=0.5, num_inference_steps=4,
            guidance_scale=backend.guidance_scale, generator=[torch_generator(derive_seed(request.seed, 0))],
            output_type="np",
        ).images[0]
        return _to_uint8(image)

    ours = backend.paint([request], [0.5])[0][0].image
    inside = request.mask
    # the same call with the same inputs and draws: bit-equal, no tolerance needed
    assert np.array_equal(ours[inside], own_call(None)[inside])
    assert np.abs(ours[inside].astype(int) - own_call([""])[inside]).mean() > 5  # what "" gave instead
    # a batch mixing requests with and without a negative prompt: each as painted alone
    other = _request(13)  # negative_prompt="blurry"
    together = backend.paint([request, other], [0.5])
    assert np.array_equal(together[0][0].image, ours)
    assert np.array_equal(together[1][0].image, backend.paint([other], [0.5])[0][0].image)


def test_pipeline_without_unet_takes_its_own_call_per_strength():
    """SD3 / Flux inpainting (a transformer, no `unet`) falls back to one pipeline call per strength."""
    pipe = get_dummy_sd3_inpaint_pipeline()
    assert not hasattr(pipe, "unet")
    backend = _backend(pipe, steps=4, candidates=1)
    assert not backend.batch_strengths
    request = _request(14, size=50)  # worked at 48: SD3 needs sides divisible by 8 (VAE) x 2 (patch)
    out = backend.paint([request], [0.5, 1.0])[0]
    assert [c.strength for c in out] == [0.5, 1.0]
    for candidate in out:
        assert candidate.image.shape == (50, 50, 3)
        assert np.array_equal(candidate.image[~request.mask], request.image[~request.mask])
        assert np.abs(candidate.image[request.mask].astype(int) - request.image[request.mask]).mean() > 1
    assert not np.array_equal(out[0].image, out[1].image)


def test_missing_model_is_one_input_error(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(InputError, match="no_such_checkpoint") as err:
        DiffusionBackend.from_config(DiffusionConfig(model=str(missing)))
    assert "local_files_only" in str(err.value)
    with pytest.raises(InputError, match="not set"):
        DiffusionBackend.from_config(DiffusionConfig(model=None))


def test_dtype_resolution():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(InputError):
        resolve_dtype("int8", torch.device("cpu"))
