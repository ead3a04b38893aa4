"""Forward-mode AD (JVP) for scaled-dot-product attention that keeps the fused kernel.

`torch.func.jvp` fails on the fused SDPA kernels (CPU flash, CUDA flash / efficient / cuDNN) and
the math backend costs ~4.5x a fused forward. Here the primal stays on
`F.scaled_dot_product_attention` (fused) and the tangent is computed by a custom rule

    dO = P dV + (P*dS) V - rowsum(P*dS) * O,   dS = scale * (dQ K^T + Q dK^T)

either by a memory-blocked pure-torch loop over query blocks (any device/dtype) or by a
flash-style Triton kernel (CUDA; `trajlab.kernels.flash_jvp`).

The one switch for "network calls under forward-mode AD" is `attention_context(model)`: a no-op
outside forward mode or where the fused kernel has a forward-AD rule (`fused_sdpa_supports_jvp`),
else the math SDPA backend (what the Jacobian analyses use).  The fused primal with the custom
tangent rule here is entered explicitly with `jvp_attention(model)` (benchmarks/jvp_cost.py times
it against the math backend on CUDA); `attention_tangent` also serves `trajlab.autodiff.ops` (CUDA).

Shapes: q (..., M, D), k (..., N, D), v (..., N, Dv), output (..., M, Dv); leading dims are batch
dims (B, H for diffusers). Tangents have the shapes of their primals (or None = zero).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "naive_attention",
    "attention_tangent",
    "attention_tangent_torch",
    "attention_vjp_torch",
    "FusedSDPAWithJVP",
    "sdpa_with_jvp",
    "fused_sdpa_supports_jvp",
    "forward_mode_active",
    "attention_context",
    "JVPAttnProcessor",
    "jvp_attention",
    "matched_tangent_dtypes",
    "lean_jvp_layers",
]

_DEFAULT_BLOCK_ELEMS = 1 << 25  # score-matrix elements per query block in the torch path (128 MiB fp32)


def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def naive_attention(q, k, v, scale: float | None = None):
    """softmax(scale q k^T) v with plain ops (differentiable in every mode). q (...,M,D) -> (...,M,Dv)."""
    s = (q @ k.transpose(-1, -2)) * _default_scale(q, scale)
    return torch.softmax(s, dim=-1) @ v


def _query_block(q_shape, n_keys: int, block_elems: int) -> int:
    z = 1
    for d in q_shape[:-2]:
        z *= int(d)
    m = int(q_shape[-2])
    return max(1, min(m, block_elems // max(1, z * n_keys)))


def attention_tangent_torch(q, k, v, dq=None, dk=None, dv=None, scale: float | None = None,
                            block_elems: int = _DEFAULT_BLOCK_ELEMS):
    """Tangent dO (..., M, Dv) of softmax attention, looping over query blocks.

    Accumulates in fp32 (fp64 for fp64 inputs); returns q.dtype. Uses the centred form
    dO = P dV + (P * (dS - rowsum(P dS))) V, which needs no O and avoids cancellation.
    Broadcasts leading dims (so vmap-folded, unsqueezed primals work).
    """
    sc = _default_scale(q, scale)
    ct = _compute_dtype(q.dtype)
    kc, vc = k.to(ct), v.to(ct)
    kt = kc.transpose(-1, -2)
    dkt = dk.to(ct).transpose(-1, -2) if dk is not None else None
    dvc = dv.to(ct) if dv is not None else None
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2],
                                  *[t.shape[:-2] for t in (dq, dk, dv) if t is not None])
    n_keys = k.shape[-2]
    bq = _query_block(tuple(lead) + tuple(q.shape[-2:]), n_keys, block_elems)
    outs = []
    for i in range(0, q.shape[-2], bq):
        qb = q[..., i:i + bq, :].to(ct)
        p = torch.softmax((qb @ kt) * sc, dim=-1)
        out = None
        if dq is not None or dk is not None:
            ds = None
            if dq is not None:
                ds = dq[..., i:i + bq, :].to(ct) @ kt
            if dkt is not None:
                ds = qb @ dkt if ds is None else ds + qb @ dkt
            pds = p * ds
            pds = pds - p * pds.sum(dim=-1, keepdim=True)
            out = (pds * sc) @ vc
        if dvc is not None:
            out = p @ dvc if out is None else out + p @ dvc
        if out is None:
            out = torch.zeros(*lead, p.shape[-2], v.shape[-1], dtype=ct, device=q.device)
        outs.append(out.expand(*lead, *out.shape[-2:]))
    return torch.cat(outs, dim=-2).to(q.dtype)


def attention_vjp_torch(q, k, v, g, scale: float | None = None, block_elems: int = _DEFAULT_BLOCK_ELEMS):
    """Cotangents (gq, gk, gv) of softmax attention for output cotangent g (..., M, Dv), query-blocked.

    Shapes follow q, k, v (leading dims of q/k/v must equal those of g; no broadcasting).
    """
    sc = _default_scale(q, scale)
    ct = _compute_dtype(q.dtype)
    kc, vc = k.to(ct), v.to(ct)
    bq = _query_block(g.shape, k.shape[-2], block_elems)
    gqs, gk, gv = [], None, None
    for i in range(0, q.shape[-2], bq):
        qb = q[..., i:i + bq, :].to(ct)
        gb = g[..., i:i + bq, :].to(ct)
        p = torch.softmax((qb @ kc.transpose(-1, -2)) * sc, dim=-1)
        dp = gb @ vc.transpose(-1, -2)
        ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True)) * sc
        gqs.append(ds @ kc)
        gk_b = ds.transpose(-1, -2) @ qb
        gv_b = p.transpose(-1, -2) @ gb
        gk = gk_b if gk is None else gk + gk_b
        gv = gv_b if gv is None else gv + gv_b
    return torch.cat(gqs, dim=-2).to(q.dtype), gk.to(k.dtype), gv.to(v.dtype)


def _triton_tangent():
    """The Triton tangent function, or None when Triton (or its driver) is unavailable."""
    try:
        from trajlab.kernels.flash_jvp import attention_tangent_triton
    except Exception:  # ImportError, or a Triton without a usable backend
        return None
    return attention_tangent_triton


def attention_tangent(q, k, v, dq=None, dk=None, dv=None, scale: float | None = None, impl: str = "auto"):
    """Dispatch the tangent dO (..., M, Dv): impl 'auto' (Triton for fp16/bf16 on CUDA when importable,
    else torch), 'torch' or 'triton'. Tangents are cast to q.dtype; None means zero."""
    dq, dk, dv = (None if t is None else t.to(q.dtype) for t in (dq, dk, dv))
    if impl == "auto":
        # fp32 on CUDA: cuBLAS fp32 (torch path) measured faster than Triton's ieee-fp32 dots (H200)
        use_triton = (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and max(q.shape[-1], v.shape[-1]) <= 256
                      and _triton_tangent() is not None)
        impl = "triton" if use_triton else "torch"
    if impl == "torch":
        return attention_tangent_torch(q, k, v, dq, dk, dv, scale=scale)
    if impl == "triton":
        fn = _triton_tangent()
        if fn is None:
            raise RuntimeError("impl='triton' requested but trajlab.kernels.flash_jvp could not be imported")
        return fn(q, k, v, dq, dk, dv, scale=_default_scale(q, scale))
    raise ValueError(f"unknown impl {impl!r}")


class _SDPATangent(torch.autograd.Function):
    """dO as an autograd.Function so that vmap folds its batch dim into the kernel's batch."""

    @staticmethod
    def forward(q, k, v, dq, dk, dv, scale, impl):
        return attention_tangent(q, k, v, dq, dk, dv, scale=scale, impl=impl)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            "reverse-mode through the attention tangent (reverse-over-forward) is not supported; "
            "use sdpa_kernel(SDPBackend.MATH) for that")

    @staticmethod
    def vmap(info, in_dims, q, k, v, dq, dk, dv, scale, impl):
        n = info.batch_size
        args = []
        for x, d in zip((q, k, v, dq, dk, dv), in_dims[:6]):
            if x is None:
                args.append(None)
            elif d is None:
                args.append(x.unsqueeze(0).expand(n, *x.shape))
            else:
                args.append(x.movedim(d, 0))
        return _SDPATangent.apply(*args, scale, impl), 0


