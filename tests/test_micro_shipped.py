"""The shipped micro-world (data/micro) loads through the real loaders and does what it claims."""

import json

import numpy as np
import pytest
import torch

from trajlab.models.micro import MICRO_DIR, PROMPTS, load_labeller, load_micro_clip, load_micro_lora, micro_paths
from trajlab.models.micro import data as D


@pytest.fixture(scope="module")
def labeller():
    return load_labeller()


@pytest.fixture(scope="module")
def held_out():
    return D.load_split()


DIGITS = [0, 2, 3, 5, 7, 8]  # a few prompts, 2 seeds each: 12 samples per check


def _prompted(pipe, steps, guidance, labeller):
    prompts = [PROMPTS[d] for d in DIGITS for _ in range(2)]
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(0), output_type="np")
    images = out.images
    assert images.shape == (len(prompts), 32, 32, 3)
    labels, _ = labeller((images * 255).round().astype(np.uint8))
    return float((labels == np.repeat(DIGITS, 2)).mean())


def test_paths():
    import trajlab

    if getattr(trajlab, "__file__", None):
        assert MICRO_DIR == __import__("pathlib").Path(trajlab.__file__).resolve().parents[1] / "data" / "micro"
    paths = micro_paths()
    assert set(paths) == {"micro-sd", "micro-lcm", "micro-lcm-lora", "micro-clip", "micro-pcm", "micro-tlcm", "micro-turbo", "micro-dmd"}
    for name, p in paths.items():
        assert p.is_dir(), f"{name}: {p} missing"
    assert PROMPTS[3] == "a handwritten digit 3" and len(PROMPTS) == 10
    total = sum(f.stat().st_size for f in MICRO_DIR.rglob("*") if f.is_file())
    assert total < 32e6, f"data/micro is {total / 1e6:.1f} MB"


STUDENT_FILES = {
    "micro-pcm": ["pytorch_lora_weights.safetensors"],  # a diffusers LoRA, as PCM_Weights
    "micro-tlcm": ["adapter_config.json", "adapter_model.safetensors"],  # a PEFT adapter, as TLCM's
    "micro-turbo": ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"],  # a full pipeline, as sdxl-turbo
    "micro-dmd": ["config.json", "diffusion_pytorch_model.safetensors"],  # a UNet only, as DMD2's
}


@pytest.mark.parametrize("name", sorted(STUDENT_FILES))
def test_student_folders_match_their_registry_rows(name):
    from trajlab.models import registry as reg

    folder = micro_paths()[name]
    for f in STUDENT_FILES[name]:
        assert (folder / f).is_file(), f"{name}: {f} missing in {folder}"
    info = json.loads((folder / "trajlab.json").read_text())
    spec = reg.get(name)
    assert info["steps"] == spec.steps and info["guidance"] == spec.guidance, (info, spec)
    assert spec.steps in info["steps_supported"]
    quality = json.loads((MICRO_DIR / "quality.json").read_text())
    row = quality["students"][name][f"steps{spec.steps}"]
    assert row["accuracy"] >= 0.8, f"{name}: recorded prompt accuracy {row['accuracy']} at {spec.steps} steps"
    assert row["nn_distance"]["min"] > 0.5, f"{name}: a sample is a near-copy of a training image ({row['nn_distance']})"
    log = json.loads((MICRO_DIR / "train_log.json").read_text())
    stage = name.split("-", 1)[1]
    assert log[stage]["device"] == "cpu" and log[stage]["wall_s"] > 0


def test_labeller_accuracy_on_held_out(labeller, held_out):
    x, y = held_out["x_held"], held_out["y_held"].numpy()
    labels, probs = labeller(x)
    assert labels.shape == y.shape and probs.shape == (len(y), 10)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (labels == y).mean() >= 0.95
    labels_u8, _ = labeller(D.to_uint8_hwc(x[:50]))
    assert (labels_u8 == labels[:50]).mean() >= 0.98  # uint8 HWC input path agrees with float CHW


