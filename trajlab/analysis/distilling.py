"""The Distilling-Diversity study (Gandikota & Bau, "Distilling Diversity and Control in Diffusion Models"),
asked of a store with the verdict engine: pre-declared, matched comparisons against the reference teacher.

1. Does each distilled student lose diversity? ``diversity_collapse`` per student: mean pairwise distance
   within a prompt (micro-LPIPS on micro stores, else the pixel substitute; :func:`trajlab.verdicts.reference.diversity_distance`),
   log ratio student / teacher, seeds crossed with prompts and paired (the diversity_collapse mode's statistic).
2. Does the hybrid (teacher for the first k steps, student after) restore it, and from which k? The same
   comparison for every hybrid group, plus the accuracy cost (prompted-digit accuracy, difference), both
   against the hand-off k and against compute (UNet evaluations per sample: a CFG step costs 2).
   ``collapse_unsupported_from_k`` per (teacher, student) pair: the smallest k from which no larger k has
   diversity collapse supported (an absence of evidence, not a restoration), beside ``equivalent_from_k``: the
   smallest k from which every larger k is refuted within the margin (shown equivalent to the teacher).
3. When does each model commit? The taxonomy's ``early_commitment`` rows (shared sigma levels) and the
   report's x0 filmstrips answer it; this module does not duplicate them.

All comparisons of the study are one family for the Holm correction (a family of its own, declared here,
apart from the store taxonomy's).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from trajlab.analysis import sweeps as S
from trajlab.analysis.mechanistic import experiment_of
from trajlab.verdicts.engine import Comparison, PromptStat, decide, evaluate
from trajlab.verdicts.matching import matched, pair_infos
from trajlab.verdicts.mode import Context
from trajlab.verdicts.modes import diversity_collapse
from trajlab.verdicts.reference import diversity_distance

ACCURACY = ("prompted-digit accuracy (labeller)", "decrease", "difference", 0.05)
"""metric, direction, effect, margin of the accuracy cost of a student or hybrid."""
JUDGE_ACCURACY = "prompt accuracy (attribute judge: every stated attribute read right)"
"""The accuracy metric on a world with an attribute judge (``data["judge"]``, the shapes world)."""

ROW_VARS = ("candidate", "reference", "label", "kind", "hybrid_pair", "handoff_step", "nfe", "div_estimate", "div_ci_low",
            "div_ci_high", "div_decision", "div_why", "acc_estimate", "acc_ci_low", "acc_ci_high", "acc_decision",
            "acc_why", "teacher_accuracy", "candidate_accuracy")


def unet_evals(d: dict) -> float:
    """UNet evaluations per sample of a described group (``sweeps.describe``): each step costs 2 with a CFG
    branch (guidance > 1 outside LCM pipelines, whose guidance is a w-embedding), else 1; a hybrid adds its
    teacher and student parts."""
    from trajlab.models.registry import get

    def per_step(model, guidance):
        spec = get(model)
        lcm = spec is not None and spec.pipeline == "LatentConsistencyModelPipeline"
        return 2.0 if guidance > 1 and not lcm else 1.0

    h = d.get("hybrid")
    if h:
        return (h["n_teacher_steps_run"] * per_step(h["teacher"], h["teacher_guidance"])
                + h["n_student_steps_run"] * per_step(h["student"], h["student_guidance"]))
    return d["steps"] * per_step(d["model"], d["guidance"])


def _correct(ds: xr.Dataset, idx: np.ndarray, text: str, labeller) -> np.ndarray | None:
    """Per sample 0/1: ``labeller`` (images -> (labels, probs)) read the prompt's digit; or, for a judge (an object
    with ``read``), every attribute the prompt states read right. None where the prompt has nothing to check."""
    images = np.asarray(ds["image"].isel(sample=idx).values)
    if hasattr(labeller, "read"):
        from trajlab.worlds.shapes.scores import alignment

        return np.array([float(alignment(text, r)) for r in labeller.read(images)])
    digit = S.prompt_digit(text)
    if digit is None:
        return None
    labels, _ = labeller(images)
    return (np.asarray(labels) == digit).astype(float)


def _candidate_rows(groups, teacher, cand, diversity, labeller, population=None):
    """(diversity row, accuracy row or None, accuracies) of one candidate against the teacher; ``diversity``:
    (pairwise distance, metric name, features) as :func:`trajlab.verdicts.reference.diversity_distance` gives
    them; the statistic is the diversity_collapse mode's own (:mod:`trajlab.verdicts.modes.diversity_collapse`).
    population: the world's whole prompt set (the intervals then resample seeds only, as the store verdicts do)."""
    pairs = matched(groups[teacher], groups[cand])
    ref_info, cand_info = pair_infos(teacher, cand, groups, pairs)
    comp = diversity_collapse.MODE.comparison(teacher, cand, metric=diversity[1])
    ctx = Context(groups, {}, teacher, [cand], diversity=diversity)
    ref, cnd = diversity_collapse.statistic(ctx, groups[teacher], groups[cand], pairs) if pairs else (None, None)
    div = evaluate(comp, ref, cnd, ref_info=ref_info, cand_info=cand_info, population=population)
    if labeller is None:
        return div, None, (np.nan, np.nan)
    a_ref, a_cnd = [], []
    for text, ia, ib, _ in pairs:
        ca, cb = _correct(groups[teacher], ia, text, labeller), _correct(groups[cand], ib, text, labeller)
        if ca is not None:
            a_ref.append(PromptStat("mean", ca))
            a_cnd.append(PromptStat("mean", cb))
    metric, direction, effect, margin = ACCURACY
    comp = Comparison("accuracy_loss", JUDGE_ACCURACY if hasattr(labeller, "read") else metric, teacher, cand,
                      direction, margin, effect=effect)
    acc = evaluate(comp, a_ref or None, a_cnd or None, ref_info=ref_info, cand_info=cand_info, population=population)
    means = (float(np.mean([s() for s in a_ref])) if a_ref else np.nan,
             float(np.mean([s() for s in a_cnd])) if a_cnd else np.nan)
    return div, acc, means


