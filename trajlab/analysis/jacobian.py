"""Jacobian estimators for any callable f: (B, ...) -> (B, ...) with torch.func.

f must treat samples independently (the Jacobian is block diagonal over the batch); every
estimate is per sample.  Probes have shape (m, B, ...) and are batched with `torch.func.vmap`
where the callable allows it (else a Python loop).  Forward mode: `torch.func.jvp`, falling back
to `torch.autograd.forward_ad` dual tensors, then to the double-vjp trick (a warning says which).

Maps to differentiate (all replay a FRESH deep copy of the scheduler, so repeated calls give the
same function; stochastic samplers get their generator re-seeded from a saved state per call so
the noise is held fixed):
  `denoiser_map`      x_t (or y) -> x0_hat at one timestep,
  `sampler_step_map`  latent_i -> latent_{i+1} (one `scheduler.step` call),
  `sampler_map`       latent_0 -> final latent (the whole K-step loop).
Estimators: `hutchinson_frobenius`, `power_iteration`, `randomized_svd`, `logdet_slq`,
`exact_jacobian` / `logdet_exact` (small d), `step_contraction_profile` (along a stored
trajectory).  Results are xarray objects with dims `sample`, `probe`, `rank`, `step`.

Attention: forward mode fails on fused SDPA kernels (FACTS.md); `attention_context(model)` is the
one place that decides which context network calls run under (math backend fallback, ~4.5x).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import math
import warnings
from typing import Callable

import numpy as np
import torch
import xarray as xr

__all__ = [
    "attention_context",
    "forward_mode_active",
    "fused_sdpa_jvp_works",
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
    "x0_from_model_output",
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
]

Map = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# attention backend


@functools.lru_cache(maxsize=None)
def fused_sdpa_jvp_works(device: str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """True if a tiny `torch.func.jvp` through F.scaled_dot_product_attention (default backend)
    works on `device` / `dtype` (cached per pair)."""
    import torch.nn.functional as F

    try:
        q = torch.randn(1, 2, 4, 8, device=device, dtype=dtype)
        torch.func.jvp(lambda a: F.scaled_dot_product_attention(a, a, a), (q,), (torch.ones_like(q),))
        return True
    except Exception:  # NotImplementedError / RuntimeError from missing forward-AD rules
        return False


def _model_device_dtype(model) -> tuple[str, torch.dtype]:
    if isinstance(model, torch.nn.Module):
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                return str(t.device), t.dtype
    return "cpu", torch.float32


def _has_attention(model) -> bool:
    """True unless `model` is an nn.Module without any attention submodule (by class name)."""
    if not isinstance(model, torch.nn.Module):
        return True
    return any("attention" in type(m).__name__.lower() or type(m).__name__ == "Attention" for m in model.modules())


def forward_mode_active() -> bool:
    """True inside `torch.func.jvp` (at any depth of the functorch transform stack, e.g. vmap of
    jvp) or a `torch.autograd.forward_ad.dual_level`."""
    import torch.autograd.forward_ad as fwAD
    from torch._C._functorch import TransformType, get_interpreter_stack

    if getattr(fwAD, "_current_level", -1) >= 0:
        return True
    return any(i.key() == TransformType.Jvp for i in (get_interpreter_stack() or ()))


def attention_context(model=None) -> contextlib.AbstractContextManager:
    """Context manager for network calls under forward-mode AD.

    nullcontext() outside forward-mode AD (`forward_mode_active`: plain calls and VJPs keep the
    fused kernels, whose backward exists), when the model has no attention module, or when a JVP
    through the default SDPA kernel works on the model's device/dtype;
    otherwise warns once per call site and returns `sdpa_kernel(SDPBackend.MATH)` (math backend,
    ~4.5x a fused forward per FACTS.md).  Single swap point for a fused attention JVP.
    """
    if not forward_mode_active():
        return contextlib.nullcontext()
    device, dtype = _model_device_dtype(model)
    if not _has_attention(model) or fused_sdpa_jvp_works(device, dtype):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    warnings.warn(
        f"forward-mode AD through fused SDPA fails on {device}/{dtype}: using the MATH attention backend "
        "for JVPs (~4.5x slower than the fused kernel, FACTS.md)",
        RuntimeWarning,
        stacklevel=2,
    )
    return sdpa_kernel(SDPBackend.MATH)


# ----------------------------------------------------------------------------------------------
# jvp / vjp primitives


def _jvp_func(f, x, v):
    # no_grad: forward-mode tangents still flow, but no backward graph is recorded for parameters
    # that require grad (it held every activation of a whole sampler: ~5x time, ~10x memory).
    with torch.no_grad():
        return torch.func.jvp(f, (x,), (v,))


def _jvp_forward_ad(f, x, v):
    import torch.autograd.forward_ad as fwAD

    with torch.no_grad(), fwAD.dual_level():
        out = f(fwAD.make_dual(x, v))
        y, t = fwAD.unpack_dual(out)
        t = torch.zeros_like(y) if t is None else t
        return y.detach(), t.detach()


def _jvp_double_vjp(f, x, v):
    """J v as the VJP of the VJP (linear in u); math attention, since fused SDPA backwards are not
    differentiable twice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        y, vjp_fn = torch.func.vjp(f, x)
        _, g = torch.func.vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(y))
        return y, g(v)[0]


