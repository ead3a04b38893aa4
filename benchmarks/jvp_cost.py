"""JVP cost relative to a forward: the stacked primal/tangent path (trajlab.autodiff.fast_jvp) vs the
previous torch.func path, for one guided UNet call and whole DDIM samplers, plus the GPU checks.

CPU part (always; tiny-sd and micro-sd pipelines, batch 2, CFG 7.5 -> UNet batch 4; exact:gauss-8d):
  fwd        the plain call / sampler run (default fused SDPA, no_grad)
  prev       what the analyses ran before: torch.func.jvp with the model under attention_context
             (math SDPA backend), as estimators.jvp(method="func")
  fast       trajlab.autodiff.fast_jvp: primal and tangent stacked along the batch (one conv /
             matmul over the pair, exact rules for SiLU / GELU / norms / softmax attention), the
             sampler replayed once on the stacked latent (what estimators.jvp(method="auto") now picks)
  fast_m4    the same with 4 probes folded into one call, time per probe
Times are medians over interleaved repetitions (warmup excluded); ratios are to fwd of the same
workload, measured in the same rounds.

GPU part (CUDA only, else printed as skipped): SD1.5-architecture UNet (random weights, 512 px =
64x64 latents) fp32/fp16: forward, fused-SDPA + custom attention JVP (Triton kernel for fp16/bf16),
lean layers, math-backend JVP, VJP; and the Triton tangent kernel vs the PyPI package
`jvp-flash-attention` when that is installed.

Examples:
  OMP_NUM_THREADS=1 python benchmarks/jvp_cost.py                # CPU table (+ GPU if present)
  python benchmarks/jvp_cost.py --gpu-only --dtype fp16           # GPU part only
The last line is the headline ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from trajlab.autodiff.attention import (  # noqa: E402
    fused_sdpa_supports_jvp, jvp_attention, matched_tangent_dtypes)

# Published SD1.5 UNet config (stable-diffusion-v1-5 unet/config.json), random weights, no download.
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False,
)
TINY_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, norm_num_groups=2, attention_head_dim=4,
)


def log(*a):
    print(*a, flush=True)


def build_unet(arch: str, device: str, dtype: torch.dtype):
    """Random-weight UNet2DConditionModel (eval, no parameter grads) on device/dtype."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    cfg = SD15_UNET_CONFIG if arch == "sd15" else TINY_UNET_CONFIG
    unet = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
    return unet.to(device=device, dtype=dtype), cfg


def make_scheduler(steps: int):
    from diffusers import DDIMScheduler
    s = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    s.set_timesteps(steps)
    return s


def sampler_fn(unet, emb, sched, checkpointed: bool = False):
    """x_T (B, 4, h, w) -> x_0 after len(sched.timesteps) deterministic DDIM steps."""
    timesteps = [int(t) for t in sched.timesteps]

    def one(x, t):
        eps = unet(x, t, emb).sample
        return sched.step(eps, t, x, eta=0.0, return_dict=False)[0]

    def run(x):
        for t in timesteps:
            x = checkpoint(one, x, t, use_reentrant=False) if checkpointed else one(x, t)
        return x
    return run


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_methods(unet, emb, x, v, fn, device, alt_impl: str | None, single: bool):
    """name -> zero-arg callable; fn maps x -> output (the UNet call or a whole sampler).
    alt_impl: also time the jvp with this tangent impl ('torch' / 'triton'); single: add the
    fwd_math and forward_ad variants (single UNet call only)."""
    def fwd():
        with torch.no_grad():
            return fn(x)

    def fwd_math():
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            return fn(x)

    def jvp(impl="auto", lean=False):
        def go():
            with jvp_attention(unet, impl=impl, lean_layers=lean):
                return torch.func.jvp(fn, (x,), (v,))[1]
        return go

    def jvp_math():
        with sdpa_kernel(SDPBackend.MATH), matched_tangent_dtypes(unet):
            return torch.func.jvp(fn, (x,), (v,))[1]

    def vjp():
        xx = x.detach().requires_grad_(True)
        out = fn.checkpointed(xx) if hasattr(fn, "checkpointed") else fn(xx)
        return torch.autograd.grad(out, xx, v)[0]

    def jvp_fwad():
        import torch.autograd.forward_ad as fwAD
        with jvp_attention(unet), fwAD.dual_level():
            return fwAD.unpack_dual(fn(fwAD.make_dual(x, v))).tangent

    m = {"fwd": fwd}
    if single:
        m["fwd_math"] = fwd_math
    m["jvp"] = jvp()
    m["jvp_lean"] = jvp(lean=True)
    if alt_impl:
        m[f"jvp_{alt_impl}"] = jvp(alt_impl)
    if single:
        m["jvp_fwad"] = jvp_fwad
    m["jvp_math"] = jvp_math
    m["vjp"] = vjp
    return m


