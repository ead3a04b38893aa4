"""Calibration of the verdicts through the store-verdict code itself.

The world (:class:`PixelWorld`): P prompts, each an exact Gaussian mixture over 8x8 grey images (K = 4 modes
with weights 0.4/0.3/0.2/0.1, a shared DCT-basis covariance whose spectrum decays with frequency: coarse and
fine directions). A sampler is a deterministic Euler (DDIM) integration of the exact denoiser of the prompt's
world (with classifier-free guidance against the mixture of all prompts, and optionally a negative prompt's
world) from sigma_max to sigma_min. **A seed is one generator whose noise is used under every prompt**, as
capture does: the same initial noise for every prompt and every group, so the store has the crossed
prompt x seed structure of a real capture. The null student (m = 0) mixes the seed's teacher noise with a
second draw of the same generator, rho = 0.5: the same distribution, correlated outputs, true effect 0.

Each failure mode's planted failure is declared in its own file (``FailureMode.plant``: sampler knobs at
magnitude m). Groups are built as xarray Datasets in the store schema (image uint8, x0_pred, sigma, prompt and
seed indices, the attrs ``sweeps.describe`` reads) and judged by :func:`trajlab.verdicts.store.store_verdicts`,
the function the demo's report calls, with the same metrics, margins, preconditions and sample sizes as the
demo (10 prompts x 16 seeds for teacher-vs-student modes, 8 seeds for the control groups) and the size of
the demo's Holm family of that mode (the other comparisons at their nulls, p = 1). The world's 10 prompts are
its whole prompt set (``world_data``'s "prompts"), as the digit world's 10 canonical prompts are in the demo.

Each magnitude is set so that the *true* effect (the statistic on 20x the seeds, per mode) is a fixed
multiple of the margin: 0, 0.5 and 1 (the null region: P(supported) must stay <= 0.05) and 1.5 and 2 (power;
the pass rule asks >= 0.8 at 2x). The rule is fixed here and not moved.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import xarray as xr

from trajlab.verdicts.catalogue import CATALOGUE, PIXEL_MODES
from trajlab.verdicts.reference import data_reference
from trajlab.verdicts.store import store_verdicts

RHO = 0.5
"""Correlation of the null student's initial noise with the teacher's (same seed)."""
SIDE = 8
FACTORS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
"""True effect / margin at which P(supported) is measured: <= 1 is the null region; 2 is the pass rule's power
point; 3 and 4 show how large an effect the demo's design detects."""
PASS_RULE = "FPR <= 0.05 over the whole null region (true effect 0 to the margin) and power >= 0.8 at 2x the margin"
DEMO_FAMILY = {"diversity_collapse": 17, "canonical_bias": 17, "mode_dropping": 17, "fine_detail": 17,
               "early_commitment": 14, "step_inconsistency": 3, "step_inconsistency_reinjection": 1,
               "cfg_over_amplification": 1, "weak_negative_prompt": 1}
"""Applicable comparisons per failure mode in the demo (each mode is its own Holm family; make demo,
2026-12-02: 96 rows, 88 applicable). tests/test_calibration.py checks these against a demo-shaped store."""
DEMO_SIZES = {"pairs": (10, 16), "control": (10, 8)}
"""(prompts, seeds) of the demo: teacher vs student groups, and the control (guidance, negative, steps) groups."""
GUIDANCE = 2.0
TEACHER_STEPS = 30
STUDENT_STEPS = (1, 2, 4, 8)
SIGMA_MAX, SIGMA_MIN = 20.0, 0.002


def _dct_basis(n: int = SIDE) -> tuple[np.ndarray, np.ndarray]:
    """(64, 64) orthonormal 2-D DCT-II basis (columns) and each column's radial frequency index."""
    k = np.arange(n)
    C = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
    C[0] /= np.sqrt(2.0)
    B = np.einsum("ai,bj->ijab", C, C).reshape(n * n, n * n).T  # column (a, b): outer(C[a], C[b]) flattened
    freq = np.hypot(*np.meshgrid(k, k, indexing="ij")).ravel()
    return B, freq


