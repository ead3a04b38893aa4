"""Does a student sampler cover the teacher's modes? PCA variance ratio, NDB / JSD, precision /
recall / density / coverage and (mixture worlds) covered components, with the closed-form variance
ratio beside the measurement in Gaussian worlds.

    python analyses/mode_coverage.py runs/x.zarr --teacher G --student G [--student G ...] --out DIR
        [--n-components K] [--n-bins B] [--n-pca P] [--world gmm-10mode]

Computed by trajlab.analysis.results.coverage_vs_teacher (the report's function; defaults adapt to
the sample count m, see coverage_params). Writes coverage_<student>.nc, summary.tsv and PNGs into
--out. Default students: every other group.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

from trajlab.analysis import io  # noqa: E402
from trajlab.analysis.results import coverage_vs_teacher  # noqa: E402
from trajlab.plots import coverage as P  # noqa: E402


def parse(argv=None):
    p = io.script_parser(__doc__, groups=False)
    p.add_argument("--teacher", required=True, help="teacher group")
    p.add_argument("--student", action="append", help="student group (repeatable; default all others)")
    p.add_argument("--n-components", type=int, default=None,
                   help="teacher PCA components for variance ratios (default: min(8, m - 1), m = samples per group)")
    p.add_argument("--n-bins", type=int, default=None, help="k-means bins for NDB / JSD (default: max(2, min(10, m // 6)))")
    p.add_argument("--n-pca", type=int, default=None,
                   help="k-NN / k-means in the top n teacher PCs (default: min(16, m - 1))")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--world", help="exact world preset or JSON recipe (default: from the teacher's attrs)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = io.open_groups(a.store, [a.teacher], variables=("final_latent",), complete_only=True,
                             load=True)[a.teacher]
    world = io.exact_world(a.world, [teacher])
    students = io.open_groups(a.store, a.student, variables=("final_latent",), complete_only=True)
    if not a.student:
        students.pop(a.teacher)

    results, theory, rows = {}, {}, []
    for name, st in students.items():
        res = coverage_vs_teacher(teacher, st.load(), world, n_components=a.n_components, n_bins=a.n_bins,
                                  n_pca=a.n_pca, alpha=a.alpha, seed=a.seed)
        results[name] = res
        io.save_dataset(res, out / f"coverage_{name}.nc", attrs={"group": name, "teacher": a.teacher})
        io.save_figure(P.plot_ndb_bins(res, title=f"{name}: NDB={int(res['ndb'])}, JSD={float(res['jsd']):.3g}"),
                       out / f"ndb_{name}.png")
        line = (f"{name}\tprecision={float(res['precision']):.3f}\trecall={float(res['recall']):.3f}\t"
                f"density={float(res['density']):.3f}\tcoverage={float(res['coverage']):.3f}\t"
                f"ndb={int(res['ndb'])}/{res.sizes['bin']}\tjsd={float(res['jsd']):.4f}")
        if "n_covered" in res:
            line += f"\tcovered={int(res['n_covered'])}/{res.sizes['mode']}"
        if "theory_variance_ratio" in res:
            theory[name] = res["theory_variance_ratio"].values
            line += f"\tmax|log ratio - theory|={float(res['theory_max_abs_log_error']):.3g}"
        rows.append(line)
    io.save_figure(P.plot_variance_ratio(results, theory or None, title=f"variance ratio vs teacher {a.teacher}"),
                   out / "variance_ratio.png")
    if any("n_covered" in r for r in results.values()):
        io.save_figure(P.plot_mode_fractions(results), out / "mode_fractions.png")
    (out / "summary.tsv").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
