"""Judge the shapes world's teacher against the targets of issue 17 and write the numbers.

    python -m trajlab.worlds.shapes.quality [--dir data/worlds/shapes] [--n 32] [--n-leftout 64] [--guidance 4]

Samples shapes-sd (``StableDiffusionPipeline.from_pretrained``, DDIM 30 steps, CFG ``--guidance``) on three fixed
prompt sets, reads every sample with the shipped judge and scores it (``scores.score``):

* ``single_full``: one object, every attribute stated -> alignment (all stated attributes right), target >= 0.90;
* ``two_full``: two objects, every attribute and the relation stated -> binding and relation, targets >= 0.60;
* texture (fine detail) over every prompt that states a texture, target >= 0.85;
* ``leftout``: prompts that leave attributes out -> per attribute, the total-variation distance between the read
  histogram of the free slots and the mixture of their exact laws (``world.prompt_distribution``), target <= 0.10
  for every attribute; the n-sample noise floor of that TV and the rare colour's share beside it.

Sample j of every prompt starts from the same seed j. Intervals: Wilson 95% for the rates (samples treated as
independent) and a two-stage bootstrap 95% (prompts, then samples within prompts; 1000 draws) for rates and TVs.
A miss is written as a miss. Writes ``<dir>/quality.json`` and a sample grid ``<dir>/teacher_samples.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import judge as J
from . import scores as S
from . import world as W

SINGLE_FULL = (
    "a large red solid square at the top left", "a small blue striped circle in the centre",
    "a large green striped triangle at the bottom right", "a small yellow solid cross on the right",
    "a large purple solid circle at the top", "a small orange striped square at the bottom left",
    "a large blue solid cross on the left", "a small red striped triangle at the bottom",
)
TWO_FULL = (
    "a large red solid square to the left of a small blue striped circle",
    "a small green striped triangle above a large yellow solid cross",
    "a large blue solid circle to the right of a large orange solid triangle",
    "a small purple solid cross below a large green striped square",
    "a large yellow striped square to the left of a small red solid triangle",
    "a small orange solid circle above a small blue striped cross",
    "a large green solid cross to the right of a small yellow striped circle",
    "a large red striped triangle below a large blue solid square",
)
LEFTOUT = (
    "a shape", "a square", "a red shape", "a large striped circle", "a small shape in the centre",
    "a blue solid triangle at the top right", "a circle and a square", "a red shape to the left of a blue shape",
)
PROMPT_SETS = {"single_full": SINGLE_FULL, "two_full": TWO_FULL, "leftout": LEFTOUT}
TARGETS = {"single_full_alignment": (">=", 0.90), "two_binding": (">=", 0.60), "two_relation": (">=", 0.60),
           "texture": (">=", 0.85), "leftout_tv_max": ("<=", 0.10)}
COMMAND = "python -m trajlab.worlds.shapes.quality"


@torch.no_grad()
def sample(pipe, prompt: str, n: int, steps: int, guidance: float, batch: int = 64, seeds=None,
           negative_prompt: str | None = None) -> np.ndarray:
    """uint8 (n, 32, 32, 3): sample j from seed j (from ``seeds[j]`` when given, n = len(seeds))."""
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    out = []
    for i in range(0, len(seeds), batch):
        gens = [torch.Generator().manual_seed(j) for j in seeds[i:i + batch]]
        im = pipe([prompt] * len(gens), height=32, width=32, num_inference_steps=steps, guidance_scale=guidance,
                  generator=gens, output_type="np",
                  negative_prompt=None if negative_prompt is None else [negative_prompt] * len(gens)).images
        out.append(np.clip(np.rint(im * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def _bootstrap(groups: list[np.ndarray], stat, draws: int = 1000, seed: int = 0) -> list[float]:
    """Two-stage bootstrap 95% interval of ``stat(list of per-prompt index arrays)``."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(draws):
        pick = rng.integers(0, len(groups), len(groups))
        vals.append(stat([groups[p][rng.integers(0, len(groups[p]), len(groups[p]))] for p in pick]))
    vals = np.asarray([v for v in vals if np.isfinite(v)])
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))] if len(vals) else [float("nan")] * 2


def _rate_with_ci(flags_by_prompt: list[list]) -> dict:
    flat = [f for fs in flags_by_prompt for f in fs if f is not None]
    k, n = int(sum(flat)), len(flat)
    arrs = [np.asarray([float(f) for f in fs if f is not None]) for fs in flags_by_prompt]
    arrs = [a for a in arrs if len(a)]
    boot = _bootstrap(arrs, lambda gs: float(np.concatenate(gs).mean()))
    return {"rate": k / n if n else float("nan"), "k": k, "n": n, "wilson95": list(S.wilson(k, n)), "bootstrap95": boot}


