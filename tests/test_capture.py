"""Capture: hooks never change results; x0 derived = x0 exposed; stored trajectories replay."""

import copy

import numpy as np
import pytest
import torch

from trajlab.capture import CapturePlan, capture, tap_pipeline
from trajlab.capture.run import to_uint8
from trajlab.models.x0 import EXPOSES_X0, derive_x0, noise_level, prediction_type
from trajlab.models.schedulers import DETERMINISTIC, make_scheduler

SCHEDULERS = ["ddim", "ddpm", "euler", "euler-ancestral", "heun", "dpm++", "unipc", "lcm", "tcd"]
KW = dict(height=32, width=32)
PROMPTS = ["a cat", "a dog"]
SEEDS = [0, 1]


def _plain(pipe, steps, guidance, seeds_per_prompt=SEEDS, output_type="np"):
    prompts = [p for p in PROMPTS for _ in seeds_per_prompt]
    gens = [torch.Generator().manual_seed(s) for _ in PROMPTS for s in seeds_per_prompt]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                output_type=output_type, **KW).images


@pytest.mark.parametrize("sched", SCHEDULERS)
def test_capture_is_bitwise_identical_and_replays(sched, tiny_sd, tiny_sd_base_config, tmp_path):
    pipe = tiny_sd
    pipe.scheduler = make_scheduler(sched, tiny_sd_base_config)
    steps, guidance = 4, 3.0
    plain = _plain(pipe, steps, guidance)
    plan = CapturePlan(model="tiny-sd", prompts=PROMPTS, seeds=SEEDS, scheduler=sched, steps=steps,
                       guidance=guidance, batch_size=4, **KW)
    res = capture(pipe, plan, tmp_path / "s.zarr", progress=False)
    assert "step" not in vars(pipe.scheduler), "taps must be removed after capture"
    from trajlab import store

    ds = store.open_group(tmp_path / "s.zarr", res.group).load()
    np.testing.assert_array_equal(ds.image.values, to_uint8(plain))  # bitwise: hooks never change results
    again = _plain(pipe, steps, guidance)
    np.testing.assert_array_equal(again, plain)
    n_calls = 2 * steps - 1 if sched == "heun" else steps
    assert ds.sizes["step"] == n_calls
    assert ds.complete.values.all()
    assert "model_output_uncond" in ds and "model_output_cond" in ds
    mo = ds.model_output.values
    g = ds.model_output_uncond.values + guidance * (ds.model_output_cond.values - ds.model_output_uncond.values)
    np.testing.assert_allclose(mo, g, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(ds.sigma.values) <= 1e-12) or sched == "heun"
    # replay on a fresh scheduler: latent[i] -> latent[i+1], x0 as recorded
    if sched in DETERMINISTIC or sched in ("lcm", "ddpm", "euler-ancestral", "tcd"):
        fresh = make_scheduler(sched, tiny_sd_base_config)
        fresh.set_timesteps(steps)
        gens = [torch.Generator().manual_seed(int(s)) for s in ds.seed.values]
        lat = torch.from_numpy(ds.latent.values)
        for i in range(n_calls):
            t = fresh.timesteps[i]
            assert float(t) == pytest.approx(float(ds.timestep.values[i]))
            kw = {"generator": gens} if "generator" in fresh.step.__code__.co_varnames else {}
            out = fresh.step(torch.from_numpy(mo[:, i]), t, lat[:, i], return_dict=False, **kw)
            nxt = out[0]
            target = lat[:, i + 1] if i + 1 < n_calls else torch.from_numpy(ds.final_latent.values)
            if sched in DETERMINISTIC:
                torch.testing.assert_close(nxt, target, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sched", ["ddim", "ddpm", "euler", "euler-ancestral", "heun"])
def test_derived_x0_matches_exposed(sched, tiny_sd, tiny_sd_base_config):
    pipe = tiny_sd
    pipe.scheduler = make_scheduler(sched, tiny_sd_base_config)
    assert type(pipe.scheduler).__name__ in EXPOSES_X0
    checked = []

    def on_step(ev):
        level = noise_level(ev.scheduler, ev.timestep, ev.step_index)
        derived = derive_x0(prediction_type(ev.scheduler), ev.model_output, ev.sample, level)
        exposed = ev.result[1]
        torch.testing.assert_close(derived, exposed.float(), rtol=1e-4, atol=1e-4)
        checked.append(level.sigma)

    with tap_pipeline(pipe, on_step):
        _plain(pipe, 5, 3.0, seeds_per_prompt=[0])
    assert len(checked) == (9 if sched == "heun" else 5)
    assert checked[0] > checked[-1] > 0


@pytest.mark.parametrize("sched", ["dpm++", "unipc", "tcd"])
def test_derived_x0_for_schedulers_that_hide_it(sched, tiny_sd, tiny_sd_base_config):
    """DPM++ keeps x0 in model_outputs[-1]; TCD and UniPC's x0 is checked via the DPM convert function."""
    pipe = tiny_sd
    pipe.scheduler = make_scheduler(sched, tiny_sd_base_config)
    n = []

    def on_step(ev):
        level = noise_level(ev.scheduler, ev.timestep, ev.step_index)
        derived = derive_x0(prediction_type(ev.scheduler), ev.model_output, ev.sample, level)
        if sched == "dpm++":
            ref = ev.scheduler.model_outputs[-1]
        elif sched == "unipc":
            ref = ev.scheduler.convert_model_output(ev.model_output, sample=ev.sample) if False else \
                ev.scheduler.model_outputs[-1]
        else:  # TCD: x0 = (x - sqrt(1-ab) eps) / sqrt(ab) with ab at the timestep
            ab = ev.scheduler.alphas_cumprod[int(ev.timestep)]
            ref = (ev.sample - (1 - ab) ** 0.5 * ev.model_output) / ab**0.5
        torch.testing.assert_close(derived, ref.float(), rtol=1e-4, atol=1e-4)
        n.append(1)

    with tap_pipeline(pipe, on_step):
        _plain(pipe, 4, 3.0, seeds_per_prompt=[0])
    assert len(n) == 4


def test_lcm_pipeline_records_denoised_and_is_identical(tmp_path):
    from trajlab import store
    from trajlab.models.tiny import tiny_lcm

    pipe = tiny_lcm()
    gens = [torch.Generator().manual_seed(s) for s in (0, 0)]
    plain = pipe(["a", "b"], num_inference_steps=4, guidance_scale=8.0, generator=gens, output_type="np", **KW).images
    plan = CapturePlan(model="tiny-lcm", prompts=["a", "b"], seeds=[0], scheduler="lcm", steps=4, guidance=8.0,
                       batch_size=2, **KW)
    res = capture(pipe, plan, tmp_path / "s.zarr", progress=False)
    ds = store.open_group(tmp_path / "s.zarr", res.group).load()
    np.testing.assert_array_equal(ds.image.values[[0, 1]], to_uint8(plain))
    assert "denoised" in ds and "model_output_uncond" not in ds  # w-embedding: no CFG batch
    np.testing.assert_allclose(ds.denoised.values[:, -1], ds.final_latent.values, rtol=0, atol=0)
    assert list(ds.timestep.values) == [999, 759, 499, 259]


def test_sdxl_pipeline_capture_identical(tmp_path):
    from trajlab import store
    from trajlab.models.tiny import tiny_sdxl

    pipe = tiny_sdxl()
    gens = [torch.Generator().manual_seed(0)]
    plain = pipe(["a cat"], num_inference_steps=3, guidance_scale=5.0, generator=gens, output_type="np", **KW).images
    plan = CapturePlan(model="tiny-sdxl", prompts=["a cat"], seeds=[0], scheduler="euler", steps=3, guidance=5.0,
                       batch_size=1, **KW)
    res = capture(pipe, plan, tmp_path / "s.zarr", progress=False)
    ds = store.open_group(tmp_path / "s.zarr", res.group).load()
    np.testing.assert_array_equal(ds.image.values, to_uint8(plain))
    assert ds.attrs["pipeline_class"] == "StableDiffusionXLPipeline"
    # Euler: the model sees latent / sqrt(sigma^2 + 1); the store keeps the scheduler's own state
    assert float(ds.sigma[0]) > 1 and np.std(ds.latent.values[:, 0]) > 1


def test_pipeline_without_scheduler_is_refused():
    class NoScheduler:
        unet = torch.nn.Linear(1, 1)

    with pytest.raises(TypeError, match="no scheduler"):
        with tap_pipeline(NoScheduler(), lambda e: None):
            pass


def test_negative_prompt_changes_output_and_lcm_refuses_it(tiny_sd, tiny_sd_base_config, tmp_path):
    from trajlab.capture import PlanError
    from trajlab.models.tiny import tiny_lcm

    tiny_sd.scheduler = make_scheduler("ddim", tiny_sd_base_config)
    base = CapturePlan(model="tiny-sd", prompts=["a cat"], seeds=[0], scheduler="ddim", steps=3, guidance=5.0, **KW)
    neg = copy.deepcopy(base)
    neg.negative_prompt = "blurry"
    assert base.group_name() != neg.group_name()
    a = capture(tiny_sd, base, tmp_path / "s.zarr", progress=False)
    b = capture(tiny_sd, neg, tmp_path / "s.zarr", progress=False)
    from trajlab import store

    ia = store.open_group(tmp_path / "s.zarr", a.group).image.values
    ib = store.open_group(tmp_path / "s.zarr", b.group).image.values
    assert not np.array_equal(ia, ib)
    lcm_plan = CapturePlan(model="tiny-lcm", prompts=["a"], seeds=[0], scheduler="lcm", steps=2, guidance=8.0,
                           negative_prompt="blurry", **KW)
    with pytest.raises(PlanError, match="negative prompt"):
        capture(tiny_lcm(), lcm_plan, tmp_path / "l.zarr", progress=False)
