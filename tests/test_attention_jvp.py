"""Attention JVP with the fused SDPA primal: custom rule vs fp64 references, Triton kernel in
interpret mode, tiny diffusers UNet under `jvp_attention`."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from trajlab.autodiff.attention import (
    FusedSDPAWithJVP,
    JVPAttnProcessor,
    attention_tangent_torch,
    fused_sdpa_supports_jvp,
    jvp_attention,
    naive_attention,
    sdpa_with_jvp,
)

REPO = Path(__file__).resolve().parents[1]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _problem(b, h, m, n, d, dv, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return (mk(b, h, m, d), mk(b, h, n, d), mk(b, h, n, dv),
            mk(b, h, m, d), mk(b, h, n, d), mk(b, h, n, dv))


def _ref_jvp(q, k, v, dq, dk, dv):
    """fp64 reference: torch.func.jvp of naive softmax attention; None tangent = zero."""
    z = lambda t, x: torch.zeros_like(x, dtype=torch.float64) if t is None else t.double()  # noqa: E731
    return torch.func.jvp(naive_attention, (q.double(), k.double(), v.double()),
                          (z(dq, q), z(dk, k), z(dv, v)))


SHAPES = [  # (B, H, M, N, D, Dv)
    (1, 2, 37, 37, 8, 8),     # self-attention, M not a multiple of the block
    (2, 3, 21, 77, 16, 16),   # cross-attention, longer key sequence
    (1, 1, 64, 5, 8, 12),     # short keys, Dv != D
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("which", ["qkv", "q", "kv"])
def test_torch_tangent_matches_fp64(shape, which):
    q, k, v, dq, dk, dv = _problem(*shape)
    dq, dk, dv = (dq if "q" in which else None, dk if "k" in which else None, dv if "v" in which else None)
    _, ref = _ref_jvp(q, k, v, dq, dk, dv)
    b, h, m, n = shape[:4]
    # block_elems forces several (ragged) query blocks: block = 5 rows
    out = attention_tangent_torch(q, k, v, dq, dk, dv, block_elems=b * h * n * 5)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel(out, ref) < 2e-6
    out64 = attention_tangent_torch(q.double(), k.double(), v.double(),
                                    *(None if t is None else t.double() for t in (dq, dk, dv)))
    assert _rel(out64, ref) < 1e-12


def test_function_jvp_forward_ad_and_primal():
    q, k, v, dq, dk, dv = _problem(2, 2, 19, 11, 8, 8, seed=1)
    ref_o, ref_t = _ref_jvp(q, k, v, dq, dk, dv)
    f = lambda a, b, c: FusedSDPAWithJVP.apply(a, b, c, None, "torch")  # noqa: E731
    o, t = torch.func.jvp(f, (q, k, v), (dq, dk, dv))
    assert torch.equal(o, F.scaled_dot_product_attention(q, k, v))  # primal is the fused call itself
    assert _rel(t, ref_t) < 2e-6 and _rel(o, ref_o) < 2e-6
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        out = f(fwAD.make_dual(q, dq), fwAD.make_dual(k, dk), fwAD.make_dual(v, dv))
        assert _rel(fwAD.unpack_dual(out).tangent, ref_t) < 2e-6


def test_function_vmap_jvp_both_orders_and_vjp():
    q, k, v, _, _, _ = _problem(1, 2, 13, 9, 8, 8, seed=2)
    probes = torch.randn(3, *q.shape, generator=torch.Generator().manual_seed(3))
    f = lambda a: FusedSDPAWithJVP.apply(a, k, v, None, "torch")  # noqa: E731
    batched = torch.func.vmap(lambda t: torch.func.jvp(f, (q,), (t,))[1])(probes)
    for i in range(3):
        assert _rel(batched[i], _ref_jvp(q, k, v, probes[i], None, None)[1]) < 2e-6
    # jvp of a vmapped function (batched primals go through the custom vmap rule)
    qs = torch.randn(3, *q.shape, generator=torch.Generator().manual_seed(4))
    o, t = torch.func.jvp(torch.func.vmap(f), (qs,), (probes,))
    for i in range(3):
        assert _rel(t[i], _ref_jvp(qs[i], k, v, probes[i], None, None)[1]) < 2e-6
        assert torch.equal(o[i], F.scaled_dot_product_attention(qs[i], k, v))
    # reverse mode (backward recomputes P by query blocks)
    g = torch.randn(*q.shape[:-1], v.shape[-1], generator=torch.Generator().manual_seed(5))
    _, vjp_c = torch.func.vjp(lambda a, b, c: FusedSDPAWithJVP.apply(a, b, c, None, "torch"), q, k, v)
    _, vjp_r = torch.func.vjp(naive_attention, q.double(), k.double(), v.double())
    for a, b in zip(vjp_c(g), vjp_r(g.double())):
        assert _rel(a, b) < 2e-6
    gs = torch.randn(3, *g.shape, generator=torch.Generator().manual_seed(6))
    batched_vjp = torch.func.vmap(lambda c: vjp_c(c)[0])(gs)
    for i in range(3):
        assert _rel(batched_vjp[i], vjp_r(gs[i].double())[0]) < 2e-6
    qq = q.clone().requires_grad_()
    FusedSDPAWithJVP.apply(qq, k, v, None, "torch").backward(g)
    assert _rel(qq.grad, vjp_r(g.double())[0]) < 2e-6


def test_mask_falls_back_to_math_with_warning():
    q, k, v, dq, _, _ = _problem(1, 2, 6, 6, 8, 8, seed=6)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., -2:] = float("-inf")
    with pytest.warns(UserWarning, match="math"):
        o, t = torch.func.jvp(lambda a: sdpa_with_jvp(a, k, v, attn_mask=mask), (q,), (dq,))
    o_ref, t_ref = torch.func.jvp(
        lambda a: torch.softmax(a @ k.double().transpose(-1, -2) / 8 ** 0.5 + mask.double(), -1) @ v.double(),
        (q.double(),), (dq.double(),))
    assert _rel(t, t_ref) < 2e-6 and _rel(o, o_ref) < 2e-6


def test_fused_support_detection_does_not_crash():
    # observed on CPU (torch 2.14): the default (flash) kernel has no forward-AD formula
    assert fused_sdpa_supports_jvp("cpu", torch.float32) is False
    with sdpa_kernel(SDPBackend.MATH):
        assert fused_sdpa_supports_jvp("cpu", torch.float32) is True
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(NotImplementedError):  # the failure the detection guards against
        torch.func.jvp(lambda a: F.scaled_dot_product_attention(a, q, q), (q,), (q,))


# ---------------------------------------------------------------- Triton kernel, interpret mode

_TRITON_SCRIPT = textwrap.dedent("""
    import json, torch
    from trajlab.autodiff.attention import naive_attention, FusedSDPAWithJVP
    from trajlab.kernels.flash_jvp import attention_tangent_triton
    def ref(q, k, v, dq, dk, dv):
        z = lambda t, x: torch.zeros_like(x, dtype=torch.float64) if t is None else t.double()
        return torch.func.jvp(naive_attention, (q.double(), k.double(), v.double()),
                              (z(dq, q), z(dk, k), z(dv, v)))[1]
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()
    res = {}
    g = torch.Generator().manual_seed(0)
    cases = [  # name, (B, H, M, N, D, Dv), dtype, tangents
        ("self_ragged_fp32", (1, 2, 37, 37, 8, 8), torch.float32, "qkv"),
        ("cross_fp32", (2, 1, 21, 77, 40, 40), torch.float32, "qkv"),
        ("cross_q_only_fp32", (1, 2, 33, 19, 16, 24), torch.float32, "q"),
        ("kv_only_fp32", (1, 1, 20, 70, 8, 8), torch.float32, "kv"),
        ("self_fp16", (1, 2, 50, 50, 40, 40), torch.float16, "qkv"),
        ("cross_fp16", (1, 2, 24, 77, 16, 16), torch.float16, "q"),
    ]
    for name, (b, h, m, n, d, dv_), dt, which in cases:
        mk = lambda *s: torch.randn(*s, generator=g).to(dt)
        q, k, v = mk(b, h, m, d), mk(b, h, n, d), mk(b, h, n, dv_)
        dq = mk(b, h, m, d) if "q" in which else None
        dk = mk(b, h, n, d) if "k" in which else None
        dv = mk(b, h, n, dv_) if "v" in which else None
        out = attention_tangent_triton(q, k, v, dq, dk, dv)
        res[name] = [rel(out, ref(q, k, v, dq, dk, dv)), str(out.dtype), list(out.shape)]
    # explicit small blocks: several query and key blocks in fp16, ragged edges
    mk = lambda *s: torch.randn(*s, generator=g).to(torch.float16)
    q, k, v, dq, dk, dv = mk(1, 2, 45, 16), mk(1, 2, 39, 16), mk(1, 2, 39, 16), mk(1, 2, 45, 16), mk(1, 2, 39, 16), mk(1, 2, 39, 16)
    small = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    res["small_blocks_fp16"] = [rel(attention_tangent_triton(q, k, v, dq, dk, dv, config=small),
                                    ref(q, k, v, dq, dk, dv)), "", []]
    # non-contiguous (B, L, H, D).transpose(1, 2) views, as diffusers passes them
    q = torch.randn(2, 30, 2, 16, generator=g).transpose(1, 2)
    k, v, dq, dk, dv = (torch.randn(2, 17, 2, 16, generator=g).transpose(1, 2) for _ in range(5))
    dq = torch.randn(2, 30, 2, 16, generator=g).transpose(1, 2)
    res["strided_fp32"] = [rel(attention_tangent_triton(q, k, v, dq, dk, dv), ref(q, k, v, dq, dk, dv)), "", []]
    # through the autograd.Function with impl='triton', plain and vmap(jvp)
    f = lambda a: FusedSDPAWithJVP.apply(a, k, v, None, "triton")
    _, t = torch.func.jvp(f, (q,), (dq,))
    res["function_jvp"] = [rel(t, ref(q, k, v, dq, None, None)), "", []]
    probes = torch.randn(3, *q.shape, generator=g)
    tb = torch.func.vmap(lambda p: torch.func.jvp(f, (q,), (p,))[1])(probes)
    res["function_vmap_jvp"] = [max(rel(tb[i], ref(q, k, v, probes[i], None, None)) for i in range(3)), "", []]
    print("RESULT" + json.dumps(res))