class FusedSDPAWithJVP(torch.autograd.Function):
    """softmax attention: primal via fused F.scaled_dot_product_attention, custom jvp and backward.

    apply(q, k, v, scale: float|None, impl: str) -> (..., M, Dv). Works with torch.func.jvp,
    torch.autograd.forward_ad, vmap(jvp), torch.func.vjp and .backward() (backward recomputes P by
    query blocks in plain torch).
    """

    @staticmethod
    def forward(q, k, v, scale, impl):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, impl = inputs
        ctx.scale = scale
        ctx.impl = impl
        ctx.save_for_forward(q, k, v)
        ctx.save_for_backward(q, k, v)

    @staticmethod
    def jvp(ctx, dq, dk, dv, _dscale, _dimpl):
        q, k, v = ctx.saved_tensors
        if dq is None and dk is None and dv is None:
            return torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        return _SDPATangent.apply(q, k, v, dq, dk, dv, ctx.scale, ctx.impl)

    @staticmethod
    def backward(ctx, g):
        q, k, v = ctx.saved_tensors
        gq, gk, gv = attention_vjp_torch(q, k, v, g, scale=ctx.scale)
        return gq, gk, gv, None, None

    @staticmethod
    def vmap(info, in_dims, q, k, v, scale, impl):
        # fold the vmapped dim into the leading batch dims so the fused kernel sees one big batch
        n = info.batch_size
        xs = [x.unsqueeze(0).expand(n, *x.shape) if d is None else x.movedim(d, 0)
              for x, d in zip((q, k, v), in_dims[:3])]
        lead = xs[0].shape[:-2]
        if len(lead) > 2:
            xs = [x.reshape(-1, *x.shape[-3:]) for x in xs]
        out = FusedSDPAWithJVP.apply(*xs, scale, impl)
        return out.reshape(*lead, *out.shape[-2:]), 0