_JVP = {"func": _jvp_func, "forward_ad": _jvp_forward_ad, "double_vjp": _jvp_double_vjp}


def jvp(f: Map, x: torch.Tensor, v: torch.Tensor, *, method: str = "auto"):
    """(f(x), J v) for one tangent v (shape of x).  method: auto | func | forward_ad | double_vjp."""
    y, JV, _ = _jvp_batch(f, x, v[None], method=method, use_vmap=False)
    return y, JV[0]


def jvp_probes(f: Map, x: torch.Tensor, V: torch.Tensor, *, method: str = "auto", use_vmap: bool = True):
    """(f(x), J V) for m tangents V (m, *x.shape) -> JV (m, *f(x).shape)."""
    y, JV, _ = _jvp_batch(f, x, V, method=method, use_vmap=use_vmap)
    return y, JV


def _jvp_batch(f, x, V, *, method="auto", use_vmap=True):
    if tuple(V.shape[1:]) != tuple(x.shape):
        raise ValueError(f"probes V must have shape (m, *x.shape) = (m, {tuple(x.shape)}); got {tuple(V.shape)}")
    methods = ["func", "forward_ad", "double_vjp"] if method == "auto" else [method]
    errors = []
    for mth in methods:
        fn = _JVP[mth]
        try:
            if use_vmap and mth != "forward_ad" and V.shape[0] > 1:
                try:
                    y = None

                    def one(v):
                        return fn(f, x, v)[1]

                    JV = torch.func.vmap(one, randomness="same")(V)
                    y = f(x)
                except Exception:
                    y, JV = _loop(fn, f, x, V)
            else:
                y, JV = _loop(fn, f, x, V)
            if errors:
                warnings.warn(f"jvp via {mth} (earlier methods failed: {errors})", RuntimeWarning, stacklevel=3)
            return y.detach(), JV.detach(), mth
        except Exception as e:  # try the next method
            errors.append(f"{mth}: {type(e).__name__}: {str(e)[:200]}")
    raise RuntimeError(f"every JVP method failed for input of shape {tuple(x.shape)}: {errors}")


def _loop(fn, f, x, V):
    outs = [fn(f, x, v) for v in V]
    return outs[0][0], torch.stack([o[1] for o in outs])


def vjp(f: Map, x: torch.Tensor, u: torch.Tensor):
    """(f(x), J^T u), u of the shape of f(x)."""
    y, fn = torch.func.vjp(f, x)
    return y.detach(), fn(u)[0].detach()


