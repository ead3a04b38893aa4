"""Forest plot of the verdict engine's comparisons: each effect with its 95% CI against the declared margin."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

DECISION_COLOURS = {"supported": "#c62828", "refuted": "#2e7d32", "inconclusive": "#ef8f00"}

__all__ = ["DECISION_COLOURS", "plot_forest"]


def plot_forest(rows: list[dict], title: str = "") -> plt.Figure | None:
    """One panel per failure mode: every applicable comparison's estimate and 95% CI (colour: decision), 0
    (no effect, solid) and the failure margin (dashed, on the failure side). rows: the report's verdict
    rows (mode, candidate, estimate, ci_low, ci_high, margin, direction, effect_kind, decision). None when no
    row has an estimate."""
    modes: dict = {}
    for r in rows:
        if r["decision"] in DECISION_COLOURS and all(np.isfinite(float(r[k])) for k in ("estimate", "ci_low", "ci_high")):
            modes.setdefault(r["mode"], []).append(r)
    if not modes:
        return None
    nc = 2 if len(modes) > 1 else 1
    items = list(modes.items())
    cols = [items[i::nc] for i in range(nc)]
    height = max(sum(len(v) * 0.16 + 0.75 for _, v in c) for c in cols) + 0.6
    fig = plt.figure(figsize=(6.4 * nc, height), layout="constrained")
    sub = fig.subfigures(1, nc, squeeze=False)[0]
    for sf, col in zip(sub, cols):
        axes = sf.subplots(len(col), 1, squeeze=False, height_ratios=[len(v) + 2.5 for _, v in col])[:, 0]
        for ax, (mode, rs) in zip(axes, col):
            y = np.arange(len(rs))
            est = np.array([float(r["estimate"]) for r in rs])
            err = np.clip(np.stack([est - [float(r["ci_low"]) for r in rs], [float(r["ci_high"]) for r in rs] - est]),
                          0, None)
            for i, r in enumerate(rs):
                ax.errorbar(est[i], y[i], xerr=err[:, i:i + 1], fmt="o", ms=3, capsize=2, elinewidth=1,
                            color=DECISION_COLOURS[r["decision"]])
            m = float(rs[0]["margin"]) * (-1 if rs[0].get("direction") == "decrease" else 1)
            ax.axvline(0, color="k", lw=0.8)
            ax.axvline(m, color="0.4", lw=0.8, ls="--")
            ax.set_yticks(y, [str(r["candidate"]) for r in rs], fontsize=6)
            ax.set_ylim(len(rs) - 0.5, -0.5)
            ax.tick_params(axis="x", labelsize=6)
            kind = "log ratio" if rs[0].get("effect_kind") == "log_ratio" else "difference"
            ax.set_title(f"{str(mode).replace('_', ' ')}: {kind} vs reference (failure: "
                         f"{rs[0].get('direction', '')} past {m:+g})", fontsize=7, loc="left")
    handles = [Line2D([], [], color=c, marker="o", ls="", label=d) for d, c in DECISION_COLOURS.items()]
    handles.append(Line2D([], [], color="0.4", ls="--", label="failure margin"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(title or "every applicable comparison: effect with 95% CI (Holm-corrected decisions)", fontsize=9)
    return fig
