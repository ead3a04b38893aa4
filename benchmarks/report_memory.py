"""Peak memory of the report over a store 1x vs 4x the size: streaming (the default) vs in memory.

Two synthetic stores (tests/synthetic_store.py: three groups, 4 prompts, the (sample, step, ...) arrays
``latent``, ``x0_pred``, ``model_output``) with ``--seeds`` and 4 x ``--seeds`` seeds per prompt. One child
process per path (streaming, and with --in-memory also the in-memory reference) warms up on a tiny store
(imports are not counted), then per store resets its peak RSS (/proc/self/clear_refs), computes every
result the report shows (no CLIP / LPIPS scorers: none are cached offline; the micro-world scorers are
the same per sample), renders the report, and reports peak RSS - RSS before ("growth"). A ratio near 1
means the report streams; the in-memory path grows with the store. Linux only.

    python benchmarks/report_memory.py                     # ~2-3 min on a 2-core CPU box
    python benchmarks/report_memory.py --seeds 64 --steps 64 --no-in-memory

The last line is the headline: ``peak memory 4x/1x: R``, the streaming path's peak RSS ratio (the process
with its imports, about 0.7 GiB, counted); the line before gives the growth ratios of both paths.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from synthetic_store import build_store, can_measure, measure, step_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=16, help="seeds per prompt of the 1x store (4 prompts)")
    ap.add_argument("--steps", type=int, default=96, help="teacher steps (teacher_short: half; student: 8)")
    ap.add_argument("--latent", type=int, default=32, help="latent y = x (4 channels; images y x 3)")
    ap.add_argument("--no-render", action="store_true", help="compute results only (no HTML / PNGs)")
    ap.add_argument("--no-in-memory", action="store_true", help="skip the in-memory reference runs")
    args = ap.parse_args()
    if not can_measure():
        raise SystemExit("needs Linux /proc/self/status with a resettable peak (clear_refs)")
    tmp = Path(tempfile.mkdtemp(prefix="trajlab-repmem-"))
    try:
        print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}; stores: 4 prompts x {args.seeds} / {4 * args.seeds} seeds, "
              f"{args.steps}/{args.steps // 2}/8 steps, latent 4x{args.latent}x{args.latent}", flush=True)
        latent, steps = (4, args.latent, args.latent), (args.steps, 8)
        stores = []
        for k in (1, 4):
            path = tmp / f"store-{k}x.zarr"
            t0 = time.perf_counter()
            build_store(path, n_seeds=k * args.seeds, latent=latent, steps=steps)
            mib = step_bytes(4, k * args.seeds, latent, steps) / 2**20
            print(f"store {k}x: {mib:.0f} MiB of (sample, step, ...) arrays, written in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            stores.append(path)
        tiny = tmp / "warmup.zarr"
        build_store(tiny, n_prompts=2, n_seeds=6, steps=(4, 2))
        growth = {}
        for mode in ("streaming",) + (() if args.no_in_memory else ("in memory",)):
            runs = measure(stores, tiny, tmp / mode.replace(" ", "-"), in_memory=mode == "in memory",
                           render=not args.no_render, timeout=1800)
            for k, r in zip((1, 4), runs):
                print(f"{mode}: store {k}x: peak RSS {r['peak_mb']:.0f} MiB, growth {r['growth_mb']:.0f} MiB over "
                      f"{r['base_mb']:.0f} MiB, {r['seconds']:.1f} s", flush=True)
            growth[mode] = runs
        for mode, runs in growth.items():
            g, p = [r["growth_mb"] for r in runs], [r["peak_mb"] for r in runs]
            print(f"{mode}: growth 4x/1x {g[1] / g[0]:.2f}; peak RSS 4x/1x {p[1] / p[0]:.2f}")
        p = [r["peak_mb"] for r in growth["streaming"]]
        print(f"peak memory 4x/1x: {p[1] / p[0]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
