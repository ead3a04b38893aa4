"""Exact worlds: Gaussian / Gaussian-mixture data with the closed-form denoiser.

Notation (docs/design.md, docs/theory.md §1): VP forward x_t = sqrt(ab) x0 + sqrt(1 - ab) eps; EDM view
y = x_t / sqrt(ab), sigma^2 = (1 - ab) / ab, so y = x0 + sigma * eps.  The denoiser
D(y; sigma) = E[x0 | y] of p = sum_k pi_k N(mu_k, S_k) is exact:

    w_k(y) ~ pi_k N(y; mu_k, S_k + sigma^2 I),  m_k = mu_k + S_k (S_k + sigma^2 I)^-1 (y - mu_k),
    D = sum_k w_k m_k,   dD/dy = sum_k w_k [S_k (S_k + sigma^2 I)^-1 + (m_k - D)(m_k - D)^T / sigma^2].

Each component covariance is kept as its eigen-decomposition S_k = U_k diag(lam_k) U_k^T, so
everything is a few einsums (fp64 capable, torch.func friendly: no `.item()`, no data-dependent
Python branches).

Plain functions (`gmm_denoiser`, `gmm_denoiser_jacobian`, `eps_from_denoiser`, `sample_world`)
work on an `ExactWorld`; `ExactDenoiser` packages the denoiser as an epsilon-predicting "UNet"
and `ExactWorldPipeline` drives it with any real diffusers scheduler, with the loop structure of
StableDiffusionPipeline (`trajlab.models.denoiser.sample` over `guided_model(unet)`, so capture taps
on `pipe.scheduler.step` / `pipe.unet` record it).
A d-dimensional world has latents of shape (B, d, 1, 1).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from trajlab.models.denoiser import guided_model, sample
from trajlab.models.exact_presets import EXACT_WORLDS
from trajlab.models.schedulers import promote_tables, step_kwargs

__all__ = [
    "ExactWorld",
    "gaussian_world",
    "gmm_world",
    "make_world",
    "world_to",
    "gmm_posterior",
    "gmm_denoiser",
    "gmm_denoiser_jacobian",
    "eps_from_denoiser",
    "denoiser_from_eps",
    "sample_world",
    "world_covariance",
    "world_mean",
    "ExactDenoiser",
    "ExactWorldPipeline",
    "ExactWorldPipelineOutput",
    "EXACT_WORLDS",
    "sd_ddim_scheduler",
    "build_exact_world",
    "scheduler_supports_fp64",
    "promote_scheduler_tables",
]


# ----------------------------------------------------------------------------------------------
# the world


@dataclass(frozen=True)
class ExactWorld:
    """A Gaussian mixture sum_k weights[k] N(means[k], U[k] diag(lam[k]) U[k]^T).

    means (K, d); U (K, d, d), columns are eigenvectors; lam (K, d) >= 0 eigenvalues
    (data units squared); weights (K,) summing to 1.  `params` is the JSON-able recipe (if any).
    """

    means: torch.Tensor
    U: torch.Tensor
    lam: torch.Tensor
    weights: torch.Tensor
    name: str = ""
    params: dict = field(default_factory=dict)

    @property
    def d(self) -> int:
        return int(self.means.shape[-1])

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def covs(self) -> torch.Tensor:
        """Component covariances (K, d, d)."""
        return torch.einsum("kij,kj,klj->kil", self.U, self.lam, self.U)


def _check_world(means, U, lam, weights) -> None:
    if means.ndim != 2:
        raise ValueError(f"means must have shape (K, d); got {tuple(means.shape)}")
    K, d = means.shape
    if tuple(U.shape) != (K, d, d):
        raise ValueError(f"U must have shape (K, d, d) = {(K, d, d)}; got {tuple(U.shape)}")
    if tuple(lam.shape) != (K, d):
        raise ValueError(f"lam must have shape (K, d) = {(K, d)}; got {tuple(lam.shape)}")
    if tuple(weights.shape) != (K,):
        raise ValueError(f"weights must have shape (K,) = {(K,)}; got {tuple(weights.shape)}")
    if bool((lam < 0).any()):
        raise ValueError(f"lam (eigenvalues, shape {tuple(lam.shape)}) must be >= 0; min {float(lam.min())}")
    if bool((weights < 0).any()) or abs(float(weights.sum()) - 1.0) > 1e-6:
        raise ValueError(f"weights (shape {tuple(weights.shape)}) must be >= 0 and sum to 1; got sum {float(weights.sum())}")


def _random_orthogonal(d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return q.to(dtype)


def gaussian_world(lam, U=None, mean=None, *, dtype=torch.float64, name: str = "", params=None) -> ExactWorld:
    """Single Gaussian N(mean, U diag(lam) U^T).  lam (d,); U (d, d) orthogonal (default I); mean (d,) (default 0)."""
    lam = torch.as_tensor(lam, dtype=dtype).reshape(-1)
    d = lam.shape[0]
    U = torch.eye(d, dtype=dtype) if U is None else torch.as_tensor(U, dtype=dtype)
    mean = torch.zeros(d, dtype=dtype) if mean is None else torch.as_tensor(mean, dtype=dtype).reshape(-1)
    if tuple(U.shape) != (d, d):
        raise ValueError(f"U must have shape (d, d) = {(d, d)}; got {tuple(U.shape)}")
    if tuple(mean.shape) != (d,):
        raise ValueError(f"mean must have shape (d,) = {(d,)}; got {tuple(mean.shape)}")
    w = ExactWorld(mean[None], U[None], lam[None], torch.ones(1, dtype=dtype), name, dict(params or {}))
    _check_world(w.means, w.U, w.lam, w.weights)
    return w


def gmm_world(means, covs=None, weights=None, *, variances=None, dtype=torch.float64, name: str = "",
              params=None) -> ExactWorld:
    """Gaussian mixture.  means (K, d); covs (K, d, d) or (d, d) shared, or `variances` (K,) / scalar for
    isotropic components; weights (K,) (default uniform)."""
    means = torch.as_tensor(means, dtype=dtype)
    if means.ndim != 2:
        raise ValueError(f"means must have shape (K, d); got {tuple(means.shape)}")
    K, d = means.shape
    if covs is not None:
        covs = torch.as_tensor(covs, dtype=dtype)
        if covs.ndim == 2:
            covs = covs.expand(K, d, d)
        if tuple(covs.shape) != (K, d, d):
            raise ValueError(f"covs must have shape (K, d, d) = {(K, d, d)} or (d, d); got {tuple(covs.shape)}")
        lam, U = torch.linalg.eigh(0.5 * (covs + covs.transpose(-1, -2)))
        lam = lam.clamp_min(0.0)
    else:
        v = torch.as_tensor(1.0 if variances is None else variances, dtype=dtype).reshape(-1)
        if v.numel() not in (1, K):
            raise ValueError(f"variances must be a scalar or shape (K,) = {(K,)}; got {tuple(v.shape)}")
        lam = v.expand(K).reshape(K, 1).expand(K, d).clone()
        U = torch.eye(d, dtype=dtype).expand(K, d, d).clone()
    weights = torch.full((K,), 1.0 / K, dtype=dtype) if weights is None else torch.as_tensor(weights, dtype=dtype)
    weights = weights / weights.sum()
    _check_world(means, U, lam, weights)
    return ExactWorld(means, U.contiguous(), lam.contiguous(), weights, name, dict(params or {}))


def world_to(world: ExactWorld, device=None, dtype=None) -> ExactWorld:
    """Copy of `world` with every tensor moved to `device` / cast to `dtype`."""
    f = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return ExactWorld(f(world.means), f(world.U), f(world.lam), f(world.weights), world.name, world.params)


def world_mean(world: ExactWorld) -> torch.Tensor:
    """Data mean (d,)."""
    return torch.einsum("k,kd->d", world.weights, world.means)


def world_covariance(world: ExactWorld) -> torch.Tensor:
    """Data covariance (d, d) = sum_k pi_k (S_k + mu_k mu_k^T) - mu mu^T."""
    mu = world_mean(world)
    dm = world.means - mu
    return torch.einsum("k,kij->ij", world.weights, world.covs) + torch.einsum("k,ki,kj->ij", world.weights, dm, dm)


# ----------------------------------------------------------------------------------------------
# closed-form denoiser


def _flatten(y: torch.Tensor, world: ExactWorld, name: str = "y") -> torch.Tensor:
    if y.ndim < 2 or math.prod(y.shape[1:]) != world.d:
        raise ValueError(f"{name} must have shape (B, d, ...) with prod(...) * d = {world.d}; got {tuple(y.shape)}")
    return y.reshape(y.shape[0], world.d)


def _sigma2(sigma, y: torch.Tensor) -> torch.Tensor:
    """sigma (scalar, 0-d or (B,)) -> sigma^2 shaped (B, 1, 1) or (1, 1, 1), in y's dtype/device."""
    s = torch.as_tensor(sigma, dtype=y.dtype, device=y.device)
    if s.ndim == 0:
        return (s * s).reshape(1, 1, 1)
    s = s.reshape(-1)
    if s.shape[0] not in (1, y.shape[0]):
        raise ValueError(f"sigma must be a scalar or shape (B,) = ({y.shape[0]},); got {tuple(s.shape)}")
    return (s * s).reshape(-1, 1, 1)


