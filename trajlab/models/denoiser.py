"""The denoiser as a callable, and samplers over it (plain functions, k-diffusion ``sampling.py`` style).

A *model* is ``model(x, t) -> model_output``: the guided prediction a pipeline hands to
``scheduler.step`` for the model input x (after ``scale_model_input``) at timestep t.  It is built
here, and only here, from any supported pipeline:

- StableDiffusionPipeline: CFG on a doubled batch, ``u + w (c - u)`` (w = guidance_scale > 1);
- StableDiffusionXLPipeline: the same plus its added conditioning ``text_embeds`` / ``time_ids``;
- UNets with ``time_cond_proj_dim`` (LatentConsistencyModelPipeline, LCM-SDXL): no CFG, the
  guidance-scale embedding of ``w - 1`` as ``timestep_cond``;
- ``trajlab.models.exact.ExactWorldPipeline``: the closed-form denoiser, no conditioning.

Steps: :func:`encode` (pipeline + prompts -> :class:`Conditioning`), :func:`guided_model`
(a UNet + conditioning -> model), :func:`pipeline_model` (both).  :func:`sample` is the one
sampling loop (scale_model_input, model, step); :func:`sampler_map` / :func:`sampler_step_map` /
:func:`replay_scheduler` replay a sampler on a FRESH deep copy of a scheduler, with recorded noise
(a generator snapshot, :func:`replay_generators`), so repeated calls give the same function.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from trajlab.models.x0 import NoiseLevel, derive_x0
from trajlab.models import schedulers as _sched
from trajlab.models.schedulers import promote_tables, scheduler_from_attrs

__all__ = [
    "Conditioning",
    "encode",
    "guided_model",
    "pipeline_model",
    "sample",
    "denoiser_map",
    "sampler_step_map",
    "sampler_map",
    "replay_scheduler",
    "replay_steps",
    "own_timesteps",
    "replay_generators",
    "snapshot_generator",
    "restore_generator",
    "scheduler_from_attrs",
]

Model = Callable[[torch.Tensor, Any], torch.Tensor]
Map = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# the guided model


@dataclass
class Conditioning:
    """What a pipeline feeds its UNet besides x and t, for B samples.

    encoder_hidden_states (B, L, D) conditional; negative_encoder_hidden_states (B, L, D) (CFG only);
    added_cond_kwargs (SDXL ``text_embeds`` / ``time_ids``, already doubled negative-first under CFG);
    timestep_cond (B, proj) guidance embedding; guidance_scale w.
    """

    encoder_hidden_states: torch.Tensor | None = None
    negative_encoder_hidden_states: torch.Tensor | None = None
    added_cond_kwargs: dict | None = None
    timestep_cond: torch.Tensor | None = None
    guidance_scale: float = 1.0

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1 and self.negative_encoder_hidden_states is not None


def guided_model(unet, cond: Conditioning | None = None, *,
                 context: Callable[[], contextlib.AbstractContextManager] | None = None) -> Model:
    """model(x, t) -> guided output of ``unet`` (a diffusers UNet, an ExactDenoiser or any module with
    that call signature) under ``cond``; CFG on a doubled batch, negative half first, as the pipelines.
    ``context()`` (optional) wraps every network call (e.g. the attention-JVP switch)."""
    cond = cond or Conditioning()
    ctx = context or contextlib.nullcontext
    kw = {"added_cond_kwargs": cond.added_cond_kwargs} if cond.added_cond_kwargs is not None else {}
    if not cond.cfg:
        def model(x, t):
            with ctx():
                return unet(x, t, encoder_hidden_states=cond.encoder_hidden_states,
                            timestep_cond=cond.timestep_cond, return_dict=False, **kw)[0]
        model.unet, model.cond = unet, cond  # read by trajlab.autodiff.fast_jvp.model_jvp
        return model
    eh = torch.cat([cond.negative_encoder_hidden_states, cond.encoder_hidden_states])
    w = cond.guidance_scale

    def model(x, t):
        with ctx():
            o = unet(torch.cat([x, x]), t, encoder_hidden_states=eh, timestep_cond=cond.timestep_cond,
                     return_dict=False, **kw)[0]
        u, c = o.chunk(2)
        return u + w * (c - u)

    model.unet, model.cond = unet, cond
    return model


def _prompt_list(prompts) -> list[str]:
    if prompts is None:
        return [""]
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _negative_list(negative_prompt, n: int):
    if negative_prompt is None or isinstance(negative_prompt, (list, tuple)):
        return None if negative_prompt is None else list(negative_prompt)
    return [negative_prompt] * n


def _is_sdxl(pipe) -> bool:
    return hasattr(pipe, "_get_add_time_ids")


def _sdxl_added(pipe, pooled, negative_pooled, cfg: bool, n: int, height, width, dtype) -> dict:
    """SDXL's added conditioning as its pipeline builds it (original = target size, no crop)."""
    size = pipe.default_sample_size * pipe.vae_scale_factor
    hw = (height or size, width or size)
    te2 = getattr(pipe, "text_encoder_2", None)
    proj = int(pooled.shape[-1]) if te2 is None else te2.config.projection_dim
    ids = pipe._get_add_time_ids(hw, (0, 0), hw, dtype=dtype, text_encoder_projection_dim=proj)
    if cfg:
        pooled, ids = torch.cat([negative_pooled, pooled]), torch.cat([ids, ids])
    return {"text_embeds": pooled.to(pooled.device), "time_ids": ids.to(pooled.device).repeat(n, 1)}


