"""How much does each sampler step (and the whole sampler) contract? Jacobian probes along stored runs.

    python analyses/jacobian_contraction.py STORE [--group G ...] [--model NAME] --out DIR
        [--samples 4] [--probes 8] [--power-iters 10]

For each group: the per-step contraction profile (Hutchinson ||J_i||_F^2 and power-iteration spectral
norm of each scheduler.step call, indexed by step with sigma coords) at the stored latents, and the whole
map latent_0 -> final (Hutchinson; captured noise replayed, replay_rel_error checks the map reproduces
the stored final latents).  Exact Gaussian worlds (model "exact:..."): the DDIM theory (per-step
factors a_k, the law J_DDIM / J_exact = prod cos dphi) is drawn beside the measurement.
Computed by trajlab.analysis.mechanistic.jacobian_results (its defaults are the script's); writes
DIR/<group>_contraction.nc (what `trajlab report --analyses DIR` reads), <group>_contraction_law.nc
and PNGs. Hybrid groups are skipped.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402


def main(argv=None):
    from trajlab.analysis import io
    from trajlab.analysis.mechanistic import JACOBIAN_DEFAULTS

    p = io.script_parser(__doc__, model=True)
    p.add_argument("--samples", type=int, default=JACOBIAN_DEFAULTS["samples"], help="samples per group to probe")
    p.add_argument("--probes", type=int, default=JACOBIAN_DEFAULTS["n_probes"])
    p.add_argument("--power-iters", type=int, default=JACOBIAN_DEFAULTS["n_power_iter"])
    a = p.parse_args(argv)

    from trajlab.analysis import jacobian as jac
    from trajlab.analysis.mechanistic import jacobian_results
    from trajlab.plots.jacobian import plot_contraction_law, plot_step_contraction

    out = Path(a.out)

    def figures(name, ds, prof, pipe):
        theory = prof["theory_step_factor"] if "theory_step_factor" in prof else None
        io.save_figure(plot_step_contraction(prof, theory, title=f"{name}: per-step contraction"),
                       out / f"{name}_step_contraction.png")
        scheduler = jac.scheduler_from_attrs(ds.attrs)
        if theory is not None and type(scheduler).__name__ in ("DDIMScheduler", "EulerDiscreteScheduler"):
            law = jac.contraction_law(pipe, scheduler)
            io.save_dataset(law, out / f"{name}_contraction_law{io.RESULT_SUFFIX}", attrs={"group": name})
            Ks = [int(k) for k in law["K"].values]
            fig = plot_contraction_law(law["lam"].values, {K: law["measured_ratio"].sel(K=K).values for K in Ks},
                                       {K: law["theory_ratio"].sel(K=K).values for K in Ks},
                                       title=f"{name}: J_DDIM / J_exact")
            io.save_figure(fig, out / f"{name}_contraction_law.png")

    jacobian_results(a.store, out, groups=a.group, model=a.model, samples=a.samples, n_probes=a.probes,
                     n_power_iter=a.power_iters, seed=a.seed, callback=figures)


if __name__ == "__main__":
    main()