def gmm_posterior(y: torch.Tensor, sigma, world: ExactWorld):
    """Component posteriors and means at noise level sigma (EDM coordinates).

    y (B, d) in data units; sigma scalar or (B,).  Returns (w (B, K), m (B, K, d), g (B, K, d)) with
    w_k = p(k | y), m_k = E[x0 | y, k], g = lam / (lam + sigma^2) the per-eigendirection gains.
    """
    y = _flatten(y, world)
    W = world_to(world, y.device, y.dtype)
    s2 = _sigma2(sigma, y)  # (B|1, 1, 1)
    var = W.lam[None] + s2  # (B, K, d)
    c = torch.einsum("kij,bki->bkj", W.U, y[:, None, :] - W.means[None])  # coords in eigenbasis
    logp = -0.5 * (c * c / var).sum(-1) - 0.5 * torch.log(2 * math.pi * var).sum(-1) + torch.log(W.weights)[None]
    w = torch.softmax(logp, dim=-1)
    g = W.lam[None] / var
    m = W.means[None] + torch.einsum("kij,bkj->bki", W.U, g * c)
    return w, m, g.expand(y.shape[0], -1, -1)


def gmm_denoiser(y: torch.Tensor, sigma, world: ExactWorld) -> torch.Tensor:
    """D(y; sigma) = E[x0 | y] for y = x0 + sigma eps.  y (B, d) or (B, d, 1, 1) -> same shape."""
    w, m, _ = gmm_posterior(y, sigma, world)
    return torch.einsum("bk,bkd->bd", w, m).reshape(y.shape)