def vjp_probes(f: Map, x: torch.Tensor, U: torch.Tensor, *, vjp_fn=None, use_vmap: bool = True):
    """J^T U for m cotangents U (m, *f(x).shape) -> (m, *x.shape).  Pass `vjp_fn` to reuse a
    linearisation (from torch.func.vjp(f, x))."""
    if vjp_fn is None:
        _, vjp_fn = torch.func.vjp(f, x)
    if use_vmap and U.shape[0] > 1:
        try:
            return torch.func.vmap(lambda u: vjp_fn(u)[0])(U).detach()
        except Exception:
            pass
    return torch.stack([vjp_fn(u)[0] for u in U]).detach()


# ----------------------------------------------------------------------------------------------
# estimators


def _flat(T, lead):
    """(lead..., B, *S) -> (lead..., B, n)."""
    return T.reshape(*T.shape[:lead], T.shape[lead], -1)


def _sample_coord(B):
    return {"sample": np.arange(B)}


def _probes(shape, dist, generator, dtype, device):
    g = torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    if dist == "gaussian":
        return g
    if dist == "rademacher":
        return torch.sign(g) + (g == 0).to(g.dtype)
    raise ValueError(f"distribution must be 'gaussian' or 'rademacher'; got {dist!r}")


def exact_jacobian(f: Map, x: torch.Tensor, *, method: str = "auto", chunk: int = 64,
                   mode: str = "forward") -> torch.Tensor:
    """Dense per-sample Jacobian (B, n_out, n_in) (small n only): columns from n_in JVPs
    (mode="forward") or rows from n_out VJPs of one linearisation (mode="reverse"; often faster on
    the CPU for long samplers, and it keeps fused attention)."""
    if mode not in ("forward", "reverse"):
        raise ValueError(f"mode must be 'forward' or 'reverse'; got {mode!r}")
    if mode == "reverse":
        y, vjp_fn = torch.func.vjp(f, x)
        rows = [_flat(vjp_probes(f, x, E, vjp_fn=vjp_fn), 1) for E in _unit_probe_chunks(y, chunk)]
        return torch.cat(rows, 0).permute(1, 0, 2)
    cols = [_flat(jvp_probes(f, x, E, method=method)[1], 1) for E in _unit_probe_chunks(x, chunk)]
    return torch.cat(cols, 0).permute(1, 2, 0)


def _unit_probe_chunks(like: torch.Tensor, chunk: int):
    """The standard basis of one sample of ``like`` (B, *S), in chunks of probes (k, B, *S): probe i
    is e_i in every sample (dtype/device of ``like``)."""
    B, n = like.shape[0], like[0].numel()
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        E = torch.zeros(i1 - i0, B, n, dtype=like.dtype, device=like.device)
        E[torch.arange(i1 - i0), :, torch.arange(i0, i1)] = 1
        yield E.reshape(i1 - i0, *like.shape)


def hutchinson_frobenius(f: Map, x: torch.Tensor, n_probes: int = 16, *, distribution: str = "rademacher",
                         generator: torch.Generator | None = None, method: str = "auto") -> xr.Dataset:
    """Hutchinson ||J||_F^2 = E ||J v||^2 per sample.

    Returns Dataset: fro2 (sample), fro2_se (sample; standard error of the probe mean),
    probe_value (sample, probe) = ||J v_p||^2, attrs n_in, n_out, distribution, jvp_method.
    """
    V = _probes((n_probes, *x.shape), distribution, generator, x.dtype, x.device)
    y, JV, used = _jvp_batch(f, x, V, method=method)
    vals = _flat(JV, 1).double().pow(2).sum(-1).T.cpu().numpy()  # (B, m)
    se = vals.std(axis=1, ddof=1) / math.sqrt(n_probes) if n_probes > 1 else np.full(vals.shape[0], np.nan)
    return xr.Dataset(
        {"fro2": ("sample", vals.mean(1)), "fro2_se": ("sample", se), "probe_value": (("sample", "probe"), vals)},
        coords=_sample_coord(x.shape[0]),
        attrs={"n_in": int(x[0].numel()), "n_out": int(y[0].numel()), "distribution": distribution,
               "jvp_method": used, "units": "output^2 / input^2"},
    )


def _orth(Z):
    """Per-sample orthonormal basis: Z (B, n, k) -> Q (B, n, k)."""
    return torch.linalg.qr(Z)[0]