def time_methods(methods: dict, reps: int, device: str, label: str, state: dict) -> dict:
    """Warm each method once unless already warmed on an earlier (shorter) workload (failures are
    reported, dropped and remembered in state), then `reps` interleaved rounds.
    Returns name -> median seconds."""
    ok = {}
    for name, f in methods.items():
        if name in state["failed"]:
            log(f"  [{label}] skip {name} (failed earlier)")
            continue
        if name in state["warm"]:
            ok[name] = f
            continue
        try:
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            log(f"  [{label}] warmup {name}: {time.perf_counter() - t0:.3f}s")
            ok[name] = f
            state["warm"].add(name)
        except Exception as e:  # noqa: BLE001 - report and continue with the rest
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            log(f"  [{label}] FAILED {name}: {type(e).__name__}: {msg}")
            state["failed"].add(name)
            if device == "cuda":
                torch.cuda.empty_cache()
    times = {n: [] for n in ok}
    for r in range(reps):
        for name, f in ok.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        log(f"  [{label}] round {r + 1}/{reps} done")
    return {n: statistics.median(ts) for n, ts in times.items()}


def report(label: str, med: dict) -> dict:
    base = med.get("fwd")
    parts = [f"{n}={t * 1e3:.1f}ms" for n, t in med.items()]
    log(f"  [{label}] " + " ".join(parts))
    ratios = {n: t / base for n, t in med.items() if base and n != "fwd"}
    log(f"  [{label}] ratios to fwd: " + " ".join(f"{n}/fwd={r:.2f}" for n, r in ratios.items()))
    return ratios


def run_all(args, dtype: torch.dtype) -> dict:
    device = args.device
    dname = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    log(f"== {args.arch} UNet on {device} {dname}, batch {args.batch}")
    unet, cfg = build_unet(args.arch, device, dtype)
    res = args.res or cfg["sample_size"]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, 4, res, res, generator=g).to(device, dtype)
    v = torch.randn(args.batch, 4, res, res, generator=g).to(device, dtype)
    emb = torch.randn(args.batch, 77, cfg["cross_attention_dim"], generator=g).to(device, dtype)
    log(f"  fused SDPA supports jvp natively: {fused_sdpa_supports_jvp(device, dtype)}")
    triton_ok = False
    if device == "cuda":
        from trajlab.autodiff.attention import _triton_tangent
        triton_ok = _triton_tangent() is not None
        if not triton_ok:
            log("  Triton flash-JVP kernel not importable; using the torch tangent")
    triton_used = triton_ok and dtype in (torch.float16, torch.bfloat16)  # same rule as impl='auto'
    path = "fused SDPA primal + custom JVP (" + ("Triton flash-JVP kernel" if triton_used else
                                                    "query-blocked torch tangent") + ")"
    log(f"  jvp path: {path}; jvp_math path: math SDPA backend")

    out = {"dtype": dname, "path": path}
    # correctness spot check: custom jvp vs math-backend jvp on one UNet call
    f_call = lambda a: unet(a, 500, emb).sample  # noqa: E731
    try:
        with jvp_attention(unet):
            t_c = torch.func.jvp(f_call, (x,), (v,))[1].float()
        try:
            with sdpa_kernel(SDPBackend.MATH), matched_tangent_dtypes(unet):
                t_m = torch.func.jvp(f_call, (x,), (v,))[1].float()
            rel = ((t_c - t_m).norm() / t_m.norm()).item()
            log(f"  check: |jvp - jvp_math| / |jvp_math| = {rel:.2e}")
            out["check_rel"] = rel
        except Exception as e:  # noqa: BLE001
            log(f"  check: math-backend jvp failed ({type(e).__name__}); custom jvp finite: "
                f"{bool(torch.isfinite(t_c).all())}")
        del t_c
    except Exception as e:  # noqa: BLE001
        log(f"  check: custom jvp FAILED: {type(e).__name__}: {str(e)[:300]}")
        if args.verbose:
            traceback.print_exc()

    alt = ("torch" if triton_used else "triton") if triton_ok else None
    med = time_methods(make_methods(unet, emb, x, v, f_call, device, alt, True), args.reps, device, "unet call",
                       {"warm": set(), "failed": set()})
    out["unet"] = report("unet call", med)
    state = {"warm": set(), "failed": set()}  # samplers: warm once, on the first (shortest) one
    for k in sorted(args.steps):
        sched = make_scheduler(k)
        fn = sampler_fn(unet, emb, sched)
        fn.checkpointed = sampler_fn(unet, emb, sched, checkpointed=True)
        reps = args.reps if k <= 8 else max(2, args.reps - 2)
        med = time_methods(make_methods(unet, emb, x, v, fn, device, None, False), reps, device, f"ddim{k}", state)
        out[f"ddim{k}"] = report(f"ddim{k}", med)
    unet = None  # noqa: F841 - free before the next dtype
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def summary(results: list, args) -> str:
    parts = [f"SUMMARY device={args.device} arch={args.arch} batch={args.batch}"]
    for r in results:
        seg = [f"[{r['dtype']}]"]
        for key in ["unet"] + [f"ddim{k}" for k in args.steps]:
            rat = r.get(key, {})
            items = [f"{n}/fwd={rat[n]:.2f}" for n in ("jvp", "jvp_lean", "jvp_math", "vjp") if n in rat]
            seg.append(f"{key}: " + (" ".join(items) if items else "n/a"))
        parts.append(" | ".join(seg))
    return " ".join(parts)