def _slot_contributions(prompt: str, readings: list[dict], attribute: str) -> tuple[np.ndarray, np.ndarray]:
    """For one prompt: (read value index per free slot (-1 for a wrong count) , exact law per free slot)."""
    values = W.VALUES[attribute]
    dist = W.prompt_distribution(prompt)
    free = [k for k, slot in enumerate(dist["slots"]) if len(slot[attribute]) > 1]
    laws = np.array([[dist["slots"][k][attribute].get(v, 0.0) for v in values] for k in free]).reshape(len(free), len(values))
    reads = np.full((len(readings), len(free)), -1)
    for i, r in enumerate(readings):
        if r["count"] == dist["count"]:
            reads[i] = [values.index(r["objects"][k][attribute]) for k in free]
    return reads, laws


def _pooled_tv(parts: list[tuple[np.ndarray, np.ndarray]], n_values: int) -> float:
    """TV between the histogram of all read free slots and the mean of their exact laws (as ``scores.score``)."""
    hist, law, m = np.zeros(n_values), np.zeros(n_values), 0
    for reads, laws in parts:
        ok = reads[:, 0] >= 0 if reads.shape[1] else np.zeros(len(reads), bool)
        for k in range(reads.shape[1]):
            hist += np.bincount(reads[ok, k], minlength=n_values)
            law += laws[k] * ok.sum()
            m += int(ok.sum())
    return float(0.5 * np.abs(hist / m - law / m).sum()) if m else float("nan")


def leftout_section(prompts: list[str], readings_by_prompt: list[list[dict]], draws: int = 1000, seed: int = 0) -> dict:
    """Per free attribute: pooled TV (as ``scores.score``'s ``leftout_pooled``), a two-stage bootstrap 95%
    interval, the noise floor of an exact-law histogram of that size; the rare colour share; per-prompt TVs."""
    flat_p = [p for p, rs in zip(prompts, readings_by_prompt) for _ in rs]
    flat_r = [r for rs in readings_by_prompt for r in rs]
    sc = S.score(flat_p, flat_r)
    rng = np.random.default_rng(seed)
    out = {}
    for a, row in sc["leftout_pooled"].items():
        parts = [_slot_contributions(p, rs, a) for p, rs in zip(prompts, readings_by_prompt)]
        tv = _pooled_tv(parts, len(W.VALUES[a]))
        assert abs(tv - row["tv"]) < 1e-9, (a, tv, row["tv"])
        boot = []
        for _ in range(draws):
            pick = rng.integers(0, len(parts), len(parts))
            boot.append(_pooled_tv([(parts[q][0][rng.integers(0, len(parts[q][0]), len(parts[q][0]))], parts[q][1]) for q in pick], len(W.VALUES[a])))
        boot = np.asarray([b for b in boot if np.isfinite(b)])
        out[a] = {"tv": tv, "bootstrap95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
                  "noise_floor": row["noise_floor"], "n_slots": row["n"], "read": row["read"], "exact": row["exact"]}
    per_prompt = {p: [{a: round(v["tv"], 4) for a, v in slot.items()} for slot in sc["leftout"][p]] for p in prompts}
    return {"per_attribute": out, "rare_colour": sc["rare_colour"], "per_prompt": per_prompt}


def _per_attribute_hits(prompts: list[str], readings_by_prompt: list[list[dict]]) -> dict:
    """Single-object prompts: per stated attribute, the fraction of samples read with it right."""
    out = {}
    for a in W.OBJECT_ATTRIBUTES:
        flags = []
        for p, rs in zip(prompts, readings_by_prompt):
            o = W.parse(p)["objects"][0]
            if o[a] is not None:
                flags += [r["count"] == 1 and r["objects"][0][a] == o[a] for r in rs]
        if flags:
            out[a] = round(float(np.mean(flags)), 4)
    out["count"] = round(float(np.mean([r["count"] == 1 for rs in readings_by_prompt for r in rs])), 4)
    return out