def sdpa_with_jvp(q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                  scale: float | None = None, impl: str = "auto"):
    """Drop-in F.scaled_dot_product_attention (B, H, M, D) -> (B, H, M, Dv) that supports forward AD.

    Without mask/dropout/causal: fused primal + custom JVP. Otherwise: the math backend (warns).
    """
    if attn_mask is None and dropout_p == 0.0 and not is_causal:
        return FusedSDPAWithJVP.apply(q, k, v, scale, impl)
    warnings.warn("sdpa_with_jvp: attention mask/dropout/causal given; falling back to the math "
                  "SDPA backend (slower, JVP-safe)", stacklevel=2)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale)


def fused_sdpa_supports_jvp(device, dtype, head_dim: int = 64, seq_len: int = 16) -> bool:
    """True when torch.func.jvp through the default F.scaled_dot_product_attention works for a tiny
    (1, 2, seq_len, head_dim) problem on device/dtype under the ambient sdpa_kernel settings."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, t = (torch.randn(1, 2, seq_len, head_dim, generator=g).to(device=device, dtype=dtype)
                  for _ in range(4))
    try:
        _, out_t = torch.func.jvp(lambda a: F.scaled_dot_product_attention(a, k, v), (q,), (t,))
        return bool(torch.isfinite(out_t).all())
    except (NotImplementedError, RuntimeError):
        return False


def _sdp_flags() -> tuple:
    """The ambient SDPA backend switches (what `sdpa_kernel` sets)."""
    b = torch.backends.cuda
    return tuple(bool(f()) for f in (b.flash_sdp_enabled, b.mem_efficient_sdp_enabled, b.math_sdp_enabled,
                                     getattr(b, "cudnn_sdp_enabled", lambda: False)))


def _default_kernel_supports_jvp(device: str, dtype: torch.dtype) -> bool:
    # keyed on the ambient backend switches: a probe made inside sdpa_kernel(MATH) must not decide
    # for later calls outside it (it did: the cached True then sent JVPs into the flash kernel)
    return _supports_jvp_cached(device, dtype, _sdp_flags())


@functools.lru_cache(maxsize=None)
def _supports_jvp_cached(device: str, dtype: torch.dtype, flags: tuple) -> bool:
    return fused_sdpa_supports_jvp(device, dtype)


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
    """Context manager for network calls of `model` under forward-mode AD (the one switch).

    nullcontext() outside forward-mode AD (`forward_mode_active`: plain calls and VJPs keep the
    fused kernels, whose backward exists), when the model has no attention module, or when a JVP
    through the default SDPA kernel works on the model's device/dtype (`fused_sdpa_supports_jvp`,
    cached).  Otherwise it warns (once per device/dtype) and returns `sdpa_kernel(SDPBackend.MATH)`
    (~4.5x a fused forward; docs/performance.md).
    """
    if not forward_mode_active():
        return contextlib.nullcontext()
    device, dtype = _model_device_dtype(model)
    if not _has_attention(model) or _default_kernel_supports_jvp(device, dtype):
        return contextlib.nullcontext()
    if (device, dtype) not in _WARNED_MATH:  # once per process and device/dtype, not once per group
        _WARNED_MATH.add((device, dtype))
        warnings.warn(
            f"forward-mode AD through fused SDPA fails on {device}/{dtype}: using the MATH attention backend "
            "for JVPs (~4.5x slower than the fused kernel; docs/performance.md)",
            RuntimeWarning,
            stacklevel=2,
        )
    return sdpa_kernel(SDPBackend.MATH)


_WARNED_MATH: set = set()
"""(device, dtype) pairs the math-backend fallback has been announced for."""


class _CastTangent(torch.autograd.Function):
    """Identity whose tangent (and gradient) is cast to the primal's dtype.

    On CUDA the forward-AD rule of layer_norm returns fp32 tangents for fp16 inputs (its saved
    mean/rstd are fp32), and the next fp16 linear then fails with "expected mat1 and mat2 to have
    the same dtype"."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()  # not a view: forward AD requires a view-returning forward to have a view jvp

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def jvp(ctx, t):
        return t.to(ctx.dtype)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype)


