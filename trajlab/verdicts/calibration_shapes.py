"""Calibration of the judge-read failure modes (``FailureMode.world == "shapes"``) through the store-verdict code.

The world: the shapes world's own generator. A sampler is the exact conditional law of a fully stated prompt
(every attribute and, for two objects, the relation stated; the free parts, the line two objects sit on and
the position jitter, from the world's priors): the scene is drawn and rendered (``world.render``), nothing is
learnt. **A seed is one stream of uniforms used under every prompt** (``world.sample_scenes(1, seed)``), so
groups have the crossed prompt x seed structure of a capture. Images are read by the shipped attribute judge,
so the metric (judge errors included) is the one the verdicts use on captured stores.

Rendered scenes are read perfectly by the judge, so a world of exact draws would have no variation at all; like
the real teacher (which gets 64% of one-object prompts all right), every sampler here errs at a base rate: with
probability ``BASE`` each of the three error kinds below happens to a sample (uniforms of its own (seed, prompt)).
The null student (m = 0) is the teacher's sampler on the teacher's own seed with probability ``RHO`` (decided once
per seed, for every prompt) and on a fresh seed otherwise: the same law, correlated outputs, true effect 0.
Planted failures (each mode's ``FailureMode.plant``, per sample with probability m, on top of the base errors):
``violate`` (object 1's stated colour changed), ``swap`` (the two objects' colours swapped), ``unstripe`` (striped
objects rendered solid).

The prior and control modes (``canonical_bias_prior``, ``mode_dropping_prior``, ``cfg_off_palette``,
``weak_negative_attribute``) run on the demo's six prompts that leave attributes out (their left-out attributes
drawn from the exact prior), with their own knobs: ``canonical`` (every left-out attribute but the position set to
its most probable value), ``drop_rare`` (a left-out rare colour replaced by the most probable one), ``saturate``
(colours pushed from mid-grey by 1.6) and ``neg_weaken``. The control modes' groups carry guidance 4 (a CFG branch)
and every image gets pixel noise of SD ``NOISE`` (its own (seed, prompt) stream: a network's images are never
exactly on the palette). For ``weak_negative_attribute`` there are four groups: teacher and student, each without
and with the negative "a striped shape", which removes a striped texture with probability ``NEG_EFFICACY`` for the
teacher and (1 - m) times that for the student.

Design: the demo's. The judge-read structure modes: the 8 one-object and 8 two-object prompts of ``quality`` x 16
seeds, Holm family of size :data:`FAMILY` (the students and step counts against the teacher); the prior modes: the
six left-out prompts x 16 seeds, the same family; the control modes: the six prompts x 8 seeds (the demo's
controls), family 1 (one student guidance sweep). Magnitudes are solved so that the true effect (the statistic on
:data:`TRUTH_SEEDS` seeds) is factor x margin; pass rule as the pixel world's.
"""
from __future__ import annotations

import time

import numpy as np
import xarray as xr

from trajlab.verdicts.calibration import FACTORS, PASS_RULE, magnitude_for
from trajlab.verdicts.catalogue import CATALOGUE
from trajlab.verdicts.store import store_verdicts

RHO = 0.5
BASE = 0.25
"""Probability of each error kind in every sampler's output (the teacher's too)."""
N_SEEDS = 16
FAMILY = 11
"""Rows of one mode in the study: LCM 1/2/4/8, LCM-LoRA, PCM, TLCM, Turbo, Turbo distill-heavy, DMD2, DMD2 no-GAN."""
TRUTH_SEEDS = 160
MANY_TRUTH_SEEDS = {"mode_dropping_prior": 1000, "weak_negative_attribute": 1000}
"""Seeds of the true effects of the modes whose statistic a seed decides under every prompt at once (a seed draws one
colour and one texture for all prompts): on 160 seeds the rare colour (4%) is in ~6 seeds and a true effect is off
by ~0.015, half mode_dropping_prior's margin (the null's came out at 0.033); weak_negative_attribute's by ~0.03
(its null's: -0.024). 1,000 seeds: about 2.5x less."""
KNOB_GRID = np.array([0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9])
SHAPES_MODES = tuple(n for n, m in CATALOGUE.items() if m.world == "shapes")
PRIOR_MODES = ("canonical_bias_prior", "mode_dropping_prior")
CONTROL_MODES = ("cfg_off_palette", "weak_negative_attribute")
CONTROL_SEEDS = 8
CONTROL_GUIDANCE = 4.0
NOISE = 6.0
"""SD of the pixel noise on every image of the control modes' groups (0-255 units)."""
NEG_EFFICACY = 0.8
"""P(the teacher's negative "a striped shape" renders a striped object solid)."""
NEGATIVE = "a striped shape"


