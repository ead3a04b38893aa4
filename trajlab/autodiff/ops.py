"""Op rules of the stacked primal/tangent forward (`trajlab.autodiff.fast_jvp`).

Layout: one tensor ``Z`` of batch ``(1 + m) B``, rows ``[:B]`` the primal, rows ``[B:]`` m tangents
(`Stack` holds B and m).  Linear ops (`conv`, `linear`) run once over the whole stack, the bias added
to the primal rows only; nonlinear ops split the stack and apply their exact JVP rule (`activation`
and `gelu_pair` for SiLU / GELU, `group_norm`, `layer_norm`, and softmax `attention` of a diffusers
Attention module, math or, on CUDA, the fused SDPA primal with `attention_tangent`).  The diffusers
blocks, the support check and the entry points that compose these rules are in fast_jvp.py.

Unsupported configurations raise `FastJVPUnsupported` (a `NotImplementedError`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "FastJVPUnsupported",
    "Stack",
    "conv",
    "linear",
    "tangent_view",
    "gelu_pair",
    "activation",
    "group_norm",
    "layer_norm",
    "attention",
]

_SCORE_BLOCK = 1 << 24  # score elements per query block on the math path (64 MiB fp32)


class FastJVPUnsupported(NotImplementedError):
    """The fast (stacked) JVP does not handle this model / scheduler; use torch.func.jvp."""


class Stack:
    """Stack geometry: B primal rows, m tangents."""

    __slots__ = ("B", "m")

    def __init__(self, B: int, m: int):
        self.B, self.m = B, m


def conv(mod, z, s: Stack):
    if mod.padding_mode != "zeros":
        raise FastJVPUnsupported(f"Conv2d padding_mode {mod.padding_mode!r}")
    out = F.conv2d(z, mod.weight, None, mod.stride, mod.padding, mod.dilation, mod.groups)
    if mod.bias is not None:
        out[: s.B] += mod.bias.view(1, -1, 1, 1)
    return out


def linear(mod, z, s: Stack):
    out = F.linear(z, mod.weight)
    if mod.bias is not None:
        out[: s.B] += mod.bias
    return out


def tangent_view(t, s: Stack, like):
    """(m B, ...) -> (m, B, ...)."""
    return t.view(s.m, s.B, *like.shape[1:])


def _silu(z, s: Stack):
    x, t = z[: s.B], z[s.B:]
    out = torch.empty_like(z)
    torch.ops.aten.silu.out(x, out=out[: s.B])
    if s.m == 1:
        torch.ops.aten.silu_backward.grad_input(t, x, grad_input=out[s.B:])
    else:
        torch.ops.aten.silu_backward.grad_input(tangent_view(t, s, x), x, grad_input=tangent_view(out[s.B:], s, x))
    return out


def gelu_pair(x, t, approximate: str, s: Stack):
    """(gelu(x), gelu'(x) t) with x (B, ...), t (m B, ...)."""
    y = F.gelu(x, approximate=approximate)
    if s.m == 1:
        dt = torch.ops.aten.gelu_backward(t, x, approximate=approximate)
    else:
        d = torch.ops.aten.gelu_backward(torch.ones_like(x), x, approximate=approximate)
        dt = (tangent_view(t, s, x) * d).view_as(t)
    return y, dt


def activation(mod, z, s: Stack):
    if type(mod) is torch.nn.SiLU:
        return _silu(z, s)
    if type(mod) is torch.nn.GELU:
        y, dt = gelu_pair(z[: s.B], z[s.B:], mod.approximate, s)
        return torch.cat([y, dt])
    raise FastJVPUnsupported(f"activation {type(mod).__name__}")


def _rep(a, m):
    return a if m == 1 else a.repeat(m, *([1] * (a.ndim - 1)))


def group_norm(mod, z, s: Stack):
    x, t = z[: s.B], z[s.B:]
    B, C = x.shape[:2]
    HxW = x[0, 0].numel()
    G = mod.num_groups
    y, mean, rstd = torch.native_group_norm(x, mod.weight, mod.bias, B, C, HxW, G, mod.eps)
    dt = torch.ops.aten.native_group_norm_backward(t, _rep(x, s.m), _rep(mean, s.m), _rep(rstd, s.m), None,
                                                   s.m * B, C, HxW, G, [True, False, False])[0]
    out = torch.empty_like(z)
    out[: s.B] = y
    if mod.weight is not None:
        torch.mul(dt, mod.weight.view(1, -1, *([1] * (x.ndim - 2))), out=out[s.B:])
    else:
        out[s.B:] = dt
    return out


def layer_norm(mod, z, s: Stack):
    x, t = z[: s.B], z[s.B:]
    shape = list(mod.normalized_shape)
    y, mean, rstd = torch.native_layer_norm(x, shape, mod.weight, mod.bias, mod.eps)
    dt = torch.ops.aten.native_layer_norm_backward(t, _rep(x, s.m), shape, _rep(mean, s.m), _rep(rstd, s.m),
                                                   None, None, [True, False, False])[0]
    out = torch.empty_like(z)
    out[: s.B] = y
    if mod.weight is not None:
        torch.mul(dt, mod.weight, out=out[s.B:])
    else:
        out[s.B:] = dt
    return out


def _softmax_tangent(dS, P, m):
    """dP = P (dS - sum(P dS)) for dS (m, ...) and P (...)."""
    if P.dtype in (torch.float16, torch.bfloat16):  # keep the reduction in fp32
        Pf = P.float()
        Pd = Pf * dS.float()
        return (Pd - Pf * Pd.sum(-1, keepdim=True)).to(P.dtype)
    # one fused kernel per probe: the broadcast (expanded) form is ~3x slower on the CPU
    return torch.stack([torch._softmax_backward_data(d, P, -1, P.dtype) for d in dS.unbind(0)])


def _attention_core(qz, k, v, dk, dv, scale, m):
    """Primal O (b, h, M, Dv) and tangents dO (m, b, h, M, Dv) by math attention from the stacked
    queries qz (1+m, b, h, M, D) (dk, dv (m, b, h, N, D) or None for cross-attention).  S and the
    tangent scores come from one matmul for cross-attention; for self-attention
    dS = [dq, q] @ [k, dk]^T (features concatenated, no score-sized add).  Query-blocked when the
    scores get large."""
    M, N = qz.shape[-2], k.shape[-2]
    bq = max(1, min(M, _SCORE_BLOCK // max(1, qz.shape[1] * qz.shape[2] * (1 + m) * N)))
    kt = k.transpose(-1, -2)
    if dk is not None:
        kk = torch.cat([kt.expand(m, *kt.shape), dk.transpose(-1, -2)], -2)  # (m, b, h, 2D, N)
        vv = torch.cat([v, dv.movedim(0, -2).reshape(*v.shape[:-1], m * v.shape[-1])], -1)  # (b, h, N, (1+m)Dv)
    Os, dOs = [], []
    for i in range(0, M, bq):
        qs = qz[..., i:i + bq, :] * scale
        if dk is None:
            SS = qs @ kt
            S, dS = SS[0], SS[1:]
        else:
            S = qs[0] @ kt
            dS = torch.cat([qs[1:], qs[:1].expand(m, *qs.shape[1:])], -1) @ kk
        P = torch.softmax(S, dim=-1)
        dP = _softmax_tangent(dS, P, m)
        if dv is not None:  # P @ [v, dv_1..m] in one matmul
            Pv = P @ vv
            O = Pv[..., : v.shape[-1]]
            dO = dP @ v + Pv[..., v.shape[-1]:].unflatten(-1, (m, v.shape[-1])).movedim(-2, 0)
        else:
            O = P @ v
            dO = dP @ v
        Os.append(O)
        dOs.append(dO)
    if len(Os) == 1:
        return Os[0], dOs[0]
    return torch.cat(Os, -2), torch.cat(dOs, -2)


def _attention_core_fused(qz, k, v, dk, dv, scale, m):
    """CUDA: fused SDPA primal, `attention_tangent` (Triton for fp16/bf16) for the tangents."""
    from trajlab.autodiff.attention import attention_tangent

    q, dq = qz[0], qz[1:]
    O = F.scaled_dot_product_attention(q, k, v, scale=scale)
    ex = lambda a: None if a is None else a.reshape(-1, *a.shape[2:])  # noqa: E731
    rep = lambda a: a.unsqueeze(0).expand(m, *a.shape).reshape(-1, *a.shape[1:])  # noqa: E731
    dO = attention_tangent(rep(q), rep(k), rep(v), ex(dq), ex(dk), ex(dv), scale=scale)
    return O, dO.view(m, *O.shape)


def attention(attn, z, eh, s: Stack):
    """diffusers Attention (AttnProcessor2_0 semantics) on stacked hidden states z ((1+m)B, L, C);
    eh: encoder hidden states (B, Lk, Ck), primal only, or None (self-attention)."""
    if z.ndim != 3:
        raise FastJVPUnsupported("4-D attention input")
    B, m = s.B, s.m
    q = linear(attn.to_q, z, s)
    if eh is None:
        k, v = linear(attn.to_k, z, s), linear(attn.to_v, z, s)
    else:
        k, v = F.linear(eh, attn.to_k.weight, attn.to_k.bias), F.linear(eh, attn.to_v.weight, attn.to_v.bias)
    H = attn.heads
    hd = k.shape[-1] // H
    heads = lambda a: a.view(a.shape[0], a.shape[1], H, hd).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    scale = attn.scale
    qz = q.view(1 + m, B, *q.shape[1:])
    if eh is None:
        kp, dk = k[:B], k[B:].view(m, B, *k.shape[1:])
        vp, dv = v[:B], v[B:].view(m, B, *v.shape[1:])
    else:
        kp, vp, dk, dv = k, v, None, None
    core = _attention_core_fused if q.is_cuda else _attention_core
    O, dO = core(qz, kp, vp, dk, dv, scale, m)
    o = torch.cat([O, dO.reshape(m * B, *O.shape[1:])]).transpose(1, 2).reshape(z.shape[0], -1, H * hd)
    o = linear(attn.to_out[0], o, s)
    if attn.residual_connection:
        o = o + z
    if attn.rescale_output_factor != 1:
        o = o / attn.rescale_output_factor
    return o