def gmm_denoiser_jacobian(y: torch.Tensor, sigma, world: ExactWorld) -> torch.Tensor:
    """Closed-form dD/dy = Cov[x0 | y] / sigma^2, shape (B, d, d), symmetric PSD."""
    yf = _flatten(y, world)
    w, m, g = gmm_posterior(yf, sigma, world)
    U = world.U.to(device=yf.device, dtype=yf.dtype)
    D = torch.einsum("bk,bkd->bd", w, m)
    dm = m - D[:, None, :]
    s2 = _sigma2(sigma, yf).reshape(-1, 1, 1)
    within = torch.einsum("bk,kij,bkj,klj->bil", w, U, g, U)
    between = torch.einsum("bk,bki,bkj->bij", w, dm, dm) / s2
    J = within + between
    return 0.5 * (J + J.transpose(-1, -2))


def eps_from_denoiser(x_t: torch.Tensor, D: torch.Tensor, alpha_bar) -> torch.Tensor:
    """eps_hat = (x_t - sqrt(ab) D) / sqrt(1 - ab).  x_t VP sample, D data units; alpha_bar scalar or (B,)."""
    ab = _per_sample(alpha_bar, x_t)
    return (x_t - ab.sqrt() * D) / (1 - ab).sqrt()


def denoiser_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - ab) eps) / sqrt(ab).  Inverse of `eps_from_denoiser`."""
    ab = _per_sample(alpha_bar, x_t)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def _per_sample(v, x: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        return v
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def sample_world(world: ExactWorld, n: int, generator: torch.Generator | None = None, *,
                 dtype=None, device=None):
    """Draw n samples x0 ~ p.  Returns (x0 (n, d), labels (n,) int64 component index)."""
    dtype = dtype or world.means.dtype
    labels = torch.multinomial(world.weights.to(torch.float64).cpu(), n, replacement=True, generator=generator)
    z = torch.randn(n, world.d, generator=generator, dtype=torch.float64)
    W = world_to(world, "cpu", torch.float64)
    x = W.means[labels] + torch.einsum("nij,nj->ni", W.U[labels], W.lam[labels].sqrt() * z)
    return x.to(device=device, dtype=dtype), labels.to(device)


# ----------------------------------------------------------------------------------------------
# the "UNet"


@dataclass
class ExactDenoiserOutput(BaseOutput):
    sample: torch.Tensor


class _Cfg(dict):
    """Minimal read-only config with attribute access (what pipelines inspect on a UNet)."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError as e:
            raise AttributeError(k) from e


