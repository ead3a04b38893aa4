"""The demo (quick, tiny models) captures a study store and builds a report with every section."""
import json
import re

import pytest

from trajlab import store
from trajlab.report import SECTIONS


@pytest.fixture(scope="module")
def demo(tiny_demo):
    """(output directory, index.html) of the quick tiny demo (conftest.tiny_demo, shared with the browser test)."""
    return tiny_demo


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
    assert f"data-section='{SECTIONS[0]}'>Answer" in text
    for s in SECTIONS[1:]:
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
    attn = text.split(">Cross-attention maps</h2>")[1].split("<h2")[0]  # the teacher's token heat maps
    assert "_attention_maps.png'" in attn and "_attention_word_mass.png'" in attn and "tiny-sd, 8 steps" in attn
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


@pytest.fixture(scope="module")
def rerendered(demo, tmp_path_factory):
    """The demo's result files rendered again into a fresh directory (one rendering shared by the two tests that
    need one), every figure's text extent checked before it is saved: (directory, {figure name: what is drawn
    outside its area}, [figure names])."""
    from trajlab.plots._style import text_outside
    from trajlab.report import blocks, render_report

    out, _ = demo
    cut, seen = {}, []
    save = blocks.Figures.__call__

    def check(self, fig, name, caption="", groups=()):
        seen.append(name)
        bad = text_outside(fig)
        if bad:
            cut[name] = bad
        return save(self, fig, name, caption, groups)

    d = tmp_path_factory.mktemp("rerendered")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(blocks.Figures, "__call__", check)
        render_report(out / "report" / "results", d)
    return d, cut, seen


