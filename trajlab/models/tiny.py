"""Tiny random pipelines built from configs (diffusers' ``get_dummy_components`` habit).

``tiny-sd`` (StableDiffusionPipeline) and ``tiny-sdxl`` (StableDiffusionXLPipeline): seeded random
weights, the real CLIP BPE tokenizer, SD's scheduler settings. Used by tests, demos and benchmarks.
"""

from __future__ import annotations

import torch

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


def _sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_SCHEDULER)


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                         norm_num_groups=2, sample_size=64)


def _text_encoder(seed: int, hidden: int = 32, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=hidden,
                         intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
                         vocab_size=49408, projection_dim=32, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def tiny_sd_components(seed: int = 0, time_cond_proj_dim: int | None = None) -> dict:
    """Components of a tiny StableDiffusionPipeline (UNet 32/64 channels, 4-channel latents)."""
    from diffusers import UNet2DConditionModel

    from trajlab.models.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=2, time_cond_proj_dim=time_cond_proj_dim)
    return {"unet": unet, "scheduler": _sd_scheduler(), "vae": _vae(seed), "text_encoder": _text_encoder(seed),
            "tokenizer": clip_tokenizer(), "safety_checker": None, "feature_extractor": None,
            "image_encoder": None, "requires_safety_checker": False}


def tiny_sd(seed: int = 0):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_lcm(seed: int = 0):
    """A tiny LatentConsistencyModelPipeline (UNet with a guidance embedding, LCMScheduler)."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    comps = tiny_sd_components(seed, time_cond_proj_dim=32)
    comps["scheduler"] = LCMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "clip_sample"})
    comps.pop("requires_safety_checker")
    pipe = LatentConsistencyModelPipeline(**comps, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_unet(seed: int = 0, time_cond_proj_dim: int | None = None):
    """tiny-sdxl's UNet (micro-conditioning ``text_time``); ``time_cond_proj_dim`` adds LCM's guidance embedding
    (as the ``latent-consistency/lcm-sdxl`` UNet has, 256 there)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=80, cross_attention_dim=64,
                                norm_num_groups=1, time_cond_proj_dim=time_cond_proj_dim)


def tiny_sdxl(seed: int = 0):
    """A tiny StableDiffusionXLPipeline (two text encoders, micro-conditioning)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from trajlab.models.tokenizer import clip_tokenizer

    unet = tiny_sdxl_unet(seed)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        unet=unet, scheduler=scheduler, vae=_vae(seed), text_encoder=_text_encoder(seed, projection=False),
        text_encoder_2=_text_encoder(seed + 1, projection=True), tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"), image_encoder=None, feature_extractor=None,
        force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {"tiny-sd": tiny_sd, "tiny-sdxl": tiny_sdxl, "tiny-lcm": tiny_lcm}


SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
"""The published SD1.5 UNet config (860M parameters)."""

SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

SD15_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                        bos_token_id=49406, eos_token_id=49407, pad_token_id=1, projection_dim=768)


def sd15_architecture(seed: int = 0):
    """A StableDiffusionPipeline with SD1.5's published architecture and random weights (benchmarks only)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trajlab.models.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD15_UNET_CONFIG), vae=AutoencoderKL(**SD15_VAE_CONFIG),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)), tokenizer=clip_tokenizer(),
        scheduler=_sd_scheduler(), safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
