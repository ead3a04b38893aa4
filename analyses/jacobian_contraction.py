"""How much does each sampler step (and the whole sampler) contract? Jacobian probes along stored runs.

    python analyses/jacobian_contraction.py STORE [--group G ...] [--model NAME] --out DIR
        [--samples 4] [--probes 8] [--power-iters 10]

For each group: the per-step contraction profile (Hutchinson ||J_i||_F^2 and power-iteration spectral
norm of each scheduler.step call, indexed by step with sigma coords) at the stored latents, and the whole
map latent_0 -> final (Hutchinson; captured noise replayed, replay_rel_error checks the map reproduces
the stored final latents).  Exact Gaussian worlds (model "exact:..."): the DDIM theory (per-step
factors a_k, the law J_DDIM / J_exact = prod cos dphi) is drawn beside the measurement.
Writes DIR/<group>_contraction.zarr (and <group>_contraction_law.zarr; .nc with --format nc) and PNGs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402


def main(argv=None):
    from trajlab.analysis import io

    p = io.script_parser(__doc__, model=True, result_format=True)
    p.add_argument("--samples", type=int, default=4, help="samples per group to probe")
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--power-iters", type=int, default=10)
    a = p.parse_args(argv)

    from trajlab.analysis import jacobian as jac
    from trajlab.plots.jacobian import plot_contraction_law, plot_step_contraction

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, ds in io.open_groups(a.store, a.group, complete_only=True).items():
        pipe = io.resolve_pipeline(a.model or ds)
        scheduler = jac.scheduler_from_attrs(ds.attrs)
        prof = jac.contraction_profile(ds, pipe, samples=a.samples, n_probes=a.probes, n_power_iter=a.power_iters,
                                       seed=a.seed, scheduler=scheduler)
        io.save_dataset(prof, out / f"{name}_contraction.{a.format}", attrs={"group": name})
        theory = prof["theory_step_factor"] if "theory_step_factor" in prof else None
        io.save_figure(plot_step_contraction(prof, theory, title=f"{name}: per-step contraction"),
                       out / f"{name}_step_contraction.png")
        if theory is not None and type(scheduler).__name__ in ("DDIMScheduler", "EulerDiscreteScheduler"):
            law = jac.contraction_law(pipe, scheduler)
            io.save_dataset(law, out / f"{name}_contraction_law.{a.format}", attrs={"group": name})
            Ks = [int(k) for k in law["K"].values]
            fig = plot_contraction_law(law["lam"].values, {K: law["measured_ratio"].sel(K=K).values for K in Ks},
                                       {K: law["theory_ratio"].sel(K=K).values for K in Ks},
                                       title=f"{name}: J_DDIM / J_exact")
            io.save_figure(fig, out / f"{name}_contraction_law.png")
        print(f"{name}: whole-map ||J||_F^2 = {float(prof['whole_fro2'].mean()):.4g} "
              f"(+- {float(prof['whole_fro2_se'].mean()):.2g}); replay rel. error "
              f"{float(prof['replay_rel_error'].max()):.2g}; jvp via {prof.attrs['jvp_method']}")


if __name__ == "__main__":
    main()
