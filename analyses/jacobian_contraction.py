"""How much does each sampler step (and the whole sampler) contract? Jacobian probes along stored runs.

    python analyses/jacobian_contraction.py STORE [--group G ...] [--model NAME] --out DIR

For each group: the per-step contraction profile (Hutchinson ||J_i||_F^2 and power-iteration spectral
norm of each scheduler.step call, indexed by step with sigma coords) at the stored latents, and the whole
map latent_0 -> final (Hutchinson).  Exact Gaussian worlds (model "exact:..."): the DDIM theory (per-step
factors a_k, the law J_DDIM / J_exact = prod cos dphi) is drawn beside the measurement.
Writes DIR/<group>_contraction.zarr and PNGs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def resolve_pipeline(name: str, dtype: str = "fp32"):
    """Exact worlds via build_exact_world, everything else via the lead's loader (lazy import)."""
    if name.startswith("exact:"):
        from trajlab.models.exact import build_exact_world

        return build_exact_world(name.split(":", 1)[1])
    from trajlab.models.loading import load_pipeline

    return load_pipeline(name, dtype=dtype)


def open_groups(store: str, groups):
    import trajlab

    tree = trajlab.open(store)
    names = list(groups) if groups else [k for k in tree.children]
    return {g: tree[g].to_dataset() for g in names}


def _save(ds, path: Path):
    import json

    ds = ds.copy()
    ds.attrs = {k: (v if isinstance(v, (str, int, float)) else json.dumps(v, default=str)) for k, v in ds.attrs.items()}
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False)


def exact_theory(pipe, scheduler, steps: int):
    """(lam, per-step factors (step, direction), grid) for a single-Gaussian exact world, else None."""
    from trajlab.analysis import theory as th

    world = getattr(pipe, "world", None)
    if world is None or world.n_components != 1:
        return None
    lam = world.lam[0].numpy()
    grid = th.ddim_grid(scheduler, steps)
    return lam, th.ddim_step_factor(lam, grid.alpha_bar.values, grid.alpha_bar_next.values), grid


def contraction_law(pipe, scheduler, Ks=(1, 2, 4, 8, 16)):
    """Measured (JVP of the whole sampler along each eigen-direction / exact flow) and theory prod cos."""
    import copy

    import torch

    from trajlab.analysis import jacobian as jac
    from trajlab.analysis import theory as th

    U, lam = pipe.world.U[0], pipe.world.lam[0].numpy()
    meas, theo = {}, {}
    for K in Ks:
        s = copy.deepcopy(scheduler)
        s.set_timesteps(K)
        ins = float(s.init_noise_sigma)
        f0 = jac.sampler_map(scheduler, jac.unet_model_fn(pipe.unet), K)
        x = torch.zeros(1, U.shape[0], 1, 1, dtype=torch.float64)
        _, JU = jac.jvp_probes(lambda n: f0(n * ins), x, U.T.reshape(-1, 1, U.shape[0], 1, 1))
        gain = (JU.reshape(len(lam), -1) * U.T).sum(1).numpy()
        g = th.ddim_grid(scheduler, K)
        flow = th.flow_factor(lam, g.alpha_bar.values, g.alpha_bar_next.values).prod("step").values
        meas[K], theo[K] = gain / flow, th.ddim_contraction_ratio(lam, g).values
    return lam, meas, theo


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--group", action="append", default=None, help="repeatable; default: all groups")
    p.add_argument("--model", default=None, help="model name for JVPs (default: the group's `model` attr)")
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=4, help="samples per group to probe")
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--power-iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import numpy as np
    import torch

    from trajlab.analysis import jacobian as jac
    from trajlab.plots.jacobian import plot_contraction_law, plot_step_contraction

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, ds in open_groups(a.store, a.group).items():
        model = a.model or ds.attrs.get("model")
        pipe = resolve_pipeline(model)
        scheduler = jac.scheduler_from_attrs(ds.attrs)
        idx = np.arange(min(a.samples, ds.sizes["sample"]))
        exact = model.startswith("exact:")
        dtype = torch.float64 if exact else torch.float32
        if exact:
            mf = jac.unet_model_fn(pipe.unet)
        else:
            texts = [str(t) for t in ds["prompt_text"].values]
            prompts = [texts[int(i)] for i in ds["prompt_index"].values[idx]]
            mf = jac.pipeline_model_fn(pipe, prompts, guidance_scale=float(ds.attrs.get("guidance", 1.0)),
                                       negative_prompt=ds.attrs.get("negative_prompt") or None, dtype=dtype)
        g = torch.Generator().manual_seed(a.seed)
        prof = jac.step_contraction_profile(ds, mf, scheduler, samples=idx, n_probes=a.probes,
                                            n_power_iter=a.power_iters, generator=g, dtype=dtype)
        steps = int(ds.attrs.get("steps", ds.sizes["step"]))
        f = jac.sampler_map(scheduler, mf, steps)
        x0 = torch.from_numpy(np.asarray(ds["latent"].isel(sample=idx, step=0).values)).to(dtype)
        whole = jac.hutchinson_frobenius(f, x0, a.probes, generator=g)
        prof["whole_fro2"] = ("sample", whole["fro2"].values)
        prof["whole_fro2_se"] = ("sample", whole["fro2_se"].values)
        th_ = exact_theory(pipe, scheduler, steps) if exact else None
        if th_ is not None:
            lam, factors, _ = th_
            prof["theory_step_factor"] = (("step", "direction"), factors.values)
            prof["theory_whole_fro2"] = float((factors.prod("step") ** 2).sum())
        _save(prof, out / f"{name}_contraction.zarr")
        fig = plot_step_contraction(prof, None if th_ is None else th_[1], title=f"{name}: per-step contraction")
        fig.savefig(out / f"{name}_step_contraction.png", dpi=120)
        if th_ is not None and type(scheduler).__name__ in ("DDIMScheduler", "EulerDiscreteScheduler"):
            lam, meas, theo = contraction_law(pipe, scheduler)
            plot_contraction_law(lam, meas, theo, title=f"{name}: J_DDIM / J_exact").savefig(
                out / f"{name}_contraction_law.png", dpi=120)
        print(f"{name}: whole-map ||J||_F^2 = {float(whole['fro2'].mean()):.4g} "
              f"(+- {float(whole['fro2_se'].mean()):.2g}); jvp via {prof.attrs['jvp_method']}")


if __name__ == "__main__":
    main()
