"""The failure taxonomy of a store: every failure mode as pre-declared, matched comparisons (verdicts.py).

Rules (declared here, before any data are read; an experiment may restate them):

- Groups are matched on (prompt text, seed): only prompts present in both groups and seeds present
  for every such prompt in both enter, so n is equal and seeds are paired by construction.
- Features: the final image as grey levels block-averaged to at most 8x8 (the digits' native
  resolution in the micro-world; a plain pixel space elsewhere), RMS distances in [0, 1] units.
  This is a pixel-space substitute, named so in every row, not a perceptual distance.
- Diversity (``diversity_collapse``) on micro-world stores: micro-LPIPS
  (:mod:`trajlab.metrics.world_lpips`: LPIPS's formula with uniform weights on the labeller CNN's three
  conv stages; not human-calibrated), named so in the row; other stores keep the pixel substitute.
- Modes inside a prompt: k-means (k = 4) clusters of the real data of the prompted class when the
  store is a micro-world store (``reference_modes``), else of the reference group's own samples.

=======================  ============================================  =========  ===========  ======
failure mode             per-sample metric (per prompt)                direction  effect       margin
=======================  ============================================  =========  ===========  ======
diversity_collapse       pairwise distance (micro-LPIPS / pixel RMS)   decrease   log ratio    0.05
canonical_bias           in the prompt's most populous mode (0/1)      increase   difference   0.05
mode_dropping            in the prompt's rarest mode (0/1)             decrease   difference   0.03
early_commitment         log sigma of commitment on shared sigmas      increase   difference   0.1
cfg_over_amplification   |ink - data ink| / data ink, matched w        increase   log ratio    0.1
fine_detail              power fraction in the data's upper band       decrease   log ratio    0.1
step_inconsistency       RMS between consecutive step counts           increase   log ratio    0.1
weak_negative_prompt     RMS(with negative - without), matched w       decrease   log ratio    0.1
step_inconsistency_      step inconsistency, LCM sampler / the same    increase   log ratio    0.1
reinjection              weights under TCD gamma 0 (mechanism row)
=======================  ============================================  =========  ===========  ======

The margins are those the calibration (``trajlab calibrate``) validates. Students are compared with
the reference teacher (:func:`trajlab.analysis.sweeps.pick_teacher`); every comparison of the
store is one family for the Holm correction.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import xarray as xr

from trajlab.analysis import sweeps as S
from trajlab.analysis.verdicts import Comparison, GroupInfo, PromptStat, decide, evaluate, verdict_dataset

FEATURES = "grey pixels block-averaged to <= 8x8 (a pixel-space substitute, not a perceptual distance)"
PIXEL_DIVERSITY = f"pairwise RMS distance within prompt ({FEATURES})"
SPECS = {
    "diversity_collapse": ("pairwise RMS distance within prompt", "decrease", "log_ratio", 0.05),
    "canonical_bias": ("fraction of samples in the prompt's most populous mode", "increase", "difference", 0.05),
    "mode_dropping": ("fraction of samples in the prompt's rarest mode", "decrease", "difference", 0.03),
    "early_commitment": ("mean log sigma at which the x0 mode commits (shared sigma levels)", "increase",
                         "difference", 0.1),
    "cfg_over_amplification": ("ink-mass deviation from the data |ink - data ink| / data ink", "increase",
                               "log_ratio", 0.1),
    "fine_detail": ("spectral power fraction in the data's upper band", "decrease", "log_ratio", 0.1),
    "step_inconsistency": ("RMS between consecutive step counts / teacher family's", "increase", "log_ratio", 0.1),
    "weak_negative_prompt": ("RMS(with negative - without), matched guidance", "decrease", "log_ratio", 0.1),
    "step_inconsistency_reinjection": ("RMS between consecutive step counts: LCM sampler (fresh noise each step) / "
                                       "the same weights under TCD gamma 0 (deterministic re-noising)",
                                       "increase", "log_ratio", 0.1),
}


def comparison(mode: str, ref: str, cand: str, requires=("same_prompts", "same_n", "paired_seeds")) -> Comparison:
    """The pre-declared comparison of ``mode`` (SPECS); an experiment's margins are applied in store_verdicts."""
    metric, direction, effect, margin = SPECS[mode]
    return Comparison(mode, metric, ref, cand, direction, margin, effect=effect, requires=tuple(requires))


