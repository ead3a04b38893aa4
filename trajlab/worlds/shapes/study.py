"""The shapes world's students against their teacher, and the research plan's teacher-vs-LCM table in this world.

    python -m trajlab.worlds.shapes.study [--dir data/worlds/shapes] [--n 16] [--n-leftout 32] [--configs NAME:STEPS,...]

Every configuration (a registry model at a step count, its recommended scheduler and guidance; loaded by
``trajlab.models.loading.load_pipeline`` exactly as ``trajlab capture`` loads it) samples the 24 prompts of
``quality`` (8 one-object prompts with every attribute stated, 8 two-object prompts, 8 prompts that leave
attributes out); sample j of every prompt and every configuration starts from seed j, so the design is crossed
(one seed = one initial noise under every prompt and every model).

Per configuration:
* the judge's table (``quality.evaluate``): alignment of one-object prompts, binding and relation of two-object
  prompts, texture (fine detail), TV of left-out attributes to the exact prior, the rare colour's share;
* diversity in three units, each the mean over prompts of the within-prompt mean pairwise statistic:
  shapes-LPIPS (the LPIPS-style distance on the judge's conv features, ``metrics.world_lpips``), shapes-CLIP
  feature variance (``metrics.clip.clip_variance`` on shapes-clip image embeddings) and shapes-CLIP alignment
  (mean cosine of image and prompt embeddings);
* 95% intervals by a seed bootstrap: seeds are resampled once per replicate and the same resample is applied
  to every prompt and every configuration (the crossed design), so the difference of two configurations is
  paired replicate by replicate.
Differences to the teacher (student minus teacher) and the two ablations (dmd2 - dmd2-no-gan, turbo -
turbo-distill-heavy) get the same paired intervals. Writes ``<dir>/study.json``.
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

from trajlab.metrics import bootstrap as B

from . import quality as Q

CONFIGS = (("shapes-sd", 30), ("shapes-lcm", 1), ("shapes-lcm", 2), ("shapes-lcm", 4), ("shapes-lcm", 8), ("shapes-lcm-lora", 4),
           ("shapes-pcm", 4), ("shapes-tlcm", 4), ("shapes-turbo", 1), ("shapes-turbo-distill-heavy", 1), ("shapes-dmd2", 4),
           ("shapes-dmd2-no-gan", 4))
TEACHER = ("shapes-sd", 30)
ABLATIONS = {"dmd2 GAN term (dmd2 - dmd2-no-gan)": (("shapes-dmd2", 4), ("shapes-dmd2-no-gan", 4)),
             "ADD weighting (turbo - turbo-distill-heavy)": (("shapes-turbo", 1), ("shapes-turbo-distill-heavy", 1))}
DIVERSITY = ("shapes_lpips", "clip_variance", "clip_alignment")
N_BOOT = 1000
COMMAND = "python -m trajlab.worlds.shapes.study"


def label(cfg: tuple[str, int]) -> str:
    return f"{cfg[0]} {cfg[1]} step{'s' if cfg[1] != 1 else ''}"


def parse_configs(text: str) -> list[tuple[str, int]]:
    """``NAME:STEPS,NAME:STEPS`` -> configurations; refuses an unknown name or a bad step count in one line."""
    from trajlab.models import registry as reg

    out = []
    for item in [t for t in text.split(",") if t]:
        name, _, steps = item.partition(":")
        if reg.get(name) is None:
            raise SystemExit(f"--configs: unknown model {name!r} (shapes models: {', '.join(n for n in reg.registry() if n.startswith('shapes-'))})")
        if not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"--configs: {item!r} needs NAME:STEPS with STEPS >= 1")
        out.append((name, int(steps)))
    return out


class Diversity:
    """Per prompt, the statistics whose within-prompt pair means make the three diversity units."""

    def __init__(self, lpips, clip_model, clip_tokenize):
        from trajlab.metrics.clip import embedder_from_model

        self.lpips = lpips
        self.embedder = embedder_from_model(clip_model, tokenizer=clip_tokenize, image_size=32, name="shapes-clip")

    def per_prompt(self, prompt: str, images: np.ndarray) -> dict:
        """{"shapes_lpips": (n, n) distances, "clip_variance": (n, n) half squared distances of unit embeddings,
        "clip_alignment": (n,) CLIP scores max(100 cos, 0) with the prompt}; the pair means of the first two are the
        diversities (the pair mean of half squared distances is ``metrics.clip.clip_variance``)."""
        from trajlab.metrics.clip import clip_scores, unit
        from trajlab.metrics.world_lpips import micro_lpips_pairwise

        e = unit(self.embedder.embed_images(images))
        sq = np.maximum(2.0 - 2.0 * e @ e.T, 0.0)
        return {"shapes_lpips": micro_lpips_pairwise(self.lpips, images), "clip_variance": sq / 2.0,
                "clip_alignment": clip_scores(e, self.embedder.embed_texts([prompt]))}


def replicates(stats: dict[str, dict], n: int, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, np.ndarray]:
    """(n_boot,) replicates of each diversity unit, seeds resampled jointly over prompts (the same resample for a
    given (n, n_boot, seed), so replicates of two configurations are paired); plus the point estimates."""
    idx = B.resample_indices(n, n_boot, B.rng_for(seed))
    out = {}
    for unit_name in DIVERSITY:
        per_prompt = []
        for st in stats.values():
            v = st[unit_name]
            if v.ndim == 2:
                per_prompt.append(np.array([B.mean_pairwise(v, row) for row in idx]))
            else:
                per_prompt.append(v[idx].mean(1))
        out[unit_name] = np.nanmean(np.stack(per_prompt), 0)
    return out


def point(stats: dict[str, dict]) -> dict[str, float]:
    return {u: float(np.mean([B.mean_pairwise(st[u]) if st[u].ndim == 2 else st[u].mean() for st in stats.values()])) for u in DIVERSITY}


def run(root: Path, configs, n: int, n_leftout: int, log=print) -> dict:
    """Sample, judge and measure every configuration; returns the study document (without run metadata)."""
    from trajlab.metrics.world_lpips import load_shapes_lpips
    from trajlab.models.loading import load_pipeline
    from trajlab.models import registry as reg

    from . import clip as C
    from . import judge as J

    judge = J.load_judge(root if (root / J.WEIGHTS_FILE).exists() else None)
    clip_model, _, tok = C.load_clip(root / "shapes-clip")
    div = Diversity(load_shapes_lpips(root if (root / J.WEIGHTS_FILE).exists() else None), clip_model, tok)
    rows, reps = {}, {}
    for cfg in configs:
        t0 = time.perf_counter()
        spec = reg.get(cfg[0])
        pipe = load_pipeline(cfg[0])
        res, images = Q.evaluate(pipe, judge, n=n, n_leftout=n_leftout, steps=cfg[1], guidance=spec.guidance, log=lambda *_: None)
        stats = {p: div.per_prompt(p, ims[:n]) for p, ims in images.items()}
        reps[cfg] = replicates(stats, n)
        est = point(stats)
        rows[label(cfg)] = {"model": cfg[0], "steps": cfg[1], "scheduler": spec.scheduler, "guidance": spec.guidance,
                            "diversity": {u: {"value": est[u], "ci95": list(B.percentile_ci(reps[cfg][u]))} for u in DIVERSITY},
                            "judge": _judge_row(res), "wall_s": round(time.perf_counter() - t0, 1)}
        log(f"study: {label(cfg)}: lpips {est['shapes_lpips']:.3f} clip var {est['clip_variance']:.4f} align {est['clip_alignment']:.3f} "
            f"single {res['single_full_alignment']['rate']:.3f} binding {res['two_binding']['rate']:.3f} texture {res['texture']['rate']:.3f} "
            f"({rows[label(cfg)]['wall_s']} s)")
    doc = {"configs": rows, "differences_to_teacher": {}, "ablations": {}}
    if TEACHER in reps:
        for cfg in configs:
            if cfg != TEACHER:
                doc["differences_to_teacher"][label(cfg)] = _difference(rows[label(cfg)], rows[label(TEACHER)], reps[cfg], reps[TEACHER])
    for name, (a, b) in ABLATIONS.items():
        if a in reps and b in reps:
            doc["ablations"][name] = _difference(rows[label(a)], rows[label(b)], reps[a], reps[b])
    return doc


def _judge_row(res: dict) -> dict:
    lo = res["leftout"]
    return {"single_alignment": _rate(res["single_full_alignment"]), "binding": _rate(res["two_binding"]),
            "relation": _rate(res["two_relation"]), "texture": _rate(res["texture"]), "two_count": res["two_count"],
            "leftout_tv": {a: {"tv": round(v["tv"], 4), "bootstrap95": [round(x, 4) for x in v["bootstrap95"]], "noise_floor": v["noise_floor"]}
                           for a, v in lo["per_attribute"].items()},
            "rare_colour": lo["rare_colour"], "per_attribute_single": res["single_full_per_attribute"],
            "judge_confidence": res["mean_judge_confidence"]}


def _rate(r: dict) -> dict:
    return {"rate": round(r["rate"], 4), "k": r["k"], "n": r["n"], "wilson95": [round(x, 4) for x in r["wilson95"]],
            "bootstrap95": [round(x, 4) for x in r["bootstrap95"]]}


def _difference(row_a: dict, row_b: dict, rep_a: dict, rep_b: dict) -> dict:
    """a - b for each diversity unit with the paired seed-bootstrap 95% interval; judge rates side by side."""
    out = {}
    for u in DIVERSITY:
        d = rep_a[u] - rep_b[u]
        out[u] = {"difference": row_a["diversity"][u]["value"] - row_b["diversity"][u]["value"], "ci95": list(B.percentile_ci(d))}
    for k in ("single_alignment", "binding", "texture"):
        out[k] = {"a": row_a["judge"][k]["rate"], "b": row_b["judge"][k]["rate"]}
    out["leftout_colour_tv"] = {"a": row_a["judge"]["leftout_tv"].get("colour", {}).get("tv"), "b": row_b["judge"]["leftout_tv"].get("colour", {}).get("tv")}
    return out


def main(argv=None) -> None:
    from . import judge as J

    ap = argparse.ArgumentParser(prog=COMMAND, description="Judge the shapes world's students against shapes-sd (CPU).")
    ap.add_argument("--dir", default=str(J.DEFAULT_DIR), help="world folder (default data/worlds/shapes)")
    ap.add_argument("--n", type=int, default=16, help="samples per fully stated prompt (default 16)")
    ap.add_argument("--n-leftout", type=int, default=32, help="samples per prompt with left-out attributes (default 32)")
    ap.add_argument("--configs", default=None, help="NAME:STEPS,... (default: the teacher, LCM 1/2/4/8, every student at its steps)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    a = ap.parse_args(argv)
    configs = parse_configs(a.configs) if a.configs else list(CONFIGS)
    if a.n < 2 or a.n_leftout < a.n:
        raise SystemExit(f"--n {a.n} / --n-leftout {a.n_leftout}: need n >= 2 and n-leftout >= n")
    torch.set_num_threads(a.threads)
    root = Path(a.dir)
    if root.name != "shapes":
        raise SystemExit(f"--dir {root}: expected a world folder named shapes (its models load as world:shapes/NAME)")
    os.environ["TRAJLAB_WORLDS_DIR"] = str(root.parent.resolve())
    load0, t0, c0 = os.getloadavg(), time.perf_counter(), time.process_time()
    doc = run(root, configs, a.n, a.n_leftout)
    doc["design"] = (f"{a.n} samples per stated prompt, {a.n_leftout} per left-out prompt (diversity on the first {a.n}); sample j from seed j "
                     "in every prompt and configuration (crossed); diversity CIs: seed bootstrap, one resample for all prompts and configurations "
                     f"({N_BOOT} replicates); judge rates: Wilson (samples independent) and two-stage bootstrap (prompts, then samples)")
    doc["units"] = {"shapes_lpips": "shapes-LPIPS (judge conv features; not human-calibrated)", "clip_variance": "shapes-CLIP feature variance (half mean squared distance of unit embeddings)",
                    "clip_alignment": "shapes-CLIP score, mean max(100 cos(image, prompt), 0)"}
    doc["command"] = " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)])
    doc["run"] = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1), "threads": a.threads,
                  "load_average_start": [round(v, 2) for v in load0], "load_average_end": [round(v, 2) for v in os.getloadavg()],
                  "machine": J._machine(), "torch": torch.__version__}
    out = root / "study.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"written {out} ({doc['run']['wall_s']:.0f} s wall)")


if __name__ == "__main__":
    main()