@dataclass(frozen=True)
class PixelWorld:
    """means (P, K, 64) in [0, 1] grey levels, weights (K,), basis (64, 64), spectrum lam (64,), fine (64,) bool."""

    means: np.ndarray
    weights: np.ndarray
    basis: np.ndarray
    lam: np.ndarray
    fine: np.ndarray

    @property
    def n_prompts(self) -> int:
        return self.means.shape[0]

    def prompts(self) -> list[str]:
        return [f"calibration prompt {p}" for p in range(self.n_prompts)]


def make_world(n_prompts: int = 10, seed: int = 0) -> PixelWorld:
    """Prompts with distinct brightness (so guidance moves ink), four smooth modes each, and a spectrum that
    decays with DCT frequency (the upper half of frequencies: the fine directions)."""
    rng = np.random.default_rng(seed)
    B, freq = _dct_basis()
    low = freq <= 2.5
    means = np.empty((n_prompts, 4, SIDE * SIDE))
    levels = np.linspace(0.32, 0.62, n_prompts)
    for p in range(n_prompts):
        for k in range(4):
            coef = np.where(low, rng.standard_normal(SIDE * SIDE), 0.0) * 0.55
            coef[0] = 0.0
            means[p, k] = levels[p] + B @ coef / SIDE
    lam = 0.002 * np.exp(-freq / 6.0) + 1e-5
    return PixelWorld(np.clip(means, 0.05, 0.95), np.array([0.4, 0.3, 0.2, 0.1]), B, lam,
                      freq >= np.median(freq))


# -- the exact denoiser and the sampler -------------------------------------------------------------
def _denoise(world: PixelWorld, means, weights, lam, y, sigma):
    """Exact posterior mean E[x0 | x0 + sigma z = y] of per-prompt mixtures: means (P, K, d), weights (P, K),
    covariance basis diag(lam) basis^T; y (P, n, d) -> (P, n, d). In the basis: r_k = B^T (y - mu_k), posterior
    p_k ~ w_k N(r_k; 0, lam + sigma^2), E[x0 | y] = sum_k p_k mu_k + B (lam / (lam + sigma^2) * sum_k p_k r_k)."""
    B = world.basis
    mB = means @ B  # (P, K, d)
    r = (y @ B)[:, :, None, :] - mB[:, None]  # (P, n, K, d)
    s2 = lam + sigma ** 2
    logw = np.log(np.maximum(weights, 1e-300))[:, None] - 0.5 * np.einsum("pnkd,d->pnk", r * r, 1.0 / s2)
    post = np.exp(logw - logw.max(-1, keepdims=True))
    post /= post.sum(-1, keepdims=True)
    mix_mean = np.einsum("pnk,pkd->pnd", post, means)
    mix_r = np.einsum("pnk,pnkd->pnd", post, r)
    return mix_mean + (mix_r * (lam / s2)) @ B.T


@dataclass(frozen=True)
class Knobs:
    """A sampler's planted failure (FailureMode.plant(m) -> dict of these fields)."""

    shrink: float = 0.0
    canonical: float = 0.0
    drop: float = 0.0
    warp: float = 0.0
    guidance_factor: float = 1.0
    fine_atten: float = 0.0
    fresh_noise: float = 0.0
    neg_atten: float = 0.0


def _planted_world(world, knobs):
    """(weights (K,), spectrum (d,)) of the planted sampler's conditional worlds."""
    w = world.weights.copy()
    if knobs.canonical:
        w = (1 - knobs.canonical) * w + knobs.canonical * np.eye(len(w))[0]
    if knobs.drop:
        w[-1] *= 1 - knobs.drop
        w = w / w.sum()
    return w, world.lam * np.where(world.fine, (1 - knobs.fine_atten) ** 2, 1.0)