def prompts(mode: str | None = None) -> list[str]:
    """The calibration prompts of ``mode``: the study's fully stated ones, or the demo's six texture-free left-out
    prompts for the prior and control modes."""
    if mode in PRIOR_MODES + CONTROL_MODES:
        from trajlab.experiments.shapes_demo import leaves_texture_out, shapes_prompts

        return [p for p in shapes_prompts() if leaves_texture_out(p)]
    from trajlab.worlds.shapes.quality import SINGLE_FULL, TWO_FULL

    return list(SINGLE_FULL) + list(TWO_FULL)


def design(mode: str) -> tuple[int, int]:
    """(seeds per prompt, Holm family size) of ``mode`` in the demo."""
    return (CONTROL_SEEDS, 1) if mode in CONTROL_MODES else (N_SEEDS, FAMILY)


def scene_for(prompt: str, seed: int) -> dict:
    """A scene from the exact law of ``prompt`` (left-out and free parts from the priors), seeded: the same seed
    draws the same uniforms under every prompt."""
    from trajlab.worlds.shapes import world as W

    spec = W.parse(prompt)
    priors = {k: dict(v) for k, v in W.PRIORS.items()}
    priors["count"] = {len(spec["objects"]): 1.0}
    if spec.get("relation"):
        priors["relation"] = {spec["relation"]: 1.0}
    scene = W.sample_scenes(1, seed, priors=priors)[0]
    for o, so in zip(spec["objects"], scene["objects"]):
        for a in ("shape", "colour", "size", "texture"):
            if o[a] is not None:
                so[a] = o[a]
            else:
                so.setdefault("free", []).append(a)
        if len(spec["objects"]) == 1 and o["position"]:
            r0, c0 = W.position_cell(so["position"])
            r1, c1 = W.position_cell(o["position"])
            so["x"] += W.GRID[c1] - W.GRID[c0]
            so["y"] += W.GRID[r1] - W.GRID[r0]
            so["position"] = o["position"]
    return scene


def plant(scene: dict, knobs: dict, u: np.ndarray) -> dict:
    """Errors on one scene: each knob (violate, swap, unstripe, canonical, drop_rare, neg) is the probability of its
    kind; u: six uniforms. ``free``: an object's left-out attributes (canonical, drop_rare act on them only)."""
    from trajlab.worlds.shapes import world as W

    objs = [dict(o) for o in scene["objects"]]
    if knobs.get("canonical", 0) > u[3]:
        for o in objs:
            for a in o.get("free", ()):
                o[a] = max(W.PRIORS[a], key=W.PRIORS[a].get)
    if knobs.get("drop_rare", 0) > u[4]:
        for o in objs:
            if "colour" in o.get("free", ()) and o["colour"] == W.RARE_COLOUR:
                o["colour"] = max(W.PRIORS["colour"], key=W.PRIORS["colour"].get)
    if knobs.get("neg", 0) > u[5]:
        for o in objs:
            o["texture"] = "solid"
    if knobs.get("violate", 0) > u[0] and "colour" not in objs[0].get("free", ()):  # a stated colour read wrong
        objs[0]["colour"] = W.COLOURS[(W.COLOURS.index(objs[0]["colour"]) + 1) % len(W.COLOURS)]
    if knobs.get("swap", 0) > u[1] and len(objs) == 2:
        objs[0]["colour"], objs[1]["colour"] = objs[1]["colour"], objs[0]["colour"]
    if knobs.get("unstripe", 0) > u[2]:
        for o in objs:
            o["texture"] = "solid"
    return {**scene, "objects": objs}


