"""Does a student sampler cover the teacher's modes? PCA variance ratio, NDB / JSD, precision /
recall / density / coverage and (mixture worlds) covered components, with the closed-form variance
ratio beside the measurement in Gaussian worlds.

    python analyses/mode_coverage.py runs/x.zarr --teacher G --student G [--student G ...] --out DIR
        [--n-components 16] [--n-bins 20] [--n-pca 64] [--world gmm-10mode]

Writes coverage_<student>.nc, summary.tsv and PNGs into --out. Default students: every other group.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from trajlab.analysis import commitment as C  # noqa: E402
from trajlab.analysis import coverage as V  # noqa: E402
from trajlab.analysis import theory as T  # noqa: E402
from trajlab.analysis.accessor import save_netcdf  # noqa: E402
from trajlab.plots import coverage as P  # noqa: E402


def open_store(path):
    try:
        import trajlab

        return trajlab.open(path)
    except (ImportError, AttributeError):
        return xr.open_datatree(path, engine="zarr")


def world_of(arg, ds):
    """ExactWorld from --world (preset or JSON recipe) or the teacher's `model` attr, else None."""
    spec = arg
    model = str(ds.attrs.get("model", ""))
    if spec is None and model.startswith("exact:"):
        spec = model.split(":", 1)[1]
    if spec is None:
        return None
    from trajlab.models.exact import make_world

    return make_world(json.loads(spec) if spec.strip().startswith("{") else spec)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("--teacher", required=True, help="teacher group")
    p.add_argument("--student", action="append", help="student group (repeatable; default all others)")
    p.add_argument("--out", required=True)
    p.add_argument("--n-components", type=int, default=16, help="teacher PCA components for variance ratios")
    p.add_argument("--n-bins", type=int, default=20, help="k-means bins for NDB / JSD")
    p.add_argument("--n-pca", type=int, default=None, help="k-NN / k-means in the top n teacher PCs (default raw)")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--world", help="exact world preset or JSON recipe (default: from the teacher's attrs)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _complete(ds):
    """Only final_latent (lazy arrays otherwise read whole), only complete samples, loaded."""
    keep = ds[[v for v in ("final_latent", "complete") if v in ds]]
    if "complete" in keep:
        keep = keep.isel(sample=np.flatnonzero(keep["complete"].values))
    return keep.load()


def main(argv=None):
    a = parse(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tree = open_store(a.store)
    teacher = _complete(tree[a.teacher].to_dataset())
    students = a.student or [n for n in tree.children if n != a.teacher]
    world = world_of(a.world, teacher)
    means = world.means.double().numpy() if world is not None and world.n_components >= 2 else None
    n_comp = min(a.n_components, teacher.sizes["sample"] - 1,
                 int(np.prod([teacher.sizes[d] for d in teacher["final_latent"].dims if d != "sample"])))

    results, theory, rows = {}, {}, []
    for name in students:
        st = _complete(tree[name].to_dataset())
        res = V.mode_coverage(teacher, st, n_components=n_comp, n_bins=a.n_bins, alpha=a.alpha,
                              seed=a.seed, n_pca=a.n_pca, means=means)
        if world is not None and world.n_components == 1:
            # linear sampler from x_T ~ N(0, I): output variance J_k^2 per eigen-direction (sorted)
            lam = np.sort(world.lam[0].double().numpy())[::-1]
            jt = T.ddim_contraction(lam, C.alpha_bar_nodes(teacher)).values
            js = T.ddim_contraction(lam, C.alpha_bar_nodes(st)).values
            th = (js / jt)[:n_comp] ** 2
            theory[name] = th
            res["theory_variance_ratio"] = ("component", np.pad(th, (0, n_comp - th.size), constant_values=np.nan))
        results[name] = res
        save_netcdf(res, out / f"coverage_{name}.nc")
        P.plot_ndb_bins(res, title=f"{name}: NDB={int(res['ndb'])}, JSD={float(res['jsd']):.3g}").savefig(
            out / f"ndb_{name}.png", dpi=120)
        line = (f"{name}\tprecision={float(res['precision']):.3f}\trecall={float(res['recall']):.3f}\t"
                f"density={float(res['density']):.3f}\tcoverage={float(res['coverage']):.3f}\t"
                f"ndb={int(res['ndb'])}/{a.n_bins}\tjsd={float(res['jsd']):.4f}")
        if means is not None:
            line += f"\tcovered={int(res['n_covered'])}/{len(means)}"
        if name in theory:
            line += f"\tmax|log ratio - theory|={np.nanmax(np.abs(np.log(res['variance_ratio'].values / theory[name]))):.3g}"
        rows.append(line)
    P.plot_variance_ratio(results, theory or None, title=f"variance ratio vs teacher {a.teacher}").savefig(
        out / "variance_ratio.png", dpi=120)
    if means is not None:
        P.plot_mode_fractions(results).savefig(out / "mode_fractions.png", dpi=120)
    (out / "summary.tsv").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
