"""Capture correctness on an accelerator: fp16 CUDA runs with capture on are bitwise identical to plain runs,
the pinned non-blocking copies land intact, and derived x0 matches exposed x0.

python benchmarks/gpu_capture_check.py --device cuda --dtype fp16
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trajlab import store  # noqa: E402
from trajlab.capture import CapturePlan, capture, tap_pipeline  # noqa: E402
from trajlab.capture.run import pipeline_kwargs, to_uint8  # noqa: E402
from trajlab.models.x0 import EXPOSES_X0, derive_x0, noise_level, prediction_type  # noqa: E402
from trajlab.models.schedulers import make_scheduler  # noqa: E402
from trajlab.models.tiny import tiny_sd  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32", "bf16"])
    args = ap.parse_args()
    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    pipe = tiny_sd().to(args.device, dtype)
    base = dict(pipe.scheduler.config)
    ok_all = True
    for sched in ["ddim", "ddpm", "euler", "euler-ancestral", "heun", "dpm++", "unipc", "lcm", "tcd"]:
        pipe.scheduler = make_scheduler(sched, base)
        plan = CapturePlan(model="tiny-sd", prompts=["a cat", "a dog"], seeds=[0, 1], scheduler=sched, steps=6,
                           guidance=4.0, height=64, width=64, dtype=args.dtype, device=args.device, batch_size=4)
        prompts = ["a cat", "a cat", "a dog", "a dog"]
        gens = [torch.Generator("cpu").manual_seed(s) for s in (0, 1, 0, 1)]
        plain = to_uint8(pipe(**pipeline_kwargs(pipe, plan, prompts, gens)).images)
        with tempfile.TemporaryDirectory() as tmp:
            res = capture(pipe, plan, f"{tmp}/s.zarr", progress=False)
            ds = store.open_group(f"{tmp}/s.zarr", res.group).load()
        identical = bool(np.array_equal(ds.image.values, plain))
        finite = bool(np.isfinite(ds.latent.values).all() and np.isfinite(ds.x0_pred.values).all())
        err = float("nan")
        if type(pipe.scheduler).__name__ in EXPOSES_X0:
            diffs = []

            def on_step(ev):
                lv = noise_level(ev.scheduler, ev.timestep, ev.step_index)
                d = derive_x0(prediction_type(ev.scheduler), ev.model_output, ev.sample, lv)
                diffs.append(float((d - ev.result[1].float()).abs().max()))

            gens = [torch.Generator("cpu").manual_seed(s) for s in (0, 1, 0, 1)]
            with tap_pipeline(pipe, on_step):
                pipe(**pipeline_kwargs(pipe, plan, prompts, gens))
            err = max(diffs)
        ok = identical and finite
        ok_all &= ok
        print(f"{sched:16s} dtype={ds.latent.dtype} steps={ds.sizes['step']:2d} bitwise_identical={identical} "
              f"finite={finite} max|x0_derived-x0_exposed|={err:.2e}", flush=True)
    print(f"GPU capture check on {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}: "
          f"{'PASS' if ok_all else 'FAIL'}")


if __name__ == "__main__":
    main()
