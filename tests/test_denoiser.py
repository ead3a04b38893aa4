"""The guided model callable (trajlab.models.denoiser) is what each pipeline steps with: replaying the
sampler through it on a fresh scheduler, with the captured noise, reproduces the captured trajectory."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from trajlab.capture import CapturePlan
from trajlab.capture.run import capture_dataset
from trajlab.models import denoiser as dn
from trajlab.models.schedulers import make_scheduler, promote_tables, scheduler_from_attrs, step_kwargs

PROMPTS = ["a red cube", "a blue ball"]
SEEDS = [3, 4]

# model, scheduler, steps, guidance, negative prompt
CASES = {
    "sd": ("tiny-sd", "ddim", 4, 5.0, "blurry"),
    "sdxl": ("tiny-sdxl", "euler", 4, 5.0, None),
    "lcm": ("tiny-lcm", "lcm", 3, 8.0, None),
    "exact": ("exact:gauss-8d", "default", 4, 1.0, None),
}


def _capture(name):
    from trajlab.models.loading import load_pipeline

    model, sched, steps, w, neg = CASES[name]
    pipe = load_pipeline(model, scheduler=sched)
    plan = CapturePlan(model, PROMPTS, SEEDS, scheduler=sched, steps=steps, guidance=w, negative_prompt=neg,
                       images=False, batch_size=len(PROMPTS) * len(SEEDS))
    return pipe, capture_dataset(pipe, plan)


def _prompts(ds):
    texts = [str(t) for t in np.asarray(ds["prompt_text"].values)]
    return [texts[int(i)] for i in np.asarray(ds["prompt_index"].values)]


def _replay(pipe, ds, **model_kw):
    """Final latents of the whole sampler replayed through `dn.pipeline_model` from the stored latent[:, 0]."""
    model = dn.pipeline_model(pipe, _prompts(ds), **model_kw)
    lat0 = torch.from_numpy(np.asarray(ds["latent"].values[:, 0]))
    gens = dn.replay_generators(ds["seed"].values, lat0.shape[1:])
    f = dn.sampler_map(scheduler_from_attrs(ds.attrs), model, int(ds.attrs["steps"]), generator=gens)
    with torch.no_grad():
        return f(lat0).numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_model_replays_the_captured_sampler(name):
    pipe, ds = _capture(name)
    _, _, _, w, neg = CASES[name]
    final = np.asarray(ds["final_latent"].values)
    got = _replay(pipe, ds, guidance_scale=w, negative_prompt=neg)
    np.testing.assert_allclose(got, final, rtol=0, atol=1e-6 * np.abs(final).max())
    # the model at step 0 is the stored model output (what the pipeline handed to scheduler.step)
    s = scheduler_from_attrs(ds.attrs)
    s.set_timesteps(int(ds.attrs["steps"]))
    t0 = s.timesteps[0]
    x = torch.from_numpy(np.asarray(ds["latent"].values[:, 0]))
    with torch.no_grad():
        out = dn.pipeline_model(pipe, _prompts(ds), guidance_scale=w, negative_prompt=neg)(s.scale_model_input(x, t0), t0)
    mo = np.asarray(ds["model_output"].values[:, 0])
    np.testing.assert_allclose(out.numpy(), mo, rtol=0, atol=1e-6 * np.abs(mo).max())
    if name != "exact":  # the conditioning matters: a different guidance gives a different sampler
        other = _replay(pipe, ds, guidance_scale=w + 2.0, negative_prompt=neg)
        assert np.abs(other - final).max() > 1e-4


class _Recorder(torch.nn.Module):
    """A fake UNet: output = x * (1 + mean of encoder states); records its kwargs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, encoder_hidden_states=None, timestep_cond=None, return_dict=True, **kw):
        self.calls.append({"batch": x.shape[0], "timestep_cond": timestep_cond, **kw})
        return (x * (1 + encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)),)


def test_guided_model_cfg_doubles_negative_first():
    unet = _Recorder()
    pos, neg = torch.full((2, 3, 4), 1.0), torch.full((2, 3, 4), -0.5)
    added = {"text_embeds": torch.zeros(4, 2)}
    x = torch.randn(2, 4, 2, 2)
    out = dn.guided_model(unet, dn.Conditioning(pos, neg, added, None, 3.0))(x, 10)
    u, c = x * 0.5, x * 2.0
    torch.testing.assert_close(out, u + 3.0 * (c - u))
    assert unet.calls[-1]["batch"] == 4 and unet.calls[-1]["added_cond_kwargs"] is added
    # guidance 1 (or no negative embeddings): one plain call, no doubling
    out1 = dn.guided_model(unet, dn.Conditioning(pos, neg, None, None, 1.0))(x, 10)
    torch.testing.assert_close(out1, c)
    assert unet.calls[-1]["batch"] == 2 and "added_cond_kwargs" not in unet.calls[-1]


def test_sampler_map_holds_noise_fixed_and_scheduler_helpers():
    from trajlab.models.tiny import SD_SCHEDULER

    base = {"_class_name": "DDIMScheduler", **SD_SCHEDULER}
    lcm = make_scheduler("lcm", base)
    model = lambda x, t: 0.1 * x  # noqa: E731
    g = torch.Generator().manual_seed(5)
    f = dn.sampler_map(lcm, model, 3, generator=g)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    a, b = f(x), f(x)
    assert torch.equal(a, b)  # the generator snapshot is restored per evaluation
    other = dn.sampler_map(lcm, model, 3, generator=torch.Generator().manual_seed(6))(x)
    assert not torch.equal(a, other)  # ... and it is the noise that LCM's multistep sampling uses
    kw = step_kwargs(make_scheduler("ddim", base), g, extra={"eta": 0.3, "nonsense": 1})
    assert kw == {"eta": 0.3, "generator": g}
    assert "eta" not in step_kwargs(lcm, g)
    s = promote_tables(make_scheduler("ddim", base), torch.float32)
    assert s.alphas_cumprod.dtype == torch.float32
    assert promote_tables(s).alphas_cumprod.dtype == torch.float64