def group(texts: list[str], seeds, *, role: str, knobs: dict | None = None, guidance: float = 1.0,
          negative: str = "", noise: float = 0.0) -> xr.Dataset:
    """One group in the store schema (samples ordered (prompt, seed)): rendered scenes of each prompt's law, the
    base errors, the planted ``knobs`` (a student's), then ``saturate`` and pixel noise of SD ``noise`` on the
    images. With a ``negative`` the teacher's law removes stripes with probability ``NEG_EFFICACY`` and the
    student's with (1 - neg_weaken) times that, on the same uniforms."""
    from trajlab.worlds.shapes import world as W

    knobs = dict(knobs or {})
    base = {"violate": BASE, "swap": BASE, "unstripe": BASE}
    if negative:
        base["neg"] = NEG_EFFICACY * (1 - (knobs.pop("neg_weaken", 0.0) if role != "teacher" else 0.0))
    scenes, sat = [], []
    for i, t in enumerate(texts):
        for s in seeds:
            s = int(s)
            if role != "teacher" and np.random.default_rng([s, 7]).random() >= RHO:
                s += 10 ** 7  # the null student's fresh seed (decided once per seed)
            sc = plant(scene_for(t, s), base, np.random.default_rng([s, i, 11]).random(6))
            u = np.random.default_rng([int(s), i, 13]).random(7)
            if role != "teacher":
                sc = plant(sc, knobs, u[:6])
            scenes.append(sc)
            sat.append(role != "teacher" and knobs.get("saturate", 0) > u[6])
    images = W.render_batch(scenes)
    if any(sat) or noise:
        x = images.astype(np.float64)
        x[np.asarray(sat)] = 128.0 + 1.6 * (x[np.asarray(sat)] - 128.0)
        if noise:
            k = 0
            for i in range(len(texts)):
                for s in seeds:
                    s = int(s) + (10 ** 7 if role != "teacher" and np.random.default_rng([int(s), 7]).random() >= RHO else 0)
                    x[k] += np.random.default_rng([s, i, 17]).normal(0.0, noise, x[k].shape)
                    k += 1
        images = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    ds = final_images_group(images, texts, seeds, model=f"calibration-shapes-{role}", role=role,
                            pipeline_class="ExactWorldPipeline", steps=30 if role == "teacher" else 4)
    return ds.assign_attrs(guidance=guidance, negative_prompt=negative)


def final_images_group(images: np.ndarray, texts: list[str], seeds, *, model: str, role: str, pipeline_class: str,
                       steps: int) -> xr.Dataset:
    """Final images uint8 (len(texts) * len(seeds), H, W, 3), ordered (prompt, seed), as a group in the store schema
    (a one-level x0_pred placeholder: the judge-read modes read final images only)."""
    n = len(seeds)
    ds = xr.Dataset(
        {"image": (("sample", "h", "w", "rgb"), images),
         "x0_pred": (("sample", "step", "d"), np.zeros((len(images), 1, 1), np.float32)),
         "prompt_index": ("sample", np.repeat(np.arange(len(texts)), n)), "seed": ("sample", np.tile(np.asarray(seeds), len(texts))),
         "prompt_text": ("prompt", list(texts))},
        coords={"sigma": ("step", [0.0])})
    ds.attrs.update(model=model, scheduler_class="DDIMScheduler" if role == "teacher" else "LCMScheduler", guidance=1.0,
                    negative_prompt="", pipeline_class=pipeline_class, steps=steps, extra={})
    return ds


def groups_for(mode: str, seeds, knobs: dict) -> dict[str, xr.Dataset]:
    """The calibration groups of ``mode``: teacher and planted student (and, for weak_negative_attribute, both again
    with the negative prompt)."""
    texts = prompts(mode)
    if mode not in CONTROL_MODES:
        return {"teacher": group(texts, seeds, role="teacher"), "student": group(texts, seeds, role="student", knobs=knobs)}
    kw = dict(guidance=CONTROL_GUIDANCE, noise=NOISE)
    out = {"teacher": group(texts, seeds, role="teacher", **kw), "student": group(texts, seeds, role="student", knobs=knobs, **kw)}
    if mode == "weak_negative_attribute":
        out["teacher-neg"] = group(texts, seeds, role="teacher", negative=NEGATIVE, **kw)
        out["student-neg"] = group(texts, seeds, role="student", knobs=knobs, negative=NEGATIVE, **kw)
    return out


