"""Experiment configs and prompt suites (data/prompts/*.toml) and experiment configs (data/experiments/*.toml).

An experiment config is a capture grid (the keys of ``trajlab capture --config``: top-level
defaults + ``[[run]]`` tables, list values expand) plus an ``[experiment]`` table::

    [experiment]
    name = "seed_table"            # defaults to the file stem
    kind = "seed_table"            # one of KINDS; "hybrid" adds hybrid groups from [experiment.hybrid]
    description = "..."
    offline = {teacher = "micro-sd", student = "micro-lcm", prompts_file = "micro.toml"}
    quick = {seeds = "0:2", n_prompts = 2}
    [experiment.hybrid]            # kind = "hybrid" only
    teacher = "sd15"; student = "lcm-lora-sd15"; handoff = [0, 5, 10, 20, 30]
    teacher_steps = 30; student_steps = 4; mechanism = "auto"

``offline``: model substitutions by name (``models = {sd15 = "micro-sd"}``) or by registry role
(``teacher``/``student``), and capture-key overrides (prompts_file, seeds, ...). Offline runs drop
the online height/width (the substitute's native size) unless ``offline`` sets them.
``quick``: overrides for smoke runs (``seeds``, ``n_prompts`` = keep the first n prompts, any
capture key, ``handoff``/``teacher_steps``/``student_steps`` for hybrids).
``prompts_file`` may name a prompt suite (``NAME.toml`` in data/prompts or beside the config) or a
text file (one prompt a line).
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from trajlab.experiments.plans import GRID_KEYS, SCALAR_KEYS, InputError, expand_cell, parse_seeds, plan_group, \
    preflight, read_prompts, run_plans
from trajlab.verdicts.catalogue import taxonomy

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS_DIR = REPO / "data" / "experiments"
CALIBRATION_FILE = REPO / "data" / "calibration" / "calibration.nc"
"""The shipped `trajlab calibrate` result the reports show beside their verdicts."""
PROMPTS_DIR = REPO / "data" / "prompts"

KINDS = ("seed_table", "cfg_sweep", "step_consistency", "negative_prompt", "hybrid", "fine_detail", "composition",
         "grid")
CATEGORIES = taxonomy()
"""The failure taxonomy prompt suites tag with: category -> failure modes (owned by
:func:`trajlab.verdicts.catalogue.taxonomy`)."""
EXPERIMENT_KEYS = {"name", "kind", "description", "offline", "quick", "hybrid", "verdicts"}
HYBRID_KEYS = {"teacher", "student", "handoff", "teacher_steps", "student_steps", "teacher_guidance",
               "student_guidance", "mechanism", "teacher_scheduler", "student_scheduler", "grid"}


class ExperimentError(InputError):
    """An experiment config or prompt suite is invalid (raised before any model loads)."""


# -- prompt suites ------------------------------------------------------------------------------
def _suite_path(name, base: Path | None = None) -> Path:
    p = Path(name)
    cands = [p] if p.is_absolute() else [PROMPTS_DIR / p, PROMPTS_DIR / f"{p}.toml"] + ([base / p] if base else []) + [p]
    for c in cands:
        if c.is_file():
            return c
    raise ExperimentError(f"prompt suite {name!r}: no such file (looked in {[str(c) for c in cands]})")


def load_prompt_suite(name, base: Path | None = None) -> list[dict]:
    """Entries ``{text, category, failure_mode[, negative]}`` of a suite (TOML) or a text file.

    Text files (one prompt a line) get category/failure_mode "untagged".
    """
    path = _suite_path(name, base)
    if path.suffix != ".toml":
        return [{"text": t, "category": "untagged", "failure_mode": "untagged"} for t in read_prompts(path)]
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"prompt suite {path}: malformed TOML: {exc}") from None
    entries = doc.get("prompt")
    if not isinstance(entries, list) or not entries:
        raise ExperimentError(f"prompt suite {path}: needs [[prompt]] tables with text, category, failure_mode")
    out = []
    for i, e in enumerate(entries):
        missing = {"text", "category", "failure_mode"} - set(e)
        if missing:
            raise ExperimentError(f"prompt suite {path}: entry {i} lacks {sorted(missing)}")
        if e["category"] not in CATEGORIES or e["failure_mode"] not in CATEGORIES[e["category"]]:
            raise ExperimentError(f"prompt suite {path}: entry {i} has category={e['category']!r}, "
                                  f"failure_mode={e['failure_mode']!r}; expected one of {CATEGORIES}")
        out.append({**e, "suite": doc.get("suite", path.stem)})
    return out


def suite_negative(name, base: Path | None = None) -> str | None:
    """The suite-wide ``negative`` of a TOML suite, or None."""
    path = _suite_path(name, base)
    return tomllib.loads(path.read_text()).get("negative") if path.suffix == ".toml" else None


def prompt_tags() -> dict[str, dict]:
    """prompt text -> its suite entry, over every suite in data/prompts (for tagging store prompts)."""
    tags = {}
    for p in sorted(PROMPTS_DIR.glob("*.toml")):
        for e in load_prompt_suite(p):
            tags.setdefault(e["text"], e)
    return tags


# -- experiment configs -------------------------------------------------------------------------
@dataclass
class Experiment:
    """A parsed experiment config; ``grid`` holds the capture keys (top-level + ``run`` list)."""

    name: str
    kind: str
    description: str
    path: Path
    grid: dict
    offline: dict = field(default_factory=dict)
    quick: dict = field(default_factory=dict)
    hybrid: dict | None = None
    verdicts: dict = field(default_factory=dict)
    """Pre-declared verdict settings: ``[experiment.verdicts.<failure mode>] margin = ...`` (the
    comparisons themselves are declared in :mod:`trajlab.verdicts.modes`, one file per mode)."""


def _check_verdicts(table, path) -> dict:
    from trajlab.verdicts.catalogue import CATALOGUE as SPECS

    if not isinstance(table, dict):
        raise ExperimentError(f"experiment {path}: [experiment.verdicts] must be a table of failure modes")
    for mode, v in table.items():
        if mode not in SPECS:
            raise ExperimentError(f"experiment {path}: verdicts.{mode}: unknown failure mode; expected one of "
                                  f"{sorted(SPECS)}")
        if not isinstance(v, dict) or set(v) - {"margin"} or not float(v.get("margin", 1)) > 0:
            raise ExperimentError(f"experiment {path}: verdicts.{mode} = {v!r}; expected {{margin = <number > 0>}}")
    return table


def store_margins(store) -> dict:
    """Verdict margins declared by the experiments a store's groups were captured for (merged)."""
    from trajlab import store as st

    margins = {}
    for g in st.group_names(store):
        extra = st.decode_attr(st.group_attrs(store, g).get("extra")) or {}
        name = extra.get("experiment") if isinstance(extra, dict) else None
        if name and name in list_experiments():
            margins.update(load_experiment(name).verdicts)
    return margins


