"""Capture overhead of named module taps and cross-attention maps: the same plan captured with taps off and
on, side by side (interleaved repetitions, fresh store group each, medians).

Three variants per repetition: ``off`` (full capture, no taps), ``taps`` (``--tap`` on the blocks named by
``--taps``, default mid_block + down_blocks.1.attentions.0 spatial mean + up_blocks.0 float16), ``attention``
(``--attention-maps``). Checks that every array the ``off`` capture stores is bitwise identical in the other two.
Prints per-variant medians, stored bytes per sample, and on its last line the headline ratio (taps on / off).

CPU:  python benchmarks/tap_overhead.py                     (micro-sd, 30 DDIM steps, CFG 4, 2 prompts x 8 seeds)
GPU:  python benchmarks/tap_overhead.py --model tiny-sd --device cuda --size 64
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trajlab import store  # noqa: E402
from trajlab.capture import CapturePlan, capture  # noqa: E402
from trajlab.models.loading import load_pipeline  # noqa: E402

DEFAULT_TAPS = ["mid_block", {"name": "down_blocks.1.attentions.0", "reduce": "spatial_mean"},
                {"name": "up_blocks.0", "dtype": "float16"}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="micro-sd")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=None, help="height = width in pixels (default: the model's)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--taps", nargs="*", default=None, help="module names (default: three blocks, see the doc)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    pipe = load_pipeline(args.model, device=args.device)
    prompts = [f"a handwritten digit {i}" for i in range(args.prompts)]
    base = dict(model=args.model, prompts=prompts, seeds=list(range(args.seeds)), steps=args.steps, guidance=args.guidance,
                scheduler="ddim", device=args.device, batch_size=args.batch, height=args.size, width=args.size)
    variants = {"off": CapturePlan(**base),
                "taps": CapturePlan(**base, taps=args.taps if args.taps is not None else DEFAULT_TAPS),
                "attention": CapturePlan(**base, attention_maps=True)}
    tmp = tempfile.mkdtemp(prefix="trajlab-tapbench-")
    times = {k: [] for k in variants}
    per_sample, identical = {}, True

    def run(name, rep):
        path = os.path.join(tmp, f"{name}{rep}.zarr")
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        res = capture(pipe, variants[name], path, progress=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t, path, res.group

    for name in variants:  # warm-up (and the first reference)
        run(name, -1)
    for rep in range(args.reps):
        stores = {}
        for name in variants:
            dt, path, group = run(name, rep)
            times[name].append(dt)
            stores[name] = (path, group)
        ref = store.open_group(*stores["off"]).load()
        for name in ("taps", "attention"):
            ds = store.open_group(*stores[name]).load()
            identical &= all(np.array_equal(ref[v].values, ds[v].values, equal_nan=True) for v in ref.data_vars)
            if rep == 0:
                from trajlab.store_groups import step_array_sizes

                per_sample[name] = step_array_sizes(*stores[name])
        for path, _ in stores.values():
            shutil.rmtree(path)
    shutil.rmtree(tmp, ignore_errors=True)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {dev}; {os.cpu_count()} cores; load average {load:.1f}; torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}")
    print(f"config: model={args.model} device={args.device} steps={args.steps} guidance={args.guidance} "
          f"{args.prompts} prompts x {args.seeds} seeds, batch {args.batch}, reps {args.reps}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, ts in times.items():
        print(f"{name:9} median {med[name]:.3f} s  ({', '.join(f'{x:.3f}' for x in ts)})")
    for name, rows in per_sample.items():
        for a in rows:
            print(f"  {name}: {a['name']} {'x'.join(map(str, a['shape']))} {a['dtype']}: {a['raw_bytes_per_sample'] / 1e3:.1f} "
                  f"kB/sample raw, {(a['stored_bytes_per_sample'] or 0) / 1e3:.1f} kB/sample stored")
    print(f"every array of the plain capture bitwise identical with taps and attention maps on: {identical}")
    ratio = [t / o for t, o in zip(times["taps"], times["off"])]
    ratio_a = [t / o for t, o in zip(times["attention"], times["off"])]
    print(f"attention maps on / off median wall-time ratio: {statistics.median(ratio_a):.3f}")
    print(f"taps on / off median wall-time ratio: {statistics.median(ratio):.3f}")


if __name__ == "__main__":
    main()