def verdict(data: dict, mode: str, seeds, knobs: dict, family: int | None = None) -> dict:
    """The store verdict of ``mode`` (one row) on a teacher group and a student group planted with ``knobs``."""
    ds = store_verdicts(groups_for(mode, seeds, knobs), data=data, modes={mode},
                        holm_family=design(mode)[1] if family is None else family)
    rows = [i for i in range(ds.sizes["comparison"]) if ds["mode"].values[i] == mode]
    if len(rows) != 1:
        raise RuntimeError(f"shapes calibration of {mode}: expected one row, got {len(rows)}")
    return {k: ds[k].values[rows[0]].item() for k in ("decision", "estimate", "ci_low", "ci_high", "why")}


def true_effect(data: dict, mode: str, m: float, n_seeds: int | None = None) -> float:
    """The signed effect (failure direction positive) of magnitude m on ``n_seeds`` seeds disjoint from the replicates'
    (default :data:`TRUTH_SEEDS`, or the mode's :data:`MANY_TRUTH_SEEDS`)."""
    fm = CATALOGUE[mode]
    n_seeds = n_seeds or MANY_TRUTH_SEEDS.get(mode, TRUTH_SEEDS)
    sign = 1.0 if fm.direction == "increase" else -1.0
    return sign * float(verdict(data, mode, list(range(10 ** 6, 10 ** 6 + n_seeds)), fm.plant(m))["estimate"])


def data_reference() -> dict:
    """What the verdicts read in this world: the shipped judge (no diversity or real-data modes are judged here)."""
    from trajlab.worlds.shapes.judge import load_judge
    from trajlab.worlds.shapes.scores import off_palette

    return {"judge": load_judge(), "off_palette": off_palette, "note": "shapes generator world (calibration)"}


def run(*, n_replicates: int = 100, modes=SHAPES_MODES, factors=FACTORS, progress=print) -> xr.Dataset:
    """P(supported) per mode and factor (true effect / margin), the Dataset shape of the pixel world's calibration."""
    t0 = time.perf_counter()
    data = data_reference()
    modes = list(modes)
    f = np.asarray(factors, dtype=float)
    mags = np.full((len(modes), len(f)), np.nan)
    truth = np.full_like(mags, np.nan)
    for i, mode in enumerate(modes):
        curve = np.array([true_effect(data, mode, float(m)) for m in KNOB_GRID])
        mags[i] = [magnitude_for(curve, x * CATALOGUE[mode].margin, KNOB_GRID) for x in f]
        truth[i] = [true_effect(data, mode, k) if np.isfinite(k) else np.nan for k in mags[i]]
        if progress:
            progress(f"shapes calibration: {mode}: magnitudes {np.round(mags[i], 3).tolist()}, true effects {np.round(truth[i], 4).tolist()}")
    sup = np.zeros_like(mags)
    for r in range(n_replicates):
        for i, mode in enumerate(modes):
            n = design(mode)[0]
            seeds = list(range(r * n, (r + 1) * n))
            for j, k in enumerate(mags[i]):
                if np.isfinite(k):
                    sup[i, j] += verdict(data, mode, seeds, CATALOGUE[mode].plant(float(k)))["decision"] == "supported"
        if progress and (r + 1) % 10 == 0:
            progress(f"shapes calibration: {r + 1}/{n_replicates} replicates ({time.perf_counter() - t0:.0f} s)")
    rate = np.where(np.isfinite(mags), sup / n_replicates, np.nan)
    ds = xr.Dataset({"supported_rate": (("mode", "factor"), rate), "magnitude": (("mode", "factor"), mags),
                     "true_effect": (("mode", "factor"), np.abs(truth))}, coords={"mode": modes, "factor": f})
    ds["fpr_max"] = ds["supported_rate"].sel(factor=f[f <= 1]).max("factor", skipna=False)
    ds["power_2x"] = ds["supported_rate"].sel(factor=2.0)
    ds["ok"] = (ds["fpr_max"] <= 0.05) & (ds["power_2x"] >= 0.8)
    ds["margin"] = ("mode", [CATALOGUE[m].margin for m in modes])
    ds["n_prompts"] = ("mode", [len(prompts(m)) for m in modes])
    ds["n_seeds"] = ("mode", [design(m)[0] for m in modes])
    ds["holm_family"] = ("mode", [design(m)[1] for m in modes])
    ds.attrs.update(n_replicates=n_replicates, rho=RHO, rule=PASS_RULE,
                    wall_s=round(time.perf_counter() - t0, 1),
                    source="trajlab.verdicts.calibration_shapes: store_verdicts on rendered shapes-world groups with shared seeds, read by the shipped judge")
    return ds