def _alphas_cumprod_of(scheduler_or_config) -> torch.Tensor:
    ac = getattr(scheduler_or_config, "alphas_cumprod", None)
    if ac is None:
        cfg = dict(getattr(scheduler_or_config, "config", scheduler_or_config))
        ac = DDIMScheduler.from_config(cfg).alphas_cumprod
    return torch.as_tensor(ac).detach().to(torch.float64).cpu().clone()


class ExactDenoiser(torch.nn.Module):
    """The exact denoiser as an epsilon-predicting UNet stand-in (VP coordinates).

    forward(sample (B, d, 1, 1) = x_t as SD's UNet receives it (after scale_model_input),
    timestep int / float / 0-d or (B,) tensor) -> output with `.sample` (B, d, 1, 1): the model
    prediction of type `prediction_type` ("epsilon", "v_prediction" or "sample").  alpha_bar(t) is
    read from the scheduler's alphas_cumprod (given at construction); non-integer timesteps use
    sigma linearly interpolated in t (EulerDiscreteScheduler's convention).  Computes in the
    sample's dtype.
    """

    def __init__(self, world: ExactWorld, scheduler_or_config, prediction_type: str | None = None):
        super().__init__()
        self.world_name = world.name
        self.world_params = dict(world.params)
        W = world_to(world, "cpu", torch.float64)
        self.register_buffer("means", W.means.clone())
        self.register_buffer("U", W.U.clone())
        self.register_buffer("lam", W.lam.clone())
        self.register_buffer("weights", W.weights.clone())
        ac = _alphas_cumprod_of(scheduler_or_config)
        self.register_buffer("alphas_cumprod", ac)
        self.register_buffer("sigmas_table", ((1 - ac) / ac).sqrt())
        cfg = getattr(scheduler_or_config, "config", scheduler_or_config)
        if prediction_type is None:
            prediction_type = dict(cfg).get("prediction_type", "epsilon") if cfg is not None else "epsilon"
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be epsilon | v_prediction | sample; got {prediction_type!r}")
        self.prediction_type = prediction_type
        self.config = _Cfg(in_channels=W.d, out_channels=W.d, sample_size=1, time_cond_proj_dim=None,
                           addition_embed_type=None, prediction_type=prediction_type)

    # what DiffusionPipeline.dtype / .device read
    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def world(self) -> ExactWorld:
        return ExactWorld(self.means, self.U, self.lam, self.weights, self.world_name, self.world_params)

    def alpha_bar(self, timestep) -> torch.Tensor:
        """alpha_bar at `timestep` (fp64, shape of timestep).  Integer t: alphas_cumprod[t] exactly."""
        T = self.alphas_cumprod.shape[0]
        t = torch.as_tensor(timestep, device=self.alphas_cumprod.device).to(torch.float64)
        t = t.clamp(0, T - 1)
        lo = torch.floor(t).long()
        hi = (lo + 1).clamp_max(T - 1)
        frac = t - lo.to(torch.float64)
        sig = self.sigmas_table[lo] * (1 - frac) + self.sigmas_table[hi] * frac
        return torch.where(frac == 0, self.alphas_cumprod[lo], 1.0 / (1.0 + sig * sig))

    def tangent(self, x: torch.Tensor, T: torch.Tensor, timestep):
        """(output, tangent) of this denoiser at x (B, d, 1, 1) along tangents T (m, B, d, 1, 1), in closed
        form (the GMM denoiser's derivative, docs/theory.md §2.3); the fast-JVP path (trajlab.autodiff.fast_jvp)
        uses it. Outputs in the model's parameterisation (epsilon / v_prediction / sample)."""
        dt = x.dtype
        m, B = T.shape[0], x.shape[0]
        ab = self.alpha_bar(timestep).to(device=x.device, dtype=dt)
        ab = ab.reshape(-1) if ab.ndim else ab
        abx = _per_sample(ab, x)
        sq, sq1 = abx.sqrt(), (1 - abx).sqrt()
        W = world_to(self.world, x.device, dt)
        d = W.means.shape[-1]
        y = (x / sq).reshape(B, d)
        dy = (T / sq).reshape(m, B, d)
        s2 = ((1 - ab) / ab).reshape(-1, 1, 1)  # (B|1, 1, 1)
        var = W.lam[None] + s2  # (B, K, d)
        c = torch.einsum("kij,bki->bkj", W.U, y[:, None, :] - W.means[None])
        logp = -0.5 * (c * c / var).sum(-1) - 0.5 * torch.log(2 * math.pi * var).sum(-1) + torch.log(W.weights)[None]
        w = torch.softmax(logp, dim=-1)  # (B, K)
        g = W.lam[None] / var
        mk = W.means[None] + torch.einsum("kij,bkj->bki", W.U, g * c)  # (B, K, d)
        D = torch.einsum("bk,bkd->bd", w, mk)
        dc = torch.einsum("kij,mbi->mbkj", W.U, dy)  # (m, B, K, d)
        dlogp = -(c / var * dc).sum(-1)  # (m, B, K)
        dw = w * (dlogp - (w * dlogp).sum(-1, keepdim=True))
        dmk = torch.einsum("kij,mbkj->mbki", W.U, g * dc)
        dD = torch.einsum("mbk,bkd->mbd", dw, mk) + torch.einsum("bk,mbkd->mbd", w, dmk)
        D, dD = D.reshape(x.shape), dD.reshape(T.shape)
        if self.prediction_type == "sample":
            return D, dD
        eps, deps = (x - sq * D) / sq1, (T - sq * dD) / sq1
        if self.prediction_type == "epsilon":
            return eps, deps
        return sq * eps - sq1 * D, sq * deps - sq1 * dD

    def forward(self, sample, timestep, encoder_hidden_states=None, timestep_cond=None, return_dict=True, **kw):
        x_t = sample
        dt = x_t.dtype if x_t.is_floating_point() else torch.float32
        ab = self.alpha_bar(timestep).to(device=x_t.device, dtype=dt)
        ab = ab.reshape(-1) if ab.ndim else ab
        sigma = ((1 - ab) / ab).sqrt()
        abx = _per_sample(ab, x_t)
        y = x_t / abx.sqrt()
        D = gmm_denoiser(y, sigma, world_to(self.world, x_t.device, dt))
        if self.prediction_type == "sample":
            out = D
        else:
            eps = (x_t - abx.sqrt() * D) / (1 - abx).sqrt()
            out = eps if self.prediction_type == "epsilon" else abx.sqrt() * eps - (1 - abx).sqrt() * D
        if not return_dict:
            return (out,)
        return ExactDenoiserOutput(sample=out)


