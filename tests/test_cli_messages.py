"""What the CLI says (issue 19 item 6): a missing checkpoint for an experiment that has micro-world
substitutes suggests ``--offline`` in one line before any heavy import; help gives each flag one default;
Ctrl-C says only what exists (a new store interrupted during the model load has nothing to keep)."""

import argparse
import sys
from pathlib import Path

import pytest

from trajlab import store
from trajlab.cli import build_parser, main

sys.path.insert(0, str(Path(__file__).parent))
from test_store import _allocate  # noqa: E402

TINY = ["capture", "--model", "tiny-sd", "--steps", "3", "--height", "32", "--width", "32", "--quiet",
        "--prompt", "a cat", "--no-images", "--batch-size", "4"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_an_online_experiment_without_its_checkpoints_suggests_offline_in_one_line(tmp_path, capsys, monkeypatch):
    import trajlab.experiments.configs as configs
    import trajlab.models.loading as loading

    def missing(name, loras=()):
        raise loading.ModelNotAvailable(f"model {name!r} is not available offline: looked in the Hugging Face cache "
                                        "/nowhere and found no snapshot. On a machine with internet run ...")

    def no_plans(*a, **k):
        raise AssertionError("plans were built (torch, diffusers imported) before the refusal")

    monkeypatch.setattr(loading, "check_available", missing)
    monkeypatch.setattr(configs, "build_plans", no_plans)
    out = tmp_path / "h.zarr"
    assert main(["experiment", "hybrid", "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert err.startswith("trajlab: error: experiment hybrid needs checkpoints that are not here: add --offline to "
                          "run it on its micro-world substitutes (trajlab experiment hybrid --offline --out "
                          f"{out}), or fetch them: model "), err
    assert "is not available offline" in err and not out.exists()


def test_an_online_experiment_with_its_checkpoints_is_not_told_to_go_offline(tmp_path, capsys, monkeypatch):
    import trajlab.experiments.configs as configs
    import trajlab.models.loading as loading

    seen = []
    monkeypatch.setattr(loading, "check_available", lambda name, loras=(): seen.append(name))

    class Built(Exception):
        pass

    def built(*a, **k):
        raise Built

    monkeypatch.setattr(configs, "build_plans", built)
    with pytest.raises(Built):
        main(["experiment", "hybrid", "--out", str(tmp_path / "h.zarr")])
    assert "sd15" in seen and "lcm-lora-sd15" in seen


def _parsers():
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return [("trajlab", ap), *sub.choices.items()]


def test_help_gives_each_flag_one_default():
    for name, parser in _parsers():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help is None:
                continue
            text = formatter._expand_help(action)
            assert text.count("(default") <= 1, (name, action.option_strings, text)
            assert "(default: None)" not in text and "(default: False)" not in text, (name, text)
        full = parser.format_help()
        assert "(default: None)" not in full and "(default: False)" not in full, name
    capture = " ".join(dict(_parsers())["capture"].format_help().split())
    assert "(default: 0:4)" in capture and "(default: fp32)" in capture  # a value default is still said once
    assert "(default 1, or $TRAJLAB_THREADS)" in capture


def test_ctrl_c_during_the_model_load_of_a_new_store_says_nothing_was_written(tmp_path, capsys, monkeypatch):
    import trajlab.experiments.plans as P

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "plan_pipeline", interrupted)
    out = tmp_path / "s.zarr"
    assert main([*TINY, "--seeds", "0:4", "--out", str(out)]) == 130
    err = _one_line(capsys)
    assert f"interrupted before anything was written (no store at {out})" in err, err
    assert "keeps" not in err and "complete sample" not in err


def test_ctrl_c_into_an_existing_store_says_what_it_keeps(tmp_path, capsys, monkeypatch):
    import trajlab.experiments.plans as P

    out = tmp_path / "s.zarr"
    assert main([*TINY, "--seeds", "0:4", "--out", str(out)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(P, "plan_pipeline", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main([*TINY, "--seeds", "0:8", "--out", str(out)]) == 130
    err = _one_line(capsys)
    assert f"interrupted: {out} keeps its 4 complete sample(s) in 1 group(s); re-run the same command to resume" \
        in err, err


def test_ctrl_c_during_a_report_says_what_exists(tmp_path, capsys, monkeypatch):
    import trajlab.experiments.reporting as reporting

    path = tmp_path / "s.zarr"
    _allocate(path)
    store.mark_complete(path, "g", 0, 1)
    monkeypatch.setattr(reporting, "report_store", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "report"
    assert main(["report", str(path), "--out", str(out)]) == 130
    err = _one_line(capsys)
    assert err == f"interrupted before anything was written to {out}", err
    out.mkdir()
    assert main(["report", str(path), "--out", str(out)]) == 130
    assert _one_line(capsys) == f"interrupted: {out} may be incomplete; re-run the same command to write it"