def _to_probes(Q, x_shape):
    """(B, n, k) -> (k, *x_shape)."""
    return Q.permute(2, 0, 1).reshape(Q.shape[-1], *x_shape)


def _from_probes(P):
    """(k, B, *S) -> (B, n, k)."""
    return _flat(P, 1).permute(1, 2, 0)


def power_iteration(f: Map, x: torch.Tensor, k: int = 1, n_iter: int = 30, *,
                    generator: torch.Generator | None = None, method: str = "auto") -> xr.Dataset:
    """Top-k singular values of J per sample by subspace (power) iteration on J^T J: each iteration is
    k jvps + k vjps (the vjp linearisation is built once).  Final Rayleigh-Ritz step: svd of J Q.

    Returns Dataset: singular_value (sample, rank), rel_change (sample, rank) of the last iteration.
    """
    y, vjp_fn = torch.func.vjp(f, x)
    Q = _orth(_from_probes(_probes((k, *x.shape), "gaussian", generator, x.dtype, x.device)))
    prev = None
    used = method
    for _ in range(n_iter):
        _, JQ, used = _jvp_batch(f, x, _to_probes(Q, x.shape), method=method)
        s = torch.linalg.norm(_from_probes(JQ), dim=1)
        Z = vjp_probes(f, x, JQ, vjp_fn=vjp_fn)
        Q = _orth(_from_probes(Z))
        rel = None if prev is None else ((s - prev).abs() / prev.clamp_min(1e-300))
        prev = s
    _, JQ, used = _jvp_batch(f, x, _to_probes(Q, x.shape), method=method)
    sv = torch.linalg.svdvals(_from_probes(JQ).double())  # (B, k)
    rel = torch.full_like(sv, float("nan")) if rel is None else rel.double()
    return xr.Dataset(
        {"singular_value": (("sample", "rank"), sv.cpu().numpy()),
         "rel_change": (("sample", "rank"), rel.sort(dim=1, descending=True)[0].cpu().numpy())},
        coords={**_sample_coord(x.shape[0]), "rank": np.arange(k)},
        attrs={"n_iter": int(n_iter), "jvp_method": used, "estimator": "subspace power iteration"},
    )


def randomized_svd(f: Map, x: torch.Tensor, rank: int, *, oversample: int = 8, n_power_iter: int = 2,
                   generator: torch.Generator | None = None, return_vectors: bool = False,
                   method: str = "auto") -> xr.Dataset:
    """Randomized SVD of J per sample (Halko et al. 0909.4061): Y = J Omega, power iterations
    Y <- J J^T Y with re-orthonormalisation, Q = qr(Y), B^T = J^T Q, svd(B).

    Returns Dataset: singular_value (sample, rank); with return_vectors also left (sample, rank,
    out_feature) and right (sample, rank, in_feature) singular vectors (flattened features).
    """
    n_in = x[0].numel()
    ell = min(rank + oversample, n_in)
    _, vjp_fn = torch.func.vjp(f, x)
    Om = _probes((ell, *x.shape), "gaussian", generator, x.dtype, x.device)
    _, Y, used = _jvp_batch(f, x, Om, method=method)
    out_shape = Y.shape[1:]
    Q = _orth(_from_probes(Y))
    for _ in range(n_power_iter):
        Z = _orth(_from_probes(vjp_probes(f, x, _to_probes(Q, out_shape), vjp_fn=vjp_fn)))
        _, Y, used = _jvp_batch(f, x, _to_probes(Z, x.shape), method=method)
        Q = _orth(_from_probes(Y))
    Bt = _from_probes(vjp_probes(f, x, _to_probes(Q, out_shape), vjp_fn=vjp_fn))  # (B, n_in, ell) = J^T Q
    Ub, S, Vh = torch.linalg.svd(Bt.transpose(1, 2).double(), full_matrices=False)  # B = Q^T J: (B, ell, n_in)
    r = min(rank, S.shape[1])
    data = {"singular_value": (("sample", "rank"), S[:, :r].cpu().numpy())}
    if return_vectors:
        left = (Q.double() @ Ub)[:, :, :r].transpose(1, 2)
        data["left"] = (("sample", "rank", "out_feature"), left.cpu().numpy())
        data["right"] = (("sample", "rank", "in_feature"), Vh[:, :r].cpu().numpy())
    return xr.Dataset(data, coords={**_sample_coord(x.shape[0]), "rank": np.arange(r)},
                      attrs={"oversample": int(oversample), "n_power_iter": int(n_power_iter), "jvp_method": used,
                             "estimator": "randomized SVD (Halko)"})


