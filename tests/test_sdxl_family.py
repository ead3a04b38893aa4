"""The SDXL family rows of the registry (LCM-LoRA SDXL, PCM SDXL, TLCM SDXL, SDXL-Turbo, LCM-SDXL UNet swap),
loaded offline through trajlab's own loading code from tiny stand-ins laid out like the real checkpoints.

A fake Hugging Face cache (``models--OWNER--NAME/refs/main`` + ``snapshots/COMMIT/...``) holds, under the
real hub ids and file names of the registry rows, a tiny random SDXL pipeline (SDXL base), a tiny SDXL-Turbo
(Euler-ancestral trailing scheduler), a separate tiny LCM-SDXL UNet (with LCM's guidance embedding), a
diffusers-format LoRA file (``pytorch_lora_weights.safetensors``), PCM's ``sdxl/pcm_sdxl_smallcfg_2step_
converted.safetensors`` and a PEFT adapter (TLCM: ``adapter_config.json`` + weights). ``load_pipeline(ROW)``
then resolves the registry row exactly as for the real weights; each capture is replayed step by step.
"""

import copy
import hashlib
import importlib

import numpy as np
import pytest
import torch

from trajlab import store
from trajlab.capture import CapturePlan, capture
from trajlab.models.denoiser import replay_generators
from trajlab.models.loading import ModelNotAvailable, check_available, load_pipeline, resolve_source
from trajlab.models.registry import SDXL, Lora, parse_lora, registry
from trajlab.models.schedulers import make_scheduler, scheduler_from_attrs, step_kwargs

LCM_LORA = "latent-consistency/lcm-lora-sdxl"
PCM = "wangfuyun/PCM_Weights"
TLCM = "OPPOer/TLCM"
TURBO = "stabilityai/sdxl-turbo"
LCM_UNET = "latent-consistency/lcm-sdxl"
DMD2 = "tianweiy/DMD2"
TLCM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
"""TLCM README's LoraConfig target modules."""
KW = dict(height=32, width=32)