def test_teacher_pipeline_gives_prompted_digits(labeller):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = micro_paths()["micro-sd"]
    info = json.loads((folder / "trajlab.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    cfg = pipe.scheduler.config
    assert cfg.steps_offset == 1 and cfg.set_alpha_to_one is False and cfg.beta_schedule == "scaled_linear"
    assert pipe.unet.config.time_cond_proj_dim is None and pipe.safety_checker is None
    assert info["steps"] == 30 and 3 <= info["guidance"] <= 5
    acc = _prompted(pipe, info["steps"], info["guidance"], labeller)
    assert acc >= 0.75, f"teacher prompt accuracy {acc}"


def test_lcm_pipeline_few_steps(labeller):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    folder = micro_paths()["micro-lcm"]
    info = json.loads((folder / "trajlab.json").read_text())
    pipe = LatentConsistencyModelPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim is not None
    acc = _prompted(pipe, 4, info["guidance"], labeller)
    assert acc >= 0.75, f"LCM 4-step prompt accuracy {acc}"


def test_lcm_lora_loads_on_teacher(labeller):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from trajlab.models.micro import lora as LO

    sd_dir, lora_dir = micro_paths()["micro-sd"], micro_paths()["micro-lcm-lora"]
    assert (lora_dir / LO.WEIGHT_NAME).exists()
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    z, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 900]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        base_out = pipe.unet(z, t, encoder_hidden_states=c).sample
    how = load_micro_lora(pipe, lora_dir)
    assert how == ("peft" if LO.peft_available() else "fused")
    with torch.no_grad():
        lora_out = pipe.unet(z, t, encoder_hidden_states=c).sample
    assert (lora_out - base_out).abs().max() > 1e-3, "the LoRA must change the UNet"
    # the peft path and the fallback fuse agree
    fused = StableDiffusionPipeline.from_pretrained(str(sd_dir))
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(str(lora_dir))
    assert LO.fuse_lora(fused.unet, state_dict) > 0
    with torch.no_grad():
        fused_out = fused.unet(z, t, encoder_hidden_states=c).sample
    assert torch.allclose(fused_out, lora_out, atol=1e-4), (fused_out - lora_out).abs().max()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    acc = _prompted(pipe, 4, 1.0, labeller)
    assert acc >= 0.75, f"LCM-LoRA 4-step prompt accuracy {acc}"


def test_open_clip_scorer(held_out):
    from PIL import Image

    model, preprocess, tokenizer = load_micro_clip()
    im = Image.fromarray(D.to_uint8_hwc(held_out["x_held"][:1])[0])
    x = preprocess(im)
    assert x.shape == (3, 32, 32)
    tok = tokenizer(list(PROMPTS))
    assert tok.shape == (10, 77)
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.fromarray(a)) for a in D.to_uint8_hwc(held_out["x_held"][:100])]), normalize=True)
        txt = model.encode_text(tok, normalize=True)
    assert img.shape == (100, 32) and txt.shape == (10, 32)
    acc = ((img @ txt.T).argmax(1) == held_out["y_held"][:100]).float().mean().item()
    assert acc >= 0.9, f"micro-clip zero-shot accuracy {acc}"


def test_teacher_text_encoder_is_the_clip_text_tower():
    from transformers import CLIPTextModel

    from trajlab.models.tokenizer import clip_tokenizer

    model, _, _ = load_micro_clip()
    te = CLIPTextModel.from_pretrained(str(micro_paths()["micro-sd"] / "text_encoder"))
    ids = clip_tokenizer()(["a handwritten digit 3", "the number seven", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h = te(ids).last_hidden_state
        x = model.transformer(model.token_embedding(ids) + model.positional_embedding, attn_mask=model.attn_mask)
        x = model.ln_final(x)
    assert torch.allclose(h, x, atol=1e-4), (h - x).abs().max()
