"""When do trajectories commit? Label-stability and cosine commitment per store group, with theory
beside measurement in exact worlds (speciation sigma for mixtures, per-direction commitment for
Gaussian worlds, and optionally the clone experiment against phi(t)).

    python analyses/commitment.py runs/x.zarr --out out/commitment [--group G ...] [--n-classes 4]
        [--labeller centroid|micro] [--world gmm-2class] [--clone] [--renoise M]

Writes NetCDF (commitment_<group>.nc, summary_<method>_<group>.nc, curves.nc, ...), summary.tsv and
PNGs into --out. The world of an exact-world group is taken from --world or from its `model` attr
("exact:<preset>"). Labellers: "centroid" (default; one nearest-centroid labeller for all groups: the
world's class means, else k-means on the pooled final latents), "micro" (decode x0_pred / final
latents with each group's own VAE and label them with the micro-world's digit classifier).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from trajlab.analysis import commitment as C  # noqa: E402
from trajlab.analysis import io  # noqa: E402
from trajlab.analysis import labellers as L  # noqa: E402
from trajlab.analysis import speciation as S  # noqa: E402
from trajlab.analysis import theory as T  # noqa: E402
from trajlab.plots import commitment as P  # noqa: E402


def parse(argv=None):
    p = io.script_parser(__doc__)
    p.add_argument("--labeller", choices=("centroid", "micro"), default="centroid",
                   help="centroid: nearest centroid in latent space; micro: VAE decode + micro-world digit CNN")
    p.add_argument("--n-classes", type=int, default=4, help="k-means classes when no mixture world is known")
    p.add_argument("--n-components", type=int, default=L.CENTROID_COMPONENTS,
                   help="PCA dims of the nearest-centroid labeller")
    p.add_argument("--tau", type=float, default=0.9, help="cosine threshold")
    p.add_argument("--world", help="exact world preset name or JSON recipe (default: from group attrs)")
    p.add_argument("--clone", action="store_true", help="run the clone experiment (two-class world)")
    p.add_argument("--n-pairs", type=int, default=2000)
    p.add_argument("--renoise", type=int, default=0, metavar="M",
                   help="re-noise probe with M regenerations per sample and step (exact worlds, DDIM grid)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = io.open_groups(a.store, a.group, variables=("x0_pred", "final_latent"), complete_only=True,
                              load=True)
    world = io.exact_world(a.world, datasets.values())
    labellers = L.group_labellers(datasets, a.labeller, world, n_classes=a.n_classes, n_components=a.n_components,
                                  seed=a.seed)

    curves, rows = {}, []
    for name, ds in datasets.items():
        res = {"label": C.label_stability(ds, labellers[name]), "cosine": C.cosine_commitment(ds, tau=a.tau)}
        io.save_dataset(C.merge_methods(res), out / f"commitment_{name}.nc", attrs={"group": name})
        for method, r in res.items():
            summ = C.commitment_summary(r)
            io.save_dataset(summ, out / f"summary_{method}_{name}.nc", attrs={"group": name})
            curves[f"{name} {method}"] = C.commitment_curve(r)
            io.save_figure(P.plot_commitment_by_step(summ, title=f"{name}: {method}"),
                           out / f"by_step_{method}_{name}.png")
            rows.append(f"{name}\t{method}\tmean_step={float(r['commit_step'].mean()):.3f}\t"
                        f"median_sigma={float(r['commit_sigma'].median()):.4g}")
        if a.renoise and world is not None:
            rows.append(renoise(ds, world, labellers[name], a, out, name))
        if world is not None and world.n_components == 1:
            d = C.direction_commitment_theory(ds, *T.gaussian_eigensystem(world))
            io.save_dataset(d, out / f"direction_commitment_{name}.nc")
            rows.append(f"{name}\tdirection\tmax|rho - rho_ddim theory|={float(d['max_abs_error']):.3g}")
            theory = {"exact flow": d["theory_exact_flow"], "K-step DDIM": d["theory_K_step_DDIM"]}
            io.save_figure(P.plot_direction_commitment(d, theory, title=f"{name}: per-direction commitment"),
                           out / f"direction_commitment_{name}.png")

    spec = S.world_speciation(world) if world is not None else None
    if spec is not None:
        rows.append(f"theory\tspeciation\tLambda={spec['Lambda']:.4g}\tsigma_S={spec['sigma_S']:.4g}\t"
                    f"t_S={spec['t_S']:.4g}")
    io.save_dataset(C.stack_curves(curves), out / "curves.nc")
    io.save_figure(P.plot_commitment_curves(curves, sigma_s=None if spec is None else spec["sigma_S"]),
                   out / "commitment_curves.png")

    if a.clone:
        if world is None or world.n_components != 2:
            raise SystemExit("--clone needs a two-class exact world (--world gmm-2class)")
        rows.append(clone(world, a, out))
    (out / "summary.tsv").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def renoise(ds, world, labeller, a, out, name) -> str:
    """Re-noise probe in an exact world: save, plot, one summary line."""
    probe = C.exact_renoise_probe(ds, world, labeller, n_branches=a.renoise, seed=a.seed)
    io.save_dataset(probe, out / f"renoise_{name}.nc")
    theory = probe["theory_p_same"].mean("sample").values if "theory_p_same" in probe else None
    io.save_figure(P.plot_p_same(probe, theory, title=f"{name}: re-noise probe"), out / f"renoise_{name}.png")
    line = (f"{name}\trenoise\tmedian_commit_sigma={float(probe['commit_sigma'].median()):.4g}\t"
            f"entropy_commit_sigma={float(probe['group_commit_sigma']):.4g}")
    if theory is not None:
        line += f"\tmax|p_same - theory|={np.abs(probe['p_same'].mean('sample').values - theory).max():.3g}"
    return line


def clone(world, a, out) -> str:
    """Clone experiment in the exact two-class world: save, plot, one summary line."""
    meas = S.exact_clone_experiment(world, n_pairs=a.n_pairs, seed=a.seed)
    m_norm, s = meas.attrs["m_norm"], meas.attrs["s"]
    io.save_dataset(meas.drop_vars("branch_label"), out / "clone_curve.nc")
    fig = P.plot_clone_curve(meas, T.clone_probability(np.linspace(0, 4, 200), m_norm, s), t_s=float(meas["t_S"]),
                             title=f"clone experiment |m|={m_norm:.3g}, s={s:.3g}")
    io.save_figure(fig, out / "clone_curve.png")
    return (f"clone\tphi(t_S)={float(meas['phi_t_S']):.4f}\t"
            f"fraction of theory points inside 95% CI={float(meas['inside_ci']):.2f}")


if __name__ == "__main__":
    main()