def encode(pipe, prompts=None, *, guidance_scale: float = 1.0, negative_prompt=None, device=None, dtype=None,
           height=None, width=None, latent_dtype=None) -> Conditioning:
    """The conditioning ``pipe`` builds for ``prompts`` (one per sample) at ``guidance_scale``.

    Pipelines without ``encode_prompt`` (exact worlds) get none.  ``dtype`` casts the embeddings
    (JVPs need fp32); ``latent_dtype`` is the dtype of the guidance embedding (default: the
    embeddings').  height/width matter for SDXL's ``time_ids`` only (default: the pipeline's).
    """
    if not hasattr(pipe, "encode_prompt"):
        return Conditioning()
    unet = pipe.unet
    prompts = _prompt_list(prompts)
    n = len(prompts)
    negative = _negative_list(negative_prompt, n)
    proj_dim = getattr(unet.config, "time_cond_proj_dim", None)
    cfg = guidance_scale > 1 and proj_dim is None
    device = device if device is not None else pipe._execution_device
    added = None
    with torch.no_grad():
        if _is_sdxl(pipe):
            pe, ne, pooled, npooled = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                         do_classifier_free_guidance=cfg,
                                                         negative_prompt=negative if cfg else None)
            added = _sdxl_added(pipe, pooled, npooled, cfg, n, height, width, pe.dtype)
        else:
            pe, ne = pipe.encode_prompt(prompts, device, 1, cfg, negative if cfg else None)
    if dtype is not None:
        pe = pe.to(dtype)
        ne = ne.to(dtype) if ne is not None else None
        added = {k: v.to(dtype) for k, v in added.items()} if added is not None else None
    tc = None
    if proj_dim is not None:
        w = torch.tensor(guidance_scale - 1).repeat(n)
        tc = pipe.get_guidance_scale_embedding(w, embedding_dim=proj_dim).to(device=device,
                                                                              dtype=latent_dtype or pe.dtype)
    return Conditioning(pe, ne if cfg else None, added, tc, float(guidance_scale))


def pipeline_model(pipe, prompts=None, *, guidance_scale: float = 1.0, negative_prompt=None, dtype=None,
                   height=None, width=None, context=None) -> Model:
    """``guided_model(pipe.unet, encode(pipe, prompts, ...))``: the model a pipeline call would step with."""
    cond = encode(pipe, prompts, guidance_scale=guidance_scale, negative_prompt=negative_prompt, dtype=dtype,
                  height=height, width=width)
    return guided_model(pipe.unet, cond, context=context)


# ----------------------------------------------------------------------------------------------
# sampling