def list_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))


def experiment_path(name_or_path) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    q = EXPERIMENTS_DIR / f"{name_or_path}.toml"
    if q.is_file():
        return q
    raise ExperimentError(f"experiment {name_or_path!r}: neither a file nor one of {list_experiments()} "
                          f"(in {EXPERIMENTS_DIR})")


def load_experiment(name_or_path) -> Experiment:
    """Parse and check an experiment config (keys, kind, hybrid table); no model is touched."""
    path = experiment_path(name_or_path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"experiment {path}: malformed TOML: {exc}") from None
    meta = doc.pop("experiment", None)
    if not isinstance(meta, dict):
        raise ExperimentError(f"experiment {path}: needs an [experiment] table (name, kind, description)")
    unknown = set(meta) - EXPERIMENT_KEYS
    if unknown:
        raise ExperimentError(f"experiment {path}: unknown [experiment] keys {sorted(unknown)}; "
                              f"allowed {sorted(EXPERIMENT_KEYS)}")
    kind = meta.get("kind", "grid")
    if kind not in KINDS:
        raise ExperimentError(f"experiment {path}: kind={kind!r}; expected one of {KINDS}")
    allowed = set(GRID_KEYS) | set(SCALAR_KEYS)
    runs = doc.get("run", [])
    bad = (set(doc) - allowed - {"run"}) | {k for r in runs for k in r if k not in allowed}
    if bad:
        raise ExperimentError(f"experiment {path}: unknown capture keys {sorted(bad)}; allowed {sorted(allowed)}")
    hybrid = meta.get("hybrid")
    if kind == "hybrid":
        if not isinstance(hybrid, dict):
            raise ExperimentError(f"experiment {path}: kind 'hybrid' needs an [experiment.hybrid] table")
        bad = set(hybrid) - HYBRID_KEYS
        students = hybrid.get("student")
        if isinstance(students, list) and (not students or not all(isinstance(x, str) for x in students)):
            raise ExperimentError(f"experiment {path}: [experiment.hybrid] student = {students!r}: expected a model "
                                  "name or a non-empty list of names")
        if bad or not {"teacher", "student", "handoff"} <= set(hybrid):
            raise ExperimentError(f"experiment {path}: [experiment.hybrid] needs teacher, student, handoff; "
                                  f"unknown keys {sorted(bad)}; allowed {sorted(HYBRID_KEYS)}")
    elif hybrid is not None:
        raise ExperimentError(f"experiment {path}: [experiment.hybrid] given but kind={kind!r} (use kind='hybrid')")
    for table in ("offline", "quick"):
        if not isinstance(meta.get(table, {}), dict):
            raise ExperimentError(f"experiment {path}: experiment.{table} must be a table")
    if not runs and "model" not in doc and kind != "hybrid":
        raise ExperimentError(f"experiment {path}: no model: give 'model' or [[run]] tables")
    return Experiment(name=meta.get("name", path.stem), kind=kind, description=meta.get("description", ""),
                      path=path, grid=doc, offline=dict(meta.get("offline", {})), quick=dict(meta.get("quick", {})),
                      hybrid=hybrid, verdicts=_check_verdicts(meta.get("verdicts", {}), path))