def logdet_slq(f: Map, x: torch.Tensor, n_probes: int = 16, lanczos_steps: int = 20, *,
               generator: torch.Generator | None = None, method: str = "auto") -> xr.Dataset:
    """log|det J| = 0.5 tr log(J^T J) per sample by stochastic Lanczos quadrature (Rademacher probes,
    full re-orthogonalisation; steps capped at n).  J must be square.

    Returns Dataset: logdet (sample), logdet_se (sample; probe standard error; the quadrature error
    is negligible once lanczos_steps covers the spectrum), probe_value (sample, probe).
    """
    y, vjp_fn = torch.func.vjp(f, x)
    n = x[0].numel()
    if y[0].numel() != n:
        raise ValueError(f"logdet needs a square Jacobian: input {tuple(x.shape)} vs output {tuple(y.shape)}")
    m = n_probes
    s = min(lanczos_steps, n)
    B = x.shape[0]
    Z = _flat(_probes((m, *x.shape), "rademacher", generator, x.dtype, x.device), 1).double()  # (m, B, n)
    q = Z / Z.norm(dim=-1, keepdim=True)
    Qs = [q]
    alpha = torch.zeros(m, B, s, dtype=torch.float64, device=x.device)
    beta = torch.zeros(m, B, s, dtype=torch.float64, device=x.device)
    used = method

    def A(v):  # J^T J v for v (m, B, n)
        nonlocal used
        _, Jv, used = _jvp_batch(f, x, v.to(x.dtype).reshape(m, *x.shape), method=method)
        return _flat(vjp_probes(f, x, Jv, vjp_fn=vjp_fn), 1).double()

    for j in range(s):
        w = A(Qs[-1])
        alpha[..., j] = (w * Qs[-1]).sum(-1)
        Qm = torch.stack(Qs, -1)  # (m, B, n, j+1)
        for _ in range(2):  # full re-orthogonalisation, twice
            w = w - (Qm @ (Qm.transpose(-1, -2) @ w[..., None]))[..., 0]
        if j == s - 1:
            break
        b = w.norm(dim=-1)
        scale = torch.stack([a.abs() for a in alpha[..., : j + 1].unbind(-1)], -1).amax(-1).clamp_min(1e-300)
        broke = b <= 1e-10 * scale
        # on breakdown restart with a random vector orthogonal to the Krylov space (beta = 0 keeps T block diagonal)
        if bool(broke.any()):
            r = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w.device)
            for _ in range(2):
                r = r - (Qm @ (Qm.transpose(-1, -2) @ r[..., None]))[..., 0]
            w = torch.where(broke[..., None], r, w)
            b = torch.where(broke, torch.zeros_like(b), b)
        beta[..., j] = b
        Qs.append(w / w.norm(dim=-1, keepdim=True))
    T = torch.diag_embed(alpha) + torch.diag_embed(beta[..., : s - 1], 1) + torch.diag_embed(beta[..., : s - 1], -1)
    theta, vecs = torch.linalg.eigh(T)
    tau2 = vecs[..., 0, :] ** 2
    quad = (tau2 * torch.log(theta.clamp_min(1e-300))).sum(-1) * Z.pow(2).sum(-1)  # (m, B): z^T log(A) z
    vals = (0.5 * quad).T.cpu().numpy()  # (B, m)
    se = vals.std(axis=1, ddof=1) / math.sqrt(m) if m > 1 else np.full(B, np.nan)
    return xr.Dataset(
        {"logdet": ("sample", vals.mean(1)), "logdet_se": ("sample", se), "probe_value": (("sample", "probe"), vals)},
        coords=_sample_coord(B),
        attrs={"lanczos_steps": int(s), "jvp_method": used, "estimator": "stochastic Lanczos quadrature on J^T J"},
    )