NULL_MODELS = (("shapes-sd", 30), ("shapes-lcm", 4))
NULL_CONTROL = ("shapes-sd", 30)
"""The control modes' real null: the teacher at guidance 4, without and with the negative, against itself."""


def network_group(model: str, steps: int, texts: list[str], seeds, *, role: str, guidance: float | None = None,
                  negative: str = "") -> xr.Dataset:
    """A group in the store schema sampled by a shipped network (registry ``model`` at ``steps``, its recommended
    scheduler, its guidance unless given; sample (prompt, seed) from ``torch.Generator().manual_seed(seed)``)."""
    from trajlab.models import registry as reg
    from trajlab.models.loading import load_pipeline
    from trajlab.worlds.shapes.quality import sample

    w = reg.get(model).guidance if guidance is None else guidance
    pipe = load_pipeline(model)
    images = np.concatenate([sample(pipe, t, len(seeds), steps, w, seeds=seeds, negative_prompt=negative or None)
                             for t in texts])
    ds = final_images_group(images, texts, seeds, model=f"null-{model}", role=role,
                            pipeline_class="StableDiffusionPipeline", steps=steps)
    return ds.assign_attrs(guidance=float(w), negative_prompt=negative)


def _null_rows(label: str, ref: dict, other: dict, modes, data, progress) -> list[dict]:
    """store_verdicts of groups ``ref`` (seeds 0..n-1) against ``other`` (seeds n..2n-1 relabelled 0..n-1, so that
    samples pair by position but share no noise), as a store of both."""
    groups = dict(ref)
    for name, ds in other.items():
        groups[name] = ds.assign(seed=next(iter(ref.values()))["seed"])
    ds = store_verdicts(groups, data=data, modes=set(modes), holm_family={m: design(m)[1] for m in modes})
    out = []
    for i in range(ds.sizes["comparison"]):
        row = {"model": label, "mode": str(ds["mode"].values[i]), "decision": str(ds["decision"].values[i]),
               "estimate": float(ds["estimate"].values[i]), "ci95": [float(ds["ci_low"].values[i]), float(ds["ci_high"].values[i])]}
        out.append(row)
        if progress:
            progress(f"shapes real null: {row['model']} vs itself on other seeds: {row['mode']} {row['decision']} "
                     f"{row['estimate']:+.3f} [{row['ci95'][0]:+.3f}, {row['ci95'][1]:+.3f}]")
    return out


