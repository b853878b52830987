"""Tiny random-weight models built in code, the way diffusers' own tests build theirs.

Nothing is downloaded: the CLIP tokenizer gets a byte-level vocabulary written here (every byte
alone and as a word end, no merges), which tokenizes any text, one token per character.
"""

from __future__ import annotations

import torch


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def get_dummy_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


VOCAB_SIZE = 2 * 256 + 2  # of get_dummy_tokenizer; bos = VOCAB_SIZE - 2, eos = VOCAB_SIZE - 1


def _text_config(**overrides):
    from transformers import CLIPTextConfig

    config = dict(
        bos_token_id=VOCAB_SIZE - 2, eos_token_id=VOCAB_SIZE - 1, pad_token_id=VOCAB_SIZE - 1,
        hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=VOCAB_SIZE, max_position_embeddings=77,
    )
    config.update(overrides)
    return CLIPTextConfig(**config)


def get_dummy_inpaint_components(seed: int = 0) -> dict:
    """Components of a tiny SD-style inpainting pipeline (9-channel UNet), random weights, seeded."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=16,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[16, 32, 32, 32], in_channels=3, out_channels=3, norm_num_groups=16,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4, layers_per_block=1,
    )  # four blocks: the SD-like 8x latent downscale
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config())
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return {
        "unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": get_dummy_tokenizer(),
        "scheduler": scheduler, "safety_checker": None, "feature_extractor": None,
        "requires_safety_checker": False,
    }


def get_dummy_inpaint_pipeline(seed: int = 0):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(**get_dummy_inpaint_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def get_dummy_sdxl_inpaint_pipeline(seed: int = 0):
    """A tiny SDXL inpainting pipeline (two text encoders, text_time conditioning), random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=16,
        cross_attention_dim=64,  # both text encoders' hidden states side by side
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six size/crop ids + the pooled text
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[16, 32, 32, 32], in_channels=3, out_channels=3, norm_num_groups=16,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4, layers_per_block=1,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=32))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=get_dummy_tokenizer(),
        tokenizer_2=get_dummy_tokenizer(), unet=unet, scheduler=scheduler, requires_aesthetics_score=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def get_dummy_sd3_inpaint_pipeline(seed: int = 0):
    """A tiny SD3 inpainting pipeline: a transformer instead of a UNet, no T5 (SD3 then uses zeros)."""
    from diffusers import (
        AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3InpaintPipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=16,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[16, 32, 32, 32], in_channels=3, out_channels=3, norm_num_groups=16,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=16, layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_text_config(projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=32))
    pipe = StableDiffusion3InpaintPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=text_encoder, tokenizer=get_dummy_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=get_dummy_tokenizer(), text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def get_dummy_clip(seed: int = 0, image_size: int = 32):
    """A tiny CLIPModel and its processor (image processor + the dummy tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        image_size=image_size, patch_size=8,
    )
    config = CLIPConfig.from_text_vision_configs(_text_config(), vision, projection_dim=16) if hasattr(
        CLIPConfig, "from_text_vision_configs"
    ) else CLIPConfig(text_config=_text_config().to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=get_dummy_tokenizer())
