"""Jacobian analyses along sampler trajectories (store groups), on the estimators of
`trajlab.analysis.estimators` and the maps of `trajlab.models.denoiser`.

Maps to differentiate (`trajlab.models.denoiser`; all replay a FRESH deep copy of the scheduler, so
repeated calls give the same function; stochastic samplers get their generator re-created from a
saved state per call so the noise is held fixed):
  `denoiser_map`      x_t (or y) -> x0_hat at one timestep,
  `sampler_step_map`  latent_i -> latent_{i+1} (one `scheduler.step` call),
  `sampler_map`       latent_0 -> final latent (the whole K-step loop).
Analyses here: `step_contraction_profile` (along a stored trajectory), `contraction_profile`,
`contraction_theory`, `contraction_law`.  Estimators and maps are re-exported under their names.

Noise injected by stochastic samplers (docs/theory.md §14): `record_injections` runs a sampler once and
returns its draws (`NoiseInjections`), with maps z_k -> final latent for each draw k (the Jacobian of the
output w.r.t. the noise injected at a step: the later step maps times the injection scale), by routing
the scheduler's `randn_tensor` calls through `drawn_noise`.  Whole-map norms are also reported per unit
of initial-noise standard deviation (`unit_noise_scale`), so samplers with init_noise_sigma != 1 compare.

Attention: forward mode fails on fused SDPA kernels (docs/performance.md, "JVP cost"); `unet_model_fn` /
`pipeline_model_fn` run the network under `trajlab.autodiff.attention.attention_context`, the
one switch (math backend fallback, ~4.5x).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import xarray as xr

from trajlab.autodiff.attention import attention_context, forward_mode_active
from trajlab.analysis.estimators import (Map, exact_jacobian, hutchinson_frobenius, jvp, jvp_probes, logdet_exact,
                                         logdet_slq, power_iteration, randomized_svd, vjp, vjp_probes)
from trajlab.models import denoiser as dn
from trajlab.models.denoiser import (denoiser_map, replay_generators, replay_scheduler, sampler_map,
                                     sampler_step_map, scheduler_from_attrs)
from trajlab.models.schedulers import promote_tables, step_kwargs

__all__ = [
    "attention_context",
    "forward_mode_active",
    "jvp",
    "vjp",
    "jvp_probes",
    "vjp_probes",
    "exact_jacobian",
    "hutchinson_frobenius",
    "power_iteration",
    "randomized_svd",
    "logdet_slq",
    "logdet_exact",
    "denoiser_map",
    "sampler_step_map",
    "sampler_map",
    "unet_model_fn",
    "pipeline_model_fn",
    "scheduler_from_attrs",
    "replay_scheduler",
    "step_contraction_profile",
    "jvp_dtype",
    "replay_generators",
    "group_model_fn",
    "contraction_profile",
    "contraction_theory",
    "contraction_law",
    "Map",
    "drawn_noise",
    "NoiseInjections",
    "record_injections",
    "unit_noise_scale",
]


# ----------------------------------------------------------------------------------------------
# the model under the attention-JVP switch


def unet_model_fn(unet, encoder_hidden_states=None, *, guidance_scale: float = 1.0,
                  negative_encoder_hidden_states=None, added_cond_kwargs=None, timestep_cond=None,
                  use_attention_context: bool = True):
    """`trajlab.models.denoiser.guided_model` of `unet` with this conditioning, every call under
    `attention_context(unet)` (math SDPA fallback when fused kernels lack forward AD)."""
    cond = dn.Conditioning(encoder_hidden_states, negative_encoder_hidden_states, added_cond_kwargs, timestep_cond,
                           float(guidance_scale))
    return dn.guided_model(unet, cond, context=(lambda: attention_context(unet)) if use_attention_context else None)


def pipeline_model_fn(pipe, prompts=None, *, guidance_scale: float = 1.0, negative_prompt=None, dtype=None):
    """`trajlab.models.denoiser.pipeline_model` (SD, SDXL, LCM, exact worlds: the model the pipeline
    steps with for `prompts`, one per sample) under `attention_context(pipe.unet)`.  `dtype` casts the
    embeddings (JVPs need fp32)."""
    return dn.pipeline_model(pipe, prompts, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                             dtype=dtype, context=lambda: attention_context(pipe.unet))


# ----------------------------------------------------------------------------------------------
# along a stored trajectory


def step_contraction_profile(ds: xr.Dataset, model_fn, scheduler=None, *, samples=None, steps=None,
                             n_probes: int = 8, n_power_iter: int = 10, k: int = 1, dtype=None,
                             generator: torch.Generator | None = None, method: str = "auto",
                             device=None) -> xr.Dataset:
    """Per-step contraction of the sampler along a stored trajectory.

    For each step call i (dims step) and sample: the Jacobian of latent_i -> latent_{i+1} at the stored
    latent_i (`scheduler.step` replayed on a fresh scheduler positioned by the stored model outputs):
    Hutchinson ||J_i||_F^2 (fro2, fro2_se; fro2_per_dim = fro2 / n) and the top-k singular values
    by power iteration (singular_value (sample, step, rank); spectral_norm = rank 0).
    ds: a store group Dataset (latent, model_output, coords timestep / sigma / alpha_bar, attrs
    scheduler_class / scheduler_config / steps).  dtype defaults to fp32 for half-precision stores.
    """
    scheduler = scheduler if scheduler is not None else scheduler_from_attrs(ds.attrs)
    sel = ds if samples is None else ds.isel(sample=samples)
    dt = dtype or (torch.float32 if sel["latent"].dtype.itemsize < 4 else torch.from_numpy(
        np.zeros(1, sel["latent"].dtype)).dtype)
    lat = torch.from_numpy(np.asarray(sel["latent"].values)).to(device=device, dtype=dt)
    mo = torch.from_numpy(np.asarray(sel["model_output"].values)).to(device=device, dtype=dt)
    ts_np = ds["timestep"].values
    ts = [torch.tensor(t) for t in ts_np]
    K = int(ds.attrs.get("steps", len(ts)))
    steps = list(range(len(ts))) if steps is None else list(steps)
    n = lat[0, 0].numel()
    s = promote_tables(copy.deepcopy(scheduler), dt)
    s.set_timesteps(K, device=lat.device)
    ts = dn.own_timesteps(s, ts_np, ts)
    kw = step_kwargs(s, torch.Generator().manual_seed(0))
    fro2, fro2_se, sv = [], [], []
    method_used = method
    for i in range(max(steps) + 1):
        if i in steps:
            f = sampler_step_map(s, model_fn, ts[i], generator=generator)
            x = lat[:, i]
            h = hutchinson_frobenius(f, x, n_probes, generator=generator, method=method)
            p = power_iteration(f, x, k=k, n_iter=n_power_iter, generator=generator, method=method)
            method_used = h.attrs["jvp_method"]
            fro2.append(h["fro2"].values)
            fro2_se.append(h["fro2_se"].values)
            sv.append(p["singular_value"].values)
        dn.replay_steps(s, mo, lat, ts, i, i + 1, kw)
    coords = {"step": ds["step"].values[steps], "rank": np.arange(k)}
    for c in ("timestep", "sigma", "alpha_bar"):
        if c in ds.coords:
            coords[c] = ("step", ds[c].values[steps])
    for c in ("seed", "prompt_index"):
        if c in sel.coords:
            coords[c] = ("sample", sel[c].values)
    coords["sample"] = sel["sample"].values if "sample" in sel.coords else np.arange(lat.shape[0])
    fro2 = np.stack(fro2, 1)
    sv = np.stack(sv, 1)
    return xr.Dataset(
        {"fro2": (("sample", "step"), fro2), "fro2_se": (("sample", "step"), np.stack(fro2_se, 1)),
         "fro2_per_dim": (("sample", "step"), fro2 / n),
         "singular_value": (("sample", "step", "rank"), sv), "spectral_norm": (("sample", "step"), sv[..., 0])},
        coords=coords,
        attrs={"n": int(n), "n_probes": int(n_probes), "n_power_iter": int(n_power_iter), "jvp_method": method_used,
               "scheduler_class": type(scheduler).__name__, "what": "Jacobian of one scheduler.step call"},
    )


# ----------------------------------------------------------------------------------------------
# noise injected by stochastic samplers (docs/theory.md §14)


def _noise_modules(scheduler) -> list:
    """The modules whose global `randn_tensor` (diffusers' noise function, imported by name) the
    scheduler's step calls: those of its class and its base classes."""
    mods = []
    for cls in type(scheduler).__mro__:
        m = sys.modules.get(cls.__module__)
        if m is not None and callable(getattr(m, "randn_tensor", None)) and m not in mods:
            mods.append(m)
    return mods


@contextlib.contextmanager
def drawn_noise(scheduler, hook: Callable[[torch.Tensor], torch.Tensor]):
    """Inside, every noise draw of `scheduler.step` (diffusers' `randn_tensor`, as DDPM, DDIM eta > 0, Euler
    ancestral, Euler s_churn, LCM, TCD and SDE DPM-Solver draw it) is passed through hook(draw) -> tensor,
    which may record it or return another tensor (e.g. one carrying a tangent) in its place.  The draw
    itself is still made, so the generator advances as in an unobserved run.  Schedulers that draw noise
    otherwise (torchsde Brownian trees) are not seen."""
    mods = _noise_modules(scheduler)
    saved = [m.randn_tensor for m in mods]

    def wrap(orig):
        def randn_tensor(*args, **kwargs):
            return hook(orig(*args, **kwargs))
        return randn_tensor

    for m, orig in zip(mods, saved):
        m.randn_tensor = wrap(orig)
    try:
        yield
    finally:
        for m, orig in zip(mods, saved):
            m.randn_tensor = orig


@dataclass
class NoiseInjections:
    """The noise one run of a stochastic sampler drew from `latent` (latent_0, (B, ...)).

    noise[k]: draw k (unit-variance N(0, I) entries, as `randn_tensor` returned it), drawn in step call
    step[k]; final: the sampler's output; run(latent, {k: z}) -> final latent with draw k replaced by z
    (every other draw held fixed, the generator re-created from its snapshot per call).
    `map(k)`: z -> final latent (latent_0 and the other draws fixed), whose Jacobian is J_{z_k}: the
    product of the step maps after step[k] times the injection scale (docs/theory.md §14.1);
    `initial_map()`: latent_0 -> final latent with every draw fixed (J_T, = `sampler_map`)."""

    latent: torch.Tensor
    final: torch.Tensor
    noise: list = field(default_factory=list)
    step: list = field(default_factory=list)
    run: Callable | None = None

    def map(self, k: int) -> Map:
        latent, run = self.latent, self.run
        return lambda z: run(latent, {int(k): z})

    def initial_map(self) -> Map:
        run = self.run
        return lambda x: run(x, None)


def record_injections(scheduler, model, num_inference_steps: int, latent: torch.Tensor, *, generator=None,
                      step_kw: dict | None = None, device="cpu") -> NoiseInjections:
    """Run the sampler (`scheduler` fresh copy, set_timesteps(num_inference_steps), the pipeline loop of
    `trajlab.models.denoiser.sample`) once from `latent` with `generator` (a torch.Generator or a
    per-sample list, e.g. `replay_generators` of a store group's seeds, so the run replays the captured
    one) and record every noise draw of its steps.  step_kw: extra `scheduler.step` keywords (e.g.
    {"eta": gamma} for TCD; those the step does not take are dropped).  Deterministic samplers give no
    draws (Euler without s_churn draws none; zero-scale draws, such as Euler ancestral's last step, are kept)."""
    gstate = dn.snapshot_generator(generator)
    base = copy.deepcopy(scheduler)
    base.set_timesteps(num_inference_steps, device=device)
    promote_tables(base, latent.dtype)

    def run(x, replace=None, record=None):
        s = promote_tables(copy.deepcopy(base), x.dtype)
        state = {"step": 0, "k": 0}

        def hook(z):
            k = state["k"]
            state["k"] += 1
            if record is not None:
                record.append((state["step"], z))
            if replace and k in replace:
                return replace[k].to(device=z.device, dtype=z.dtype)
            return z

        def after(i, t, lat):
            state["step"] = i + 1
            return lat

        with drawn_noise(s, hook):
            return dn.sample(s, model, x, callback=after,
                             extra_step_kwargs=step_kwargs(s, dn.restore_generator(gstate), extra=step_kw))

    rec = []
    with torch.no_grad():
        final = run(latent, None, rec)
    return NoiseInjections(latent=latent, final=final, noise=[z for _, z in rec], step=[i for i, _ in rec], run=run)


def unit_noise_scale(scheduler, steps: int) -> float:
    """init_noise_sigma of `scheduler` after set_timesteps(steps) (on a copy): latent_0 = init_noise_sigma n
    with n ~ N(0, I), so J_unit = J * init_noise_sigma is the map from unit noise n, and
    ||J_unit||_F^2 = init_noise_sigma^2 ||J||_F^2 compares across samplers (DDIM: 1; Euler: ~14.6 on SD's
    schedule)."""
    s = copy.deepcopy(scheduler)
    s.set_timesteps(steps)
    return float(s.init_noise_sigma)


# ----------------------------------------------------------------------------------------------
# a store group with the pipeline that made it


def jvp_dtype(pipe) -> torch.dtype:
    """float64 for exact-world pipelines (closed-form denoiser, fp64 tables), else float32."""
    return torch.float64 if getattr(pipe, "world", None) is not None else torch.float32


def _sample_index(ds: xr.Dataset, samples) -> np.ndarray:
    if samples is None:
        return np.arange(ds.sizes["sample"])
    if np.ndim(samples) == 0:
        return np.arange(min(int(samples), ds.sizes["sample"]))
    return np.asarray(samples, dtype=np.int64)


def group_model_fn(pipe, ds: xr.Dataset, samples=None, *, dtype=None):
    """`pipeline_model_fn` for the samples `samples` (index array, count or None = all) of a store group:
    their prompts (`prompt_text[prompt_index]`), the group's `guidance` and `negative_prompt` attrs."""
    idx = _sample_index(ds, samples)
    if not hasattr(pipe, "encode_prompt"):
        return pipeline_model_fn(pipe)
    texts = [str(t) for t in np.asarray(ds["prompt_text"].values)]
    prompts = [texts[int(i)] for i in np.asarray(ds["prompt_index"].values)[idx]]
    return pipeline_model_fn(pipe, prompts, guidance_scale=float(ds.attrs.get("guidance", 1.0)),
                             negative_prompt=ds.attrs.get("negative_prompt") or None, dtype=dtype)


def contraction_theory(world, scheduler, steps: int) -> xr.Dataset | None:
    """DDIM theory of the per-step and whole-sampler contraction in a single-Gaussian exact world
    (docs/theory.md §4.7, §5.5): theory_step_factor (step, direction) on the scheduler's actual K-step grid
    (`theory.step_factor`: DDIM's a_k for DDIM steps, LCM / ancestral steps as they run),
    theory_whole_fro2 = sum_k prod_i a_k^2 (= ||J_sampler||_F^2), coord lam.
    None for mixtures (no closed form) or world None."""
    from trajlab.analysis import theory as th

    if world is None or int(world.means.shape[0]) != 1:
        return None
    lam, _, _ = th.gaussian_eigensystem(world)
    grid = th.ddim_grid(scheduler, steps)
    a = th.step_factor(lam, grid)  # the scheduler's actual steps, in its latent coordinates
    return xr.Dataset({"theory_step_factor": (("step", "direction"), np.asarray(a.values)),
                       "theory_whole_fro2": ((), float((np.asarray(a.values).prod(0) ** 2).sum()))},
                      coords={"step": np.arange(a.sizes["step"]), "direction": np.arange(lam.size),
                              "lam": ("direction", lam)},
                      attrs={"units": "1", "grid": f"{type(scheduler).__name__} {steps} steps"})


def contraction_law(pipe, scheduler, Ks=(1, 2, 4, 8, 16)) -> xr.Dataset:
    """The DDIM contraction law in a single-Gaussian exact world: for each step count K, the JVP of the
    whole K-step sampler (latent_0 -> final, `sampler_map` on `pipe.unet`) along each eigen-direction
    u_k, divided by the exact flow's factor, beside the theory J_DDIM / J_exact = prod cos dphi.
    Returns Dataset (K, direction): measured_ratio, theory_ratio; coord lam (direction, descending)."""
    from trajlab.analysis import theory as th

    lam, U, _ = th.gaussian_eigensystem(pipe.world)
    d = U.shape[0]
    Ut = torch.from_numpy(U.T.copy())  # rows = directions
    meas, theo = [], []
    for K in Ks:
        s = copy.deepcopy(scheduler)
        s.set_timesteps(K)
        ins = float(s.init_noise_sigma)
        f0 = sampler_map(scheduler, unet_model_fn(pipe.unet), K)
        x = torch.zeros(1, d, 1, 1, dtype=torch.float64)
        _, JU = jvp_probes(lambda n: f0(n * ins), x, Ut.reshape(d, 1, d, 1, 1))
        gain = (JU.reshape(d, -1) * Ut).sum(1).numpy()
        g = th.ddim_grid(scheduler, K)
        flow = th.flow_factor(lam, g["alpha_bar"].values, g["alpha_bar_next"].values).prod("step").values
        meas.append(gain / flow)
        theo.append(th.ddim_contraction_ratio(lam, g).values)
    return xr.Dataset({"measured_ratio": (("K", "direction"), np.stack(meas)),
                       "theory_ratio": (("K", "direction"), np.stack(theo))},
                      coords={"K": np.asarray(Ks, dtype=np.int64), "direction": np.arange(d),
                              "lam": ("direction", lam)},
                      attrs={"units": "1", "what": "J_DDIM / J_exact along each eigen-direction"})


def contraction_profile(ds: xr.Dataset, pipe, *, samples=4, n_probes: int = 8, n_power_iter: int = 10,
                        seed: int = 0, scheduler=None, method: str = "auto") -> xr.Dataset:
    """Jacobian contraction of a store group's sampler, measured with the pipeline that made it.

    samples: index array or count (the first n). Per step (`step_contraction_profile` at the stored
    latents): fro2, fro2_se, fro2_per_dim, singular_value, spectral_norm. Whole map latent_0 -> final
    (`sampler_map` with the group's prompts and guidance, captured noise replayed by
    `replay_generators`): whole_fro2, whole_fro2_se (Hutchinson, sample; per unit latent_0 variance),
    whole_fro2_unit_noise, whole_fro2_unit_noise_se (times init_noise_sigma^2: the map from unit-variance
    noise, comparable across samplers; attr init_noise_sigma) and replay_rel_error (sample) =
    ||f(latent_0) - final_latent|| / ||final_latent||, which is ~0 when the differentiated map is the
    captured sampler.  Single-Gaussian exact worlds add `contraction_theory`'s variables.
    JVPs in float64 for exact worlds, else float32; probes drawn from a generator seeded with `seed`.
    """
    scheduler = scheduler if scheduler is not None else scheduler_from_attrs(ds.attrs)
    idx = _sample_index(ds, samples)
    dtype = jvp_dtype(pipe)
    mf = group_model_fn(pipe, ds, idx, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    prof = step_contraction_profile(ds, mf, scheduler, samples=idx, n_probes=n_probes, n_power_iter=n_power_iter,
                                    generator=g, dtype=dtype, method=method)
    steps = int(ds.attrs.get("steps", ds.sizes["step"]))
    x0 = torch.from_numpy(np.asarray(ds["latent"].isel(sample=idx, step=0).values)).to(dtype)
    noise = None
    if "generator" in inspect.signature(scheduler.step).parameters and "seed" in ds.coords:
        noise = replay_generators(ds["seed"].values[idx], x0.shape[1:])
    f = sampler_map(scheduler, mf, steps, generator=noise)
    whole = hutchinson_frobenius(f, x0, n_probes, generator=g, method=method)
    with torch.no_grad():
        y = f(x0).double().reshape(len(idx), -1).cpu().numpy()
    ref = np.asarray(ds["final_latent"].isel(sample=idx).values, np.float64).reshape(len(idx), -1)
    prof["whole_fro2"] = ("sample", whole["fro2"].values)
    prof["whole_fro2_se"] = ("sample", whole["fro2_se"].values)
    prof["replay_rel_error"] = ("sample", np.linalg.norm(y - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1),
                                                                                         1e-300))
    prof["whole_fro2"].attrs["units"] = "output^2 / input^2 (latent_0 -> final latent)"
    ins = unit_noise_scale(scheduler, steps)
    prof["whole_fro2_unit_noise"] = ("sample", whole["fro2"].values * ins**2)
    prof["whole_fro2_unit_noise_se"] = ("sample", whole["fro2_se"].values * ins**2)
    prof["whole_fro2_unit_noise"].attrs.update(
        units="latent^2 per unit initial-noise variance (n -> final latent, latent_0 = init_noise_sigma n)",
        what="init_noise_sigma^2 ||J||_F^2: comparable across samplers (docs/theory.md §14.3)")
    th_ = contraction_theory(getattr(pipe, "world", None), scheduler, steps)
    if th_ is not None:
        prof = prof.assign(theory_step_factor=(("step", "direction"), th_["theory_step_factor"].values),
                           theory_whole_fro2=th_["theory_whole_fro2"]).assign_coords(lam=th_["lam"])
    prof.attrs.update({"model": str(ds.attrs.get("model", "")), "steps": steps, "seed": int(seed),
                       "init_noise_sigma": ins,
                       "noise": "captured (replayed)" if noise is not None else "none (deterministic step)"})
    return prof