def _cast_tangent_hook(module, inputs, output):
    if isinstance(output, torch.Tensor) and output.dtype in (torch.float16, torch.bfloat16):
        return _CastTangent.apply(output)
    return output


@contextlib.contextmanager
def matched_tangent_dtypes(model, module_types=(torch.nn.LayerNorm, torch.nn.GroupNorm)):
    """Within the context, outputs of `module_types` modules in `model` carry tangents in their
    primal dtype (forward hooks, removed on exit). Needed for fp16/bf16 JVPs on CUDA."""
    handles = [m.register_forward_hook(_cast_tangent_hook) for m in model.modules()
               if isinstance(m, tuple(module_types))]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


class _Conv2dJVP(torch.autograd.Function):
    """F.conv2d (padding_mode 'zeros') whose JVP skips the zero weight/bias tangents.

    PyTorch's forward-AD rule materialises an undefined weight tangent as a zero tensor and runs a
    full extra convolution on it (3 convolutions per conv JVP instead of 2)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b, stride, padding, dilation, groups):
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, stride, padding, dilation, groups = inputs
        ctx.conf = (stride, padding, dilation, groups)
        ctx.has_bias = b is not None
        ctx.save_for_forward(x, w)
        ctx.save_for_backward(x, w)

    @staticmethod
    def jvp(ctx, dx, dw, db, *_):
        x, w = ctx.saved_tensors
        out = None
        if dx is not None:
            out = F.conv2d(dx, w, None, *ctx.conf)
        if dw is not None:
            t = F.conv2d(x, dw, None, *ctx.conf)
            out = t if out is None else out + t
        if db is not None:
            t = db.reshape(1, -1, 1, 1)
            out = t if out is None else out + t
        return out

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, w, [w.shape[0]] if ctx.has_bias else None, _pair(stride), _pair(padding), _pair(dilation),
            False, [0, 0], groups, mask)
        return gx, gw, gb, None, None, None, None


class _LinearJVP(torch.autograd.Function):
    """F.linear whose JVP skips the zero weight/bias tangents (see _Conv2dJVP)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b):
        return F.linear(x, w, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b = inputs
        ctx.has_bias = b is not None
        ctx.save_for_forward(x, w)
        ctx.save_for_backward(x, w)

    @staticmethod
    def jvp(ctx, dx, dw, db):
        x, w = ctx.saved_tensors
        out = None
        if dx is not None:
            out = F.linear(dx, w)
        if dw is not None:
            t = F.linear(x, dw)
            out = t if out is None else out + t
        if db is not None:
            out = db if out is None else out + db
        return out

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = g @ w
        gw = g.reshape(-1, g.shape[-1]).transpose(0, 1) @ x.reshape(-1, x.shape[-1])
        gb = g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias else None
        return gx, gw, gb


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _lean_conv_forward(self, x):
    return _Conv2dJVP.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _lean_linear_forward(self, x):
    return _LinearJVP.apply(x, self.weight, self.bias)


@contextlib.contextmanager
def lean_jvp_layers(model):
    """Within the context, plain nn.Conv2d (padding_mode 'zeros', string-free padding) and nn.Linear
    modules of `model` run autograd.Functions whose JVP skips zero weight/bias tangents: same primal
    (the same F.conv2d / F.linear call), one matmul/conv per tangent instead of two. Restored on exit."""
    import types

    patched = []
    try:
        for m in model.modules():
            if type(m) is torch.nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str):
                m.forward = types.MethodType(_lean_conv_forward, m)
                patched.append(m)
            elif type(m) is torch.nn.Linear:
                m.forward = types.MethodType(_lean_linear_forward, m)
                patched.append(m)
        yield model
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