def _cache_entry(cache, repo_id):
    """A snapshot folder of ``repo_id`` in an HF hub cache, as ``hf download`` leaves it (refs/main -> commit)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    return snap


def _random_lora(unet, seed, targets=("to_q", "to_k", "to_v", "to_out.0")):
    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(unet)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights=False))
    return get_peft_model_state_dict(unet)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model

    from trajlab.models.tiny import tiny_sdxl, tiny_sdxl_unet

    cache = tmp_path_factory.mktemp("hf-cache")
    base = tiny_sdxl(seed=0)
    base.save_pretrained(_cache_entry(cache, SDXL))
    unet = base.unet
    # LCM-LoRA SDXL: pytorch_lora_weights.safetensors at the repo root (diffusers' format)
    StableDiffusionXLPipeline.save_lora_weights(_cache_entry(cache, LCM_LORA), unet_lora_layers=_random_lora(unet, 1))
    # PCM: sdxl/pcm_sdxl_smallcfg_{k}step_converted.safetensors (diffusers' format), only the 2-step file here
    pcm = _cache_entry(cache, PCM) / "sdxl"
    StableDiffusionXLPipeline.save_lora_weights(pcm, unet_lora_layers=_random_lora(unet, 2),
                                                weight_name="pcm_sdxl_smallcfg_2step_converted.safetensors")
    # DMD2: dmd2_sdxl_4step_lora_fp16.safetensors at the repo root (diffusers' LoRA format, as its README loads it)
    StableDiffusionXLPipeline.save_lora_weights(_cache_entry(cache, DMD2), unet_lora_layers=_random_lora(unet, 4),
                                                weight_name="dmd2_sdxl_4step_lora_fp16.safetensors")
    # TLCM: a PEFT adapter (PeftModel.save_pretrained of get_peft_model(unet, LoraConfig(r=.., TLCM targets)))
    torch.manual_seed(3)
    peft_unet = get_peft_model(copy.deepcopy(unet), LoraConfig(r=8, lora_alpha=4, target_modules=TLCM_TARGETS,
                                                               init_lora_weights=False))
    adapter = tmp_path_factory.mktemp("tlcm-adapter")
    peft_unet.save_pretrained(adapter)
    tlcm = _cache_entry(cache, TLCM)
    (tlcm / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    (tlcm / "TLCM_SDXL.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    # LCM-SDXL: a UNet-only repo (config.json + diffusion_pytorch_model.safetensors at the root), guidance embedding
    swap = tiny_sdxl_unet(seed=7, time_cond_proj_dim=32)
    swap.save_pretrained(_cache_entry(cache, LCM_UNET))
    # SDXL-Turbo: a whole SDXL pipeline whose scheduler is Euler-ancestral with trailing spacing
    base.scheduler = EulerAncestralDiscreteScheduler.from_config(base.scheduler.config, timestep_spacing="trailing")
    base.save_pretrained(_cache_entry(cache, TURBO))
    return {"cache": cache, "adapter": adapter, "swap_state": {k: v.clone() for k, v in swap.state_dict().items()},
            "lcm_lora_file": cache / f"models--{LCM_LORA.replace('/', '--')}" / "snapshots" /
            hashlib.sha1(LCM_LORA.encode()).hexdigest() / "pytorch_lora_weights.safetensors"}


@pytest.fixture
def cached(hub, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub["cache"]))
    return hub


def _capture(pipe, tmp_path, steps, guidance, model, seeds=(0, 1)):
    path = tmp_path / "s.zarr"
    plan = CapturePlan(model=model, prompts=["a cat"], seeds=list(seeds), steps=steps, guidance=guidance,
                       batch_size=len(seeds), **KW)
    res = capture(pipe, plan, path, progress=False)
    return store.open_group(path, res.group).load(), store.group_attrs(path, res.group)


def _replay(ds, attrs, steps, generators=True):
    """Step calls on a fresh scheduler from the store's attrs, with the captured per-sample noise (generators
    as a capture leaves them after the initial-noise draw): latent[:, i] -> latent[:, i+1] (final_latent last)."""
    fresh = scheduler_from_attrs(attrs)
    fresh.set_timesteps(steps)
    lat, mo = torch.from_numpy(ds.latent.values), torch.from_numpy(ds.model_output.values)
    gens = replay_generators(ds.seed.values, lat.shape[2:]) if generators else \
        [torch.Generator().manual_seed(1234 + i) for i in range(lat.shape[0])]
    n = ds.sizes["step"]
    assert n == steps
    results = []
    for i in range(n):
        t = fresh.timesteps[i]
        assert float(t) == pytest.approx(float(ds.timestep.values[i]))
        fresh.scale_model_input(lat[:, i], t)
        out = fresh.step(mo[:, i], t, lat[:, i], return_dict=False, **step_kwargs(fresh, gens))
        target = lat[:, i + 1] if i + 1 < n else torch.from_numpy(ds.final_latent.values)
        results.append((out, target))
    return fresh, results


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 4, 4, generator=g)
    ehs = torch.randn(2, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]] * 2)}
    with torch.no_grad():
        return unet(x, torch.tensor([500, 250]), encoder_hidden_states=ehs, added_cond_kwargs=added).sample


def test_lcm_lora_sdxl_row_lcm_4_steps_replays_and_lora_matters(cached, tmp_path):
    pipe = load_pipeline("lcm-lora-sdxl")  # SDXL base + latent-consistency/lcm-lora-sdxl from the (fake) cache
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.get_active_adapters() == ["lora0"]
    ds, attrs = _capture(pipe, tmp_path, steps=4, guidance=1.0, model="lcm-lora-sdxl")
    assert list(ds.timestep.values) == [999, 759, 499, 259]
    assert "model_output_uncond" not in ds  # guidance 1: no CFG batch
    for i, (out, target) in enumerate(_replay(ds, attrs, 4)[1]):  # LCM re-noises: replayed with captured noise
        torch.testing.assert_close(out[0], target, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], torch.from_numpy(ds.denoised.values[:, i]), rtol=1e-5, atol=1e-5)
    # the same LoRA file given as --lora PATH:SCALE on the plain SDXL row gives the same trajectory
    by_path = load_pipeline("sdxl", loras=(parse_lora(f"{cached['lcm_lora_file']}:1.0"),), scheduler="lcm")
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    call = dict(prompt=["a cat"] * 2, num_inference_steps=4, guidance_scale=1.0, generator=gens,
                output_type="latent", **KW)
    np.testing.assert_allclose(by_path(**call).images.numpy(), ds.final_latent.values, rtol=1e-5, atol=1e-5)
    by_path.disable_lora()
    call["generator"] = [torch.Generator().manual_seed(s) for s in (0, 1)]
    assert np.abs(by_path(**call).images.numpy() - ds.final_latent.values).max() > 1e-3, "the LoRA must matter"


def test_dmd2_sdxl_lora_row_lcm_4_steps_no_cfg_replays(cached, tmp_path):
    spec = registry()["dmd2-sdxl-lora"]
    pipe = load_pipeline("dmd2-sdxl-lora")  # SDXL base + tianweiy/DMD2's 4-step LoRA file from the (fake) cache
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and spec.guidance == 0.0 and pipe.get_active_adapters()
    ds, attrs = _capture(pipe, tmp_path, steps=spec.steps, guidance=spec.guidance, model=spec.name)
    assert list(ds.timestep.values) == [999, 759, 499, 259] and "model_output_uncond" not in ds
    for out, target in _replay(ds, attrs, spec.steps)[1]:
        torch.testing.assert_close(out[0], target, rtol=1e-5, atol=1e-5)
    pipe.disable_lora()
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    plain = pipe(prompt=["a cat"] * 2, num_inference_steps=4, guidance_scale=0.0, generator=gens,
                 output_type="latent", **KW).images.numpy()
    assert np.abs(plain - ds.final_latent.values).max() > 1e-3, "the LoRA must matter"


def test_pcm_sdxl_row_lora_tcd_2_steps_replays(cached, tmp_path):
    spec = registry()["pcm-sdxl-2step"]
    assert spec.loras[0] == Lora(PCM, subfolder="sdxl", weight_name="pcm_sdxl_smallcfg_2step_converted.safetensors")
    pipe = load_pipeline("pcm-sdxl-2step")
    assert type(pipe.scheduler).__name__ == "TCDScheduler" and pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.get_active_adapters() == ["lora0"]
    ds, attrs = _capture(pipe, tmp_path, steps=2, guidance=1.0, model="pcm-sdxl-2step")
    assert ds.timestep.values[0] == 999 and ds.sizes["step"] == 2
    for out, target in _replay(ds, attrs, 2)[1]:  # the pipeline passes eta=0: TCD is then deterministic
        torch.testing.assert_close(out[0], target, rtol=1e-5, atol=1e-5)
    # the 4-step row's file is absent from this PCM_Weights snapshot: refused before any weights load
    with pytest.raises(ModelNotAvailable, match=r"sdxl/pcm_sdxl_smallcfg_4step_converted\.safetensors.*hf download"):
        check_available("pcm-sdxl-4step")


def test_tlcm_peft_adapter_row_matches_readme_loading_and_captures(cached, tmp_path):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    pipe = load_pipeline("tlcm-sdxl")  # OPPOer/TLCM: adapter_config.json + TLCM_SDXL.safetensors (PEFT keys)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.get_active_adapters() == ["lora0"]
    # reference: TLCM's README, get_peft_model(unet, LoraConfig(...)) then unet.load_adapter(lora_path)
    ref = UNet2DConditionModel.from_pretrained(resolve_source(SDXL), subfolder="unet")
    plain = _unet_out(ref)
    ref = get_peft_model(ref, LoraConfig(r=8, lora_alpha=4, target_modules=TLCM_TARGETS))
    ref.load_adapter(str(cached["adapter"]), adapter_name="default")
    expected = _unet_out(ref)
    assert (expected - plain).abs().max() > 1e-3
    torch.testing.assert_close(_unet_out(pipe.unet), expected, rtol=1e-5, atol=1e-5)
    # the README's lora_path (the adapter folder) given as --lora PATH loads the same adapter
    by_path = load_pipeline("sdxl", loras=(Lora(str(cached["adapter"])),), scheduler="lcm")
    torch.testing.assert_close(_unet_out(by_path.unet), expected, rtol=1e-5, atol=1e-5)
    ds, attrs = _capture(pipe, tmp_path, steps=4, guidance=0.0, model="tlcm-sdxl")
    assert "model_output_uncond" not in ds and ds.sizes["step"] == 4
    for out, target in _replay(ds, attrs, 4)[1]:
        torch.testing.assert_close(out[0], target, rtol=1e-5, atol=1e-5)


def test_peft_weights_without_adapter_config_are_refused(cached, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "TLCM_SDXL.safetensors").write_bytes((cached["adapter"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ModelNotAvailable, match="adapter_config.json"):
        load_pipeline("sdxl", loras=(Lora(str(lone / "TLCM_SDXL.safetensors")),), scheduler="lcm")


def test_sdxl_turbo_row_euler_ancestral_trailing_one_step_no_cfg(cached, tmp_path):
    pipe = load_pipeline("sdxl-turbo")
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing"  # kept from the checkpoint's own scheduler config
    ds, attrs = _capture(pipe, tmp_path / "one", steps=1, guidance=0.0, model="sdxl-turbo")
    assert ds.sizes["step"] == 1 and ds.timestep.values[0] == 999
    assert "model_output_uncond" not in ds and "model_output_cond" not in ds  # guidance 0: no CFG branch
    (out, target), = _replay(ds, attrs, 1)[1]
    torch.testing.assert_close(out[0], target, rtol=1e-5, atol=1e-5)  # last step: sigma_up = 0
    torch.testing.assert_close(out[1], torch.from_numpy(ds.x0_pred.values[:, 0]), rtol=1e-5, atol=1e-5)
    # two ancestral steps: the first step's noise is the captured generators' (and other noise would differ)
    ds2, attrs2 = _capture(pipe, tmp_path / "two", steps=2, guidance=0.0, model="sdxl-turbo")
    for out, target in _replay(ds2, attrs2, 2)[1]:
        torch.testing.assert_close(out[0], target, rtol=1e-5, atol=1e-5)
    (wrong, target), _ = _replay(ds2, attrs2, 2, generators=False)[1]
    assert (wrong[0] - target).abs().max() > 1e-2
    # the explicit name gives the same grid on a checkpoint whose scheduler is "leading" (the SDXL base)
    s = make_scheduler("euler-ancestral-trailing", load_pipeline("sdxl", scheduler="default").scheduler.config)
    s.set_timesteps(1)
    assert type(s).__name__ == "EulerAncestralDiscreteScheduler" and float(s.timesteps[0]) == 999


def test_lcm_sdxl_row_swaps_in_the_separate_unet(cached, tmp_path):
    spec = registry()["lcm-sdxl"]
    assert spec.unet == LCM_UNET and spec.source == SDXL
    pipe = load_pipeline("lcm-sdxl")
    got = pipe.unet.state_dict()
    assert got.keys() == cached["swap_state"].keys()
    for k, v in cached["swap_state"].items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    assert pipe.unet.config.time_cond_proj_dim == 32
    base_unet = load_pipeline("sdxl", scheduler="default").unet.state_dict()
    assert any(not torch.equal(base_unet[k], v) for k, v in got.items() if k in base_unet)
    ds, attrs = _capture(pipe, tmp_path, steps=4, guidance=8.0, model="lcm-sdxl")
    assert "model_output_uncond" not in ds  # w-embedding UNet: guidance 8 without a CFG batch
    for out, target in _replay(ds, attrs, 4)[1]:
        torch.testing.assert_close(out[0], target, rtol=1e-5, atol=1e-5)


ROWS = {"lcm-lora-sdxl": LCM_LORA, "pcm-sdxl-2step": PCM, "pcm-sdxl-16step": PCM, "tlcm-sdxl": TLCM,
        "sdxl-turbo": TURBO, "lcm-sdxl": LCM_UNET}


def test_missing_checkpoints_fail_fast_naming_hub_id_and_cache(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
        importlib.reload(c)
        for name, own in ROWS.items():  # empty cache: the first missing checkpoint is named, with the cache dir
            first = TURBO if name == "sdxl-turbo" else SDXL
            with pytest.raises(ModelNotAvailable, match=rf"'{first}' is not available offline: .*empty-home"):
                check_available(name)
        # a cache with only the SDXL base: each row's own checkpoint (LoRA / adapter / UNet) is named
        home = tmp_path / "base-only"
        (home / "hub").mkdir(parents=True)
        entry = "models--" + SDXL.replace("/", "--")
        (home / "hub" / entry).symlink_to(hub["cache"] / entry)
        monkeypatch.setenv("HF_HOME", str(home))
        importlib.reload(c)
        for name, own in ROWS.items():
            with pytest.raises(ModelNotAvailable, match=rf"'{own}' is not available offline: .*base-only.*hf download {own}"):
                check_available(name)
    finally:
        monkeypatch.undo()
        importlib.reload(c)