def sample(world: PixelWorld, noise: np.ndarray, steps: int, *, guidance: float = 1.0, negative: bool = False,
           knobs: Knobs = Knobs(), fresh: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(final x (P, n, 64), x0 predictions (steps, P, n, 64), sigmas (steps,)) of every prompt from the same unit
    noise (n, 64) (a seed's noise under every prompt); negative: prompt p's negative is prompt p + 1's world."""
    P, K = world.n_prompts, len(world.weights)
    w, lam = _planted_world(world, knobs)
    cw = np.broadcast_to(w, (P, K))
    u_means = np.broadcast_to(world.means.reshape(1, P * K, -1), (P, P * K, world.means.shape[-1]))
    u_w = np.broadcast_to(np.tile(world.weights, P) / P, (P, P * K))
    n_means, n_w = np.roll(world.means, -1, axis=0), np.broadcast_to(world.weights, (P, K))
    g = guidance * knobs.guidance_factor
    sig = np.geomspace(SIGMA_MAX, SIGMA_MIN, steps + 1)

    def D(y, s):
        s_eff = s * (1 - knobs.warp)
        cond = _denoise(world, world.means, cw, lam, y, s_eff)
        if g == 1.0:
            return cond
        ref = _denoise(world, u_means, u_w, world.lam, y, s_eff)
        if negative:
            ref = (1 - knobs.neg_atten) * _denoise(world, n_means, n_w, world.lam, y, s_eff) + knobs.neg_atten * ref
        return ref + g * (cond - ref)

    y, x0s = np.broadcast_to(noise * sig[0], (P, *noise.shape)).copy(), []
    for i in range(steps):
        d = D(y, sig[i])
        x0s.append(d)
        y = d + (sig[i + 1] / sig[i]) * (y - d)
    x = x0s[-1] if steps == 1 else y
    centre = (w[None, :, None] * world.means).sum(1)[:, None]  # (P, 1, d)
    x0s = np.stack(x0s)
    if knobs.shrink:
        x, x0s = centre + (1 - knobs.shrink) * (x - centre), centre + (1 - knobs.shrink) * (x0s - centre)
    if knobs.fresh_noise and fresh is not None:
        x = x + knobs.fresh_noise * fresh
    return x, x0s, sig[:-1]


def seed_noise(seeds, student: bool) -> np.ndarray:
    """(n, 64) initial noise of each seed: one generator per seed, the same under every prompt."""
    out = []
    for s in seeds:
        g = np.random.default_rng([int(s), 0])
        z, own = g.standard_normal(SIDE * SIDE), g.standard_normal(SIDE * SIDE)
        out.append(RHO * z + np.sqrt(1 - RHO ** 2) * own if student else z)
    return np.stack(out)


def fresh_noise(seeds, steps: int) -> np.ndarray:
    """Per-seed fresh output noise for step count ``steps`` (grey-level units, sd 0.03)."""
    return np.stack([np.random.default_rng([int(s), 1, steps]).standard_normal(SIDE * SIDE) for s in seeds]) * 0.03


def to_image(x: np.ndarray) -> np.ndarray:
    """(..., 64) grey levels -> uint8 (..., 8, 8, 3)."""
    g = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8).reshape(*x.shape[:-1], SIDE, SIDE)
    return np.repeat(g[..., None], 3, axis=-1)


def group(world: PixelWorld, seeds, steps: int, *, role: str, guidance: float = GUIDANCE, negative=None,
          knobs: Knobs = Knobs(), student: bool = False, scheduler: str | None = None, keep: int | None = None,
          label_steps: int | None = None) -> xr.Dataset:
    """One group in the store schema: samples ordered (prompt, seed), image, x0_pred, sigma, the attrs.

    steps: Euler steps run; keep: store the x0 predictions of only this many levels, evenly spread over the
    run (a null student that samples exactly like the teacher but records a few-step grid; labelled
    ``label_steps`` steps); student: the null student's seed noise (correlated RHO with the teacher's)."""
    P = world.n_prompts
    noise = seed_noise(seeds, student)
    label = label_steps or steps
    fresh = fresh_noise(seeds, label)
    levels = np.round(np.linspace(0, steps - 1, keep)).astype(int) if keep else np.arange(steps)
    x, x0, sig = sample(world, noise, steps, guidance=guidance, negative=bool(negative), knobs=knobs, fresh=fresh)
    imgs = to_image(x).reshape(P * len(seeds), SIDE, SIDE, 3)
    x0s = np.moveaxis(x0[levels], 0, 2).reshape(P * len(seeds), len(levels), -1)
    sig = sig[levels]
    n = len(seeds)
    sched = scheduler or ("DDIMScheduler" if role == "teacher" else "LCMScheduler")
    ds = xr.Dataset(
        {"image": (("sample", "h", "w", "rgb"), imgs),
         "x0_pred": (("sample", "step", "d"), x0s.astype(np.float32)),
         "prompt_index": ("sample", np.repeat(np.arange(P), n)), "seed": ("sample", np.tile(np.asarray(seeds), P)),
         "prompt_text": ("prompt", world.prompts()[:P])},
        coords={"sigma": ("step", sig)})
    ds.attrs.update(model=f"calibration-{role}", scheduler_class=sched, guidance=float(guidance),
                    negative_prompt="calibration negative" if negative else "", pipeline_class="ExactWorldPipeline",
                    steps=label, extra={})
    return ds


def decode(ds, idx, step) -> np.ndarray:
    """The calibration groups' x0 "decoder": grey levels -> uint8 images."""
    return to_image(np.asarray(ds["x0_pred"].isel(sample=idx, step=step).values, dtype=np.float64))


def world_data(world: PixelWorld, n_per_prompt: int = 400) -> dict:
    """The real-data reference of the world (k-means modes, ink, band) from exact draws, by the same code as
    the micro-world's (:func:`trajlab.verdicts.reference.data_reference`)."""
    rng = np.random.default_rng(12345)
    imgs, labels = [], []
    for p in range(world.n_prompts):
        k = rng.choice(len(world.weights), size=n_per_prompt, p=world.weights)
        z = rng.standard_normal((n_per_prompt, SIDE * SIDE)) * np.sqrt(world.lam)
        imgs.append(to_image(world.means[p][k] + z @ world.basis.T))
        labels.append(np.full(n_per_prompt, p))
    texts = world.prompts()
    return data_reference(np.concatenate(imgs), np.concatenate(labels), lambda lab: [texts[int(lab)]],
                          "calibration world: exact draws", prompts=texts)


# -- the groups each mode needs -----------------------------------------------------------------------
CONTROL_MODES = ("step_inconsistency", "step_inconsistency_reinjection", "weak_negative_prompt", "cfg_over_amplification")


def mode_groups(world, mode: str, seeds, knobs: Knobs, *, n_control: int | None = None,
                cache: dict | None = None) -> dict[str, xr.Dataset]:
    """{name: Dataset} of the groups mode ``mode`` compares, the candidate carrying ``knobs``; the control modes
    use the first ``n_control`` seeds (default: the demo's control seed count). cache: a dict that keeps groups
    between calls (a group is a pure function of its arguments; the teacher's do not depend on the knobs)."""
    cache = {} if cache is None else cache

    def g(steps, **kw):
        key = (tuple(int(x) for x in seeds), steps, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = group(world, seeds, steps, **kw)
        return cache[key]

    T = dict(role="teacher")
    S = dict(role="student", student=True, keep=4, label_steps=4)  # samples exactly as the teacher, records 4 levels
    if mode in CONTROL_MODES:
        seeds = seeds[: n_control or DEMO_SIZES["control"][1]]
    if mode in ("step_inconsistency", "step_inconsistency_reinjection"):
        out = {"teacher": g(TEACHER_STEPS, **T)}
        for k in STUDENT_STEPS:  # the reference: teacher weights under DDIM, or the student's TCD family
            ref = dict(role="teacher") if mode == "step_inconsistency" else dict(role="student", scheduler="TCDScheduler")
            out[f"reference-{k}"] = g(k, **ref)
            out[f"student-{k}"] = g(k, knobs=knobs, role="student", student=True)
        return out
    if mode == "weak_negative_prompt":
        return {"teacher": g(TEACHER_STEPS, **T), "teacher-neg": g(TEACHER_STEPS, negative=True, **T),
                "student": g(TEACHER_STEPS, **S), "student-neg": g(TEACHER_STEPS, negative=True, knobs=knobs, **S)}
    return {"teacher": g(TEACHER_STEPS, **T), "student": g(TEACHER_STEPS, knobs=knobs, **S)}


def judge(world, data, mode: str, seeds, knobs: Knobs, family: int | dict = DEMO_FAMILY, cache: dict | None = None) -> dict:
    """The store verdict of ``mode`` on groups planted with ``knobs`` (Holm family padded to ``family``: an int, or
    {mode: size})."""
    ds = store_verdicts(mode_groups(world, mode, seeds, knobs, cache=cache), data=data, decode=decode, modes={mode},
                        holm_family=family)
    rows = [i for i in range(ds.sizes["comparison"]) if ds["mode"].values[i] == mode]
    if len(rows) != 1:
        raise RuntimeError(f"calibration of {mode}: expected one row, got {len(rows)}")
    return {k: ds[k].values[rows[0]].item() for k in ("decision", "estimate", "ci_low", "ci_high", "why")}


TRUTH_SEEDS = 160
"""Seeds of a true effect (10x the demo's 16 per prompt; 20x its 8 control seeds), disjoint from every replicate's."""


def true_effect(world, data, mode: str, knobs: Knobs, n_seeds: int = TRUTH_SEEDS, cache: dict | None = None) -> float:
    """The statistic's effect on ``n_seeds`` seeds per prompt by the store-verdict code (its estimate)."""
    seeds = list(range(10 ** 6, 10 ** 6 + n_seeds))
    ds = store_verdicts(mode_groups(world, mode, seeds, knobs, n_control=n_seeds, cache=cache), data=data,
                        decode=decode, modes={mode})
    return float(ds["estimate"].values[0])


KNOB_GRID = np.array([0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9])
"""Knob magnitudes at which each mode's true effect is measured; a target effect is interpolated between them."""


def effect_curve(world, data, mode: str, grid=KNOB_GRID) -> np.ndarray:
    """(len(grid),) true signed effect (failure direction positive) of the mode's planted knob at each grid value."""
    fm = CATALOGUE[mode]
    sign = 1.0 if fm.direction == "increase" else -1.0
    cache: dict = {}
    return np.array([sign * true_effect(world, data, mode, Knobs(**fm.plant(float(m))), cache=cache) for m in grid])


def magnitude_for(curve: np.ndarray, target: float, grid=KNOB_GRID) -> float:
    """The knob magnitude whose true signed effect is ``target``, by linear interpolation of ``curve`` (made
    monotone by a running maximum); NaN when the largest planted knob does not reach it."""
    if target == 0:
        return 0.0
    c = np.maximum.accumulate(np.asarray(curve, dtype=np.float64))
    if target > c[-1]:
        return float("nan")
    i = int(np.searchsorted(c, target))
    if i == 0:
        return float(grid[0])
    a, b = c[i - 1], c[i]
    return float(grid[i - 1] + (grid[i] - grid[i - 1]) * ((target - a) / (b - a) if b > a else 1.0))


def solve_magnitudes(modes=None, factors=FACTORS, progress=None) -> dict:
    """{mode: [knob magnitude per factor]} whose true effect is factor x margin (the expensive part: true
    effects on 20x the seeds over the knob grid)."""
    world = make_world(DEMO_SIZES["pairs"][0])
    data = world_data(world)
    out = {}
    for mode in modes or PIXEL_MODES:
        curve = effect_curve(world, data, mode)
        out[mode] = [magnitude_for(curve, f * CATALOGUE[mode].margin) for f in factors]
        if progress is not None:
            progress(f"magnitudes of {mode}: {np.round(out[mode], 4).tolist()}")
    return out


def run_calibration(*, n_replicates: int = 100, modes=None, factors=FACTORS, family: int | dict = DEMO_FAMILY,
                    magnitudes: dict | None = None, truth: bool = True, progress=None) -> xr.Dataset:
    """P(supported) and P(refuted) per (mode, true effect / margin) over replicate seed blocks.

    magnitudes: {mode: knob magnitude per factor} (default: :func:`solve_magnitudes`). truth: measure each
    planted magnitude's true effect again (False: NaN; the magnitudes were solved for it). Dataset vars on
    (mode, factor): supported_rate, refuted_rate, magnitude (the knob), true_effect (on 20x the seeds); per
    mode: fpr_max (the largest P(supported) at factors <= 1), power_1_5x, power_2x, ok (the pass rule),
    margin, metric. A factor whose effect the planted knob cannot reach has NaN rates (and fails the rule).
    """
    world = make_world(DEMO_SIZES["pairs"][0])
    data = world_data(world)
    modes = list(modes or PIXEL_MODES)
    t0 = time.perf_counter()
    magnitudes = magnitudes or solve_magnitudes(modes, factors)
    bad = {m: len(magnitudes.get(m, ())) for m in modes if len(magnitudes.get(m, ())) != len(factors)}
    if bad:
        raise ValueError(f"magnitudes: {bad} values per mode; expected {len(factors)} (one per factor {factors})")
    mags = np.array([[float(v) for v in magnitudes[m]] for m in modes])
    tcache: dict = {}
    truth = np.array([[true_effect(world, data, m, Knobs(**CATALOGUE[m].plant(k)), cache=tcache)
                       if truth and np.isfinite(k) else np.nan for k in row] for m, row in zip(modes, mags)])
    del tcache
    sup = np.zeros(mags.shape)
    ref = np.zeros(mags.shape)
    n_seeds = DEMO_SIZES["pairs"][1]
    for r in range(n_replicates):
        seeds = list(range(10_000 * (r + 1), 10_000 * (r + 1) + n_seeds))
        cache: dict = {}  # this replicate's groups (the teacher's and the null student's serve every factor)
        for i, m in enumerate(modes):
            for j, k in enumerate(mags[i]):
                if not np.isfinite(k):
                    continue
                dec = judge(world, data, m, seeds, Knobs(**CATALOGUE[m].plant(k)), family, cache=cache)["decision"]
                sup[i, j] += dec == "supported"
                ref[i, j] += dec == "refuted"
        if progress is not None:
            progress(r + 1, n_replicates, time.perf_counter() - t0)
    f = np.asarray(factors, dtype=np.float64)
    rate = np.where(np.isfinite(mags), 1.0, np.nan) / n_replicates
    ds = xr.Dataset({"supported_rate": (("mode", "factor"), sup * rate),
                     "refuted_rate": (("mode", "factor"), ref * rate),
                     "magnitude": (("mode", "factor"), mags), "true_effect": (("mode", "factor"), truth)},
                    coords={"mode": modes, "factor": f})
    ds["factor"].attrs["units"] = "true signed effect / margin"
    ds["true_effect"].attrs["units"] = "effect units of the mode (log ratio or difference), unsigned"
    ds["fpr_max"] = ds["supported_rate"].sel(factor=f[f <= 1]).max("factor", skipna=False)
    ds["power_1_5x"] = ds["supported_rate"].sel(factor=1.5)
    ds["power_2x"] = ds["supported_rate"].sel(factor=2.0)
    ds["ok"] = (ds["fpr_max"] <= 0.05) & (ds["power_2x"] >= 0.8)
    detect = ds["factor"].where(ds["supported_rate"] >= 0.8).min("factor")
    ds["detectable_factor"] = detect
    ds["detectable_factor"].attrs["meaning"] = ("smallest true effect / margin (of the grid) with P(supported) >= 0.8 "
                                                "at the demo's design; NaN: none up to the largest")
    ds["margin"] = ("mode", [CATALOGUE[m].margin for m in modes])
    ds["metric"] = ("mode", [CATALOGUE[m].metric for m in modes])
    ds.attrs.update(n_replicates=n_replicates, n_prompts=DEMO_SIZES["pairs"][0], n_seeds=n_seeds,
                    n_seeds_control=DEMO_SIZES["control"][1], rho=RHO, rule=PASS_RULE,
                    holm_family=str(family if isinstance(family, int) else {m: family.get(m) for m in modes}),
                    wall_s=round(time.perf_counter() - t0, 1),
                    planted="each mode's FailureMode.plant (trajlab/verdicts/modes/<mode>.py)",
                    source="trajlab.verdicts.calibration: store_verdicts on exact pixel-world groups with shared seeds")
    return ds


def summary_line(ds: xr.Dataset) -> str:
    return f"calibration: {int(ds['ok'].sum())}/{ds.sizes['mode']} failure modes with {PASS_RULE}"


__all__ = ["FACTORS", "KNOB_GRID", "Knobs", "PASS_RULE", "PixelWorld", "effect_curve", "group", "judge",
           "magnitude_for", "make_world", "mode_groups", "run_calibration", "sample", "solve_magnitudes", "summary_line",
           "true_effect", "world_data"]