class JVPAttnProcessor:
    """diffusers AttnProcessor2_0 with the SDPA call replaced by `sdpa_with_jvp` (same primal)."""

    def __init__(self, impl: str = "auto"):
        self.impl = impl

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = sdpa_with_jvp(query, key, value, attn_mask=attention_mask, impl=self.impl)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


@contextlib.contextmanager
def jvp_attention(model, impl: str = "auto", lean_layers: bool = False):
    """Within the context every diffusers `Attention` module of `model` using AttnProcessor2_0 /
    AttnProcessor runs `JVPAttnProcessor(impl)`; the original processors are restored on exit.
    Other processor types are left alone (with a warning). LayerNorm / GroupNorm outputs get their
    tangents cast to the primal dtype (`matched_tangent_dtypes`) so fp16 JVPs can work; with
    lean_layers, Conv2d / Linear skip the zero weight-tangent work (`lean_jvp_layers`; opt-in: it
    adds a Python autograd.Function per layer, a net loss on CPU for small models, GPU gain
    unmeasured). Yields the model."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    proc = JVPAttnProcessor(impl)
    saved = []
    try:
        for m in model.modules():
            if isinstance(m, Attention):
                saved.append((m, m.processor))
                if isinstance(m.processor, (AttnProcessor2_0, AttnProcessor, JVPAttnProcessor)):
                    m.set_processor(proc)
                else:
                    warnings.warn(f"jvp_attention: leaving {type(m.processor).__name__} unchanged", stacklevel=3)
        with matched_tangent_dtypes(model), (lean_jvp_layers(model) if lean_layers else contextlib.nullcontext()):
            yield model
    finally:
        for m, p in saved:
            m.set_processor(p)