def _memo(fn):
    """``fn(images)`` remembered by the images' bytes: every candidate is compared with the same teacher samples."""
    import hashlib

    cache = {}

    def call(images):
        key = hashlib.blake2b(np.ascontiguousarray(images).tobytes(), digest_size=16).digest()
        if key not in cache:
            cache[key] = fn(images)
        return cache[key]
    return call


class _MemoReader:
    """A judge whose ``read`` is remembered (:func:`_memo`)."""

    def __init__(self, judge):
        self.read = _memo(judge.read)


def restored_from(ks, decisions) -> tuple[float, float]:
    """(smallest k from which no larger k is "supported", smallest k from which every larger k is "refuted"),
    NaN when there is none; ``ks`` ascending with their diversity decisions."""
    def first_tail(ok):
        out = np.nan
        for k, good in zip(reversed(ks), reversed(ok)):
            if not good:
                break
            out = float(k)
        return out

    return (first_tail([d not in ("supported", "not applicable") for d in decisions]),
            first_tail([d == "refuted" for d in decisions]))


EXPERIMENT = "distilling_diversity"
"""The experiment tag of the study's groups (data/experiments/distilling_diversity.toml)."""


def distilling_diversity(groups: dict[str, xr.Dataset], *, labeller=None, data: dict | None = None,
                         alpha: float = 0.05, experiment: str | None = EXPERIMENT) -> xr.Dataset:
    """The study over a store's image groups (dims ``row``: one per student or hybrid; ``pair``: per hybrid
    (teacher -> student) pair). Empty, with a ``note``, without a teacher or a student.

    labeller: uint8 images (N, H, W, 3) -> (labels, probs) for the accuracy cost (default: ``data["judge"]``'s
    alignment where the world has an attribute judge; None: not measured).
    data: as for :func:`failure_modes.store_verdicts` (optional ``diversity`` distance; optional ``ablations``:
    (recipe model, ablation model) pairs, each compared directly, recipe against ablation, in rows of kind
    "ablation" whose reference is the ablation's group).
    experiment: when some group carries this experiment tag, only those groups are candidates (the teacher is
    the store's reference teacher either way); None: every student and hybrid group.
    Estimates: diversity log ratio candidate / teacher; accuracy difference candidate - teacher; 95% CIs of the
    verdict engine (crossed prompt x seed jackknife; seeds only where the prompts are ``data["prompts"]``, the
    world's whole prompt set, as in the store verdicts); decisions Holm-corrected over the study's family.
    """
    groups = {n: g for n, g in groups.items() if "image" in g}
    desc = S.describe_all(groups)
    teacher = S.pick_teacher(desc)
    students = [n for n, d in desc.items() if d["role"] == "student" and not d["negative_prompt"]
                and not S._off_default_guidance(d)]
    hybrids = sorted((n for n, d in desc.items() if d["role"] == "hybrid"),
                     key=lambda n: (desc[n]["hybrid"]["student"], desc[n]["hybrid"]["handoff_step"]))
    tagged = {n for n, g in groups.items() if experiment is not None and experiment_of(g.attrs) == experiment}
    if tagged:
        students, hybrids = [n for n in students if n in tagged], [n for n in hybrids if n in tagged]
    if teacher is None or not (students or hybrids):
        return xr.Dataset(attrs={"note": "needs a teacher group and a student or hybrid group with images"})
    # final images in memory, once per group: the comparisons read them prompt by prompt (a dask compute each)
    groups = {n: g.assign(image=g["image"].load()) if n in {teacher, *students, *hybrids} else g for n, g in groups.items()}
    diversity = diversity_distance(desc, data)
    features = diversity[2]
    diversity = (_memo(diversity[0]), *diversity[1:])
    if labeller is None:
        labeller = (data or {}).get("judge")
    if labeller is not None:
        labeller = _MemoReader(labeller) if hasattr(labeller, "read") else _memo(labeller)
    by_model = {desc[n]["model"]: n for n in students}
    ablations = [(by_model[a], by_model[b]) for a, b in (data or {}).get("ablations", ()) if a in by_model and b in by_model]
    rows, families = [], []
    for ref, n in [(teacher, n) for n in students + hybrids] + [(b, a) for a, b in ablations]:
        div, acc, (ta, ca) = _candidate_rows(groups, ref, n, diversity, labeller, (data or {}).get("prompts"))
        h = desc[n]["hybrid"] or {}
        label = f"hybrid {h['teacher']} -> {h['student']}, k = {h['handoff_step']}" if h else desc[n]["label"]
        kind = "hybrid" if h else ("student" if ref == teacher else "ablation")
        if kind == "ablation":
            label = f"{desc[n]['model']} against its ablation {desc[ref]['model']}"
        rows.append({"candidate": n, "reference": ref, "label": label, "kind": kind,
                     "hybrid_pair": f"{h['teacher']} -> {h['student']}" if h else "", "handoff_step": h.get("handoff_step", -1),
                     "nfe": unet_evals(desc[n]), "teacher_accuracy": ta, "candidate_accuracy": ca})
        families += [div] + ([acc] if acc is not None else [])
    decided = iter(decide(families, alpha))
    for row in rows:
        for prefix in ("div", "acc"):
            if prefix == "acc" and labeller is None:
                r = {"estimate": np.nan, "ci_low": np.nan, "ci_high": np.nan, "decision": "not applicable",
                     "why": "no labeller"}
            else:
                r = next(decided)
            row.update({f"{prefix}_{k}": r.get(k) for k in ("estimate", "ci_low", "ci_high", "decision", "why")})
    ds = xr.Dataset({v: ("row", [r[v] for r in rows]) for v in ROW_VARS}, coords={"row": np.arange(len(rows))})
    ds["teacher_accuracy"].attrs["meaning"] = "the reference's accuracy: the teacher's, or for an ablation row the ablation's"
    pairs = sorted({r["hybrid_pair"] for r in rows if r["kind"] == "hybrid"})
    restored = [restored_from([r["handoff_step"] for r in rows if r["hybrid_pair"] == p],
                              [r["div_decision"] for r in rows if r["hybrid_pair"] == p]) for p in pairs]
    ds = ds.assign({"collapse_unsupported_from_k": ("pair", [r[0] for r in restored]),
                    "equivalent_from_k": ("pair", [r[1] for r in restored])}).assign_coords(pair=pairs)
    acc_metric = JUDGE_ACCURACY if hasattr(labeller, "read") else ACCURACY[0]
    for v in ("div_estimate", "div_ci_low", "div_ci_high"):
        ds[v].attrs["units"] = "log ratio (candidate / reference) of mean pairwise distance within prompt"
    for v in ("acc_estimate", "acc_ci_low", "acc_ci_high"):
        ds[v].attrs["units"] = f"difference (candidate - reference) of {acc_metric}"
    ds["nfe"].attrs["units"] = "UNet evaluations per sample (a CFG step counts 2)"
    ds["collapse_unsupported_from_k"].attrs["meaning"] = ("smallest k from which no larger k has diversity collapse "
                                                          "supported (absence of evidence, not restoration)")
    ds["equivalent_from_k"].attrs["meaning"] = "smallest k from which every larger k is refuted within the margin"
    ds.attrs.update(teacher=teacher, features=features, alpha=alpha, margin_diversity=diversity_collapse.MODE.margin,
                    margin_accuracy=ACCURACY[3], accuracy_metric=acc_metric, multiplicity="Holm over the study's comparisons (its own family)",
                    question_3="commitment: the taxonomy's early_commitment rows and the x0 filmstrips")
    return ds


__all__ = ["ACCURACY", "EXPERIMENT", "JUDGE_ACCURACY", "distilling_diversity", "restored_from", "unet_evals"]
