"""The demo (quick, tiny models) captures a study store and builds a report with every section."""
import json
import re

import pytest

from trajlab import store
from trajlab.report import SECTIONS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from trajlab.experiments.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    path = run_demo(out, quick=True, tiny=True, teacher_steps=8, n_prompts=2, n_seeds=3, progress=False)
    return out, path


def test_demo_writes_store_and_report(demo):
    out, path = demo
    assert path == out / "report" / "index.html" and path.is_file()
    st = out / "study.zarr"
    store.validate(st)
    names = store.group_names(st)
    assert any(n.startswith("tiny-sd__ddim__8steps") for n in names)
    exp = {n: json.loads(store.group_attrs(st, n)["extra"]).get("experiment") for n in names}
    assert sorted(n.split("__")[2] for n in names if n.startswith("tiny-lcm__lcm__") and exp[n] == "demo") == \
        ["1steps", "2steps", "4steps", "8steps"]
    hyb = [n for n in names if n.startswith("hybrid__")]
    assert len(hyb) == 2  # quick hand-offs: k = 0, teacher_steps // 3 (k = teacher_steps is the teacher group)
    for n in hyb:
        extra = json.loads(store.group_attrs(st, n)["extra"])
        assert extra["hybrid"]["handoff_step"] in (0, 2)
    # control experiments (quick grids, offline models mapped to tiny): guidance sweep + negative prompt
    control = [n for n in names if exp[n] == "demo-control"]
    assert any(n.startswith("tiny-sd__ddim__8steps__cfg1__none") for n in control)  # at the demo's teacher steps
    assert any(n.startswith("tiny-sd__ddim__8steps__cfg7.5__none") for n in control)
    assert any("__neg-" in n for n in control)
    assert len(control) == len(set(control)) and all(store.completed(st, n).all() for n in control)


def test_report_has_every_section_and_names_groups(demo):
    out, path = demo
    text = path.read_text()
    for s in SECTIONS:
        assert f">{s}</h2>" in text, s
    # sections this store cannot support say so; those it can are filled
    neg = text.split(">Negative-prompt sensitivity</h2>")[1].split("<h2")[0]
    assert "__neg-" in neg and "sensitivity" in neg
    cfg = text.split(">CFG curves</h2>")[1].split("<h2")[0]
    assert "_cfg.png'" in cfg and "tiny-sd" in cfg
    steps = text.split(">Step consistency</h2>")[1].split("<h2")[0]
    assert "not measured" not in steps and "tiny-lcm__lcm__8steps" in steps
    hybrid = text.split(">Hybrid sweep</h2>")[1].split("<h2")[0]
    assert "hybrid__tiny-sd__to__tiny-lcm__k00" in hybrid
    jac = text.split(">Jacobian spectra and covariance</h2>")[1].split("<h2")[0]
    assert "whole_fro2" in jac and "tiny-lcm__lcm__1steps" in jac and "jacobian_whole" in jac
    assert len(list((out / "analyses").glob("*_contraction.nc"))) == 5  # teacher + 4 students, hybrids skipped
    cov = sorted(f.name for f in (out / "analyses").glob("*_covariance.nc"))  # teacher, LCM 1 and 4 steps
    assert len(cov) == 3 and any("tiny-lcm__lcm__1steps" in c for c in cov)
    assert "trace_ratio" in jac and "covariance_trace" in jac
    tables = json.loads((out / "report" / "tables.json").read_text())
    from trajlab.verdicts.engine import DECISIONS

    rows = tables["verdicts"]
    assert rows and all(r["decision"] in DECISIONS for r in rows)
    assert "step_inconsistency" in {r["mode"] for r in rows} and "taxonomy" not in tables
    names = store.group_names(out / "study.zarr")
    for r in rows:  # every row names the store groups it compares (or says which one was not captured)
        assert r["candidate_group"] in names or " / " in r["candidate_group"], r
    pngs = list((out / "report").glob("*.png"))
    assert len(pngs) >= 5 and all(re.search(rf"src='{p.name}'", text) for p in pngs)


def test_cli_registers_study_commands():
    from trajlab.cli import build_parser

    ap = build_parser()
    for cmd in (["experiment", "--list"], ["report", "x.zarr", "--out", "r"], ["demo", "--out", "d", "--quick"]):
        assert ap.parse_args(cmd).func.__module__ == "trajlab.cli"


def test_results_are_datasets_and_the_report_only_renders(demo, tmp_path):
    import subprocess
    import sys

    import xarray as xr

    out, _ = demo
    res = out / "report" / "results"
    for name in ("groups", "metrics", "step_consistency", "negative_prompt", "cfg", "hybrid", "commitment",
                 "coverage", "verdicts"):
        assert (res / f"{name}.nc").is_file(), name
    assert not (res / "taxonomy.nc").exists()
    grid = next((res / "image_grid").glob("*.nc"))
    from trajlab.report import load_results, render_report

    assert next(iter(load_results(res)["image_grid"].values()))["image"].dtype.name == "uint8", grid
    # re-rendering from the result files alone gives the same numbers
    render_report(res, tmp_path)
    assert (tmp_path / "tables.json").read_text() == (out / "report" / "tables.json").read_text()
    code = ("import sys, trajlab.report; bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers') "
            "or m.startswith('trajlab.models')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
