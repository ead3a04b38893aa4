"""A synthetic trajectory store of any size, written with the store API (no model, no torch), for the
streaming tests and benchmarks/report_memory.py.

Three groups share prompts and seeds: ``teacher`` (DDIMScheduler, ``steps[0]`` steps), ``teacher_short``
(the same model and scheduler at ``steps[0] // 2``: a steps family) and ``student`` (LCMScheduler,
``steps[1]`` steps). Sample s (prompt p, seed k) belongs to mode m = (k + p) % n_prompts; its final
latent is the mode's centre plus 0.3 x noise, its image the final latent's channels 0-2 as uint8, and
its x0 prediction at step t is the centre of mode m + 1 before step ``s % n_step`` and its own final
latent from then on, so label-stability commitment is known: commit_step = s % n_step. ``latent`` and
``model_output`` repeat x0_pred: they make the store big (and compress well on disk), as real step arrays
do, and no report analysis should read them whole.
"""

from __future__ import annotations

import numpy as np

from trajlab import store

HEAVY = ("latent", "x0_pred", "model_output")


def group_specs(steps=(16, 4)) -> dict:
    t, s = steps
    base = {"guidance": 1.0, "negative_prompt": "", "pipeline_class": "SyntheticPipeline", "extra": {}}
    return {"teacher": dict(base, model="synthetic-teacher", scheduler_class="DDIMScheduler", steps=t),
            "teacher_short": dict(base, model="synthetic-teacher", scheduler_class="DDIMScheduler", steps=t // 2),
            "student": dict(base, model="synthetic-student", scheduler_class="LCMScheduler", steps=s)}


def step_bytes(n_prompts: int, n_seeds: int, latent=(4, 8, 8), steps=(16, 4)) -> int:
    """Uncompressed bytes of the (sample, step, ...) arrays of :func:`build_store` (float32)."""
    per_step = 4 * int(np.prod(latent)) * len(HEAVY)
    return sum(n_prompts * n_seeds * spec["steps"] * per_step for spec in group_specs(steps).values())


def build_store(path, *, n_prompts: int = 4, n_seeds: int = 8, latent=(4, 8, 8), steps=(16, 4),
                incomplete: int = 1, batch: int = 32, seed: int = 0) -> dict:
    """Write the store at ``path``; returns {group: commit_step (sample,) expected for its samples}.

    latent: (channel, y, x) with channel >= 3; images are (y, x, 3). incomplete: the last this many samples of
    ``student`` are never written (their ``complete`` flag stays False)."""
    C, H, W = latent
    rng = np.random.default_rng(seed)
    centres = (3.0 * rng.standard_normal((n_prompts, C, H, W))).astype(np.float32)
    prompts = [f"synthetic prompt {p}" for p in range(n_prompts)]
    S = n_prompts * n_seeds
    pidx = np.repeat(np.arange(n_prompts), n_seeds)
    seeds = np.tile(np.arange(n_seeds), n_prompts)
    mode = (seeds + pidx) % n_prompts
    expected = {}
    for gi, (name, spec) in enumerate(group_specs(steps).items()):
        T = spec["steps"]
        layout = store.GroupLayout(n_samples=S, n_steps=T, latent_shape=(C, H, W), dtype="float32",
                                   step_variables=HEAVY, image_shape=(H, W, 3))
        attrs = {k: v for k, v in spec.items() if k != "steps"}
        attrs.update(steps=T, config={"group": name}, height=H, width=W, dtype="fp32", device="cpu")
        store.allocate_group(path, name, layout, timesteps=np.linspace(999, 0, T).round(),
                             alpha_bar=np.linspace(0.05, 0.95, T), seeds=seeds, prompt_index=pidx, prompts=prompts,
                             attrs=attrs)
        n_write = S - (incomplete if name == "student" else 0)
        noise_rng = np.random.default_rng(seed + 1 + gi)
        for start in range(0, n_write, batch):
            idx = np.arange(start, min(start + batch, n_write))
            final = centres[mode[idx]] + 0.3 * noise_rng.standard_normal((idx.size, C, H, W)).astype(np.float32)
            before = centres[(mode[idx] + 1) % n_prompts]
            late = np.arange(T)[None, :] >= (idx % T)[:, None]                      # (n, T)
            x0 = np.where(late[:, :, None, None, None], final[:, None], before[:, None])
            image = np.clip(128 + 40 * final[:, :3], 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
            arrays = {v: x0 for v in HEAVY}
            arrays.update(final_latent=final, image=image)
            store.write_samples(path, name, int(idx[0]), arrays)
            store.mark_complete(path, name, int(idx[0]), int(idx[-1]) + 1)
        expected[name] = np.arange(S) % T
    return expected


# -- peak memory of computing results, measured in a child process -------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def can_measure() -> bool:
    """Linux with /proc/self/status and a resettable peak (``clear_refs`` 5): what :func:`measure` needs."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kb("VmHWM") > 0
    except OSError:
        return False


def _child(cfg: dict) -> None:
    """Warm up (imports, caches) on cfg["warmup"], then per store: reset the peak RSS, compute the results
    (and render the report with cfg["render"]), print one JSON line with the RSS before and the peak."""
    import gc
    import json
    import os
    import time

    from trajlab.analysis.results import compute_results

    def run(path, out):
        res = compute_results(path, out, scorers=(None, None, None, []), lpips=False, n_boot=cfg["n_boot"],
                              in_memory=cfg["in_memory"])
        if cfg["render"]:
            from trajlab.report import render_report

            render_report(res, out)

    run(cfg["warmup"], os.path.join(cfg["out"], "warmup"))
    for i, path in enumerate(cfg["stores"]):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := VmRSS
        base = _status_kb("VmRSS")
        t0 = time.perf_counter()
        run(path, os.path.join(cfg["out"], f"run{i}"))
        print(json.dumps({"store": path, "base_mb": base / 1024, "peak_mb": _status_kb("VmHWM") / 1024,
                          "growth_mb": (_status_kb("VmHWM") - base) / 1024, "seconds": time.perf_counter() - t0,
                          "results": os.path.join(cfg["out"], f"run{i}", "results")}), flush=True)


def measure(stores, warmup, out, *, in_memory: bool = False, render: bool = False, n_boot: int = 20,
            timeout: float = 600) -> list[dict]:
    """Per store: {"store", "base_mb", "peak_mb", "growth_mb" (peak RSS - RSS before, MiB), "seconds",
    "results" (the results directory)} of computing its results in a fresh child process (one child for
    all ``stores``, warmed up on ``warmup`` first so that imports are not counted)."""
    import json
    import os
    import subprocess
    import sys

    cfg = {"stores": [str(s) for s in stores], "warmup": str(warmup), "out": str(out), "in_memory": in_memory,
           "render": render, "n_boot": n_boot}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


if __name__ == "__main__":
    import json
    import sys

    _child(json.loads(sys.argv[1]))