""")


def test_triton_kernel_interpret_mode_matches_fp64():
    pytest.importorskip("triton")  # the torch wheel ships Triton; absent only on exotic installs
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    res = json.loads(line[len("RESULT"):])
    assert len(res) == 10
    for name, (err, dtype, shape) in res.items():
        tol = 3e-3 if "fp16" in name else 2e-6  # fp16 inputs: fp32 accumulation, fp16 P*dS and output
        assert err < tol, (name, err)
    assert res["self_fp16"][1] == "torch.float16" and res["self_ragged_fp32"][2] == [1, 2, 37, 8]
    assert res["cross_q_only_fp32"][2] == [1, 2, 33, 24]


# ---------------------------------------------------------------- tiny diffusers UNet


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2, attention_head_dim=4).eval()
    g = torch.Generator().manual_seed(1)
    x, emb = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    vx, vemb = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    return unet, (x, emb, vx, vemb)


def test_unet_jvp_matches_math_backend_and_keeps_primal(tiny_unet):
    unet, (x, emb, vx, vemb) = tiny_unet
    f = lambda a, e: unet(a, 500, e).sample  # noqa: E731
    with torch.no_grad():
        plain = f(x, emb)
    before = dict(unet.attn_processors)
    with jvp_attention(unet):
        assert all(isinstance(p, JVPAttnProcessor) for p in unet.attn_processors.values())
        with torch.no_grad():
            assert torch.equal(f(x, emb), plain)
        out, tan = torch.func.jvp(f, (x, emb), (vx, vemb))
        _, tan_x = torch.func.jvp(lambda a: f(a, emb), (x,), (vx,))  # cross-attn K/V without tangent
    assert all(unet.attn_processors[n] is p for n, p in before.items())  # restored
    assert torch.equal(out, plain)  # jvp primal bitwise equal to the plain fused forward
    with sdpa_kernel(SDPBackend.MATH):
        _, tan_m = torch.func.jvp(f, (x, emb), (vx, vemb))
        _, tan_xm = torch.func.jvp(lambda a: f(a, emb), (x,), (vx,))
    assert tan.norm() > 0 and (tan - tan_m).norm() / tan_m.norm() < 1e-4
    assert (tan_x - tan_xm).norm() / tan_xm.norm() < 1e-4


def test_lean_layers_same_primal_jvp_and_vjp(tiny_unet):
    unet, (x, emb, vx, vemb) = tiny_unet
    f = lambda a, e: unet(a, 500, e).sample  # noqa: E731
    with torch.no_grad():
        plain = f(x, emb)
    with sdpa_kernel(SDPBackend.MATH):
        _, tan_m = torch.func.jvp(f, (x, emb), (vx, vemb))
    xx = x.clone().requires_grad_(True)
    g_plain = torch.autograd.grad(f(xx, emb), xx, vx)[0]
    with jvp_attention(unet, lean_layers=True):
        assert sum("forward" in m.__dict__ for m in unet.modules()) > 10  # convs and linears patched
        out, tan = torch.func.jvp(f, (x, emb), (vx, vemb))
        xx = x.clone().requires_grad_(True)
        g_lean = torch.autograd.grad(f(xx, emb), xx, vx)[0]
    assert not any("forward" in m.__dict__ for m in unet.modules())  # restored
    assert torch.equal(out, plain)
    assert (tan - tan_m).norm() / tan_m.norm() < 1e-4
    assert (g_lean - g_plain).norm() / g_plain.norm() < 1e-4


def test_unet_jvp_matches_finite_differences_fp64(tiny_unet):
    unet, (x, emb, vx, vemb) = tiny_unet
    import copy
    ud = copy.deepcopy(unet).double()
    xd, ed, vxd, ved = (t.double() for t in (x, emb, vx, vemb))
    f = lambda a, e: ud(a, 500, e).sample  # noqa: E731
    h = 1e-5
    with jvp_attention(ud):
        _, tan = torch.func.jvp(f, (xd, ed), (vxd, ved))
        with torch.no_grad():
            fd = (f(xd + h * vxd, ed + h * ved) - f(xd - h * vxd, ed - h * ved)) / (2 * h)
    assert (tan - fd).norm() / fd.norm() < 1e-7


def test_unet_vmap_jvp_batched_probes(tiny_unet):
    unet, (x, emb, vx, _) = tiny_unet
    probes = torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(2))
    f = lambda a: unet(a, 500, emb).sample  # noqa: E731
    with jvp_attention(unet):
        batched = torch.func.vmap(lambda p: torch.func.jvp(f, (x,), (p,))[1])(probes)
        single = [torch.func.jvp(f, (x,), (probes[i],))[1] for i in range(3)]
    for i in range(3):
        assert (batched[i] - single[i]).norm() / single[i].norm() < 1e-5


def test_matched_tangent_dtypes_fixes_fp32_tangents_from_a_norm():
    """Emulates the CUDA layer_norm forward-AD rule (fp32 tangent for a half primal)."""
    from trajlab.autodiff.attention import matched_tangent_dtypes

    class Fp32Tangent(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 1

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def jvp(ctx, t):
            return t.float()

    class Norm(torch.nn.Module):
        def forward(self, x):
            return Fp32Tangent.apply(x)

    net = torch.nn.Sequential(Norm(), torch.nn.Linear(8, 8)).to(torch.bfloat16)
    x, t = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(3, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.func.jvp(net, (x,), (t,))
    with matched_tangent_dtypes(net, (Norm,)):
        _, tan = torch.func.jvp(net, (x,), (t,))
    assert tan.dtype == torch.bfloat16
    assert _rel(tan, t.double() @ net[1].weight.double().T) < 1e-2  # bf16 rounding
    assert len(net[0]._forward_hooks) == 0  # hooks removed


def test_unet_bf16_jvp_under_jvp_attention(tiny_unet):
    unet, (x, emb, vx, _) = tiny_unet
    import copy
    ub = copy.deepcopy(unet).to(torch.bfloat16)
    with jvp_attention(unet):
        _, ref = torch.func.jvp(lambda a: unet(a, 500, emb).sample, (x,), (vx,))
    with jvp_attention(ub):
        _, tan = torch.func.jvp(lambda a: ub(a, 500, emb.bfloat16()).sample, (x.bfloat16(),), (vx.bfloat16(),))
    assert tan.dtype == torch.bfloat16
    assert (tan.float() - ref).norm() / ref.norm() < 5e-2  # bf16 has 8 mantissa bits


def test_processors_restored_after_exception(tiny_unet):
    unet, _ = tiny_unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with jvp_attention(unet):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[n] is p for n, p in before.items())
    # and the plain model still fails under jvp outside the context (fused CPU kernel), not silently
    x = torch.randn(1, 4, 16, 16)
    with pytest.raises(NotImplementedError):
        torch.func.jvp(lambda a: unet(a, 500, torch.zeros(1, 7, 32)).sample, (x,), (x,))


def test_attention_context_is_the_one_switch(tiny_unet):
    """Outside forward mode: no-op.  Under jvp on CPU (no fused forward-AD rule): warns once and uses the
    math backend, whose JVP matches the custom-tangent processors of `jvp_attention`."""
    import contextlib
    import warnings

    from trajlab.autodiff.attention import attention_context, forward_mode_active

    unet, (x, emb, vx, _) = tiny_unet
    assert isinstance(attention_context(unet), contextlib.nullcontext) and not forward_mode_active()

    def g(a):
        with attention_context(unet):
            return unet(a, 500, emb).sample

    import trajlab.autodiff.attention as A

    A._WARNED_MATH.clear()  # earlier tests in this process may have announced the fallback already
    with pytest.warns(RuntimeWarning, match="MATH") as record:
        _, t_math = torch.func.jvp(g, (x,), (vx,))
    assert "FACTS" + ".md" not in str(record[0].message)  # points at nothing a user lacks
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # announced once per process, not once per call
        _, t_math2 = torch.func.jvp(g, (x,), (vx,))
    assert torch.equal(t_math, t_math2)
    with jvp_attention(unet):
        _, t_fused = torch.func.jvp(lambda a: unet(a, 500, emb).sample, (x,), (vx,))
    assert _rel(t_fused, t_math) < 1e-4


def test_attention_context_probe_not_poisoned_by_an_ambient_math_backend(tiny_unet):
    """The 'does the default kernel support forward AD' probe is cached per ambient SDPA switches: a
    first call made inside sdpa_kernel(MATH) (where it does) must not make later calls outside it
    skip the fallback (they then hit the flash kernel's missing forward-AD rule)."""
    import warnings

    from trajlab.autodiff.attention import _supports_jvp_cached, attention_context

    unet, (x, emb, vx, _) = tiny_unet
    _supports_jvp_cached.cache_clear()

    def g(a):
        with attention_context(unet):
            return unet(a, 500, emb).sample

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with sdpa_kernel(SDPBackend.MATH):
            _, t_in = torch.func.jvp(g, (x,), (vx,))
        _, t_out = torch.func.jvp(g, (x,), (vx,))  # raised NotImplementedError before the fix
    assert _rel(t_out, t_in) < 1e-5