def sample(scheduler, model: Model, latent: torch.Tensor, *, timesteps=None, extra_step_kwargs=None,
           callback: Callable[[int, Any, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The sampling loop of a diffusers pipeline from ``latent`` (initial noise x init_noise_sigma):
    for t in ``timesteps`` (default ``scheduler.timesteps``): scale_model_input, model, step.
    ``callback(i, t, latent) -> latent`` runs after each step.  Mutates ``scheduler``'s step state."""
    kw = extra_step_kwargs or {}
    for i, t in enumerate(scheduler.timesteps if timesteps is None else timesteps):
        inp = scheduler.scale_model_input(latent, t)
        latent = scheduler.step(model(inp, t), t, latent, return_dict=False, **kw)[0]
        if callback is not None:
            latent = callback(i, t, latent)
    return latent


def snapshot_generator(generator):
    """(device, state) of a torch.Generator (or a list of them); None passes."""
    if generator is None:
        return None
    if isinstance(generator, list):
        return [snapshot_generator(g) for g in generator]
    return (generator.device, generator.get_state())


def restore_generator(state):
    """A fresh torch.Generator (or list) in a :func:`snapshot_generator` state; None passes."""
    if state is None:
        return None
    if isinstance(state, list):
        return [restore_generator(s) for s in state]
    dev, st = state
    return torch.Generator(device=dev).set_state(st)


def replay_generators(seeds, latent_shape, device="cpu") -> list[torch.Generator]:
    """Per-sample generators in the state a diffusers pipeline's `scheduler.step` sees them in a capture
    (trajlab.capture seeds sample s with `torch.Generator(device).manual_seed(seed_s)`): advanced past
    the initial-noise draw `randn((1, *latent_shape))` that `prepare_latents` makes with a generator
    list.  With them `sampler_map` replays stochastic samplers (LCM's multi-step noise, ancestral
    schedulers) with the captured noise."""
    gens = []
    for s in np.asarray(seeds).reshape(-1):
        g = torch.Generator(device=device).manual_seed(int(s))
        torch.randn((1, *tuple(latent_shape)), generator=g, device=device)
        gens.append(g)
    return gens


def sampler_map(scheduler, model: Model, num_inference_steps: int, *, generator=None, timesteps=None,
                step_kwargs=None, device="cpu", dtype=None) -> Map:
    """latent_0 (= initial noise x init_noise_sigma, the store's latent[:, 0]) -> final latent: :func:`sample`
    on a fresh deep copy of the scheduler per evaluation, noise held fixed via the generator's
    snapshotted state.  set_timesteps runs once here, outside any torch.func transform (on `device`;
    some schedulers' set_timesteps break under torch.func); dtype=float64 promotes the tables now.
    ``step_kwargs``: extra ``scheduler.step`` keywords (those it does not take are dropped)."""
    gstate = snapshot_generator(generator)
    base = copy.deepcopy(scheduler)
    if timesteps is not None:
        base.set_timesteps(timesteps=list(timesteps), device=device)
    else:
        base.set_timesteps(num_inference_steps, device=device)
    if dtype is not None:
        promote_tables(base, dtype)
    def f(latent):
        s = promote_tables(copy.deepcopy(base), latent.dtype)
        return sample(s, model, latent, extra_step_kwargs=_kwargs(s, gstate, step_kwargs))

    def fast_jvp(latent, V):  # (f(latent), J V) with primal and tangents stacked (fast_jvp.sample_jvp)
        from trajlab.autodiff.fast_jvp import sample_jvp

        s = promote_tables(copy.deepcopy(base), latent.dtype)
        return sample_jvp(s, model, latent, V, extra_step_kwargs=_kwargs(s, gstate, step_kwargs))

    f.fast_jvp = fast_jvp
    return f


def _kwargs(s, gstate, extra) -> dict:
    """step keywords for a fresh evaluation: the generator re-created from its snapshot."""
    return _sched.step_kwargs(s, restore_generator(gstate), extra=extra)


def sampler_step_map(scheduler_state, model: Model, timestep, *, generator=None, step_kwargs=None) -> Map:
    """latent_i -> latent_{i+1}: one `scheduler.step` call as the pipeline makes it (scale_model_input,
    model, step).  `scheduler_state` is the scheduler as it stands before that call (see
    `replay_scheduler`); each evaluation deep-copies it.  A generator is snapshotted now and
    re-created per evaluation (noise held fixed)."""
    gstate = snapshot_generator(generator)

    def f(latent):
        s = promote_tables(copy.deepcopy(scheduler_state), latent.dtype)
        return sample(s, model, latent, timesteps=[timestep], extra_step_kwargs=_kwargs(s, gstate, step_kwargs))

    def fast_jvp(latent, V):
        from trajlab.autodiff.fast_jvp import sample_jvp

        s = promote_tables(copy.deepcopy(scheduler_state), latent.dtype)
        return sample_jvp(s, model, latent, V, timesteps=[timestep], extra_step_kwargs=_kwargs(s, gstate, step_kwargs))

    f.fast_jvp = fast_jvp
    return f


def own_timesteps(s, stored, fallback):
    """The scheduler's own timestep values (right dtype, e.g. float for Euler) if they match the stored
    grid ``stored``; ``fallback`` if the lengths differ; ValueError if the values differ."""
    own = s.timesteps
    if len(own) == len(stored) and np.allclose(own.cpu().numpy().astype(np.float64), np.asarray(stored, np.float64)):
        return [t for t in own]
    if len(own) == len(stored):
        raise ValueError(f"stored timestep coord {np.asarray(stored)} differs from the scheduler's grid "
                         f"{own.cpu().numpy()}: wrong scheduler config or steps")
    return fallback


def replay_steps(s, model_output: torch.Tensor, latent: torch.Tensor, timesteps, start: int, stop: int,
                 extra_step_kwargs=None):
    """Advance scheduler ``s`` through step calls start..stop-1 with the stored arrays model_output /
    latent (sample, step, ...) (the state's only input; the results are dropped).  Returns ``s``."""
    kw = extra_step_kwargs or {}
    for j in range(start, stop):
        s.scale_model_input(latent[:, j], timesteps[j])
        s.step(model_output[:, j], timesteps[j], latent[:, j], return_dict=False, **kw)
    return s


def replay_scheduler(scheduler, num_inference_steps: int, model_output: torch.Tensor, latent: torch.Tensor,
                     timesteps, upto: int):
    """Fresh copy of `scheduler` advanced through step calls 0..upto-1 with stored arrays
    model_output / latent (sample, step, ...): its state before step call `upto`."""
    s = promote_tables(copy.deepcopy(scheduler), latent.dtype)
    s.set_timesteps(num_inference_steps, device=latent.device)
    timesteps = own_timesteps(s, [float(t) for t in timesteps], timesteps)
    kw = _sched.step_kwargs(s, torch.Generator(device=latent.device).manual_seed(0))
    return replay_steps(s, model_output, latent, timesteps, 0, upto, kw)


def denoiser_map(model: Model, timestep, alpha_bar: float, *, prediction_type: str = "epsilon",
                 space: str = "edm") -> Map:
    """x0_hat as a function of the noisy input at `timestep` (VP coordinates; x0 by
    `trajlab.models.x0.derive_x0`, the capture's own function).

    space="edm": input y = x_t / sqrt(ab) (dD/dy, the Jacobian of docs/theory.md §2.2); space="vp": input x_t
    (the model input).  model(model_input, timestep) -> model output.
    """
    ab = float(alpha_bar)
    if space not in ("edm", "vp"):
        raise ValueError(f"space must be 'edm' or 'vp'; got {space!r}")
    level = NoiseLevel(ab, math.sqrt((1 - ab) / ab), "vp")

    def f(inp):
        x_t = inp * math.sqrt(ab) if space == "edm" else inp
        return derive_x0(prediction_type, model(x_t, timestep), x_t, level)

    def fast_jvp(inp, V):  # derive_x0 is linear in (model output, x_t): applied to the stacked pair
        from trajlab.autodiff.fast_jvp import model_jvp

        c = math.sqrt(ab) if space == "edm" else 1.0
        x_t, T = inp * c, V * c
        y, dY = model_jvp(model, x_t, T, timestep)
        m = T.shape[0]
        z = derive_x0(prediction_type, torch.cat([y, dY.flatten(0, 1)]), torch.cat([x_t, T.flatten(0, 1)]), level)
        B = inp.shape[0]
        return z[:B], z[B:].view(m, B, *z.shape[1:])

    f.fast_jvp = fast_jvp
    return f