def real_nulls(models=NULL_MODELS, n_seeds: int = N_SEEDS, progress=print) -> list[dict]:
    """Real-network nulls: each shipped network against itself on other seeds, every shapes mode at the demo's
    design: the structure modes on the fully stated prompts, the prior modes on the left-out prompts (16 seeds), the
    control modes with the teacher at guidance 4 without and with the negative (8 seeds). The true effect is 0:
    "supported" here is a false positive of the verdict code on real outputs."""
    data = data_reference()
    structure = [m for m in SHAPES_MODES if m not in PRIOR_MODES + CONTROL_MODES]
    out = []
    for model, steps in models:
        for modes in (structure, list(PRIOR_MODES)):
            texts = prompts(modes[0])
            ref = network_group(model, steps, texts, list(range(n_seeds)), role="teacher")
            other = network_group(model, steps, texts, list(range(n_seeds, 2 * n_seeds)), role="student")
            out += _null_rows(f"{model} {steps} steps", {"teacher": ref}, {"student": other}, modes, data, progress)
    model, steps = NULL_CONTROL
    texts, n = prompts(CONTROL_MODES[0]), CONTROL_SEEDS
    groups = {}
    for role, seeds in (("teacher", range(n)), ("student", range(n, 2 * n))):
        for neg in ("", NEGATIVE):
            groups[f"{role}{'-neg' if neg else ''}"] = network_group(model, steps, texts, list(seeds), role=role,
                                                                    guidance=CONTROL_GUIDANCE, negative=neg)
    ref = {k: v for k, v in groups.items() if k.startswith("teacher")}
    other = {k: v for k, v in groups.items() if k.startswith("student")}
    out += _null_rows(f"{model} {steps} steps, guidance {CONTROL_GUIDANCE:g}", ref, other, CONTROL_MODES, data, progress)
    return out


def merged(new: xr.Dataset, path) -> xr.Dataset:
    """``new``'s modes with the other modes of the calibration file at ``path`` (when there is one, at the same
    replicate count); the design of a row kept from the file is this module's (:func:`design`)."""
    from pathlib import Path

    if not Path(path).exists():
        return new
    with xr.open_dataset(path) as f:
        old = f.load()
    keep = [m for m in old["mode"].values.tolist() if m not in new["mode"].values.tolist()]
    if not keep or old.attrs.get("n_replicates") != new.attrs["n_replicates"]:
        return new
    old = old.sel(mode=keep)
    for k, fn in (("n_prompts", lambda m: len(prompts(m))), ("n_seeds", lambda m: design(m)[0]), ("holm_family", lambda m: design(m)[1])):
        old[k] = ("mode", [fn(m) for m in keep])
    out = xr.concat([old[list(new.data_vars)], new], dim="mode")
    out.attrs = dict(new.attrs, wall_s=f"{new.attrs['wall_s']} (modes {', '.join(new['mode'].values.tolist())}); "
                                       f"the others: {old.attrs.get('wall_s')}")
    return out


def summary_line(ds: xr.Dataset) -> str:
    return f"shapes calibration: {int(ds['ok'].sum())}/{ds.sizes['mode']} shapes failure modes with {PASS_RULE}"


def main(argv=None) -> None:
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m trajlab.verdicts.calibration_shapes", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/calibration", help="folder for shapes.nc and shapes.csv (default data/calibration)")
    ap.add_argument("--replicates", type=int, default=100)
    ap.add_argument("--nulls-only", action="store_true", help="only the real-network nulls (shapes-sd, shapes-lcm vs themselves)")
    ap.add_argument("--skip-nulls", action="store_true", help="only the generator-world calibration")
    ap.add_argument("--modes", default=",".join(SHAPES_MODES),
                    help="comma-separated modes to calibrate (default: all); their rows replace those in OUT/shapes.nc")
    a = ap.parse_args(argv)
    if a.replicates < 1:
        raise SystemExit(f"--replicates {a.replicates}: expected >= 1")
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in SHAPES_MODES]
    if bad or not modes:
        raise SystemExit(f"--modes: {bad[0] if bad else a.modes!r} is not a shapes mode (they are {', '.join(SHAPES_MODES)})")
    import json

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.skip_nulls:
        nulls = real_nulls()
        (out / "shapes_real_nulls.json").write_text(json.dumps(nulls, indent=1) + "\n")
        print(f"shapes real-network nulls supported: {sum(r['decision'] == 'supported' for r in nulls)}/{len(nulls)}")
    if a.nulls_only:
        return
    ds = merged(run(n_replicates=a.replicates, modes=modes), out / "shapes.nc")
    ds.to_netcdf(out / "shapes.nc")
    ds[["supported_rate", "magnitude", "true_effect"]].to_dataframe().to_csv(out / "shapes.csv")
    print(ds["supported_rate"].to_pandas().round(3).to_string())
    print(summary_line(ds))


if __name__ == "__main__":
    main()