def test_results_are_datasets_and_the_report_only_renders(demo, rerendered):
    import subprocess
    import sys

    out, _ = demo
    res = out / "report" / "results"
    for name in ("groups", "metrics", "step_consistency", "negative_prompt", "cfg", "hybrid", "commitment",
                 "coverage", "verdicts"):
        assert (res / f"{name}.nc").is_file(), name
    assert not (res / "taxonomy.nc").exists()
    grid = next((res / "image_grid").glob("*.nc"))
    from trajlab.report import load_results

    assert next(iter(load_results(res)["image_grid"].values()))["image"].dtype.name == "uint8", grid
    # re-rendering from the result files alone gives the same numbers
    assert (rerendered[0] / "tables.json").read_text() == (out / "report" / "tables.json").read_text()
    code = ("import sys, trajlab.report; bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers') "
            "or m.startswith('trajlab.models')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- answer first, labels, figures ----------------------------------------------------------------
def _row(mode, est, lo, hi, *, kind="log_ratio", direction="decrease", margin=0.05, decision="supported",
         cand="micro-turbo, 2 steps", group="micro-turbo__g", ref_group="teacher__g", n=(10, 16)):
    return {"mode": mode, "estimate": est, "ci_low": lo, "ci_high": hi, "effect_kind": kind, "direction": direction,
            "margin": margin, "decision": decision, "candidate": cand, "candidate_group": group,
            "reference": "micro-sd, 30 steps", "reference_group": ref_group, "metric": "m", "n_prompts": n[0],
            "n_per_prompt": n[1]}


def test_headline_sentences_rank_supported_failures_with_effect_ci_and_n():
    """A log ratio reads as a percentage via exp(), a difference of fractions in percentage points; findings
    rank by effect in margin units, students by their largest finding; the other decisions are counted."""
    import math

    from trajlab.report.headline import counts_text, headline

    rows = [_row("diversity_collapse", math.log(0.37), math.log(0.34), math.log(0.40)),
            _row("canonical_bias", 0.041, 0.020, 0.063, kind="difference", direction="increase"),
            _row("fine_detail", -0.01, -0.02, 0.0, decision="refuted", margin=0.1),
            _row("mode_dropping", -0.02, -0.1, 0.05, kind="difference", decision="inconclusive", margin=0.03,
                 cand="micro-lcm, 4 steps", group="micro-lcm__g"),
            _row("early_commitment", 0.0, 0.0, 0.0, decision="not applicable", cand="micro-lcm, 1 step",
                 group="micro-lcm__g1")]
    hl = headline(rows, {"micro-turbo__g": "micro-turbo", "micro-lcm__g": "micro-lcm", "micro-lcm__g1": "micro-lcm"},
                  teacher="teacher__g")
    turbo, lcm = hl["students"]
    assert turbo["student"] == "micro-turbo" and [f["mode"] for f in turbo["findings"]] == \
        ["diversity_collapse", "canonical_bias"]
    assert turbo["findings"][0]["sentence"] == ("micro-turbo, 2 steps: 63% less diverse than the teacher "
                                                "(95% CI 60-66%), 160 matched pairs.")
    assert turbo["findings"][1]["sentence"] == ("micro-turbo, 2 steps: 4.1 percentage points more samples in a "
                                                "prompt's most common mode than the teacher (95% CI 2-6.3 pp), "
                                                "160 matched pairs.")
    assert turbo["counts"]["refuted"] == 1 and not lcm["findings"]
    assert lcm["counts"] == {"supported": 0, "refuted": 0, "inconclusive": 1, "not applicable": 1}
    assert counts_text(hl["counts"]) == "2 supported, 1 refuted, 1 inconclusive, 1 not applicable"


def test_labels_are_human_unique_and_name_hybrids():
    import xarray as xr

    from trajlab.report.labels import group_info, label_of

    names = ["micro-sd__ddim__30steps__cfg4__none__aa", "micro-turbo__euler__2steps__cfg0__none__bb",
             "micro-lcm-lora__lcm__4steps__cfg1__none__cc", "micro-lcm-lora__lcm__4steps__cfg1__none__dd",
             "micro-lcm-lora__tcd__4steps__cfg1__none__cc", "micro-lcm-lora__lcm__2steps__cfg1__none__cc",
             "hybrid__micro-sd__to__micro-turbo__k01of2__s2__cfg4-0"]
    col = {"model": ["micro-sd", "micro-turbo", "micro-lcm-lora", "micro-lcm-lora", "micro-lcm-lora", "micro-lcm-lora",
                     "micro-sd"],
           "scheduler": ["DDIMScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler", "LCMScheduler",
                         "TCDScheduler", "LCMScheduler", "Switch"],
           "steps": ["30", "2", "4", "4", "4", "2", "2"], "guidance": ["4.0", "0.0", "1.0", "1.0", "1.0", "1.0", "4.0"],
           "negative_prompt": [""] * 7, "role": ["teacher", "student", "student", "student", "student", "student", "hybrid"],
           "label": ["x"] * 7}
    info = group_info(xr.Dataset({k: ("group", v) for k, v in col.items()}, coords={"group": names}))
    labels = [info[n]["label"] for n in names]
    assert labels[:3] == ["micro-sd, 30 steps", "micro-turbo, 2 steps", "micro-lcm-lora LCM, 4 steps (cc)"]
    assert labels[4] == "micro-lcm-lora TCD, 4 steps" and len(set(labels)) == len(labels)
    assert labels[6] == "micro-sd → micro-turbo, k = 1 of 2" and info[names[6]]["family"] == "micro-turbo"
    assert info[names[1]]["sampler"] == "Euler-A"
    assert label_of(f"{names[5]} / {names[2]}", info) == "micro-lcm-lora LCM, 2/4 steps"


def test_report_answers_first_and_names_both_commitment_estimators(demo, capsys):
    """The page opens with the answer (before any other section), the verdict table is the next section, the
    technical notes close it; the commitment section names both estimators, the early-commitment verdict's
    as x0-mode stability; the terminal summary ends with the same headline and the report's file:// link."""
    from trajlab.experiments.demo import print_summary
    from trajlab.verdicts.modes.early_commitment import ESTIMATOR

    out, path = demo
    text = path.read_text()
    body = text.split("<body>", 1)[1].lstrip()
    assert body.startswith("<section id='Answer'>") and "<h1 data-section='Answer'>Answer" in body[:200]
    assert body.index("id='Answer'") < body.index("<h2") == body.index("<h2 id='Verdicts'")
    assert text.rindex("<h2") == text.index("<h2 id='Technical-notes'")
    tables = json.loads((out / "report" / "tables.json").read_text())
    hl = tables["headline"]
    assert hl["n_comparisons"] == len(tables["verdicts"]) and hl["students"] and hl["counts_text"]
    assert all(r["student"] and r["change"] for r in tables["verdicts"])
    commit = text.split(">Commitment</h2>")[1].split("<h2")[0]
    assert "labeller stability" in commit and "x0-mode stability" in commit
    assert ESTIMATOR.startswith("x0-mode stability")
    print_summary(out / "report", 1.0)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"report: {(out / 'report' / 'index.html').resolve().as_uri()}"
    assert any(line.startswith(f"All {hl['n_comparisons']} comparisons: ") for line in lines)


def test_no_figure_text_is_cut(rerendered):
    """Every figure of the report keeps its titles, labels, tick labels and legends inside its own area
    (checked on the matplotlib figure before it is saved, in the rerendered fixture; the PNG is also saved with
    a tight box)."""
    d, cut, seen = rerendered
    assert len(seen) >= 5 and not cut, cut
    pngs = [p.name for p in d.glob("*.png")]
    assert all(any(p.endswith(f"_{name}.png") for p in pngs) for name in seen)  # the checked figures were saved


def test_mechanistic_helper_process_writes_what_this_process_would(demo, tmp_path):
    """The demo computes its mechanistic analyses in a second process while the report runs: the Jacobian
    contraction files that process wrote (the demo's analyses folder) equal the ones this process computes with the
    demo's settings (same functions, seeds, thread count); the covariance files are there too. (The Jacobian only:
    the tiny pipelines' covariance costs a minute more and goes through the same process boundary.)"""
    import xarray as xr

    from trajlab.analysis.mechanistic import jacobian_results
    from trajlab.experiments.demo import QUICK_JACOBIAN

    out, _ = demo
    there = out / "analyses"
    jacobian_results(str(out / "study.zarr"), tmp_path / "here", models=("tiny-sd", "tiny-lcm"),
                     experiments=("demo", "distilling_diversity"), **QUICK_JACOBIAN)
    here = sorted(p.relative_to(tmp_path / "here") for p in (tmp_path / "here").rglob("*.nc"))
    assert here and here == sorted(p.relative_to(there) for p in there.rglob("*_contraction.nc"))
    assert len(list(there.glob("*_covariance.nc"))) == 3
    for rel in here:
        with xr.open_dataset(tmp_path / "here" / rel) as a, xr.open_dataset(there / rel) as b:
            xr.testing.assert_identical(a.load(), b.load())


def test_mechanistic_helper_failure_names_its_log(tmp_path):
    from trajlab.experiments.demo import MechanisticHelper

    helper = MechanisticHelper(str(tmp_path / "absent.zarr"), tmp_path / "a", tmp_path / "a.log",
                               dict(teacher="tiny-sd", student="tiny-lcm", quick=True, n_prompts=2, seeds=[0]))
    with pytest.raises(RuntimeError, match=r"mechanistic analyses failed \(exit 1\); end of .*a\.log"):
        helper.wait()
