"""The demo's design on the shapes world (what `make demo` runs): every group the issue names is there, matched for
the comparisons that read it, and nothing is captured twice; the world choice is checked before any work."""

import pytest

from trajlab.experiments import shapes_demo as SD
from trajlab.worlds import world_path

pytestmark = pytest.mark.skipif(not world_path("shapes/shapes-sd").exists(), reason="shapes world not shipped")


@pytest.fixture(scope="module")
def design():
    return SD.shapes_design()


def _key(p):
    h = p.extra.get("hybrid") or {}
    return (p.model, p.scheduler, p.steps, p.guidance, p.negative_prompt, tuple(p.prompts), tuple(p.seeds),
            h.get("student"), h.get("handoff_step"))


def test_the_study_groups_are_the_teacher_lcm_steps_and_the_teacher_family(design):
    plain = [p for p in design.plans]
    teacher = plain[0]
    assert (teacher.model, teacher.scheduler, teacher.steps) == ("shapes-sd", "ddim", 30)
    assert sorted(p.steps for p in plain if p.model == "shapes-lcm") == [1, 2, 4, 8]
    family = [p for p in plain if p.extra["experiment"] == "demo-family"]
    assert sorted(p.steps for p in family) == [1, 2, 4, 8] and {p.model for p in family} == {"shapes-sd"}
    assert design.prompts == SD.shapes_prompts(demo=True) and len(design.prompts) == 22 and design.seeds == list(range(16))
    assert all(p.prompts == design.prompts and p.seeds == design.seeds for p in plain)


def test_every_student_and_both_ablations_run_on_the_studys_prompts_and_seeds(design):
    from trajlab.models.registry import registry

    students = {p.model for p in design.cplans if p.extra["experiment"] == "distilling_diversity"}
    shipped = {n for n, s in registry().items() if n.startswith("shapes-") and s.role == "student"} - {"shapes-lcm"}
    assert students == shipped
    for recipe, ablation in SD.ABLATIONS:
        a, b = [p for p in design.cplans if p.model in (recipe, ablation)]
        assert a.prompts == b.prompts == design.prompts and a.seeds == b.seeds == design.seeds
    hybrids = [p.extra["hybrid"] for p in design.hplans if p.extra["experiment"] == "distilling_diversity"]
    assert {h["student"] for h in hybrids} == {"shapes-turbo", "shapes-dmd2", "shapes-lcm-lora"}
    assert max(h["handoff_step"] for h in hybrids) == SD.MAX_HANDOFF and min(h["handoff_step"] for h in hybrids) == 0


def test_controls_pair_teacher_and_student_at_matched_guidance_on_texture_free_prompts(design):
    ctrl = [p for p in design.cplans if p.extra["experiment"] == "demo-control"]
    assert all(SD.leaves_texture_out(t) for p in ctrl for t in p.prompts)
    for model in ("shapes-sd", SD.CONTROL_STUDENT):
        plain = {p.guidance for p in ctrl if p.model == model and not p.negative_prompt and p.scheduler != "tcd"}
        neg = {p.guidance for p in ctrl if p.model == model and p.negative_prompt == SD.NEGATIVE}
        assert max(plain) > 4 and neg == set(SD.NEGATIVE_GUIDANCE)
        # the plain group at the negative's guidance: the student's own sweep, the teacher's study group (guidance 4)
        assert neg <= plain | ({design.plans[0].guidance} if model == "shapes-sd" else set())
    assert {p.scheduler for p in ctrl if p.model == SD.CONTROL_STUDENT} == {"lcm", "tcd"}  # the re-injection control
    keys = [_key(p) for p in design.plans + design.cplans + design.hplans]
    assert len(keys) == len(set(keys))  # nothing captured twice


def test_quick_design_spans_every_kind_of_prompt():
    d = SD.shapes_design(quick=True)
    from trajlab.worlds.shapes.world import parse

    kinds = {(len(parse(t)["objects"]), SD.leaves_texture_out(t)) for t in d.prompts}
    assert {(1, False), (2, False), (1, True), (2, True)} <= kinds and d.seeds == list(range(4))


def test_an_unknown_world_is_refused_before_any_work(tmp_path):
    from trajlab.experiments.demo import run_demo

    with pytest.raises(ValueError, match="world='digits'"):
        run_demo(tmp_path / "d", world="digits")
    assert not (tmp_path / "d").exists()


def test_the_cli_offers_both_worlds_and_defaults_to_shapes():
    from trajlab.cli import build_parser

    a = build_parser().parse_args(["demo", "--out", "x"])
    assert a.world == "shapes"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--out", "x", "--world", "digits"])


def test_the_demo_runs_the_worlds_declared_ablations():
    from trajlab.worlds.shapes.students import ABLATIONS, RECIPES

    assert SD.ABLATIONS == ABLATIONS
    for recipe, ablation in ABLATIONS:
        assert RECIPES[ablation.removeprefix("shapes-")]["paper"].startswith("ablation of")
        assert recipe.removeprefix("shapes-") in RECIPES


def test_quick_shapes_demo_end_to_end(tmp_path):
    """`trajlab demo --world shapes --quick` at a reduced size: the store holds the study, students, hybrids and
    controls; the report's verdicts have the shapes rows (judge-read, with estimates) and the Distilling-Diversity
    table compares each ablation with its recipe."""
    import json

    from trajlab import store
    from trajlab.experiments.demo import run_demo

    out = tmp_path / "d"
    kw = dict(quick=True, teacher_steps=6, n_prompts=8, n_seeds=8)  # 8 seeds: the verdicts' smallest design
    path = run_demo(out, world="shapes", progress=False, mechanistic=False, **kw)
    assert path.is_file()
    d = SD.shapes_design(**kw)
    assert len(store.group_names(out / "study.zarr")) == len(d.plans + d.cplans + d.hplans)
    tables = json.loads((out / "report" / "tables.json").read_text())
    rows = [v for v in tables["verdicts"] if v["candidate"] == "shapes-lcm, 4 steps"]
    decided = {v["mode"] for v in rows if v["decision"] != "not applicable"}
    assert {"alignment_loss", "compositional_fragility", "texture_loss", "canonical_bias_prior"} <= decided, rows
    kinds = tables["distilling"]["data_vars"]["kind"]["data"]
    assert kinds.count("ablation") == 2 and "student" in kinds and "hybrid" in kinds
    # another design into the same folder is refused before anything loads (the report would mix the two)
    from trajlab.experiments.plans import InputError

    with pytest.raises(InputError, match="another demo"):
        run_demo(out, world="shapes", quick=True, teacher_steps=6, n_prompts=4, n_seeds=8, progress=False)
