"""Every experiment config and prompt suite validates; every config runs (quick, offline, tiny models)."""
import pytest

from trajlab import store
from trajlab.experiments import configs as E

TINY = ["micro-sd=tiny-sd", "micro-lcm=tiny-lcm", "micro-lcm-lora=tiny-sd", "micro-pcm=tiny-sd", "micro-tlcm=tiny-sd",
        "micro-turbo=tiny-sd", "micro-dmd=tiny-sd"]  # SD pipelines where the micro model is one (TCD runs)
NAMES = E.list_experiments()


def test_the_required_experiments_exist():
    assert {"seed_table", "cfg_sweep", "step_consistency", "negative_prompt", "hybrid", "fine_detail",
            "composition"} <= set(NAMES)


def test_prompt_suites_cover_every_failure_mode():
    modes = {(e["category"], e["failure_mode"]) for p in sorted(E.PROMPTS_DIR.glob("*.toml"))
             for e in E.load_prompt_suite(p)}
    assert modes == {(c, m) for c, ms in E.CATEGORIES.items() for m in ms}
    assert E.suite_negative("negative_prompt")
    assert all("negative" in e for e in E.load_prompt_suite("negative_prompt"))
    assert [e["text"] for e in E.load_prompt_suite("micro")] == [f"a handwritten digit {d}" for d in range(10)]


@pytest.mark.parametrize("name", NAMES)
def test_config_validates_online_and_offline(name):
    exp = E.load_experiment(name)
    for offline in (False, True):
        plans, hplans, _ = E.build_plans(exp, offline=offline)
        assert plans or hplans
        models = {p.model for p in plans} | {h.extra["hybrid"]["student"] for h in hplans}
        if offline:
            assert all(m.startswith("micro-") for m in models), models
        else:  # online: the research plan's real systems (hub ids), each with a micro-world analogue
            from trajlab.models.registry import REAL_MODELS, SEED_SYSTEMS

            assert models <= {m.name for m in REAL_MODELS} and models <= set(SEED_SYSTEMS), models


def test_bad_configs_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "tiny-sd"\nprompts = ["x"]\nfoo = 1\n[experiment]\nkind = "seed_table"\n')
    with pytest.raises(E.ExperimentError, match="foo"):
        E.load_experiment(bad)
    bad.write_text('model = "tiny-sd"\nprompts = ["x"]\n[experiment]\nkind = "nonsense"\n')
    with pytest.raises(E.ExperimentError, match="kind"):
        E.load_experiment(bad)
    bad.write_text('prompts = ["x"]\n[experiment]\nkind = "hybrid"\n')
    with pytest.raises(E.ExperimentError, match="hybrid"):
        E.load_experiment(bad)


@pytest.mark.parametrize("name", NAMES)
def test_config_runs_quick_on_tiny_models(name, tmp_path, capsys):
    from trajlab.cli import main

    out = str(tmp_path / f"{name}.zarr")
    argv = ["experiment", name, "--out", out, "--offline", "--quick", "--quiet"]
    for m in TINY:
        argv += ["--map", m]
    assert main(argv) == 0
    store.validate(out)
    exp = E.load_experiment(name)
    plans, hplans, _ = E.build_plans(exp, offline=True, quick=True, model_map=dict(m.split("=") for m in TINY))
    names = store.group_names(out)
    assert len(names) == len(plans) + len(hplans)
    assert all(store.completed(out, g).all() for g in names)
    if exp.kind == "hybrid":
        assert any(g.startswith("hybrid__") for g in names)


def test_experiment_declares_verdict_margins(tmp_path):
    good = tmp_path / "g.toml"
    good.write_text('model = "tiny-sd"\nprompts = ["a"]\n[experiment]\nkind = "grid"\n'
                    '[experiment.verdicts.diversity_collapse]\nmargin = 0.2\n')
    assert E.load_experiment(good).verdicts == {"diversity_collapse": {"margin": 0.2}}
    bad = tmp_path / "b.toml"
    bad.write_text('model = "tiny-sd"\nprompts = ["a"]\n[experiment]\nkind = "grid"\n[experiment.verdicts.diversity]\n'
                   'margin = 0.2\n')
    with pytest.raises(E.ExperimentError, match="unknown failure mode"):
        E.load_experiment(bad)
