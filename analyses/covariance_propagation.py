"""Does the sampler's Jacobian explain the spread of same-prompt samples? Cov[x_out] vs J Cov[x_T] J^T.

    python analyses/covariance_propagation.py STORE [--group G ...] [--model NAME] --out DIR

Per group and prompt: empirical covariance of final latents (different seeds) vs the propagated
input_var * J J^T (J of the whole sampler map at the mean latent_0; low-rank randomized SVD for
high-d latents), per principal component and in trace.  Exact Gaussian worlds: the theory variance
ratios r_k = prod cos^2(dphi) are drawn beside the measured per-direction ratios.
Writes DIR/<group>_covariance.zarr and PNGs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--group", action="append", default=None, help="repeatable; default: all groups")
    p.add_argument("--model", default=None, help="model name for JVPs (default: the group's `model` attr)")
    p.add_argument("--out", required=True)
    p.add_argument("--components", type=int, default=16)
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import copy

    import numpy as np
    import torch

    from jacobian_contraction import _save, open_groups, resolve_pipeline
    from trajlab.analysis import covariance as cov
    from trajlab.analysis import jacobian as jac
    from trajlab.analysis import theory as th
    from trajlab.plots.covariance import plot_covariance_propagation, plot_variance_ratio_theory

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, ds in open_groups(a.store, a.group).items():
        model = a.model or ds.attrs.get("model")
        pipe = resolve_pipeline(model)
        scheduler = jac.scheduler_from_attrs(ds.attrs)
        steps = int(ds.attrs.get("steps", ds.sizes["step"]))
        exact = model.startswith("exact:")
        dtype = torch.float64 if exact else torch.float32
        s = copy.deepcopy(scheduler)
        s.set_timesteps(steps)
        input_var = float(s.init_noise_sigma) ** 2
        if exact:
            maps = jac.sampler_map(scheduler, jac.unet_model_fn(pipe.unet), steps)
        else:
            texts = [str(t) for t in ds["prompt_text"].values]
            maps = {int(k): jac.sampler_map(scheduler, jac.pipeline_model_fn(
                pipe, [texts[int(k)]], guidance_scale=float(ds.attrs.get("guidance", 1.0)),
                negative_prompt=ds.attrs.get("negative_prompt") or None, dtype=dtype), steps)
                for k in np.unique(ds["prompt_index"].values)}
        res = cov.covariance_propagation(ds, maps, input_var=input_var, n_components=a.components,
                                         n_probes=a.probes, dtype=dtype, generator=torch.Generator().manual_seed(a.seed))
        world = getattr(pipe, "world", None)
        if exact and world is not None and world.n_components == 1:
            U, lam = world.U[0].numpy(), world.lam[0].numpy()
            grid = th.ddim_grid(scheduler, steps)
            X = ds["final_latent"].values.reshape(ds.sizes["sample"], -1) @ U
            abf = float(grid.alpha_bar_next[-1])
            ab0 = float(grid.alpha_bar[0])
            # measured output variance over the exact flow's, for x_T ~ N(0, input_var I) (VP x_T = noise)
            exact_var = (abf * lam + 1 - abf) / (ab0 * lam + 1 - ab0)
            res["measured_r"] = ("direction", X.var(0, ddof=1) / exact_var)
            res["theory_r"] = ("direction", th.output_variance_ratio(lam, grid).values)
            res = res.assign_coords(lam=("direction", lam))
            plot_variance_ratio_theory(lam, res["measured_r"].values, res["theory_r"].values,
                                       title=f"{name}: r_k").savefig(out / f"{name}_variance_ratio.png", dpi=120)
        _save(res, out / f"{name}_covariance.zarr")
        for k in res["prompt"].values[:4]:
            plot_covariance_propagation(res, prompt=k, title=f"{name}, prompt {k}").savefig(
                out / f"{name}_covariance_p{k}.png", dpi=120)
        print(f"{name}: trace ratio emp/pred = {np.round(res['trace_ratio'].values, 3)}")


if __name__ == "__main__":
    main()