def gpu_main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--arch", choices=["tiny", "sd15"], default=None, help="default: sd15 on cuda, tiny on cpu")
    p.add_argument("--batch", type=int, default=None, help="default 2 (cpu) / 4 (cuda)")
    p.add_argument("--res", type=int, default=None, help="latent size (default: config sample_size)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 3 cuda, 5 cpu)")
    p.add_argument("--steps", type=str, default="4,30", help="DDIM step counts, comma separated")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    args.arch = args.arch or ("sd15" if args.device == "cuda" else "tiny")
    args.batch = args.batch or (4 if args.device == "cuda" else 2)
    args.reps = args.reps or (3 if args.device == "cuda" else 5)
    args.steps = [int(s) for s in args.steps.split(",") if s]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    log(f"torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    results = [run_all(args, dtype)]
    if dtype != torch.float32 and "jvp" not in results[0].get("unet", {}):
        log(f"{args.dtype} custom JVP failed; continuing with fp32")
        results.append(run_all(args, torch.float32))
    log(f"total {time.perf_counter() - t0:.1f}s")
    log(summary(results, args))


# ----------------------------------------------------------------------------------------------
# CPU: previous vs fast path on the project's pipelines


def cpu_workloads(name: str, steps: list, prev_steps: int, fast_probes: int = 4):
    """name -> list of (label, methods dict) for one pipeline."""
    import copy

    from trajlab.autodiff import fast_jvp as fj
    from trajlab.autodiff.attention import attention_context
    from trajlab.analysis.estimators import _jvp_func
    from trajlab.models import denoiser as dn
    from trajlab.models.loading import load_pipeline

    pipe = load_pipeline(name)
    exact = getattr(pipe, "world", None) is not None
    dtype = torch.float64 if exact else torch.float32
    g = torch.Generator().manual_seed(0)
    if exact:
        d = pipe.unet.world.d
        model = dn.pipeline_model(pipe, context=lambda: attention_context(pipe.unet))
        x = torch.randn(4, d, 1, 1, generator=g, dtype=dtype)
    else:
        model = dn.pipeline_model(pipe, ["a red cube", "a dog"], guidance_scale=7.5, dtype=dtype,
                                  context=lambda: attention_context(pipe.unet))
        res = pipe.unet.config.sample_size
        x = torch.randn(2, 4, res, res, generator=g)
    v = torch.randn(x.shape, generator=g, dtype=dtype)
    V4 = torch.randn(fast_probes, *x.shape, generator=g, dtype=dtype)
    out = []

    def trio(f, fast, prev_ok):
        m = {"fwd": lambda: _nograd(f, x)}
        if prev_ok:
            m["prev"] = lambda: _jvp_func(f, x, v)
        m["fast"] = lambda: fast(x, v[None])
        m[f"fast_m{fast_probes}"] = lambda: fast(x, V4)
        return m

    if not exact:
        t = torch.tensor(500)
        call = lambda a: model(a, t)  # noqa: E731
        out.append(("unet call", trio(call, lambda a, T: fj.model_jvp(model, a, T, t), True)))
    for k in steps:
        f = dn.sampler_map(copy.deepcopy(pipe.scheduler), model, k)
        out.append((f"ddim{k}", trio(f, f.fast_jvp, exact or k <= prev_steps)))
    return out


def _nograd(f, x):
    with torch.no_grad():
        return f(x)


def cpu_main(args) -> list:
    rows = []
    jobs = [("tiny-sd", args.steps), ("micro-sd", args.steps), ("exact:gauss-8d", [25])]
    for name, steps in jobs:
        log(f"== {name} on cpu ({torch.get_num_threads()} thread(s))")
        for label, methods in cpu_workloads(name, steps, args.prev_steps):
            k = int(label[4:]) if label.startswith("ddim") else 1
            reps = args.reps if k <= 8 else max(3, args.reps - 2)
            med = time_methods(methods, reps, "cpu", f"{name} {label}", {"warm": set(), "failed": set()})
            fp = [n for n in med if n.startswith("fast_m")]
            if fp:  # per probe
                m = int(fp[0][6:])
                med[fp[0]] = med[fp[0]] / m
            rat = report(f"{name} {label}", med)
            rows.append((name, label, med, rat))
    log("")
    log("| model | workload | forward | prev JVP (func, math SDPA) | fast JVP | fast, 4 probes/call (per probe) |")
    log("|---|---|---|---|---|---|")
    for name, label, med, rat in rows:
        fp = next((n for n in med if n.startswith("fast_m")), None)
        cell = lambda n: (f"{med[n] * 1e3:.0f} ms ({rat[n]:.2f}x)" if n in med else "not run")  # noqa: E731
        log(f"| {name} | {label} | {med['fwd'] * 1e3:.0f} ms | {cell('prev')} | {cell('fast')} | "
            f"{cell(fp) if fp else '-'} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed interleaved rounds on the CPU (30 steps: reps-2)")
    p.add_argument("--steps", type=str, default="4,30", help="DDIM step counts, comma separated")
    p.add_argument("--prev-steps", type=int, default=4,
                   help="time the previous (torch.func) path only for samplers up to this many steps (slow)")
    p.add_argument("--gpu-only", action="store_true")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="GPU part")
    args, rest = p.parse_known_args(argv)
    args.steps = [int(s) for s in args.steps.split(",") if s]
    log(f"torch {torch.__version__}; cpu threads {torch.get_num_threads()}; OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS')}; load average {os.getloadavg()}")
    rows = []
    if not args.gpu_only:
        torch.set_num_threads(1 if os.environ.get("OMP_NUM_THREADS") == "1" else torch.get_num_threads())
        rows = cpu_main(args)
    if torch.cuda.is_available():
        gpu_main(["--device", "cuda", "--dtype", args.dtype] + rest)
        triton_vs_pypi()
    else:
        log("GPU part SKIPPED: no CUDA device (SD1.5-architecture UNet fp32/fp16 JVPs, Triton flash-JVP kernel "
            "vs jvp-flash-attention)")
    heads = [f"{n} {lab} JVP/fwd {r['fast']:.2f}x (prev {r['prev']:.2f}x)" if "prev" in r else
             f"{n} {lab} JVP/fwd {r['fast']:.2f}x" for n, lab, _, r in rows]
    log("HEADLINE fast JVP / forward: " + "; ".join(heads))