def evaluate(pipe, judge, *, n: int = 32, n_leftout: int = 64, steps: int = 30, guidance: float = 4.0, log=print) -> tuple[dict, dict]:
    """(results, images by prompt) for the three prompt sets."""
    images, readings = {}, {}
    for name, prompts in PROMPT_SETS.items():
        for p in prompts:
            images[p] = sample(pipe, p, n_leftout if name == "leftout" else n, steps, guidance)
            readings[p] = judge.read(images[p])
        log(f"quality: {name} sampled and read ({len(prompts)} prompts)")
    res = {}
    single = [[S.alignment(p, r) for r in readings[p]] for p in SINGLE_FULL]
    res["single_full_alignment"] = _rate_with_ci(single)
    res["single_full_per_attribute"] = _per_attribute_hits(list(SINGLE_FULL), [readings[p] for p in SINGLE_FULL])
    comp = {p: [S.composition(p, r) for r in readings[p]] for p in TWO_FULL}
    res["two_binding"] = _rate_with_ci([[c["binding"] for c in comp[p]] for p in TWO_FULL])
    res["two_relation"] = _rate_with_ci([[c["relation"] for c in comp[p]] for p in TWO_FULL])
    res["two_count"] = round(float(np.mean([r["count"] == 2 for p in TWO_FULL for r in readings[p]])), 4)
    textured = [p for p in images if any(o["texture"] for o in W.parse(p)["objects"])]
    res["texture"] = _rate_with_ci([[S.fine_detail(p, r) for r in readings[p]] for p in textured])
    res["texture_prompts"] = len(textured)
    res["leftout"] = leftout_section(list(LEFTOUT), [readings[p] for p in LEFTOUT])
    tvs = {a: v["tv"] for a, v in res["leftout"]["per_attribute"].items()}
    res["leftout_tv_max"] = {"tv": max(tvs.values()), "attribute": max(tvs, key=tvs.get), "per_attribute": tvs}
    res["per_prompt_alignment"] = {p: round(float(np.mean([S.alignment(p, r) for r in readings[p]])), 4) for p in images}
    res["mean_judge_confidence"] = round(float(np.mean([r["confidence"] for rs in readings.values() for r in rs])), 4)
    return res, images


def verdicts(res: dict) -> dict:
    """{target: {"measured", "target", "hit"}} (a hit needs the point estimate on the right side)."""
    out = {}
    for key, (op, bar) in TARGETS.items():
        v = res[key]["tv"] if key == "leftout_tv_max" else res[key]["rate"]
        out[key] = {"measured": round(v, 4), "target": f"{op} {bar}", "hit": bool(v >= bar if op == ">=" else v <= bar)}
    return out


def save_grid(images: dict, path: Path, per_row: int = 8) -> None:
    """One row per prompt, the first ``per_row`` samples (seeds 0..per_row-1), 1 px gaps."""
    from PIL import Image

    k = min(per_row, *(len(ims) for ims in images.values()))
    rows = [np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=255) for im in ims[:k]], 1) for ims in images.values()]
    Image.fromarray(np.concatenate(rows, 0)).save(path, optimize=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog=COMMAND, description="Judge shapes-sd against issue 17's targets (CPU).")
    ap.add_argument("--dir", default=str(J.DEFAULT_DIR), help="world folder with shapes-sd/ and the judge (default data/worlds/shapes)")
    ap.add_argument("--out", default=None, help="quality JSON (default <dir>/quality.json)")
    ap.add_argument("--n", type=int, default=32, help="samples per fully stated prompt (default 32)")
    ap.add_argument("--n-leftout", type=int, default=64, help="samples per prompt with left-out attributes (default 64)")
    ap.add_argument("--steps", type=int, default=30, help="DDIM steps (default 30)")
    ap.add_argument("--guidance", type=float, default=4.0, help="CFG scale (default 4.0)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    a = ap.parse_args(argv)
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(a.threads)
    folder = Path(a.dir)
    if not (folder / "shapes-sd" / "model_index.json").exists():
        raise SystemExit(f"shapes-sd missing in {folder} (train it: python -m trajlab.worlds.shapes.train --out {folder})")
    load0, t0, c0 = os.getloadavg(), time.perf_counter(), time.process_time()
    pipe = StableDiffusionPipeline.from_pretrained(str(folder / "shapes-sd"), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    res, images = evaluate(pipe, J.load_judge(folder if (folder / J.WEIGHTS_FILE).exists() else None), n=a.n, n_leftout=a.n_leftout, steps=a.steps, guidance=a.guidance)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = Path(a.out) if a.out else folder / "quality.json"
    doc = {"model": "shapes-sd", "sampler": f"DDIM {a.steps} steps", "guidance": a.guidance, "samples_per_prompt": {"single_full": a.n, "two_full": a.n, "leftout": a.n_leftout},
           "prompts": {k: list(v) for k, v in PROMPT_SETS.items()}, "targets": verdicts(res), "results": res,
           "intervals": "wilson95: Wilson score (samples independent); bootstrap95: two-stage bootstrap over prompts then samples",
           "command": " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)]),
           "run": {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "threads": a.threads, "load_average_start": [round(v, 2) for v in load0],
                   "load_average_end": [round(v, 2) for v in os.getloadavg()], "machine": J._machine(), "torch": torch.__version__}}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    save_grid(images, out.parent / "teacher_samples.png")
    for k, v in doc["targets"].items():
        print(f"{k}: {v['measured']} (target {v['target']}) {'hit' if v['hit'] else 'MISS'}")
    print(f"written {out} ({wall:.0f} s wall, {cpu:.0f} s CPU)")


if __name__ == "__main__":
    main()
