"""Jacobian estimators for any callable f: (B, ...) -> (B, ...) with torch.func.

f must treat samples independently (the Jacobian is block diagonal over the batch); every
estimate is per sample.  Probes have shape (m, B, ...) and are batched with `torch.func.vmap`
where the callable allows it (else a Python loop).  Forward mode: `torch.func.jvp`, falling back
to `torch.autograd.forward_ad` dual tensors, then to the double-vjp trick (a warning says which).

Estimators: `hutchinson_frobenius`, `power_iteration`, `randomized_svd`, `logdet_slq`,
`exact_jacobian` / `logdet_exact` (small d).  Results are xarray objects with dims `sample`,
`probe`, `rank`.  The maps to differentiate live in `trajlab.models.denoiser`, the analyses along
stored trajectories in `trajlab.analysis.jacobian`.

Fast path: maps built by `trajlab.models.denoiser` (`guided_model`'s model via `denoiser_map`,
`sampler_step_map`, `sampler_map`) carry a `fast_jvp` rule that runs primal and tangents stacked
along the batch (`trajlab.autodiff.fast_jvp`): ~2x a forward instead of ~7x; method "auto" tries it
first and falls back to torch.func where it does not apply (LoRA layers, stochastic schedulers, ...).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch
import xarray as xr

__all__ = [
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
]

Map = Callable[[torch.Tensor], torch.Tensor]


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
    """(f(x), J v) for one tangent v (shape of x).  method: auto | fast | func | forward_ad | double_vjp."""
    y, JV, _ = _jvp_batch(f, x, v[None], method=method, use_vmap=False)
    return y, JV[0]


def jvp_probes(f: Map, x: torch.Tensor, V: torch.Tensor, *, method: str = "auto", use_vmap: bool = True):
    """(f(x), J V) for m tangents V (m, *x.shape) -> JV (m, *f(x).shape)."""
    y, JV, _ = _jvp_batch(f, x, V, method=method, use_vmap=use_vmap)
    return y, JV


_FAST_CHUNK = 8  # probes folded into one stacked call (memory: (1 + chunk) x the primal activations)


def _jvp_fast(f, x, V):
    """The map's own stacked primal/tangent rule (`trajlab.autodiff.fast_jvp`), probes in chunks."""
    from trajlab.autodiff.fast_jvp import FastJVPUnsupported, fast_jvp_of

    rule = fast_jvp_of(f)
    if rule is None:
        raise FastJVPUnsupported("the map carries no fast_jvp rule")
    y, outs = None, []
    for i in range(0, V.shape[0], _FAST_CHUNK):
        y, JV = rule(x, V[i:i + _FAST_CHUNK])
        outs.append(JV)
    return y, outs[0] if len(outs) == 1 else torch.cat(outs)


def _jvp_batch(f, x, V, *, method="auto", use_vmap=True):
    """(f(x), J V, method used).  method "auto": "fast" (the map's stacked primal/tangent rule, see
    `trajlab.autodiff.fast_jvp`; skipped silently where the map has none or it does not apply), then
    "func", "forward_ad", "double_vjp"."""
    if tuple(V.shape[1:]) != tuple(x.shape):
        raise ValueError(f"probes V must have shape (m, *x.shape) = (m, {tuple(x.shape)}); got {tuple(V.shape)}")
    methods = ["fast", "func", "forward_ad", "double_vjp"] if method == "auto" else [method]
    errors = []
    for mth in methods:
        if mth == "fast":
            from trajlab.autodiff.fast_jvp import FastJVPUnsupported

            try:
                y, JV = _jvp_fast(f, x, V)
                return y.detach(), JV.detach(), "fast"
            except FastJVPUnsupported as e:
                if method != "auto":
                    raise RuntimeError(f"method='fast' does not apply: {e}") from e
                continue
            except Exception as e:  # a bug or an unexpected model: fall back, loudly
                if method != "auto":
                    raise
                errors.append(f"fast: {type(e).__name__}: {str(e)[:200]}")
                continue
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