def logdet_exact(f: Map, x: torch.Tensor, *, method: str = "auto") -> xr.DataArray:
    """Exact log|det J| per sample (dense Jacobian; small n only).  dims (sample,)."""
    J = exact_jacobian(f, x, method=method).double()
    return xr.DataArray(torch.linalg.slogdet(J)[1].cpu().numpy(), dims="sample", coords=_sample_coord(x.shape[0]),
                        name="logdet")


# ----------------------------------------------------------------------------------------------
# maps to differentiate


def x0_from_model_output(model_output, sample, alpha_bar, prediction_type: str = "epsilon"):
    """x0_hat from a model output at VP x_t = sample with alpha_bar (scalar)."""
    ab = torch.as_tensor(alpha_bar, dtype=sample.dtype, device=sample.device)
    if prediction_type == "epsilon":
        return (sample - (1 - ab).sqrt() * model_output) / ab.sqrt()
    if prediction_type == "v_prediction":
        return ab.sqrt() * sample - (1 - ab).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type must be epsilon | v_prediction | sample; got {prediction_type!r}")


def denoiser_map(model_fn, timestep, alpha_bar: float, *, prediction_type: str = "epsilon",
                 space: str = "edm") -> Map:
    """x0_hat as a function of the noisy input at `timestep`.

    space="edm": input y = x_t / sqrt(ab) (dD/dy, THEORY.md's Jacobian); space="vp": input x_t
    (the model input).  model_fn(model_input, timestep) -> model output.
    """
    ab = float(alpha_bar)
    if space not in ("edm", "vp"):
        raise ValueError(f"space must be 'edm' or 'vp'; got {space!r}")

    def f(inp):
        x_t = inp * math.sqrt(ab) if space == "edm" else inp
        return x0_from_model_output(model_fn(x_t, timestep), x_t, ab, prediction_type)

    return f


def _promote_tables(s, dtype):
    if dtype != torch.float64:
        return s
    for name in ("alphas_cumprod", "final_alpha_cumprod", "betas", "alphas"):
        v = getattr(s, name, None)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            setattr(s, name, v.to(torch.float64))
    return s


def _step_kwargs(scheduler, generator, step_kwargs):
    params = set(inspect.signature(scheduler.step).parameters)
    kw = {k: v for k, v in (step_kwargs or {}).items() if k in params}
    if generator is not None and "generator" in params:
        kw["generator"] = generator
    return kw


def _fresh_generator(state):
    """A torch.Generator (or list) rebuilt from a saved state (or list of states); None passes."""
    if state is None:
        return None
    if isinstance(state, list):
        return [_fresh_generator(s) for s in state]
    dev, st = state
    return torch.Generator(device=dev).set_state(st)


def _save_generator(generator):
    if generator is None:
        return None
    if isinstance(generator, list):
        return [_save_generator(g) for g in generator]
    return (generator.device, generator.get_state())


def sampler_step_map(scheduler_state, model_fn, timestep, *, generator=None, step_kwargs=None) -> Map:
    """latent_i -> latent_{i+1}: one `scheduler.step` call as the pipeline makes it (scale_model_input,
    model, step).  `scheduler_state` is the scheduler as it stands before that call (see
    `replay_scheduler`); each evaluation deep-copies it.  A generator is snapshotted now and
    re-created per evaluation (noise held fixed)."""
    gstate = _save_generator(generator)

    def f(latent):
        s = _promote_tables(copy.deepcopy(scheduler_state), latent.dtype)
        inp = s.scale_model_input(latent, timestep)
        out = model_fn(inp, timestep)
        return s.step(out, timestep, latent, return_dict=False, **_step_kwargs(s, _fresh_generator(gstate),
                                                                                step_kwargs))[0]

    return f


