"""When do trajectories commit? Label-stability and cosine commitment per store group, with theory
beside measurement in exact worlds (speciation sigma for mixtures, per-direction commitment for
Gaussian worlds, and optionally the clone experiment against phi(t)).

    python analyses/commitment.py runs/x.zarr --out out/commitment [--group G ...] [--n-classes 4]
        [--world gmm-2class] [--clone]

Writes NetCDF (commitment_<group>.nc, summary_<group>.nc, curves.nc, ...) and PNGs into --out.
The world of an exact-world group is taken from --world or from its `model` attr ("exact:<preset>").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from trajlab.analysis import commitment as C  # noqa: E402
from trajlab.analysis import speciation as S  # noqa: E402
from trajlab.analysis import theory as T  # noqa: E402
from trajlab.analysis.accessor import save_netcdf  # noqa: E402
from trajlab.plots import commitment as P  # noqa: E402


def open_store(path):
    try:
        import trajlab

        return trajlab.open(path)
    except (ImportError, AttributeError):
        return xr.open_datatree(path, engine="zarr")


def world_of(arg, datasets):
    """ExactWorld from --world (preset name or JSON recipe) or a group's `model` attr, else None."""
    spec = arg
    if spec is None:
        for ds in datasets.values():
            model = str(ds.attrs.get("model", ""))
            if model.startswith("exact:"):
                spec = model.split(":", 1)[1]
                break
    if spec is None:
        return None
    from trajlab.models.exact import make_world

    return make_world(json.loads(spec) if spec.strip().startswith("{") else spec)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store", help="trajectory store (zarr)")
    p.add_argument("--group", action="append", help="group name (repeatable; default all)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-classes", type=int, default=4, help="k-means classes when no mixture world is known")
    p.add_argument("--n-components", type=int, default=16, help="PCA dims of the nearest-centroid labeller")
    p.add_argument("--tau", type=float, default=0.9, help="cosine threshold")
    p.add_argument("--world", help="exact world preset name or JSON recipe (default: from group attrs)")
    p.add_argument("--clone", action="store_true", help="run the clone experiment (two-class world)")
    p.add_argument("--n-pairs", type=int, default=2000)
    p.add_argument("--renoise", type=int, default=0, metavar="M",
                   help="re-noise probe with M regenerations per sample and step (exact worlds, DDIM grid)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tree = open_store(a.store)
    names = a.group or [n for n in tree.children]
    datasets = {}
    for n in names:
        ds = tree[n].to_dataset()
        ds = ds[[v for v in ("x0_pred", "final_latent", "complete") if v in ds]]
        if "complete" in ds:
            ds = ds.isel(sample=np.flatnonzero(ds["complete"].values))
        datasets[n] = ds.load()
    world = world_of(a.world, datasets)

    # one labeller for all groups so labels are comparable across samplers
    if world is not None and world.n_components >= 2:
        labeller = C.nearest_centroid_labeller(means=world.means.double().numpy())
    else:
        pooled = np.concatenate([d["final_latent"].values.reshape(d.sizes["sample"], -1) for d in datasets.values()])
        ncomp = min(a.n_components, pooled.shape[0] - 1, pooled.shape[1])
        labeller = C.nearest_centroid_labeller(pooled, n_classes=a.n_classes, n_components=ncomp, seed=a.seed)

    curves, rows = {}, []
    for name, ds in datasets.items():
        lab = C.label_stability(ds, labeller)
        cos = C.cosine_commitment(ds, tau=a.tau)
        save_netcdf(xr.merge([lab.rename({k: f"label_{k}" for k in lab.data_vars}),
                              cos.rename({k: f"cosine_{k}" for k in cos.data_vars})], combine_attrs="drop"),
                    out / f"commitment_{name}.nc")
        for method, res in (("label", lab), ("cosine", cos)):
            summ = C.commitment_summary(res)
            save_netcdf(summ, out / f"summary_{method}_{name}.nc")
            curves[f"{name} {method}"] = C.commitment_curve(res)
            P.plot_commitment_by_step(summ, title=f"{name}: {method}").savefig(out / f"by_step_{method}_{name}.png", dpi=120)
            rows.append(f"{name}\t{method}\tmean_step={float(res['commit_step'].mean()):.3f}\t"
                        f"median_sigma={float(res['commit_sigma'].median()):.4g}")
        if a.renoise and world is not None:
            rows.append(renoise(ds, world, labeller, a, out, name))
        if world is not None and world.n_components == 1:
            lam, U = world.lam[0].double().numpy(), world.U[0].double().numpy()
            order = np.argsort(-lam)
            lam, U = lam[order], U[:, order]
            meas = C.direction_commitment(ds, U.T, mean=world.means[0].double().numpy())
            ab = ds["alpha_bar"].values
            nodes = C.alpha_bar_nodes(ds)
            theory = {"exact flow": T.commitment_ratio_exact(lam, ab),
                      "K-step DDIM": T.commitment_ratio_ddim(lam, nodes, form="product")}
            save_netcdf(meas.assign(**{f"theory_{k.replace(' ', '_').replace('-', '_')}":
                                       v.transpose("direction", "step").drop_vars(
                                           [c for c in v.coords if c not in ("direction", "step")]).assign_coords(step=meas["step"].values)
                                       for k, v in theory.items()}), out / f"direction_commitment_{name}.nc")
            err = np.abs(meas["rho"].values - theory["K-step DDIM"].transpose("direction", "step").values).max()
            rows.append(f"{name}\tdirection\tmax|rho - rho_ddim theory|={err:.3g}")
            P.plot_direction_commitment(meas, theory, title=f"{name}: per-direction commitment").savefig(
                out / f"direction_commitment_{name}.png", dpi=120)

    sigma_s = None
    if world is not None and world.n_components >= 2:
        from trajlab.models.exact import world_covariance

        lam_top = float(np.linalg.eigvalsh(world_covariance(world).double().numpy())[-1])
        sigma_s = S.speciation_sigma(lam_top)
        rows.append(f"theory\tspeciation\tLambda={lam_top:.4g}\tsigma_S={sigma_s:.4g}\tt_S={S.speciation_time(lam_top):.4g}")
    save_netcdf(xr.Dataset({k.replace(" ", "__"): v.rename({"sigma_level": f"sigma_level_{i}"})
                            for i, (k, v) in enumerate(curves.items())}), out / "curves.nc")
    P.plot_commitment_curves(curves, sigma_s=sigma_s).savefig(out / "commitment_curves.png", dpi=120)

    if a.clone:
        if world is None or world.n_components != 2:
            raise SystemExit("--clone needs a two-class exact world (--world gmm-2class)")
        rows.append(clone(world, a, out))
    (out / "summary.tsv").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def renoise(ds, world, labeller, a, out, name) -> str:
    """Re-noise probe with a DDIM regeneration (VP, the group's own alpha_bar grid, exact denoiser)."""
    import torch

    from trajlab.models.exact import gmm_denoiser

    nodes = C.alpha_bar_nodes(ds)
    shape = ds["final_latent"].shape[1:]

    def regenerate(x, step):
        x = x.reshape(len(x), -1)
        for ab, ab_next in zip(nodes[step:-1], nodes[step + 1:]):
            x0 = gmm_denoiser(torch.from_numpy(x / np.sqrt(ab)), float(np.sqrt((1 - ab) / ab)), world).numpy()
            eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
            x = np.sqrt(ab_next) * x0 + np.sqrt(1 - ab_next) * eps
        return x.reshape(len(x), *shape)

    probe = C.renoise_probe(ds, regenerate, labeller, n_branches=a.renoise, seed=a.seed)
    ent = C.branch_entropy(probe["branch_label"])
    theory = None
    if world.n_components == 2:
        fin = ds["final_latent"].values.reshape(ds.sizes["sample"], -1) / np.sqrt(nodes[-1])
        theory = C.renoise_theory_two_class(fin, world.means.double().numpy(), ds["sigma"].values)
        probe["theory_p_same"] = (("sample", "step"), theory)
        theory = theory.mean(0)
    save_netcdf(probe.merge(ent.drop_vars(["commit_step", "commit_sigma"]), compat="override"),
                out / f"renoise_{name}.nc")
    P.plot_p_same(probe, theory, title=f"{name}: re-noise probe").savefig(out / f"renoise_{name}.png", dpi=120)
    line = (f"{name}\trenoise\tmedian_commit_sigma={float(probe['commit_sigma'].median()):.4g}\t"
            f"entropy_commit_sigma={float(ent['group_commit_sigma']):.4g}")
    if theory is not None:
        line += f"\tmax|p_same - theory|={np.abs(probe['p_same'].mean('sample').values - theory).max():.3g}"
    return line


def clone(world, a, out) -> str:
    """Clone experiment in the exact two-class world with DDPM ancestral branches (VE grid)."""
    import torch

    from trajlab.models.exact import gmm_denoiser, sample_world

    means = world.means.double().numpy()
    m_norm = float(np.linalg.norm(means[0] - means[1]) / 2)
    s = float(np.sqrt(world.lam.double().numpy().mean()))
    gen = torch.Generator().manual_seed(a.seed)

    def denoiser(y, sigma):
        return gmm_denoiser(torch.from_numpy(y), sigma, world).numpy()

    def sample_data(n, rng):
        return sample_world(world, n, gen)[0].double().numpy()

    sig = np.append(np.geomspace(20 * (m_norm + s), 1e-3, 300), 0.0)
    t_grid = np.linspace(0.05, 3.5, 12)
    clone_steps = sorted({int(np.argmin(np.abs(sig - v))) for v in S.sigma_from_ou_time(t_grid)})
    lab = C.nearest_centroid_labeller(means=means)
    meas = S.clone_curve(partial(S.marginal_trunk, sigmas=sig, sample_data=sample_data),
                         partial(S.ancestral_branch, sigmas=sig, denoiser=denoiser), lab, clone_steps, sig,
                         n_pairs=a.n_pairs, seed=a.seed, level=0.95)
    th = T.clone_probability(np.linspace(0, 4, 200), m_norm, s)
    lam_top = m_norm ** 2 + s ** 2
    t_s = T.speciation_time(lam_top)
    meas = meas.assign(theory_phi=("clone_step", T.clone_probability(meas["t"].values, m_norm, s).values))
    save_netcdf(meas.drop_vars("branch_label"), out / "clone_curve.nc")
    P.plot_clone_curve(meas, th, t_s=t_s, title=f"clone experiment |m|={m_norm:.3g}, s={s:.3g}").savefig(
        out / "clone_curve.png", dpi=120)
    inside = np.mean((meas["ci_low"] <= meas["theory_phi"]) & (meas["theory_phi"] <= meas["ci_high"]))
    return (f"clone\tphi(t_S)={float(T.clone_probability(t_s, m_norm, s)[0]):.4f}\t"
            f"fraction of theory points inside 95% CI={float(inside):.2f}")


if __name__ == "__main__":
    main()
