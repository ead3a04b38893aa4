"""``python -m trajlab calibrate --out DIR``: the verdict engine's FPR and power on planted failures."""

from __future__ import annotations

import sys
from pathlib import Path


def calibration_table(ds) -> str:
    """Markdown table: per mode, the metric, margin, FPR and P(supported) at each planted magnitude."""
    lines = ["| failure mode | metric | margin | FPR (m = 0) | P(supported) at m | power >= 0.9 from m | ok |",
             "|---|---|---|---|---|---|---|"]
    for mode in ds["mode"].values:
        d = ds.sel(mode=mode)
        mags = [(float(m), float(r)) for m, r in zip(d["magnitude"].values, d["supported_rate"].values)
                if m == m and m > 0]
        power = ", ".join(f"{r:.2f} @ {m:g}" for m, r in mags)
        m90 = float(d["min_magnitude_power90"])
        lines.append(f"| {mode} | {d['metric'].item()} | {float(d['margin']):g} | {float(d['fpr']):.2f} | {power} | "
                     f"{'-' if m90 != m90 else f'{m90:g}'} | {'yes' if bool(d['ok']) else 'no'} |")
    return "\n".join(lines)


def run_calibrate(out, *, quick: bool = False, replicates: int | None = None, progress: bool = True):
    """Run the calibration, write DIR/calibration.{nc,csv,md} and DIR/power_curves.png, print the table."""
    from trajlab.analysis.calibration import run_calibration, summary_line
    from trajlab.analysis.io import save_dataset, save_figure
    from trajlab.plots.calibration import plot_power_curves

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = replicates or (20 if quick else 100)

    def tick(i, total, elapsed):
        if progress:
            print(f"calibrate: replicate {i}/{total}, {elapsed:.0f} s, about {elapsed / i * (total - i):.0f} s left",
                  file=sys.stderr, flush=True)

    ds = run_calibration(n_replicates=n, n_boot=500 if quick else 1000, progress=tick)
    save_dataset(ds, out / "calibration.nc")
    ds[["fpr", "power_max", "min_magnitude_power90", "margin"]].to_dataframe().to_csv(out / "calibration.csv")
    table = calibration_table(ds)
    (out / "calibration.md").write_text(table + "\n")
    save_figure(plot_power_curves(ds), out / "power_curves.png")
    print(table)
    print(f"({n} replicates x {ds.attrs['n_prompts']} prompts x {ds.attrs['n_seeds']} seeds, "
          f"{ds.attrs['wall_s']} s; files in {out})")
    print(summary_line(ds))
    return ds
