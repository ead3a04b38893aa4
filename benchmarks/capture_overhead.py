"""Capture overhead: the same pipeline and seeds with capture off and on, interleaved.

Full capture (latent, x0, model output, both CFG branches, final latent, images) into a fresh store
group on local disk per repetition. Also checks that captured images are bitwise identical to the
plain run. Prints the median wall-time ratio (capture / plain) on its last line.

CPU:  python benchmarks/capture_overhead.py                      (tiny-sd, 30 DDIM steps)
GPU:  python benchmarks/capture_overhead.py --arch sd15 --device cuda --dtype fp16 --batch 8 --batches 2 --size 512
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

from trajlab.capture import CapturePlan, capture  # noqa: E402
from trajlab.capture.run import pipeline_kwargs, to_uint8  # noqa: E402
from trajlab.models.schedulers import make_scheduler  # noqa: E402


def build(arch: str, device: str, dtype: torch.dtype):
    from trajlab.models import tiny

    pipe = tiny.sd15_architecture() if arch == "sd15" else tiny.tiny_sd()
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    return pipe.to(device=device, dtype=dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="tiny", choices=["tiny", "sd15"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4, help="pipeline calls per repetition (store allocation is "
                    "paid once per repetition, as in a real run of several batches)")
    ap.add_argument("--size", type=int, default=64, help="image height = width in pixels")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = build(args.arch, args.device, dtype)
    prompts = [f"a photo of object {i}" for i in range(args.batch * args.batches)]
    plan = CapturePlan(model=f"{args.arch}-arch", prompts=prompts, seeds=[0], scheduler="ddim", steps=args.steps,
                       guidance=args.guidance, height=args.size, width=args.size, dtype=args.dtype,
                       device=args.device, batch_size=args.batch)
    tmp = tempfile.mkdtemp(prefix="trajlab-bench-")

    def plain():
        out = []
        for b in range(args.batches):
            chunk = prompts[b * args.batch: (b + 1) * args.batch]
            gens = [torch.Generator("cpu").manual_seed(0) for _ in chunk]
            out.append(pipe(**pipeline_kwargs(pipe, plan, chunk, gens)).images)
        return np.concatenate(out)

    def captured(rep):
        path = os.path.join(tmp, f"r{rep}.zarr")
        capture(pipe, plan, path, progress=False)
        return path

    ref = plain()  # warm-up (also the identity reference)
    captured(-1)
    plain_t, cap_t = [], []
    identical = True
    for rep in range(args.reps):
        sync(args.device)
        t = time.perf_counter()
        out = plain()
        sync(args.device)
        plain_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        path = captured(rep)
        sync(args.device)
        cap_t.append(time.perf_counter() - t)
        from trajlab import store

        (g,) = store.group_names(path)
        identical &= bool(np.array_equal(store.open_group(path, g).image.values, to_uint8(ref)))
        identical &= bool(np.array_equal(out, ref))
        shutil.rmtree(path)
    shutil.rmtree(tmp, ignore_errors=True)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    ratios = [c / p for c, p in zip(cap_t, plain_t)]
    print(f"machine: {dev}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"config: arch={args.arch} device={args.device} dtype={args.dtype} batch={args.batch}x{args.batches} size={args.size} "
          f"steps={args.steps} guidance={args.guidance} reps={args.reps}")
    print(f"plain   median {statistics.median(plain_t):.3f} s  ({', '.join(f'{x:.3f}' for x in plain_t)})")
    print(f"capture median {statistics.median(cap_t):.3f} s  ({', '.join(f'{x:.3f}' for x in cap_t)})")
    print(f"captured outputs bitwise identical to plain: {identical}")
    print(f"capture/plain median wall-time ratio: {statistics.median(ratios):.3f} "
          f"(ratio of medians {statistics.median(cap_t) / statistics.median(plain_t):.3f})")


if __name__ == "__main__":
    main()