# -- matching and features ------------------------------------------------------------------------
def matched(a: xr.Dataset, b: xr.Dataset, skip_prompts=()) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """[(prompt text, sample indices in a, in b, seeds)] over prompts in both, seeds complete in both."""
    def table(ds):
        ok = S._complete(ds)
        texts = np.asarray(ds["prompt_text"].values).tolist()
        out = {}
        for i, (p, s) in enumerate(zip(np.asarray(ds["prompt_index"].values), np.asarray(ds["seed"].values))):
            if ok[i]:
                out.setdefault(texts[int(p)], {})[int(s)] = i
        return out

    ta, tb = table(a), table(b)
    out = []
    for text in ta:
        if text not in tb or text in skip_prompts:
            continue
        seeds = sorted(set(ta[text]) & set(tb[text]))
        if len(seeds) >= 2:
            out.append((text, np.array([ta[text][s] for s in seeds]), np.array([tb[text][s] for s in seeds]),
                        np.array(seeds)))
    return out


def grey(images: np.ndarray, size: int = 8) -> np.ndarray:
    """uint8 (n, H, W, 3) -> (n, size, size) grey levels in [0, 1], block means (H, W multiples of size)."""
    x = np.asarray(images, dtype=np.float64).mean(-1) / 255.0
    n, H, W = x.shape
    f = max(1, H // size)
    return x[:, : H // f * f, : W // f * f].reshape(n, H // f, f, W // f, f).mean((2, 4))


def features(ds: xr.Dataset, idx: np.ndarray) -> np.ndarray:
    return grey(ds["image"].isel(sample=idx).values).reshape(len(idx), -1)


def _rms_pairwise(x: np.ndarray) -> np.ndarray:
    return np.sqrt(((x[:, None] - x[None]) ** 2).mean(-1))


def _info(name, ds, pairs, seeds) -> GroupInfo:
    d = S.describe(name, ds)
    cfg = d["guidance"] > 1 and ds.attrs.get("pipeline_class") != "LatentConsistencyModelPipeline"
    return GroupInfo(name, [p[0] for p in pairs], list(seeds), guidance=d["guidance"], cfg_branch=bool(cfg),
                     sigma=np.asarray(ds["sigma"].values) if "sigma" in ds.coords else None)


# -- modes inside a prompt --------------------------------------------------------------------------
def reference_modes_from(images: np.ndarray, labels: np.ndarray, texts_of, k: int = 4, seed: int = 0) -> dict:
    """{prompt text: (k, f) centroids, most populous first}: k-means on the real images of each class
    (features as :func:`features`). texts_of(label) -> the prompt texts asking for that class."""
    from sklearn.cluster import KMeans

    out = {}
    for lab in np.unique(labels):
        x = grey(images[labels == lab]).reshape(int((labels == lab).sum()), -1)
        km = KMeans(k, n_init=10, random_state=seed).fit(x)
        centres = km.cluster_centers_[np.argsort(-np.bincount(km.labels_, minlength=k))]
        for text in texts_of(int(lab)):
            out[text] = centres
    return out


def _modes(ref_ds, pairs, reference_modes, k: int = 4):
    """{prompt: (k, f) centroids, most populous first} from the real data, else from the reference group."""
    from sklearn.cluster import KMeans

    out = {}
    for text, ia, _, _ in pairs:
        if reference_modes and text in reference_modes:
            out[text] = reference_modes[text]
        else:
            x = features(ref_ds, ia)
            km = KMeans(min(k, len(x)), n_init=10, random_state=0).fit(x)
            out[text] = km.cluster_centers_[np.argsort(-np.bincount(km.labels_))]
    return out


def _nearest(x, centroids):
    return np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)


# -- per-mode statistics ----------------------------------------------------------------------------
def _per_prompt(pairs, side, values_of) -> list[PromptStat]:
    return [PromptStat("mean", values_of(p[side])) for p in pairs]


def _pixel_pairwise(images: np.ndarray) -> np.ndarray:
    """(n, n) RMS distances of uint8 images (n, H, W, 3) in the pixel substitute (:func:`grey`), [0, 1] units."""
    return _rms_pairwise(grey(images).reshape(len(images), -1))


def diversity_distance(desc: dict, data: dict | None) -> tuple:
    """(pairwise(uint8 images (n, H, W, 3)) -> (n, n) distances, metric name, features name) for
    diversity_collapse: ``data["diversity"]`` when given, micro-LPIPS on micro-world stores (the shipped
    labeller), else the pixel substitute. A micro store without the labeller weights falls back to
    pixels and says why in the features name."""
    if (data or {}).get("diversity") is not None:
        return data["diversity"]
    if S.is_micro(desc):
        try:
            from trajlab.metrics import world_lpips as W

            model = W.load_micro_lpips()
            return ((lambda images: W.micro_lpips_pairwise(model, images)),
                    f"mean pairwise {W.DESCRIPTION} within prompt", W.DESCRIPTION)
        except FileNotFoundError as exc:
            return _pixel_pairwise, PIXEL_DIVERSITY, f"{FEATURES}; micro-LPIPS unavailable ({exc})"
    return _pixel_pairwise, PIXEL_DIVERSITY, FEATURES


def _pair_stats(mode, ref_ds, cand_ds, pairs, modes=None, data=None, pairwise=_pixel_pairwise):
    """(reference stats, candidate stats) of one mode on matched pairs; ``pairwise`` is the diversity
    distance (:func:`diversity_distance`)."""
    if mode == "diversity_collapse":
        return ([PromptStat("pairwise", pairwise(ref_ds["image"].isel(sample=p[1]).values)) for p in pairs],
                [PromptStat("pairwise", pairwise(cand_ds["image"].isel(sample=p[2]).values)) for p in pairs])
    if mode in ("canonical_bias", "mode_dropping"):
        which = 0 if mode == "canonical_bias" else -1
        out = []
        for ds, side in ((ref_ds, 1), (cand_ds, 2)):
            out.append([PromptStat("mean", (_nearest(features(ds, p[side]), modes[p[0]])
                                            == (modes[p[0]].shape[0] - 1 if which else 0)).astype(float))
                        for p in pairs])
        return tuple(out)
    if mode == "cfg_over_amplification":
        return tuple([PromptStat("mean", np.abs(features(ds, p[side]).mean(1) - data["ink"](p[0])) /
                                 data["ink"](p[0])) for p in pairs] for ds, side in ((ref_ds, 1), (cand_ds, 2)))
    if mode == "fine_detail":
        return tuple([PromptStat("mean", band_fraction(ds["image"].isel(sample=p[side]).values, data["band"]))
                      for p in pairs] for ds, side in ((ref_ds, 1), (cand_ds, 2)))
    raise ValueError(f"mode {mode!r} has no pair statistic")


def band_fraction(images: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """Per image: fraction of (non-DC) spectral power of the grey image at radial frequency in ``band``
    (cycles per pixel of the stored image)."""
    x = np.asarray(images, dtype=np.float64).mean(-1) / 255.0
    x = x - x.mean((1, 2), keepdims=True)
    P = np.abs(np.fft.fft2(x)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(x.shape[1]), np.fft.fftfreq(x.shape[2]), indexing="ij")
    r = np.hypot(fy, fx)
    inb = (r >= band[0]) & (r < band[1])
    return P[:, inb].sum(1) / np.maximum(P.sum((1, 2)), 1e-12)


def data_band(real_images: np.ndarray) -> tuple[float, float]:
    """The band between the radii holding 50% and 95% of the real data's (non-DC) spectral power."""
    x = np.asarray(real_images, dtype=np.float64).mean(-1) / 255.0
    x = x - x.mean((1, 2), keepdims=True)
    P = (np.abs(np.fft.fft2(x)) ** 2).mean(0)
    fy, fx = np.meshgrid(np.fft.fftfreq(x.shape[1]), np.fft.fftfreq(x.shape[2]), indexing="ij")
    r = np.hypot(fy, fx).ravel()
    order = np.argsort(r)
    c = np.cumsum(P.ravel()[order]) / P.sum()
    return float(r[order][np.searchsorted(c, 0.5)]), float(r[order][np.searchsorted(c, 0.95)] + 1e-9)


def micro_data_reference() -> dict:
    """The real digits as the micro-world stores them (32 px RGB uint8): per-prompt ink mass and the band."""
    from trajlab.models.micro.data import load_digits_rgb, prompt_variants, to_uint8_hwc

    x, y = load_digits_rgb()
    imgs = to_uint8_hwc(x)
    ink = {}
    for digit in range(10):
        m = float(grey(imgs[np.asarray(y) == digit]).mean())
        for text in prompt_variants(digit):
            ink[text] = m
    return {"ink": lambda text: ink.get(text, float(grey(imgs).mean())), "band": data_band(imgs),
            "modes": reference_modes_from(imgs, np.asarray(y), prompt_variants),
            "note": "modes, ink mass and spectral band from the real digits (sklearn, 1,797 images)"}


# -- families: steps, negative prompts, commitment ------------------------------------------------
def _consecutive_rms(groups, names, skip=()) -> tuple[list, dict] | None:
    """Per prompt: per-seed mean RMS between consecutive step counts of a family (sorted by steps)."""
    per = None
    for a, b in zip(names, names[1:]):
        pairs = matched(groups[a], groups[b], skip)
        rms = {t: (seeds, np.sqrt(((features(groups[a], ia) - features(groups[b], ib)) ** 2).mean(1)))
               for t, ia, ib, seeds in pairs}
        if per is None:
            per = {t: [v] for t, v in rms.items()}
        else:
            per = {t: per[t] + [rms[t]] for t in per if t in rms}
    if not per:
        return None
    out = {}
    for t, parts in per.items():
        common = sorted(set.intersection(*[set(s.tolist()) for s, _ in parts]))
        vals = [dict(zip(s.tolist(), v)) for s, v in parts]
        out[t] = (np.array(common), np.mean([[d[c] for c in common] for d in vals], axis=0))
    return out


def _steps_rows(groups, desc, teacher, students):
    """Step inconsistency: each student step family vs the teacher's own step-count family."""
    fam = S.families(desc, "steps")
    tfam = next((v for v in fam.values() if teacher in v), None)
    rows = []
    for key, names in fam.items():
        if names is tfam or desc[names[0]]["role"] != "student":
            continue
        comp = comparison("step_inconsistency", " / ".join(tfam) if tfam else "(none)", " / ".join(names))
        if tfam is None:
            rows.append(evaluate(comp, None, None, ref_info=None, cand_info=GroupInfo(names[0], [], [])))
            continue
        r, c = _consecutive_rms(groups, tfam), _consecutive_rms(groups, names)
        rows.append(evaluate(comp, *_paired_values(r, c, [t for t in r if t in c])))
    return rows


def _reinjection_rows(groups, desc):
    """Step inconsistency due to fresh noise: a student's LCM step family (LCMScheduler draws fresh noise
    after every step) against the same weights' TCD family (TCDScheduler at gamma = eta = 0, what trajlab
    captures through a StableDiffusionPipeline: re-noising with the model's own epsilon), on the step counts
    both have, matched by (prompt, seed). Supported: fresh noise makes outputs change more with the step
    count than the deterministic path does (a mechanism of step inconsistency, not a separate failure)."""
    by_config: dict[tuple, dict[str, list[str]]] = {}
    for key, names in S.families(desc, "steps").items():
        rest = tuple((k, v) for k, v in key if k != "scheduler")
        by_config.setdefault(rest, {})[dict(key)["scheduler"]] = names
    rows = []
    for scheds in by_config.values():
        if "LCMScheduler" not in scheds or "TCDScheduler" not in scheds:
            continue
        common = {desc[n]["steps"] for n in scheds["LCMScheduler"]} & {desc[n]["steps"] for n in scheds["TCDScheduler"]}
        lcm = [n for n in scheds["LCMScheduler"] if desc[n]["steps"] in common]
        tcd = [n for n in scheds["TCDScheduler"] if desc[n]["steps"] in common]
        comp = comparison("step_inconsistency_reinjection", " / ".join(tcd), " / ".join(lcm))
        if len(common) < 2:
            rows.append({**evaluate(comp, None, None), "why": f"the LCM and TCD families share {len(common)} step "
                         "count(s); consecutive step counts need >= 2"})
            continue
        r, c = _consecutive_rms(groups, tcd), _consecutive_rms(groups, lcm)
        rows.append(evaluate(comp, *_paired_values(r, c, [t for t in r if t in c])))
    return rows


def _negative_rows(groups, desc, teacher_model):
    """Weak negative prompt: sensitivity of each student with/without pair vs the teacher's at the same
    guidance; prompts the negative names (e.g. its own digit) are left out."""
    pairs = {}
    for key, names in S.families(desc, "negative_prompt").items():
        base = [n for n in names if not desc[n]["negative_prompt"]]
        for n in names:
            if base and desc[n]["negative_prompt"]:
                pairs.setdefault((desc[n]["model"], desc[n]["guidance"]), (n, base[0]))
    rows = []
    students = [(k, v) for k, v in pairs.items() if k[0] != teacher_model]
    for (model, w), (neg, plain) in sorted(students):
        tpair = pairs.get((teacher_model, w))
        comp = comparison("weak_negative_prompt", tpair[0] if tpair else f"{teacher_model} at guidance {w:g} (none)",
                          neg, requires=("same_prompts", "same_n", "paired_seeds", "matched_guidance", "cfg_branch"))
        cand_info = _info(neg, groups[neg], [(t,) for t in desc[neg]["prompts"]], [])
        if tpair is None:  # the most basic reason first: no CFG branch, else no matched teacher
            ref_info = cand_info if not cand_info.cfg_branch else None
            rows.append(evaluate(comp, None, None, ref_info=ref_info, cand_info=cand_info))
            continue
        negative = desc[neg]["negative_prompt"]
        skip = {t for t in desc[neg]["prompts"] if t == negative or (_digit(t) is not None and _digit(t) ==
                                                                     _digit(negative))}
        sens = {}
        for side, (gn, gp) in (("ref", tpair), ("cand", (neg, plain))):
            sens[side] = {t: (seeds, np.sqrt(((features(groups[gn], ia) - features(groups[gp], ib)) ** 2).mean(1)))
                          for t, ia, ib, seeds in matched(groups[gn], groups[gp], skip)}
        texts = [t for t in sens["ref"] if t in sens["cand"]]
        ref_info = _info(tpair[0], groups[tpair[0]], [(t,) for t in texts], [])
        cand_info = _info(neg, groups[neg], [(t,) for t in texts], [])
        ref, cand = _paired_values(sens["ref"], sens["cand"], texts)
        row = evaluate(comp, ref, cand, ref_info=ref_info, cand_info=cand_info)
        row["description"] = f"left out prompts the negative names: {sorted(skip)}" if skip else ""
        rows.append(row)
    return rows


def _paired_values(a: dict, b: dict, texts) -> tuple[list, list]:
    ref, cand = [], []
    for t in texts:
        seeds = sorted(set(a[t][0].tolist()) & set(b[t][0].tolist()))
        av, bv = dict(zip(a[t][0].tolist(), a[t][1])), dict(zip(b[t][0].tolist(), b[t][1]))
        ref.append(PromptStat("mean", [av[s] for s in seeds]))
        cand.append(PromptStat("mean", [bv[s] for s in seeds]))
    return ref, cand


def _digit(text: str):
    m = re.search(r"\b(\d)\b", str(text))
    return int(m.group(1)) if m else None


def commit_log_sigma(labels: np.ndarray, log_sigma: np.ndarray) -> np.ndarray:
    """labels (level, n) of x0 at shared sigma levels (descending) + the final label last -> per sample the
    log sigma of the earliest level from which the label equals the final one (the lowest level's value
    when it never does before the end)."""
    stable = np.flip(np.cumprod(np.flip(labels[:-1] == labels[-1], 0), 0), 0).astype(bool)
    first = np.where(stable.any(0), np.argmax(stable, axis=0), labels.shape[0] - 2)
    return log_sigma[first]


def _commit_rows(groups, desc, teacher, students, modes, decode):
    """Early commitment on the candidate's sigma levels; the teacher read at its nearest levels (within 0.35 in
    log sigma, else not applicable)."""
    rows = []
    memo: dict = {}  # (group, prompt, step, samples) -> x0 mode labels: the teacher's are decoded once, not per student

    def labels_at(name, ds, t, idx, k):
        key = (name, t, k, idx.tobytes())
        if key not in memo:
            memo[key] = _nearest(grey(decode(ds, idx, k)).reshape(len(idx), -1), modes[t])
        return memo[key]

    for s in students:
        comp = comparison("early_commitment", teacher, s, requires=("same_prompts", "same_n", "paired_seeds",
                                                                    "shared_sigma_axis"))
        ls_c = np.log(np.asarray(groups[s]["sigma"].values, dtype=np.float64))
        ls_t = np.log(np.asarray(groups[teacher]["sigma"].values, dtype=np.float64))
        near = np.array([int(np.argmin(np.abs(ls_t - v))) for v in ls_c])
        why = None
        if decode is None:
            why = "no decoder for the x0 predictions (the group's VAE is not available)"
        elif len(ls_c) < 2:
            why = "a 1-step sampler has one sigma level: commitment needs a trajectory"
        elif np.max(np.abs(ls_t[near] - ls_c)) > 0.35:
            why = f"the teacher's grid has no level within 0.35 (log sigma) of the student's {np.round(np.exp(ls_c), 2)}"
        if why:
            row = evaluate(comp, None, None)
            row.update(why=why)
            rows.append(row)
            continue
        pairs = matched(groups[teacher], groups[s])
        ref, cand = [], []
        for t, ia, ib, _ in pairs:
            vals = []
            for name, idx, steps in ((teacher, ia, near), (s, ib, np.arange(len(ls_c)))):
                ds = groups[name]
                lab = [labels_at(name, ds, t, idx, int(k)) for k in steps]
                lab.append(_nearest(features(ds, idx), modes[t]))
                vals.append(commit_log_sigma(np.stack(lab), ls_c))
            ref.append(PromptStat("mean", vals[0]))
            cand.append(PromptStat("mean", vals[1]))
        rows.append(evaluate(comp, ref, cand))
    return rows


# -- the store's taxonomy -----------------------------------------------------------------------------
def _pair_rows(groups, teacher, students, modes, data, diversity=(_pixel_pairwise, PIXEL_DIVERSITY, FEATURES)):
    rows = []
    for s in students:
        pairs = matched(groups[teacher], groups[s])
        ref_info = _info(teacher, groups[teacher], pairs, pairs[0][3] if pairs else [])
        cand_info = _info(s, groups[s], pairs, pairs[0][3] if pairs else [])
        for mode in ("diversity_collapse", "canonical_bias", "mode_dropping", "fine_detail"):
            comp = comparison(mode, teacher, s)
            if mode == "diversity_collapse":
                comp = dataclasses.replace(comp, metric=diversity[1])
            if mode == "fine_detail" and "band" not in data:
                row = evaluate(comp, None, None)
                rows.append({**row, "why": "no real-data spectrum to place the band where the data has power"})
                continue
            ref, cand = (_pair_stats(mode, groups[teacher], groups[s], pairs, modes, data, diversity[0]) if pairs
                         else (None, None))
            rows.append(evaluate(comp, ref, cand, ref_info=ref_info, cand_info=cand_info))
    return rows


def _cfg_rows(groups, desc, teacher_model, data):
    """CFG over-amplification: each student at its highest guidance > 1 vs the teacher at the same guidance."""
    plain = {n: d for n, d in desc.items() if d["role"] in ("teacher", "student") and not d["negative_prompt"]
             and d["has_images"]}
    rows = []
    for model in sorted({d["model"] for d in plain.values() if d["role"] == "student"}):
        ws = sorted({d["guidance"] for d in plain.values() if d["model"] == model and d["guidance"] > 1})
        if not ws:
            continue
        w = ws[-1]
        cand = next(n for n, d in plain.items() if d["model"] == model and d["guidance"] == w)
        ref = next((n for n, d in plain.items() if d["model"] == teacher_model and d["guidance"] == w), None)
        comp = comparison("cfg_over_amplification", ref or f"{teacher_model} at guidance {w:g} (none)", cand,
                          requires=("same_prompts", "same_n", "paired_seeds", "matched_guidance", "cfg_branch"))
        if ref is None:
            rows.append(evaluate(comp, None, None, ref_info=None, cand_info=GroupInfo(cand, [], [])))
            continue
        pairs = matched(groups[ref], groups[cand])
        seeds = pairs[0][3] if pairs else []
        r, c = _pair_stats("cfg_over_amplification", groups[ref], groups[cand], pairs, data=data)
        rows.append(evaluate(comp, r, c, ref_info=_info(ref, groups[ref], pairs, seeds),
                             cand_info=_info(cand, groups[cand], pairs, seeds)))
    return rows


def store_verdicts(groups: dict[str, xr.Dataset], *, data: dict | None = None, decode=None,
                   alpha: float = 0.05, margins: dict | None = None) -> xr.Dataset:
    """Every failure mode's comparisons over a store's groups, Holm-corrected as one family.

    data: the real-data reference ({"modes", "ink", "band", "note"}, e.g. :func:`micro_data_reference`;
    optional "diversity": (pairwise fn, metric name, features name) as :func:`diversity_distance`);
    without it, modes are clusters of the teacher's samples and the ink/band comparisons are not
    applicable. Diversity: micro-LPIPS on micro-world stores, else the pixel substitute.
    decode(ds, sample_idx, step) -> uint8 images of x0_pred at that step (for commitment).
    margins: {mode: {"margin": m}} declared by an experiment (default: SPECS).
    Bootstrap: 2000 draws, seeded (verdicts.evaluate). Returns
    :func:`trajlab.analysis.verdicts.verdict_dataset` with attrs ``teacher``, ``features``.
    """
    desc = S.describe_all(groups)
    teacher = S.pick_teacher(desc)
    if teacher is None:
        return verdict_dataset([], alpha=alpha).assign_attrs(note="no teacher group with images: nothing to compare")
    tmodel = desc[teacher]["model"]
    students = [n for n, d in desc.items() if d["role"] == "student" and d["has_images"] and not d["negative_prompt"]
                and not S._off_default_guidance(d) and d["prompts"] == desc[teacher]["prompts"]]
    modes = (data or {}).get("modes") or _modes(groups[teacher], matched(groups[teacher], groups[teacher]), None)
    diversity = diversity_distance(desc, data) if students else (_pixel_pairwise, PIXEL_DIVERSITY, FEATURES)
    rows = _pair_rows(groups, teacher, students, modes, data or {}, diversity)
    rows += _commit_rows(groups, desc, teacher, students, modes, decode)
    rows += _cfg_rows(groups, desc, tmodel, data) if data is not None else []
    rows += _steps_rows(groups, desc, teacher, students)
    rows += _reinjection_rows(groups, desc)
    rows += _negative_rows(groups, desc, tmodel)
    for r in rows:
        r["margin"] = float(((margins or {}).get(r["mode"]) or {}).get("margin", r["margin"]))
    ds = verdict_dataset(decide(rows, alpha), alpha=alpha)
    feats = FEATURES if diversity[2] == FEATURES else f"diversity_collapse: {diversity[2]}; other modes: {FEATURES}"
    ds.attrs.update(teacher=teacher, features=feats, diversity_features=diversity[2], n_boot=2000,
                    data=(data or {}).get("note", "modes from the teacher's own samples (no real data)"))
    return ds


__all__ = ["FEATURES", "PIXEL_DIVERSITY", "SPECS", "band_fraction", "comparison", "commit_log_sigma", "data_band",
           "diversity_distance", "features", "grey",
           "matched", "micro_data_reference", "reference_modes_from", "store_verdicts"]