def _model_mapper(offline: dict | None, model_map: dict | None):
    from trajlab.models.registry import get

    models = dict((offline or {}).get("models", {}))
    roles = {r: offline[r] for r in ("teacher", "student") if offline and r in offline}

    def mapped(name):
        if offline is not None:
            if name in models:
                name = models[name]
            else:
                spec = get(name)
                if spec is not None and spec.role in roles:
                    name = roles[spec.role]
        return (model_map or {}).get(name, name)

    return mapped


def _prompts_of(cell: dict, base: Path) -> list[str]:
    if cell.get("prompts"):
        return list(cell["prompts"])
    if "prompts_file" in cell:
        return [e["text"] for e in load_prompt_suite(cell["prompts_file"], base)]
    raise ExperimentError("a run has neither 'prompts' nor 'prompts_file'")


def _overlay(exp: Experiment, offline: bool, quick: bool) -> tuple[dict, list[dict], dict | None]:
    doc = copy.deepcopy(exp.grid)
    runs = doc.pop("run", None) or [{}]
    hybrid = copy.deepcopy(exp.hybrid)
    layers = []
    if offline:
        o = {k: v for k, v in exp.offline.items() if k not in ("models", "teacher", "student", "hybrid")}
        for side in ("height", "width"):
            doc.pop(side, None)
            for r in runs:
                r.pop(side, None)
        layers.append(o)
        if hybrid is not None:
            hybrid.update(exp.offline.get("hybrid", {}))
    if quick:
        layers.append({k: v for k, v in exp.quick.items() if k != "n_prompts"})
    hybrid_keys = HYBRID_KEYS - {"teacher", "student"}
    for layer in layers:
        for k, v in layer.items():
            if k in hybrid_keys:
                if hybrid is not None:
                    hybrid[k] = v
                continue
            doc[k] = v
            for r in runs:
                r.pop(k, None)
                if k == "prompts_file":
                    r.pop("prompts", None)
                if k == "prompts":
                    r.pop("prompts_file", None)
            if k == "prompts_file":
                doc.pop("prompts", None)
            if k == "prompts":
                doc.pop("prompts_file", None)
    return doc, runs, hybrid