# ----------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class ExactWorldPipelineOutput(BaseOutput):
    """images: (B, d, 1, 1) tensor for "latent"/"pt", (B, 1, 1, d) ndarray (channels last) for "np"."""

    images: Any


def scheduler_supports_fp64(scheduler) -> bool:
    """False when the scheduler's `step` upcasts/downcasts the sample to float32 (Euler, DPM++, ...)."""
    try:
        src = inspect.getsource(type(scheduler).step)
    except (OSError, TypeError):
        return False
    return "torch.float32" not in src


promote_scheduler_tables = promote_tables
"""Cast a scheduler's float tables to float64 in place (`trajlab.models.schedulers.promote_tables`)."""


class ExactWorldPipeline(DiffusionPipeline):
    """A diffusers pipeline whose "UNet" is an `ExactDenoiser`: SD's sampling loop over a d-dim world.

    Modules: `unet` (ExactDenoiser), `scheduler` (any diffusers scheduler; swap with
    `pipe.scheduler = X.from_config(pipe.scheduler.config)`).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: ExactDenoiser, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def world(self) -> ExactWorld:
        return self.unet.world

    def default_dtype(self) -> torch.dtype:
        """float64 if the current scheduler's step keeps fp64, else float32."""
        return torch.float64 if scheduler_supports_fp64(self.scheduler) else torch.float32

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        timesteps: list[int] | None = None,
        guidance_scale: float = 1.0,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "latent",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        dtype: torch.dtype | None = None,
        **kwargs,
    ):
        """Sample the exact world.  prompt sets the batch (text ignored); height/width, guidance_scale,
        negative_prompt are accepted and ignored.  Latents (B, d, 1, 1) with B = n_prompts *
        num_images_per_prompt; dtype defaults to `default_dtype()` (fp64 for DDIM/DDPM)."""
        if prompt is None:
            n_prompts = 1 if latents is None else latents.shape[0] // num_images_per_prompt
        else:
            n_prompts = 1 if isinstance(prompt, str) else len(prompt)
        batch = n_prompts * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"generator list has length {len(generator)}; expected batch size {batch}")
        if output_type not in ("latent", "np", "pt"):
            raise ValueError(f"output_type must be 'latent' | 'np' | 'pt'; got {output_type!r}")
        device = self.unet.device
        dtype = dtype or (latents.dtype if latents is not None else self.default_dtype())
        if dtype == torch.float64:
            promote_tables(self.scheduler, torch.float64)
        d = self.unet.config.in_channels
        shape = (batch, d, 1, 1)

        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=timesteps, device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        ts = self.scheduler.timesteps
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=dtype)
        latents = latents * self.scheduler.init_noise_sigma
        extra = step_kwargs(self.scheduler, generator, eta)
        self._num_timesteps = len(ts)
        with self.progress_bar(total=len(ts)) as bar:

            def after_step(i, t, latents):
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, t, {k: {"latents": latents}[k]
                                                            for k in callback_on_step_end_tensor_inputs})
                    latents = out.pop("latents", latents)
                bar.update()
                return latents

            latents = sample(self.scheduler, guided_model(self.unet), latents, timesteps=ts,
                             extra_step_kwargs=extra, callback=after_step)
        if output_type == "np":
            images = latents.permute(0, 2, 3, 1).cpu().numpy()
        else:
            images = latents
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ExactWorldPipelineOutput(images=images)