def triton_vs_pypi():
    """Attention tangent: trajlab's Triton kernel vs the PyPI `jvp-flash-attention` package (CUDA)."""
    try:
        import jvp_flash_attention  # noqa: F401
    except ImportError:
        log("jvp-flash-attention not installed: Triton kernel comparison SKIPPED")
        return
    from trajlab.autodiff.attention import attention_tangent
    q, k, v, dq, dk, dv = (torch.randn(4, 8, 4096, 64, device="cuda", dtype=torch.float16) for _ in range(6))
    import torch.nn.functional as F

    def ours():
        return F.scaled_dot_product_attention(q, k, v), attention_tangent(q, k, v, dq, dk, dv, impl="triton")

    def theirs():
        fn = getattr(jvp_flash_attention, "attention", None) or getattr(jvp_flash_attention, "JVPAttn").fwd_dual
        return torch.func.jvp(lambda a, b, c: fn(a, b, c), (q, k, v), (dq, dk, dv))

    med = time_methods({"ours": ours, "pypi": theirs}, 5, "cuda", "attn 4x8x4096x64 fp16",
                       {"warm": set(), "failed": set()})
    log("  attention primal+tangent: " + " ".join(f"{n}={t * 1e3:.2f}ms" for n, t in med.items()))


if __name__ == "__main__":
    main()
