"""Does the sampler's Jacobian explain the spread of same-prompt samples? Cov[x_out] vs J Cov[x_T] J^T.

    python analyses/covariance_propagation.py STORE [--group G ...] [--model NAME] --out DIR
        [--components 16] [--probes 16] [--dense-max 256] [--prompts N] [--points 4]

Per group and prompt: empirical covariance of final latents (different seeds) vs the propagated
input_var * J J^T (J of the whole sampler map at the mean latent_0; low-rank randomized SVD for
high-d latents), per principal component and in trace.  Exact Gaussian worlds: the theory variance
ratios r_k = prod cos^2(dphi) are drawn beside the measured per-direction ratios.
Computed by trajlab.analysis.mechanistic.covariance_results (its defaults are the script's); writes
DIR/<group>_covariance.nc (what `trajlab report --analyses DIR` reads) and PNGs. Hybrid groups are skipped.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402


def main(argv=None):
    from trajlab.analysis import io
    from trajlab.analysis.mechanistic import COVARIANCE_DEFAULTS

    p = io.script_parser(__doc__, model=True)
    p.add_argument("--components", type=int, default=COVARIANCE_DEFAULTS["n_components"])
    p.add_argument("--probes", type=int, default=COVARIANCE_DEFAULTS["n_probes"],
                   help="Hutchinson probes for the trace (low-rank path)")
    p.add_argument("--dense-max", type=int, default=COVARIANCE_DEFAULTS["dense_max"],
                   help="exact dense Jacobians up to this latent size, else randomized SVD + Hutchinson")
    p.add_argument("--prompts", type=int, default=COVARIANCE_DEFAULTS["n_prompts"],
                   help="first N prompts of each group (default: all)")
    p.add_argument("--points", type=int, default=None,
                   help="linearisation points per prompt, its first noise samples (default: "
                        "trajlab.analysis.covariance.DEFAULT_POINTS)")
    a = p.parse_args(argv)

    from trajlab.analysis.mechanistic import covariance_results
    from trajlab.plots.covariance import plot_covariance_propagation, plot_variance_ratio_theory

    out = Path(a.out)

    def figures(name, res):
        if "theory_r" in res:
            fig = plot_variance_ratio_theory(res["lam"].values, res["measured_r"].values, res["theory_r"].values,
                                             title=f"{name}: r_k")
            io.save_figure(fig, out / f"{name}_variance_ratio.png")
        for k in res["prompt"].values[:4]:
            io.save_figure(plot_covariance_propagation(res, prompt=k, title=f"{name}, prompt {k}"),
                           out / f"{name}_covariance_p{k}.png")

    covariance_results(a.store, out, groups=a.group, model=a.model, n_prompts=a.prompts, n_components=a.components,
                       n_probes=a.probes, dense_max=a.dense_max, seed=a.seed, max_points=a.points, callback=figures)


if __name__ == "__main__":
    main()