# ----------------------------------------------------------------------------------------------
# presets



def make_world(params: dict | str | ExactWorld, dtype=torch.float64) -> ExactWorld:
    """Build an ExactWorld from a preset name, a recipe dict, or pass an ExactWorld through.

    Recipe kinds: "gaussian" (d, lam_max, lam_min, basis_seed | lam [, U, mean]);
    "two-class" (d, m_norm, s [, weights]); "modes" (d, n_modes, radius, s, seed);
    "gmm" (means, covs | variances, weights).
    """
    if isinstance(params, ExactWorld):
        return params
    name = ""
    if isinstance(params, str):
        if params not in EXACT_WORLDS:
            raise KeyError(f"unknown exact world {params!r}; presets: {sorted(EXACT_WORLDS)}")
        name, params = params, EXACT_WORLDS[params]
    p = dict(params)
    kind = p.get("kind", "gaussian" if "lam" in p else "gmm")
    if kind == "gaussian":
        if "lam" in p:
            lam = torch.as_tensor(p["lam"], dtype=dtype)
        else:
            lam = torch.logspace(math.log10(p["lam_max"]), math.log10(p["lam_min"]), int(p["d"]), dtype=dtype)
        d = lam.shape[0]
        U = p.get("U")
        if U is None and p.get("basis_seed") is not None:
            U = _random_orthogonal(d, p["basis_seed"], dtype)
        return gaussian_world(lam, U, p.get("mean"), dtype=dtype, name=name, params=params)
    if kind == "two-class":
        d = int(p["d"])
        m = torch.full((d,), float(p["m_norm"]) / math.sqrt(d), dtype=dtype)
        return gmm_world(torch.stack([m, -m]), variances=float(p["s"]) ** 2, weights=p.get("weights"),
                         dtype=dtype, name=name, params=params)
    if kind == "modes":
        g = torch.Generator().manual_seed(int(p.get("seed", 0)))
        mu = torch.randn(int(p["n_modes"]), int(p["d"]), generator=g, dtype=torch.float64)
        mu = float(p["radius"]) * mu / mu.norm(dim=1, keepdim=True)
        return gmm_world(mu.to(dtype), variances=float(p["s"]) ** 2, weights=p.get("weights"), dtype=dtype,
                         name=name, params=params)
    if kind == "gmm":
        return gmm_world(p["means"], p.get("covs"), p.get("weights"), variances=p.get("variances"), dtype=dtype,
                         name=name, params=params)
    raise ValueError(f"unknown world kind {kind!r}; expected gaussian | two-class | modes | gmm")


def sd_ddim_scheduler(timestep_spacing: str = "leading", **overrides) -> DDIMScheduler:
    """DDIMScheduler with SD1.5's training schedule (scaled_linear 0.00085..0.012, 1000 steps,
    steps_offset=1, set_alpha_to_one=False, clip_sample=False)."""
    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon",
               timestep_spacing=timestep_spacing)
    cfg.update(overrides)
    return DDIMScheduler(**cfg)


def build_exact_world(name_or_params: str | dict | ExactWorld, scheduler=None, *,
                      timestep_spacing: str = "leading", prediction_type: str | None = None,
                      device=None) -> ExactWorldPipeline:
    """ExactWorldPipeline for a preset name / recipe dict / ExactWorld.  Default scheduler:
    `sd_ddim_scheduler(timestep_spacing)`."""
    world = make_world(name_or_params)
    scheduler = scheduler if scheduler is not None else sd_ddim_scheduler(timestep_spacing)
    unet = ExactDenoiser(world, scheduler, prediction_type=prediction_type)
    pipe = ExactWorldPipeline(unet=unet, scheduler=scheduler)
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
