"""JVPs at about the cost of two forwards: primal and tangents stacked along the batch.

Every op of a diffusion UNet is either linear in its input (conv, linear, reshape, cat, interpolate,
pad, residual adds) or one of a few nonlinearities (SiLU, GELU/GEGLU, group/layer norm, softmax
attention).  Here a UNet call runs on ONE tensor ``Z`` of batch ``(1 + m) B``: rows ``[:B]`` the
primal, rows ``[B:]`` m tangents (probes folded into the batch).  Linear ops run once over the whole
stack (one conv / matmul for primal and tangents; the bias is added to the primal rows only).
Nonlinear ops split the stack and apply exact rules, each one or two fused kernels (the rules are in
`trajlab.autodiff.ops`; this module composes them through the diffusers blocks):

  SiLU, GELU      dy = act'(x) dx            (aten silu_backward / gelu_backward: elementwise,
                                              symmetric Jacobian, so the VJP kernel is the JVP)
  group/layer norm dy = w * J_xhat dx        (native_*_norm_backward with weight None: the Jacobian
                                              of x -> (x - mu) rstd is symmetric)
  softmax         dP = P (dS - <P, dS>)       (_softmax_backward_data, same argument)
  attention       S = q k^T, dS = dq k^T + q dk^T, dO = dP v + P dv (math; query-blocked for large
                  scores; on CUDA the fused SDPA primal with `attention_tangent` instead)

There is no torch.func and no forward-mode AD: the cost is the forward's ops on a (1+m)-times larger
batch plus a handful of elementwise kernels.  Results equal ``torch.func.jvp`` on the math attention
backend to fp32 round-off (tests/test_fast_jvp.py).

Entry points:
  `unet_supported(unet)`                  -> (ok, reason): the module classes / flags handled here
  `unet_jvp(unet, x, T, timestep, ...)`   -> (y, dY) for a UNet2DConditionModel call, or a module's own `tangent`
  `model_jvp(model, x, T, t)`             -> the guided model of `trajlab.models.denoiser.guided_model`
  `sample_jvp(scheduler, model, x, T, ...)` -> the sampling loop with pairs (linear schedulers only)
  `attach(f, rule)` / `fast_jvp_of(f)`    -> the `fast_jvp` attribute that `estimators.jvp` looks for

Unsupported configurations raise `FastJVPUnsupported` (a `NotImplementedError`); callers fall back to
`torch.func.jvp`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trajlab.autodiff.ops import (FastJVPUnsupported, Stack, activation, attention, conv, gelu_pair, group_norm,
                                  layer_norm, linear, tangent_view)

__all__ = [
    "FastJVPUnsupported",
    "unet_supported",
    "unet_jvp",
    "model_jvp",
    "sample_jvp",
    "step_is_linear",
    "attach",
    "fast_jvp_of",
]


# ----------------------------------------------------------------------------------------------
# diffusers blocks


def _resnet(r, z, temb, s: Stack):
    h = activation(r.nonlinearity, group_norm(r.norm1, z, s), s)
    h = conv(r.conv1, h, s)
    if r.time_emb_proj is not None and temb is not None:
        tt = temb if r.skip_time_act else r.nonlinearity(temb)
        h[: s.B] += F.linear(tt, r.time_emb_proj.weight, r.time_emb_proj.bias)[:, :, None, None]
    h = activation(r.nonlinearity, group_norm(r.norm2, h, s), s)
    h = conv(r.conv2, h, s)
    x = conv(r.conv_shortcut, z, s) if r.conv_shortcut is not None else z
    out = x + h
    if r.output_scale_factor != 1:
        out = out / r.output_scale_factor
    return out


def _feed_forward(ff, z, s: Stack):
    from diffusers.models.activations import GEGLU, GELU

    for mod in ff.net:
        if isinstance(mod, torch.nn.Dropout):
            continue
        if type(mod) is torch.nn.Linear:
            z = linear(mod, z, s)
        elif type(mod) is GEGLU:
            hg = linear(mod.proj, z, s)
            h, g = hg.chunk(2, dim=-1)
            gy, gt = gelu_pair(g[: s.B], g[s.B:], "none", s)
            hp, ht = h[: s.B], h[s.B:]
            out = torch.empty_like(h)
            torch.mul(hp, gy, out=out[: s.B])
            tv = lambda a: tangent_view(a, s, hp)  # noqa: E731
            torch.addcmul(tv(ht) * gy, hp, tv(gt), out=tv(out[s.B:]))
            z = out
        elif type(mod) is GELU:
            hg = linear(mod.proj, z, s)
            y, dt = gelu_pair(hg[: s.B], hg[s.B:], mod.approximate, s)
            z = torch.cat([y, dt])
        else:
            raise FastJVPUnsupported(f"feed-forward layer {type(mod).__name__}")
    return z


def _transformer_block(blk, h, eh, s: Stack):
    n = layer_norm(blk.norm1, h, s)
    h = attention(blk.attn1, n, eh if blk.only_cross_attention else None, s) + h
    if blk.attn2 is not None:
        n = layer_norm(blk.norm2, h, s)
        h = attention(blk.attn2, n, eh, s) + h
    n = layer_norm(blk.norm3, h, s)
    return _feed_forward(blk.ff, n, s) + h


def _transformer2d(t, z, eh, s: Stack):
    bz, _, H, W = z.shape
    h = group_norm(t.norm, z, s)
    if not t.use_linear_projection:
        h = conv(t.proj_in, h, s)
        inner = h.shape[1]
        h = h.permute(0, 2, 3, 1).reshape(bz, H * W, inner)
    else:
        inner = h.shape[1]
        h = linear(t.proj_in, h.permute(0, 2, 3, 1).reshape(bz, H * W, inner), s)
    for blk in t.transformer_blocks:
        h = _transformer_block(blk, h, eh, s)
    if not t.use_linear_projection:
        h = conv(t.proj_out, h.reshape(bz, H, W, inner).permute(0, 3, 1, 2).contiguous(), s)
    else:
        h = linear(t.proj_out, h, s).reshape(bz, H, W, inner).permute(0, 3, 1, 2).contiguous()
    return h + z


def _downsample(d, z, s: Stack):
    if d.use_conv and d.padding == 0:
        z = F.pad(z, (0, 1, 0, 1), mode="constant", value=0)
    return conv(d.conv, z, s) if type(d.conv) is torch.nn.Conv2d else d.conv(z)  # AvgPool2d is linear


def _upsample(u, z, s: Stack, size=None):
    z = F.interpolate(z, scale_factor=2.0, mode="nearest") if size is None else F.interpolate(z, size=size,
                                                                                                  mode="nearest")
    if u.use_conv:
        z = conv(u.conv if u.name == "conv" else u.Conv2d_0, z, s)
    return z


def _down_block(blk, z, temb, eh, s: Stack):
    states = ()
    attns = getattr(blk, "attentions", None)
    for i, r in enumerate(blk.resnets):
        z = _resnet(r, z, temb, s)
        if attns is not None:
            z = _transformer2d(attns[i], z, eh, s)
        states += (z,)
    if blk.downsamplers is not None:
        for d in blk.downsamplers:
            z = _downsample(d, z, s)
        states += (z,)
    return z, states


def _mid_block(blk, z, temb, eh, s: Stack):
    z = _resnet(blk.resnets[0], z, temb, s)
    for a, r in zip(blk.attentions, blk.resnets[1:]):
        z = _resnet(r, _transformer2d(a, z, eh, s), temb, s)
    return z


def _up_block(blk, z, res, temb, eh, s: Stack, size):
    attns = getattr(blk, "attentions", None)
    for i, r in enumerate(blk.resnets):
        z = torch.cat([z, res[-1]], dim=1)
        res = res[:-1]
        z = _resnet(r, z, temb, s)
        if attns is not None:
            z = _transformer2d(attns[i], z, eh, s)
    if blk.upsamplers is not None:
        for u in blk.upsamplers:
            z = _upsample(u, z, s, size)
    return z


# ----------------------------------------------------------------------------------------------
# support check


def _diffusers_types():
    from diffusers.models.activations import GEGLU, GELU
    from diffusers.models.attention import BasicTransformerBlock, FeedForward
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.unets.unet_2d_blocks import (CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D,
                                                       UNetMidBlock2DCrossAttn, UpBlock2D)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.models.upsampling import Upsample2D

    return dict(GEGLU=GEGLU, GELU=GELU, BasicTransformerBlock=BasicTransformerBlock, FeedForward=FeedForward,
                Attention=Attention, procs=(AttnProcessor, AttnProcessor2_0), Downsample2D=Downsample2D,
                TimestepEmbedding=TimestepEmbedding, Timesteps=Timesteps, ResnetBlock2D=ResnetBlock2D,
                Transformer2DModel=Transformer2DModel, blocks=(CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D,
                                                               UNetMidBlock2DCrossAttn, UpBlock2D),
                UNet2DConditionModel=UNet2DConditionModel, Upsample2D=Upsample2D)


_SUPPORT_CACHE: dict = {}


def unet_supported(unet) -> tuple[bool, str]:
    """(True, "") when `unet_jvp` handles this module exactly: a diffusers UNet2DConditionModel built
    from the block / layer classes of SD1.x / SD2 / SDXL / LCM UNets (plain Conv2d / Linear, so no
    unfused PEFT LoRA layers; AttnProcessor(2_0); eval mode; no FreeU, class embeddings, gradient
    checkpointing in training), or a module with its own closed-form ``tangent(x, T, timestep)``.  Else (False, reason).
    Cached per module (by id and a parameter/processor fingerprint)."""
    key = (id(unet), tuple(type(getattr(m, "processor", None)).__name__ for m in unet.modules()
                           if hasattr(m, "processor")), unet.training)
    hit = _SUPPORT_CACHE.get(key)
    if hit is None:
        hit = _check(unet)
        _SUPPORT_CACHE[key] = hit
    return hit


def _check(unet) -> tuple[bool, str]:
    if callable(getattr(unet, "tangent", None)):  # a model that owns its closed-form tangent (exact worlds)
        return True, ""
    T = _diffusers_types()
    if type(unet) is not T["UNet2DConditionModel"]:
        return False, f"model class {type(unet).__name__}"
    c = unet.config
    bad = {k: c.get(k) for k, ok in (
        ("class_embed_type", None), ("addition_embed_type", (None, "text_time")), ("time_embedding_type", "positional"),
        ("resnet_time_scale_shift", "default"), ("encoder_hid_dim_type", None), ("dual_cross_attention", False),
        ("attention_type", "default")) if (c.get(k) not in (ok if isinstance(ok, tuple) else (ok,)))}
    if bad:
        return False, f"unsupported UNet config {bad}"
    if unet.class_embedding is not None or getattr(unet, "position_net", None) is not None:
        return False, "class embedding / GLIGEN"
    leaf_ok = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.SiLU, torch.nn.GELU,
               torch.nn.Dropout, torch.nn.ModuleList, torch.nn.Identity, torch.nn.AvgPool2d)
    known = leaf_ok + (T["GEGLU"], T["GELU"], T["BasicTransformerBlock"], T["FeedForward"], T["Attention"],
                       T["Downsample2D"], T["TimestepEmbedding"], T["Timesteps"], T["ResnetBlock2D"],
                       T["Transformer2DModel"], T["UNet2DConditionModel"], T["Upsample2D"]) + T["blocks"]
    for name, m in unet.named_modules():
        if type(m) not in known:
            return False, f"module {name or '<root>'} of class {type(m).__name__}"
        if isinstance(m, torch.nn.Dropout) and m.p != 0 and m.training:
            return False, f"dropout {name} active"
        if type(m) is torch.nn.Conv2d and m.padding_mode != "zeros":
            return False, f"{name}: padding_mode {m.padding_mode}"
        if type(m) is T["ResnetBlock2D"]:
            if m.upsample is not None or m.downsample is not None or m.time_embedding_norm != "default":
                return False, f"{name}: resnet up/down or scale_shift"
            if type(m.nonlinearity) not in (torch.nn.SiLU, torch.nn.GELU):
                return False, f"{name}: activation {type(m.nonlinearity).__name__}"
        elif type(m) is T["Attention"]:
            if type(m.processor) not in T["procs"]:
                return False, f"{name}: attention processor {type(m.processor).__name__}"
            if (m.spatial_norm is not None or m.group_norm is not None or m.norm_q is not None or m.norm_k is not None
                    or m.norm_cross or m.upcast_attention or m.upcast_softmax or m.is_cross_attention is None):
                return False, f"{name}: attention options (norms / upcast)"
            if getattr(m, "add_q_proj", None) is not None or getattr(m, "to_add_out", None) is not None:
                return False, f"{name}: joint attention"
        elif type(m) is T["BasicTransformerBlock"]:
            if m.norm_type != "layer_norm" or m.pos_embed is not None or m._chunk_size is not None:
                return False, f"{name}: transformer block norm_type {m.norm_type} / pos_embed / chunked ff"
            if getattr(m, "fuser", None) is not None:
                return False, f"{name}: GLIGEN fuser"
        elif type(m) is T["Transformer2DModel"]:
            if not m.is_input_continuous:
                return False, f"{name}: non-continuous transformer input"
        elif type(m) is T["Downsample2D"]:
            if m.norm is not None:
                return False, f"{name}: downsample norm"
        elif type(m) is T["Upsample2D"]:
            if m.norm is not None or m.use_conv_transpose or not m.interpolate:
                return False, f"{name}: upsample variant"
        elif isinstance(m, T["blocks"]):
            if all(getattr(m, a, None) for a in ("s1", "s2", "b1", "b2")):
                return False, f"{name}: FreeU enabled"
            if getattr(m, "downsample_type", "conv") == "resnet" or getattr(m, "upsample_type", "conv") == "resnet":
                return False, f"{name}: resnet down/upsampler"
    return True, ""


# ----------------------------------------------------------------------------------------------
# one network call


def _check_tangents(x, T):
    if T.ndim != x.ndim + 1 or tuple(T.shape[1:]) != tuple(x.shape):
        raise ValueError(f"tangents must have shape (m, *x.shape) = (m, {tuple(x.shape)}); got {tuple(T.shape)}")


@torch.no_grad()
def unet_jvp(unet, x, T, timestep, encoder_hidden_states=None, *, timestep_cond=None, added_cond_kwargs=None):
    """(y, dY): the UNet output ``unet(x, timestep, encoder_hidden_states, ...).sample`` and its JVPs
    along m tangents T (m, *x.shape) -> dY (m, *y.shape), by the stacked primal/tangent forward.
    Raises FastJVPUnsupported for modules `unet_supported` rejects."""
    ok, why = unet_supported(unet)
    if not ok:
        raise FastJVPUnsupported(why)
    _check_tangents(x, T)
    if callable(getattr(unet, "tangent", None)):  # the model's own closed-form tangent (exact worlds)
        return unet.tangent(x, T, timestep)
    B, m = x.shape[0], T.shape[0]
    s = Stack(B, m)
    T = T.to(x.dtype)
    up = 2 ** unet.num_upsamplers
    fwd_size = any(d % up != 0 for d in x.shape[-2:])
    if unet.config.center_input_sample:
        x, T = 2 * x - 1.0, 2 * T
    t_emb = unet.get_time_embed(sample=x, timestep=timestep)
    emb = unet.time_embedding(t_emb, timestep_cond)
    eh = encoder_hidden_states
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=eh, added_cond_kwargs=added_cond_kwargs or {})
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    eh = unet.process_encoder_hidden_states(encoder_hidden_states=eh, added_cond_kwargs=added_cond_kwargs or {})
    z = conv(unet.conv_in, torch.cat([x, T.reshape(m * B, *x.shape[1:])]), s)
    res = (z,)
    for blk in unet.down_blocks:
        z, st = _down_block(blk, z, emb, eh, s)
        res += st
    if unet.mid_block is not None:
        z = _mid_block(unet.mid_block, z, emb, eh, s)
    for i, blk in enumerate(unet.up_blocks):
        n = len(blk.resnets)
        r, res = res[-n:], res[:-n]
        size = res[-1].shape[2:] if (fwd_size and i < len(unet.up_blocks) - 1) else None
        z = _up_block(blk, z, r, emb, eh, s, size)
    if unet.conv_norm_out is not None:
        z = activation(unet.conv_act, group_norm(unet.conv_norm_out, z, s), s)
    z = conv(unet.conv_out, z, s)
    return z[:B], z[B:].view(m, B, *z.shape[1:])


def model_jvp(model, x, T, t):
    """(y, dY) for a guided model of `trajlab.models.denoiser.guided_model` (it carries `.unet` and
    `.cond`): CFG on the doubled batch as the model does.  FastJVPUnsupported otherwise."""
    unet, cond = getattr(model, "unet", None), getattr(model, "cond", None)
    if unet is None or cond is None:
        raise FastJVPUnsupported("model callable without .unet / .cond (not from guided_model)")
    _check_tangents(x, T)
    kw = dict(timestep_cond=cond.timestep_cond, added_cond_kwargs=cond.added_cond_kwargs)
    if not cond.cfg:
        return unet_jvp(unet, x, T, t, cond.encoder_hidden_states, **kw)
    eh = torch.cat([cond.negative_encoder_hidden_states, cond.encoder_hidden_states])
    y, dY = unet_jvp(unet, torch.cat([x, x]), torch.cat([T, T], 1), t, eh, **kw)
    w = cond.guidance_scale
    u, c = y.chunk(2)
    du, dc = dY.chunk(2, dim=1)
    return u + w * (c - u), du + w * (dc - du)


# ----------------------------------------------------------------------------------------------
# the sampling loop


_LINEAR_SCHEDULERS = {
    "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
    "HeunDiscreteScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "PNDMScheduler",
}


def step_is_linear(scheduler, step_kwargs=None) -> tuple[bool, str]:
    """Whether `scheduler.step(model_output, t, sample, **step_kwargs)` is linear and homogeneous in
    (model_output, sample) with coefficients fixed by the scheduler state (no noise, clipping or
    thresholding), so that one step over the stacked [primal; tangents] batch is exact."""
    name = type(scheduler).__name__
    if name not in _LINEAR_SCHEDULERS:
        return False, f"scheduler {name} (stochastic or not verified linear)"
    cfg = scheduler.config
    if cfg.get("thresholding", False) or cfg.get("clip_sample", False):
        return False, f"{name}: thresholding / clip_sample"
    if "sde" in str(cfg.get("algorithm_type", "")):
        return False, f"{name}: SDE variant"
    kw = step_kwargs or {}
    if float(kw.get("eta", 0.0) or 0.0) != 0.0 or float(kw.get("s_churn", 0.0) or 0.0) != 0.0:
        return False, f"{name}: stochastic step keywords"
    if kw.get("variance_noise") is not None:
        return False, f"{name}: variance noise"
    return True, ""


@torch.no_grad()
def sample_jvp(scheduler, model, x, T, *, timesteps=None, extra_step_kwargs=None, post=None):
    """(final, dFinal): `trajlab.models.denoiser.sample` from latent x with m tangents T (m, *x.shape):
    scale_model_input and scheduler.step run once on the stacked [x; T] batch (exact for linear steps,
    `step_is_linear`), the model by `model_jvp`.  Mutates ``scheduler`` like `sample`.  post (optional)
    maps the final stacked latent (linear, e.g. derive_x0 is not used here)."""
    ok, why = step_is_linear(scheduler, extra_step_kwargs)
    if not ok:
        raise FastJVPUnsupported(why)
    _check_tangents(x, T)
    B, m = x.shape[0], T.shape[0]
    kw = extra_step_kwargs or {}
    z = torch.cat([x, T.to(x.dtype).reshape(m * B, *x.shape[1:])])
    for t in (scheduler.timesteps if timesteps is None else timesteps):
        inp = scheduler.scale_model_input(z, t)
        y, dY = model_jvp(model, inp[:B], inp[B:].view(m, *x.shape), t)
        z = scheduler.step(torch.cat([y, dY.reshape(m * B, *y.shape[1:])]), t, z, return_dict=False, **kw)[0]
    return z[:B], z[B:].view(m, *x.shape)


# ----------------------------------------------------------------------------------------------
# the attribute estimators look for


def attach(f, rule):
    """Give map f a fast JVP: ``f.fast_jvp(x, V) -> (f(x), J V)`` for V (m, *x.shape); rule may raise
    FastJVPUnsupported (callers then fall back).  Returns f."""
    f.fast_jvp = rule
    return f


def fast_jvp_of(f):
    """The `fast_jvp` rule of map f, or None."""
    return getattr(f, "fast_jvp", None)