def sampler_map(scheduler, model_fn, num_inference_steps: int, *, generator=None, timesteps=None,
                step_kwargs=None, device="cpu", dtype=None) -> Map:
    """latent_0 (= initial noise x init_noise_sigma, the store's latent[:, 0]) -> final latent: the whole
    loop on a fresh deep copy of the scheduler per evaluation, noise held fixed via the generator's
    snapshotted state.  set_timesteps runs once here, outside any torch.func transform (on `device`;
    some schedulers' set_timesteps break under torch.func); dtype=float64 promotes the tables now."""
    gstate = _save_generator(generator)
    base = copy.deepcopy(scheduler)
    if timesteps is not None:
        base.set_timesteps(timesteps=list(timesteps), device=device)
    else:
        base.set_timesteps(num_inference_steps, device=device)
    if dtype is not None:
        _promote_tables(base, dtype)

    def f(latent):
        s = _promote_tables(copy.deepcopy(base), latent.dtype)
        kw = _step_kwargs(s, _fresh_generator(gstate), step_kwargs)
        for t in s.timesteps:
            inp = s.scale_model_input(latent, t)
            latent = s.step(model_fn(inp, t), t, latent, return_dict=False, **kw)[0]
        return latent

    return f


def unet_model_fn(unet, encoder_hidden_states=None, *, guidance_scale: float = 1.0,
                  negative_encoder_hidden_states=None, added_cond_kwargs=None, timestep_cond=None,
                  use_attention_context: bool = True):
    """model_fn(model_input, t) -> guided model output for a diffusers UNet (or ExactDenoiser).

    CFG (guidance_scale > 1 with negative embeddings): out = u + w (c - u) on a doubled batch, as SD.
    Calls run under `attention_context(unet)` (math SDPA fallback when fused kernels lack forward AD).
    """
    ctx = (lambda: attention_context(unet)) if use_attention_context else contextlib.nullcontext
    cfg = guidance_scale > 1 and negative_encoder_hidden_states is not None

    def model_fn(x, t):
        with ctx():
            if cfg:
                eh = torch.cat([negative_encoder_hidden_states, encoder_hidden_states])
                o = unet(torch.cat([x, x]), t, encoder_hidden_states=eh, timestep_cond=timestep_cond,
                         added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]
                u, c = o.chunk(2)
                return u + guidance_scale * (c - u)
            kw = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs is not None else {}
            return unet(x, t, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                        return_dict=False, **kw)[0]

    return model_fn


def pipeline_model_fn(pipe, prompts=None, *, guidance_scale: float = 1.0, negative_prompt=None, dtype=None):
    """model_fn for a pipeline: exact worlds ignore prompts; SD-like pipelines encode `prompts` (one per
    sample) with `pipe.encode_prompt` once.  `dtype` casts the embeddings (JVPs need fp32).
    Guidance as the pipeline applies it: CFG on a doubled batch, or, for UNets with
    `time_cond_proj_dim` (LCM), the guidance-scale embedding passed as `timestep_cond`."""
    unet = pipe.unet
    if not hasattr(pipe, "encode_prompt"):
        return unet_model_fn(unet)
    prompts = [""] if prompts is None else ([prompts] if isinstance(prompts, str) else list(prompts))
    proj_dim = getattr(unet.config, "time_cond_proj_dim", None)
    do_cfg = guidance_scale > 1 and proj_dim is None
    device = next(unet.parameters()).device
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(prompts, device, 1, do_cfg,
                                    [negative_prompt or ""] * len(prompts) if do_cfg else None)
    if dtype is not None:
        pe = pe.to(dtype)
        ne = ne.to(dtype) if ne is not None else None
    timestep_cond = None
    if proj_dim is not None and hasattr(pipe, "get_guidance_scale_embedding"):
        # guidance through the w-embedding (LCM; SD pipelines whose UNet has time_cond_proj_dim), as the
        # pipelines build it: embedding of w = guidance_scale - 1 per sample
        w = torch.tensor(guidance_scale - 1).repeat(len(prompts))
        timestep_cond = pipe.get_guidance_scale_embedding(w, embedding_dim=proj_dim).to(device=device, dtype=pe.dtype)
    return unet_model_fn(unet, pe, guidance_scale=guidance_scale, negative_encoder_hidden_states=ne if do_cfg else None,
                         timestep_cond=timestep_cond)


