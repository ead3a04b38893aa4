"""``python -m trajlab calibrate --out DIR``: the verdicts' false-positive rate and power, through the store-verdict
code (:mod:`trajlab.verdicts.calibration`), plus the real-network nulls on the micro-world teacher."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "calibration" / "magnitudes.json"
"""Knob magnitudes solved by the last full run (reused by --quick; a full run solves them anew)."""


def calibration_table(ds) -> str:
    """Markdown table: per mode, metric, margin, the largest FPR over the null region, power at 1.5x / 2x, ok."""
    lines = ["| failure mode | margin | P(supported) at true effect 0 / 0.5 / 1 x margin | max FPR | power 1.5x | "
             "power 2x | power 3x / 4x | 80% power from | ok |", "|---|---|---|---|---|---|---|---|---|"]
    for mode in ds["mode"].values:
        d = ds.sel(mode=mode)
        null = " / ".join("n/a" if r != r else f"{r:.2f}" for r in d["supported_rate"].sel(factor=[0, 0.5, 1]).values)

        def f(v):
            v = float(v)
            return "n/a" if v != v else f"{v:.2f}"

        big = " / ".join(f(d["supported_rate"].sel(factor=x)) for x in (3.0, 4.0) if x in d["factor"].values)
        det = float(d["detectable_factor"]) if "detectable_factor" in d else float("nan")
        lines.append(f"| {mode} | {float(d['margin']):g} | {null} | {f(d['fpr_max'])} | {f(d['power_1_5x'])} | "
                     f"{f(d['power_2x'])} | {big or '-'} | {'beyond 4x' if det != det else f'{det:g}x margin'} | "
                     f"{'yes' if bool(d['ok']) else 'no'} |")
    return "\n".join(lines)


def null_table(ds) -> str:
    lines = ["| null comparison | failure mode | effect [95% CI] | decision |", "|---|---|---|---|"]
    for i in range(ds.sizes.get("comparison", 0)):
        r = {k: ds[k].values[i] for k in ("candidate", "mode", "estimate", "ci_low", "ci_high", "decision")}
        eff = "" if r["estimate"] != r["estimate"] else f"{r['estimate']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        lines.append(f"| {r['candidate']} | {r['mode']} | {eff} | {r['decision']} |")
    return "\n".join(lines)


def run_calibrate(out, *, quick: bool = False, replicates: int | None = None, progress: bool = True,
                  real_nulls: bool | None = None, reuse_magnitudes: bool | None = None, truth: bool | None = None):
    """Run the calibration, write DIR/calibration.{nc,csv,md}, DIR/magnitudes.json, DIR/power_curves.png and (with
    the micro-world) DIR/real_nulls.nc; print the tables; the last line is the summary. reuse_magnitudes: take
    the shipped knob magnitudes (default: only when quick); truth: re-measure each planted magnitude's true
    effect (default: not quick)."""
    from trajlab.analysis.io import save_dataset, save_figure
    from trajlab.plots.calibration import plot_power_curves
    from trajlab.verdicts.calibration import run_calibration, solve_magnitudes, summary_line

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = replicates or (20 if quick else 100)

    def say(msg):
        if progress:
            print(msg, file=sys.stderr, flush=True)

    from trajlab.verdicts.calibration import FACTORS

    shipped = json.loads(SHIPPED.read_text()) if SHIPPED.is_file() else {}
    reuse = quick if reuse_magnitudes is None else reuse_magnitudes
    if reuse and shipped and all(len(v) == len(FACTORS) for v in shipped.values()):
        mags = shipped
        say(f"calibrate: knob magnitudes from {SHIPPED}")
    else:
        mags = solve_magnitudes(progress=say)
    (out / "magnitudes.json").write_text(json.dumps(mags, indent=1) + "\n")

    def tick(i, total, elapsed):
        say(f"calibrate: replicate {i}/{total}, {elapsed:.0f} s, about {elapsed / i * (total - i):.0f} s left")

    ds = run_calibration(n_replicates=n, magnitudes=mags, truth=(not quick) if truth is None else truth, progress=tick)
    nulls = None
    if real_nulls if real_nulls is not None else not quick:
        from trajlab.experiments.demo_design import micro_available
        from trajlab.verdicts.nulls import capture_real_nulls

        if micro_available():
            say("calibrate: real-network nulls (micro-sd: disjoint seed blocks; DDIM vs TCD gamma 0)")
            nulls = capture_real_nulls(out / "real_nulls.zarr")
            save_dataset(nulls, out / "real_nulls.nc")
            n_sup = int((nulls["decision"] == "supported").sum())
            ds.attrs["real_nulls_supported"] = f"{n_sup}/{nulls.sizes['comparison']}"
    save_dataset(ds, out / "calibration.nc")
    ds[["fpr_max", "power_1_5x", "power_2x", "detectable_factor", "ok", "margin"]].to_dataframe().to_csv(
        out / "calibration.csv")
    table = calibration_table(ds)
    (out / "calibration.md").write_text(table + "\n" + (("\n" + null_table(nulls) + "\n") if nulls is not None else ""))
    save_figure(plot_power_curves(ds), out / "power_curves.png")
    print(table)
    if nulls is not None:
        print(null_table(nulls))
    print(f"({n} replicates x {ds.attrs['n_prompts']} prompts x {ds.attrs['n_seeds']} seeds "
          f"({ds.attrs['n_seeds_control']} for control modes), Holm family {ds.attrs['holm_family']}, "
          f"{ds.attrs['wall_s']} s; files in {out})")
    print(summary_line(ds) + (f"; real-network nulls supported: {ds.attrs['real_nulls_supported']}"
                              if nulls is not None else ""))
    return ds
