"""Stacked primal/tangent JVPs (trajlab.autodiff.fast_jvp) equal torch.func.jvp on the math attention
backend: one UNet call (tiny-sd, micro-sd, tiny-sdxl), guided models with CFG, whole samplers
(DDIM / Euler / DPM++), exact worlds; estimators pick the fast path and fall back where it does not
apply."""

import copy
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from trajlab.analysis import estimators as est
from trajlab.autodiff.attention import attention_context
from trajlab.autodiff import fast_jvp as fj
from trajlab.models import denoiser as dn


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ctx(unet):
    return lambda: attention_context(unet)  # what the analyses use: math SDPA under forward AD


def _ref(f, x, V):
    """torch.func.jvp on the math SDPA backend, one probe at a time."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = [torch.func.jvp(f, (x,), (v,)) for v in V]
    return outs[0][0], torch.stack([o[1] for o in outs])


@pytest.fixture(scope="module")
def pipes(tiny_sd):
    from trajlab.models.loading import load_pipeline

    return {"tiny-sd": tiny_sd, "micro-sd": load_pipeline("micro-sd"), "tiny-sdxl": load_pipeline("tiny-sdxl")}


@pytest.mark.parametrize("name,res", [("tiny-sd", 16), ("micro-sd", 9), ("tiny-sdxl", 8)])
def test_unet_call_equals_func_jvp(pipes, name, res):
    pipe = pipes[name]
    assert fj.unet_supported(pipe.unet) == (True, "")
    cond = dn.encode(pipe, ["a red cube", "a dog"], guidance_scale=5.0, dtype=torch.float32,
                     height=res * 8, width=res * 8)
    model = dn.guided_model(pipe.unet, cond)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, res, res, generator=g)
    V = torch.randn(2, 2, 4, res, res, generator=g)
    t = torch.tensor(601)
    y0, ref = _ref(lambda a: model(a, t), x, V)
    y, JV = fj.model_jvp(model, x, V, t)
    assert JV.shape == ref.shape and y.shape == y0.shape
    assert _rel(y, y0) < 1e-5
    assert _rel(JV, ref) < 1e-5
    y1, JV1 = fj.model_jvp(model, x, V[:1], t)  # one probe (the m == 1 kernels)
    assert _rel(JV1[0], ref[0]) < 1e-5


def _scheduler(pipe, kind):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    cfg = dict(pipe.scheduler.config)
    if kind == "ddim":
        return copy.deepcopy(pipe.scheduler)
    if kind == "euler":
        return EulerDiscreteScheduler.from_config(cfg)
    return DPMSolverMultistepScheduler.from_config(cfg)


@pytest.mark.parametrize("name,kind,steps", [("tiny-sd", "ddim", 3), ("micro-sd", "dpm", 3),
                                             ("tiny-sdxl", "euler", 2)])
def test_whole_sampler_equals_func_jvp_and_estimators_use_it(pipes, name, kind, steps):
    pipe = pipes[name]
    res = 8
    cond = dn.encode(pipe, ["a red cube"], guidance_scale=3.0, dtype=torch.float32, height=64, width=64)
    model = dn.guided_model(pipe.unet, cond, context=_ctx(pipe.unet))
    f = dn.sampler_map(_scheduler(pipe, kind), model, steps)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, res, res, generator=g)
    V = torch.randn(2, 1, 4, res, res, generator=g)
    y0, ref = _ref(f, x, V)
    y, JV = f.fast_jvp(x, V)
    assert _rel(y, y0) < 1e-5 and _rel(JV, ref) < 2e-5
    y2, JV2, used = est._jvp_batch(f, x, V)
    assert used == "fast" and torch.equal(JV2, JV)
    # a wrapped map has no rule: the same numbers through torch.func
    _, JV3, used3 = est._jvp_batch(lambda a: f(a), x, V)
    assert used3 == "func" and _rel(JV3, ref) < 1e-6


def test_step_and_denoiser_maps(pipes):
    pipe = pipes["micro-sd"]
    model = dn.pipeline_model(pipe, ["a"], guidance_scale=2.0, dtype=torch.float32)
    s = copy.deepcopy(pipe.scheduler)
    s.set_timesteps(4)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=g)
    V = torch.randn(3, 1, 4, 8, 8, generator=g)
    fs = dn.sampler_step_map(s, model, s.timesteps[1])
    _, ref = _ref(fs, x, V)
    assert _rel(fs.fast_jvp(x, V)[1], ref) < 1e-5
    ab = float(s.alphas_cumprod[int(s.timesteps[1])])
    for space in ("edm", "vp"):
        fd = dn.denoiser_map(model, s.timesteps[1], ab, space=space)
        y0, ref = _ref(fd, x, V)
        y, JV = fd.fast_jvp(x, V)
        assert _rel(y, y0) < 2e-6 and _rel(JV, ref) < 1e-5  # fp32: the stacked batch reorders reductions (1.004e-6 seen)


def test_exact_world_sampler_and_closed_form_jacobian():
    from trajlab.models.exact import gmm_denoiser_jacobian
    from trajlab.models.loading import load_pipeline

    pipe = load_pipeline("exact:gauss-8d")
    d = pipe.unet.world.d
    model = dn.pipeline_model(pipe)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, d, 1, 1, generator=g, dtype=torch.float64)
    V = torch.randn(4, 3, d, 1, 1, generator=g, dtype=torch.float64)
    f = dn.sampler_map(pipe.scheduler, model, 25)
    y0, ref = _ref(f, x, V)
    y, JV = f.fast_jvp(x, V)
    assert _rel(y, y0) < 1e-12 and _rel(JV, ref) < 1e-10
    # denoiser map (EDM coordinates) against the closed-form dD/dy
    s = copy.deepcopy(pipe.scheduler)
    s.set_timesteps(10)
    t = s.timesteps[3]
    ab = float(s.alphas_cumprod[int(t)])
    fd = dn.denoiser_map(model, t, ab, space="edm")
    _, JV = fd.fast_jvp(x, V)
    J = gmm_denoiser_jacobian(x, ((1 - ab) / ab) ** 0.5, pipe.unet.world)  # (B, d, d)
    want = torch.einsum("bij,mbj->mbi", J, V.reshape(4, 3, d)).reshape(V.shape)
    assert _rel(JV, want) < 1e-10


def test_exact_gmm_world_matches_func_jvp():
    from trajlab.models.loading import load_pipeline
    from trajlab.models.registry import registry

    names = [n for n in registry() if n.startswith("exact:") and n != "exact:gauss-8d"]
    pipe = load_pipeline(names[0])
    d = pipe.unet.world.d
    model = dn.pipeline_model(pipe)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, d, 1, 1, generator=g, dtype=torch.float64)
    V = torch.randn(3, 2, d, 1, 1, generator=g, dtype=torch.float64)
    f = dn.sampler_map(pipe.scheduler, model, 6)
    _, ref = _ref(f, x, V)
    assert _rel(f.fast_jvp(x, V)[1], ref) < 1e-10


def test_unsupported_models_and_schedulers_fall_back(pipes):
    from diffusers import LCMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = pipes["micro-sd"]
    unet = copy.deepcopy(pipe.unet)

    class MyProc(AttnProcessor2_0):
        pass

    unet.set_attn_processor(MyProc())
    ok, why = fj.unet_supported(unet)
    assert not ok and "MyProc" in why
    model = dn.guided_model(unet, dn.encode(pipe, ["a"], dtype=torch.float32), context=_ctx(unet))
    x = torch.randn(1, 4, 8, 8, dtype=torch.float32)
    V = torch.randn(2, 1, 4, 8, 8)
    fd = dn.denoiser_map(model, 500, 0.3)
    with pytest.raises(fj.FastJVPUnsupported):
        fd.fast_jvp(x, V)
    _, JV, used = est._jvp_batch(fd, x, V)
    assert used == "func"
    # a stochastic scheduler: the rule refuses, auto falls back, method="fast" says why
    model = dn.pipeline_model(pipe, ["a"], dtype=torch.float32, context=_ctx(pipe.unet))
    f = dn.sampler_map(LCMScheduler.from_config(pipe.scheduler.config), model, 2,
                       generator=torch.Generator().manual_seed(0))
    assert not fj.step_is_linear(LCMScheduler.from_config(pipe.scheduler.config))[0]
    _, _, used = est._jvp_batch(f, x, V[:1])
    assert used == "func"
    with pytest.raises(RuntimeError, match="does not apply"):
        est.jvp(f, x, V[0], method="fast")


def test_estimators_record_fast_and_agree(pipes):
    pipe = pipes["micro-sd"]
    model = dn.pipeline_model(pipe, ["a", "b"], guidance_scale=2.0, dtype=torch.float32, context=_ctx(pipe.unet))
    f = dn.sampler_map(pipe.scheduler, model, 2)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    h1 = est.hutchinson_frobenius(f, x, 10, generator=torch.Generator().manual_seed(0))
    h2 = est.hutchinson_frobenius(f, x, 10, generator=torch.Generator().manual_seed(0), method="func")
    assert h1.attrs["jvp_method"] == "fast" and h2.attrs["jvp_method"] == "func"
    assert abs(h1["fro2"].values - h2["fro2"].values).max() / h2["fro2"].values.max() < 1e-5