# ----------------------------------------------------------------------------------------------
# along a stored trajectory


def scheduler_from_attrs(attrs: dict):
    """Fresh scheduler from a store group's attrs (scheduler_class, scheduler_config JSON)."""
    import diffusers

    cls = getattr(diffusers, attrs["scheduler_class"])
    cfg = attrs["scheduler_config"]
    return cls.from_config(json.loads(cfg) if isinstance(cfg, str) else dict(cfg))


def replay_scheduler(scheduler, num_inference_steps: int, model_output: torch.Tensor, latent: torch.Tensor,
                     timesteps, upto: int):
    """Fresh copy of `scheduler` advanced through step calls 0..upto-1 with stored arrays
    model_output / latent (sample, step, ...): its state before step call `upto`."""
    s = _promote_tables(copy.deepcopy(scheduler), latent.dtype)
    s.set_timesteps(num_inference_steps, device=latent.device)
    timesteps = _own_timesteps(s, [float(t) for t in timesteps], timesteps)
    kw = _step_kwargs(s, torch.Generator(device=latent.device).manual_seed(0), None)
    for j in range(upto):
        s.scale_model_input(latent[:, j], timesteps[j])
        s.step(model_output[:, j], timesteps[j], latent[:, j], return_dict=False, **kw)
    return s


def _own_timesteps(s, stored, fallback):
    """The scheduler's own timestep values (right dtype, e.g. float for Euler) if they match the stored grid."""
    own = s.timesteps
    if len(own) == len(stored) and np.allclose(own.cpu().numpy().astype(np.float64), np.asarray(stored, np.float64)):
        return [t for t in own]
    if len(own) == len(stored):
        raise ValueError(f"stored timestep coord {np.asarray(stored)} differs from the scheduler's grid "
                         f"{own.cpu().numpy()}: wrong scheduler config or steps")
    return fallback


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
    s = _promote_tables(copy.deepcopy(scheduler), dt)
    s.set_timesteps(K, device=lat.device)
    ts = _own_timesteps(s, ts_np, ts)
    kw = _step_kwargs(s, torch.Generator().manual_seed(0), None)
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
        s.scale_model_input(lat[:, i], ts[i])
        s.step(mo[:, i], ts[i], lat[:, i], return_dict=False, **kw)
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
# a store group with the pipeline that made it


def jvp_dtype(pipe) -> torch.dtype:
    """float64 for exact-world pipelines (closed-form denoiser, fp64 tables), else float32."""
    return torch.float64 if getattr(pipe, "world", None) is not None else torch.float32


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
    (THEORY.md): theory_step_factor (step, direction) = a_k(t_i, t_{i+1}) on the scheduler's K-step grid
    (`theory.ddim_step_factor`), theory_whole_fro2 = sum_k prod_i a_k^2 (= ||J_sampler||_F^2), coord lam.
    None for mixtures (no closed form) or world None."""
    from trajlab.analysis import theory as th

    if world is None or int(world.means.shape[0]) != 1:
        return None
    lam, _, _ = th.gaussian_eigensystem(world)
    grid = th.ddim_grid(scheduler, steps)
    a = th.ddim_step_factor(lam, grid["alpha_bar"].values, grid["alpha_bar_next"].values).transpose("step", "direction")
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
    `replay_generators`): whole_fro2, whole_fro2_se (Hutchinson, sample) and replay_rel_error (sample) =
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
    th_ = contraction_theory(getattr(pipe, "world", None), scheduler, steps)
    if th_ is not None:
        prof = prof.assign(theory_step_factor=(("step", "direction"), th_["theory_step_factor"].values),
                           theory_whole_fro2=th_["theory_whole_fro2"]).assign_coords(lam=th_["lam"])
    prof.attrs.update({"model": str(ds.attrs.get("model", "")), "steps": steps, "seed": int(seed),
                       "noise": "captured (replayed)" if noise is not None else "none (deterministic step)"})
    return prof