def build_plans(exp: Experiment, *, offline: bool = False, quick: bool = False, seeds=None,
                model_map: dict | None = None, device: str | None = None, schedulers=None):
    """(grid plans, hybrid plans, notes) of an experiment.

    offline: apply ``experiment.offline``; quick: apply ``experiment.quick``; seeds: override
    (``"0:8"`` or a list); model_map: final name substitutions (e.g. micro-* -> tiny-*);
    schedulers: ``f(model) -> (teacher-side base scheduler config)`` for hybrid grids (default:
    the tiny SD config, which micro and SD1.5 share). Plans that map to the same group are kept
    once; runs an LCM pipeline cannot honour (a negative prompt) are dropped with a note.
    """
    from trajlab.capture.plan import PlanError
    from trajlab.models.registry import get

    mapped = _model_mapper(exp.offline if offline else None, model_map)
    doc, runs, hybrid = _overlay(exp, offline, quick)
    n_prompts = exp.quick.get("n_prompts") if quick else None
    base = exp.path.parent
    notes: list[str] = []

    def skip(model, neg):
        spec = get(model)
        if neg and spec is not None and spec.pipeline == "LatentConsistencyModelPipeline":
            return (f"skipped {model} with negative prompt {neg!r}: LCM pipelines guide through a "
                    "w-embedding and ignore negative prompts by construction")
        return None

    plans, seen = [], set()
    try:
        for r in runs if exp.kind != "hybrid" or exp.grid.get("run") or "model" in exp.grid else []:
            cell = {**doc, **r}
            if "model" not in cell:
                raise ExperimentError(f"experiment {exp.path}: every run needs a 'model'")
            prompts = _prompts_of(cell, base)[: n_prompts or None]
            sd = parse_seeds(seeds if seeds is not None else cell.get("seeds", "0:4"))
            for plan in expand_cell(cell, prompts=prompts, seeds=sd, mapped=mapped, device=device, skip=skip,
                                    notes=notes):
                plan.extra["experiment"] = exp.name
                g = plan.group_name()
                if g in seen:
                    notes.append(f"dropped a duplicate of group {g} (models mapped onto the same one)")
                    continue
                seen.add(g)
                plans.append(plan)
        hplans = []
        if hybrid is not None:
            for plan in _hybrid_plans(exp, hybrid, doc, mapped, seeds, n_prompts, device, schedulers):
                g = plan.extra["group"]
                if g in seen:
                    notes.append(f"dropped a duplicate of group {g} (models mapped onto the same one)")
                    continue
                seen.add(g)
                hplans.append(plan)
    except InputError as exc:
        if isinstance(exc, ExperimentError):
            raise
        raise ExperimentError(f"experiment {exp.path}: {exc}") from None
    for p in plans + hplans:
        try:
            p.validate()
        except PlanError as exc:
            raise ExperimentError(f"experiment {exp.path}: {exc}") from None
    return plans, hplans, list(dict.fromkeys(notes))


def resolve_mechanism(teacher: str, student: str, mechanism: str = "auto") -> str:
    """``lora`` when the student is the teacher's base + LoRA(s), else ``pipelines`` (for ``auto``)."""
    from trajlab.models.registry import get

    if mechanism != "auto":
        return mechanism
    t, s = get(teacher), get(student)
    if t is not None and s is not None and s.loras and not t.loras and s.source == t.source:
        return "lora"
    return "pipelines"


def _hybrid_plans(exp, h, doc, mapped, seeds, n_prompts, device, schedulers):
    """Hybrid plans of ``[experiment.hybrid]``: one hand-off sweep per student (``student`` is a name or a
    list of names)."""
    students = h["student"] if isinstance(h["student"], list) else [h["student"]]
    out = []
    for student in students:
        out += _hybrid_plans_of(exp, h, doc, mapped(h["teacher"]), mapped(student), seeds, n_prompts, device,
                                schedulers)
    return out


