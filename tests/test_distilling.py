"""The Distilling-Diversity study on synthetic groups with planted effects: a collapsed student, hybrids that
restore diversity from a known hand-off k, an accuracy cost, compute per sample, Holm over the study."""

import json

import numpy as np
import xarray as xr

from trajlab.analysis.distilling import distilling_diversity, restored_from, unet_evals

PROMPTS = [f"a handwritten digit {d}" for d in range(8)]
SEEDS = np.arange(16)


def _images(shrink, wrong=0.0, salt=0):
    """Per (prompt, seed): the prompt's base pattern plus a seed pattern scaled by (1 - shrink); pixel (0, 0)
    carries the label a fake labeller reads (the prompted digit, or digit 9 for a ``wrong`` fraction)."""
    out = []
    for p in range(len(PROMPTS)):
        base = np.random.default_rng(100 + p).uniform(0.3, 0.7, (8, 8))
        for s in SEEDS:
            dev = np.random.default_rng([s, p]).normal(0, 0.12, (8, 8))
            noise = np.random.default_rng([s, p, salt]).normal(0, 0.01, (8, 8))
            x = np.clip(base + (1 - shrink) * dev + noise, 0, 1)
            x = np.kron(x, np.ones((4, 4)))
            img = np.repeat((x * 255).round().astype(np.uint8)[..., None], 3, axis=-1)
            bad = np.random.default_rng([s, p, 99]).uniform() < wrong
            img[0, 0, 0] = 9 if bad else p
            out.append(img)
    return np.stack(out)


def _labeller(images):
    labels = np.asarray(images)[:, 0, 0, 0].astype(int)
    return labels, np.eye(10)[labels]


def _group(images, model, scheduler, steps, guidance, hybrid=None):
    n = len(PROMPTS) * len(SEEDS)
    extra = {"hybrid": hybrid} if hybrid else {}
    return xr.Dataset(
        {"image": (("sample", "height", "width", "rgb"), images), "complete": ("sample", np.ones(n, bool)),
         "prompt_text": ("prompt", np.array(PROMPTS, dtype=object))},
        coords={"seed": ("sample", np.tile(SEEDS, len(PROMPTS))),
                "prompt_index": ("sample", np.repeat(np.arange(len(PROMPTS)), len(SEEDS))),
                "step": np.arange(steps), "sigma": ("step", np.geomspace(14.6, 0.03, steps))},
        attrs={"model": model, "scheduler_class": scheduler, "guidance": guidance, "negative_prompt": "",
               "pipeline_class": "StableDiffusionPipeline", "extra": json.dumps(extra)})


def _hybrid(k):
    return {"teacher": "micro-sd", "student": "micro-lcm", "handoff_step": k, "teacher_steps": 30, "student_steps": 4,
            "teacher_guidance": 4.0, "student_guidance": 4.0, "n_teacher_steps_run": k,
            "n_student_steps_run": 0 if k == 30 else 4}


def test_students_collapse_and_hybrids_restore_from_a_planted_k():
    groups = {"teacher": _group(_images(0.0, salt=1), "micro-sd", "DDIMScheduler", 30, 4.0),
              "student": _group(_images(0.6, wrong=0.5, salt=2), "micro-lcm", "LCMScheduler", 4, 4.0)}
    shrink = {0: 0.6, 1: 0.6, 3: 0.4, 5: 0.0, 10: 0.0}  # diversity back from k = 5
    for k, s in shrink.items():
        groups[f"hyb{k}"] = _group(_images(s, salt=10 + k), "micro-sd", "DDIMScheduler", k + 4, 4.0, _hybrid(k))
    ds = distilling_diversity(groups, labeller=_labeller,
                              data={"diversity": (lambda im: np.sqrt(((im[:, None, ::4, ::4, 0] / 255.0 -
                                                                       im[None, :, ::4, ::4, 0] / 255.0) ** 2)
                                                                     .mean((-1, -2))), "rms", "rms 8x8")})
    rows = {str(c): i for i, c in enumerate(ds["candidate"].values)}
    st = rows["student"]
    assert ds["div_decision"].values[st] == "supported"
    assert abs(float(ds["div_estimate"].values[st]) - np.log(0.4)) < 0.15  # planted: seed spread x 0.4
    assert ds["acc_decision"].values[st] == "supported"                  # planted accuracy loss 0.5
    assert -0.62 < float(ds["acc_estimate"].values[st]) < -0.38
    for k in (0, 1):
        assert ds["div_decision"].values[rows[f"hyb{k}"]] == "supported"
    for k in (5, 10):
        assert ds["div_decision"].values[rows[f"hyb{k}"]] == "refuted"
    assert float(ds["collapse_unsupported_from_k"].values[0]) in (3.0, 5.0) and float(ds["equivalent_from_k"].values[0]) == 5.0
    # compute: the teacher part with CFG costs 2 per step, micro-lcm (LCM pipeline, w-embedding) 1 per step
    assert float(ds["nfe"].values[rows["hyb5"]]) == 5 * 2 + 4 * 1
    assert float(ds["nfe"].values[st]) == 4


def test_no_labeller_and_no_teacher_say_so():
    groups = {"teacher": _group(_images(0.0), "micro-sd", "DDIMScheduler", 30, 4.0),
              "student": _group(_images(0.5), "micro-lcm", "LCMScheduler", 4, 4.0)}
    ds = distilling_diversity(groups, data={"diversity": (lambda im: np.zeros((len(im), len(im))) + 0.1, "c", "c")})
    assert ds["acc_decision"].values.tolist() == ["not applicable"] and "labeller" in ds["acc_why"].values[0]
    assert "needs a teacher" in distilling_diversity({"student": groups["student"]}).attrs["note"]


def test_restored_from_needs_every_larger_k():
    ks = [0, 1, 2, 3, 5]
    assert restored_from(ks, ["supported", "supported", "inconclusive", "refuted", "refuted"]) == (2.0, 3.0)
    # a supported collapse at a larger k resets the tail
    assert restored_from(ks, ["supported", "refuted", "supported", "inconclusive", "refuted"]) == (3.0, 5.0)
    assert np.isnan(restored_from(ks, ["refuted"] * 4 + ["supported"])[0])


def test_unet_evals_counts_cfg_branches():
    assert unet_evals({"model": "micro-sd", "guidance": 4.0, "steps": 30, "hybrid": None}) == 60
    assert unet_evals({"model": "micro-sd", "guidance": 1.0, "steps": 30, "hybrid": None}) == 30
    assert unet_evals({"model": "micro-lcm", "guidance": 4.0, "steps": 4, "hybrid": None}) == 4


def test_only_the_studys_tagged_groups_are_candidates_when_there_are_any():
    groups = {"teacher": _group(_images(0.0), "micro-sd", "DDIMScheduler", 30, 4.0),
              "other": _group(_images(0.5), "micro-lcm", "LCMScheduler", 4, 4.0),
              "study": _group(_images(0.5, salt=3), "micro-lcm", "LCMScheduler", 2, 4.0)}
    groups["study"].attrs["extra"] = json.dumps({"experiment": "distilling_diversity"})
    div = (lambda im: np.zeros((len(im), len(im))) + 0.1, "c", "c")
    assert distilling_diversity(groups, data={"diversity": div})["candidate"].values.tolist() == ["study"]
    assert sorted(distilling_diversity(groups, data={"diversity": div}, experiment=None)["candidate"].values) == \
        ["other", "study"]
