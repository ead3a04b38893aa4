"""Trajectories of exact-world pipelines recorded through the real capture layer (for theory tests)."""

import os
import shutil
import tempfile

from trajlab.capture import CapturePlan
from trajlab.capture.run import capture

SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
"""Where the temporary store lives: memory-backed when the machine has it (a store holds one file per sample
and variable: thousands of small files for the large theory samples), else the default temp directory."""


def exact_trajectories(pipe, n_prompts: int = 1, n_seeds: int = 8, num_inference_steps: int = 10):
    """Capture ``n_prompts x n_seeds`` samples (seeds 0..n_seeds-1, prompt-major) into an in-memory Dataset.

    What ``trajlab.capture.run.capture_dataset`` returns (the same capture into a temporary store, the group
    validated and loaded), read without dask (one read per array instead of one task per sample chunk)."""
    import xarray as xr

    from trajlab import store

    name = getattr(pipe.unet, "world_name", None) or "custom"
    plan = CapturePlan(model=f"exact:{name}", prompts=[f"p{i}" for i in range(n_prompts)], seeds=list(range(n_seeds)),
                       scheduler="default", steps=num_inference_steps, guidance=1.0, images=False,
                       batch_size=n_prompts * n_seeds)
    tmp = tempfile.mkdtemp(prefix="trajlab-exact-", dir=SCRATCH)
    try:
        path = f"{tmp}/s.zarr"
        res = capture(pipe, plan, path, progress=False)
        store.open_group(path, res.group)  # validated as capture_dataset's reader does
        return xr.open_zarr(path, group=res.group, chunks=None).load()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