def _hybrid_plans_of(exp, h, doc, teacher, student, seeds, n_prompts, device, schedulers):
    """The hand-off sweep of one (teacher, student) pair; the student's steps, guidance and scheduler are its
    registry recommendation unless the table sets them."""
    from trajlab.experiments.hybrid_plans import hybrid_plan
    from trajlab.models.hybrid import HybridSpec
    from trajlab.models.registry import get

    ts, ss = get(teacher), get(student)
    prompts = _prompts_of(doc, exp.path.parent)[: n_prompts or None]
    sd = parse_seeds(seeds if seeds is not None else doc.get("seeds", "0:4"))
    mech = resolve_mechanism(teacher, student, h.get("mechanism", "auto"))
    s_steps = int(h.get("student_steps", ss.steps if ss else 4))
    s_sched = h.get("student_scheduler", ss.scheduler if ss else "lcm")
    if h.get("grid", "teacher") not in ("teacher", "student"):
        raise ExperimentError(f"experiment {exp.path}: [experiment.hybrid] grid = {h['grid']!r}; expected 'teacher' "
                              "(the teacher's first k of its own steps) or 'student' (the first k of the student's)")
    paper = h.get("grid") == "student"  # Gandikota & Bau: the teacher runs the first k of the student's own steps
    t_steps = s_steps if paper else int(h.get("teacher_steps", ts.steps if ts else 30))
    out = []
    for k in sorted({min(int(k), t_steps) for k in h["handoff"]}):
        spec = HybridSpec(teacher=teacher, student=student, handoff_step=k, teacher_steps=t_steps,
                          student_steps=s_steps,
                          teacher_guidance=float(h.get("teacher_guidance", ts.guidance if ts else 7.5)),
                          student_guidance=float(h.get("student_guidance", ss.guidance if ss else 1.0)),
                          teacher_scheduler=s_sched if paper else h.get("teacher_scheduler",
                                                                         ts.scheduler if ts else "ddim"),
                          student_scheduler=s_sched, mechanism=mech)
        try:
            spec.validate()
        except ValueError as exc:
            raise ExperimentError(f"experiment {exp.path}: {exc}") from None
        tsched = ssched = None
        if schedulers is not None:
            tsched, ssched = schedulers(spec)
        plan = hybrid_plan(spec, prompts, sd, teacher_sched=tsched, student_sched=ssched,
                           height=doc.get("height"), width=doc.get("width"), dtype=doc.get("dtype", "fp32"),
                           device=device or doc.get("device", "cpu"), images=doc.get("images", True),
                           batch_size=doc.get("batch_size", 8))
        plan.extra["experiment"] = exp.name
        out.append(plan)
    return out


def validate_experiment(name_or_path, *, offline: bool = False, quick: bool = False, model_map=None) -> Experiment:
    """Load + expand (no model loads); raises :class:`ExperimentError` on any problem."""
    exp = load_experiment(name_or_path)
    plans, hplans, _ = build_plans(exp, offline=offline, quick=quick, model_map=model_map)
    if not plans and not hplans:
        raise ExperimentError(f"experiment {exp.path}: expands to no runs")
    return exp


def run_experiment(exp: Experiment, out: str, *, offline: bool = False, quick: bool = False, seeds=None,
                   model_map: dict | None = None, device: str | None = None, progress: bool = True,
                   cache=None, shard=None) -> dict:
    """Preflight every plan, then capture the grid and the hybrid groups (:func:`plans.run_plans`).

    ``shard``: ``"I/N"`` captures only this shard's sample blocks of every group.
    Returns {"groups": [...], "notes": [...]}.
    """
    plans, hplans, notes = build_plans(exp, offline=offline, quick=quick, seeds=seeds, model_map=model_map,
                                       device=device)
    for n in notes:
        print(f"note: {n}")
    preflight(plans + hplans, out)
    run_plans(plans + hplans, out, progress=progress, cache=cache, shard=shard)
    return {"groups": [plan_group(p) for p in plans + hplans], "notes": notes}


__all__ = ["CATEGORIES", "EXPERIMENTS_DIR", "Experiment", "ExperimentError", "KINDS", "PROMPTS_DIR", "build_plans",
           "list_experiments", "load_experiment", "load_prompt_suite", "prompt_tags", "resolve_mechanism",
           "run_experiment", "suite_negative", "validate_experiment"]
