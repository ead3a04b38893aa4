"""Loading: registry, local save_pretrained folders, LoRA files, fast clear errors for missing weights."""

import numpy as np
import pytest
import torch

from trajlab.models.loading import ModelNotAvailable, check_available, load_pipeline
from trajlab.models.registry import Lora, parse_lora, registry


def _images(pipe, seed=0):
    g = [torch.Generator().manual_seed(seed)]
    return pipe(["a cat"], num_inference_steps=3, guidance_scale=3.0, generator=g, output_type="np",
                height=32, width=32).images


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    from trajlab.models.tiny import tiny_sd

    folder = tmp_path_factory.mktemp("tiny-sd-folder")
    pipe = tiny_sd()
    pipe.save_pretrained(folder)
    return folder, pipe


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, saved_tiny):
    """A tiny random LoRA on the UNet's attention projections, saved in diffusers' format."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    _, pipe = saved_tiny
    unet = StableDiffusionPipeline.from_pretrained(saved_tiny[0], local_files_only=True).unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder / "pytorch_lora_weights.safetensors"


def test_local_folder_reproduces_builder_exactly(saved_tiny):
    folder, pipe = saved_tiny
    loaded = load_pipeline(str(folder), scheduler="default")
    np.testing.assert_array_equal(_images(loaded), _images(pipe))


def test_lora_file_loads_and_scales(saved_tiny, lora_file):
    folder, _ = saved_tiny
    base = _images(load_pipeline(str(folder), scheduler="default"))
    with_lora = load_pipeline(str(folder), loras=(parse_lora(f"{lora_file}:1.0"),), scheduler="default")
    assert with_lora.get_active_adapters() == ["lora0"]
    assert np.abs(_images(with_lora) - base).max() > 1e-3, "an active random LoRA must change the output"
    zero = load_pipeline(str(folder), loras=(Lora(str(lora_file), 0.0),), scheduler="default")
    np.testing.assert_allclose(_images(zero), base, atol=1e-6)
    with_lora.disable_lora()
    np.testing.assert_allclose(_images(with_lora), base, atol=1e-6)


def test_parse_lora():
    assert parse_lora("owner/name:0.5") == Lora("owner/name", 0.5)
    assert parse_lora("/path/to/file.safetensors") == Lora("/path/to/file.safetensors", 1.0)
    assert parse_lora("C:thing") == Lora("C:thing", 1.0)


def test_missing_checkpoints_fail_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import importlib

    import huggingface_hub.constants as c

    importlib.reload(c)
    try:
        for name in ("sd15", "lcm-lora-sdxl", "pcm-sd15-4step", "sdxl-turbo"):
            with pytest.raises(ModelNotAvailable, match=r"hf download .*empty-cache|empty-cache.*hf download"):
                check_available(name)
        with pytest.raises(ModelNotAvailable, match="neither a registered model"):
            check_available("definitely-not-a-model")
    finally:
        monkeypatch.undo()
        importlib.reload(c)


def test_registry_covers_the_research_plan():
    reg = registry()
    hub = {m.source for m in reg.values()} | {lo.source for m in reg.values() for lo in m.loras} | \
          {m.unet for m in reg.values() if m.unet}
    for repo in ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0",
                 "latent-consistency/lcm-lora-sdv1-5", "latent-consistency/lcm-lora-sdxl", "SimianLuo/LCM_Dreamshaper_v7",
                 "latent-consistency/lcm-sdxl", "wangfuyun/PCM_Weights", "stabilityai/sdxl-turbo"):
        assert repo in hub, repo
    assert reg["sdxl-turbo"].steps == 1 and reg["sdxl-turbo"].guidance == 0.0
    assert {reg[f"pcm-sd15-{k}step"].steps for k in (2, 4, 8, 16)} == {2, 4, 8, 16}
    assert any(n.startswith("exact:") for n in reg)
