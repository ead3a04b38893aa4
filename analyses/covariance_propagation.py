"""Does the sampler's Jacobian explain the spread of same-prompt samples? Cov[x_out] vs J Cov[x_T] J^T.

    python analyses/covariance_propagation.py STORE [--group G ...] [--model NAME] --out DIR
        [--components 16] [--probes 16] [--dense-max 256]

Per group and prompt: empirical covariance of final latents (different seeds) vs the propagated
input_var * J J^T (J of the whole sampler map at the mean latent_0; low-rank randomized SVD for
high-d latents), per principal component and in trace.  Exact Gaussian worlds: the theory variance
ratios r_k = prod cos^2(dphi) are drawn beside the measured per-direction ratios.
Writes DIR/<group>_covariance.zarr (or .nc with --format nc) and PNGs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402


def main(argv=None):
    from trajlab.analysis import io

    p = io.script_parser(__doc__, model=True, result_format=True)
    p.add_argument("--components", type=int, default=16)
    p.add_argument("--probes", type=int, default=16, help="Hutchinson probes for the trace (low-rank path)")
    p.add_argument("--dense-max", type=int, default=256,
                   help="exact dense Jacobians up to this latent size, else randomized SVD + Hutchinson")
    a = p.parse_args(argv)

    import numpy as np

    from trajlab.analysis import covariance as cov
    from trajlab.plots.covariance import plot_covariance_propagation, plot_variance_ratio_theory

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = io.open_groups(a.store, a.group, variables=("latent", "final_latent", "prompt_text"),
                            complete_only=True, load=True)
    for name, ds in groups.items():
        pipe = io.resolve_pipeline(a.model or ds)
        res = cov.group_covariance_propagation(ds, pipe, n_components=a.components, n_probes=a.probes, seed=a.seed,
                                               dense_max=a.dense_max)
        if "theory_r" in res:
            fig = plot_variance_ratio_theory(res["lam"].values, res["measured_r"].values, res["theory_r"].values,
                                             title=f"{name}: r_k")
            io.save_figure(fig, out / f"{name}_variance_ratio.png")
        io.save_dataset(res, out / f"{name}_covariance.{a.format}", attrs={"group": name})
        for k in res["prompt"].values[:4]:
            io.save_figure(plot_covariance_propagation(res, prompt=k, title=f"{name}, prompt {k}"),
                           out / f"{name}_covariance_p{k}.png")
        print(f"{name}: trace ratio emp/pred = {np.round(res['trace_ratio'].values, 3)}")


if __name__ == "__main__":
    main()
