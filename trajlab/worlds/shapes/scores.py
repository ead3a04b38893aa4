"""Scores of judge readings against prompts of the shapes grammar (no torch needed).

A reading is ``{"count", "axis", "objects": [{shape, colour, size, texture, position}, ...]}`` with
objects in canonical slot order (``world.canonical_order``), as ``judge.Judge.read`` returns it.

* ``alignment``: every stated attribute right (count; for two objects the relation when stated,
  otherwise both objects' attributes in either order).
* ``composition``: ``binding`` (each stated object found with its own attributes, in either slot)
  and ``relation`` (axis right and each object in the slot its relation implies).
* ``fine_detail``: every stated texture read right (None when the prompt states none).
* ``leftout_histograms``: per canonical slot, histograms of the attributes whose exact distribution
  (``world.prompt_distribution``) is not a point mass, with their total-variation distance to it;
  ``rare_colour_share``: the rare colour's read share against its exact share.
  ``tv_distance(p, q) = 1/2 sum |p - q|``; an n-sample histogram has an expected TV > 0 even when
  drawn from the exact law (``tv_noise_floor``).
* ``score``: all of these over (prompt, reading) pairs, with Wilson 95% intervals.

Asking about an attribute the world lacks raises a one-line ValueError (``check_attribute``).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from . import world as W

SLOT_ATTRIBUTES = W.OBJECT_ATTRIBUTES  # shape, colour, size, texture, position
SCENE_ATTRIBUTES = ("count", "axis", "relation")
ATTRIBUTES = SLOT_ATTRIBUTES + SCENE_ATTRIBUTES


def check_attribute(name: str) -> str:
    """``name`` if the shapes world has that attribute, else a one-line ValueError."""
    if name not in ATTRIBUTES:
        raise ValueError(f"shapes world has no attribute {name!r} (it has {', '.join(ATTRIBUTES)})")
    return name


# read-only caches: scoring parses the same few prompts over and over
_parse = functools.lru_cache(maxsize=4096)(W.parse)
_dist = functools.lru_cache(maxsize=4096)(W.prompt_distribution)


def _matches(stated: dict, read: dict) -> bool:
    return all(stated[a] is None or stated[a] == read[a] for a in SLOT_ATTRIBUTES)


def _implied_slots(relation: str | None) -> tuple[int, int] | None:
    """Canonical slots of caption objects (0, 1) for a stated relation."""
    if relation is None:
        return None
    return (0, 1) if relation in ("left of", "above") else (1, 0)


def composition(prompt: str, reading: dict) -> dict:
    """``{"binding": bool, "relation": bool | None}`` (relation None when the prompt leaves it out);
    for one-object prompts binding is the object's stated attributes and relation None."""
    spec = _parse(prompt)
    objs = spec["objects"]
    if reading["count"] != len(objs):
        return {"binding": False, "relation": False if spec.get("relation") else None}
    read = reading["objects"]
    if len(objs) == 1:
        return {"binding": _matches(objs[0], read[0]), "relation": None}
    a, b = objs
    binding = (_matches(a, read[0]) and _matches(b, read[1])) or (_matches(a, read[1]) and _matches(b, read[0]))
    rel = spec["relation"]
    if rel is None:
        return {"binding": binding, "relation": None}
    axis = "horizontal" if rel in ("left of", "right of") else "vertical"
    sa, sb = _implied_slots(rel)
    relation = reading["axis"] == axis and _matches(a, read[sa]) and _matches(b, read[sb])
    return {"binding": binding, "relation": bool(relation)}


def alignment(prompt: str, reading: dict) -> bool:
    """Every stated attribute read right (for two objects: the relation when stated, else binding)."""
    c = composition(prompt, reading)
    return bool(c["relation"]) if c["relation"] is not None else bool(c["binding"])


def _assignment(spec: dict, reading: dict) -> tuple[int, ...]:
    """Slot of each caption object: the relation's when stated and the axis is right, else the order
    that matches most stated non-texture attributes (ties: the relation's order, else identity)."""
    objs = spec["objects"]
    if len(objs) == 1:
        return (0,)
    implied = _implied_slots(spec.get("relation"))
    if implied is not None:
        axis = "horizontal" if spec["relation"] in ("left of", "right of") else "vertical"
        if reading["axis"] == axis:
            return implied
    read = reading["objects"]

    def hits(order):
        return sum(o[a] is not None and o[a] == read[s][a] for o, s in zip(objs, order) for a in SLOT_ATTRIBUTES if a != "texture")

    orders = [implied or (0, 1), tuple(reversed(implied or (0, 1)))]
    return max(orders, key=hits)


def fine_detail(prompt: str, reading: dict) -> bool | None:
    """Every stated texture read right (objects matched to slots by ``_assignment``); None if no
    texture is stated; False when the object count is read wrong."""
    spec = _parse(prompt)
    objs = spec["objects"]
    if all(o["texture"] is None for o in objs):
        return None
    if reading["count"] != len(objs):
        return False
    order = _assignment(spec, reading)
    return all(o["texture"] is None or reading["objects"][s]["texture"] == o["texture"] for o, s in zip(objs, order))


def histogram(values, support=None) -> dict:
    """Normalised counts {value: share} (over ``support`` order when given)."""
    values = list(values)
    n = len(values)
    keys = list(support) if support is not None else sorted(set(values), key=str)
    return {k: (sum(v == k for v in values) / n if n else 0.0) for k in keys}


def tv_distance(p: dict, q: dict) -> float:
    """Total variation 1/2 sum |p - q| over the union of keys (missing = 0)."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def tv_noise_floor(exact: dict, n: int, draws: int = 2000, seed: int = 0) -> float:
    """Expected TV between an n-sample histogram drawn from ``exact`` and ``exact`` (Monte Carlo)."""
    if n <= 0:
        return float("nan")
    keys = list(exact)
    p = np.array([exact[k] for k in keys], float)
    p = p / p.sum()
    counts = np.random.default_rng(seed).multinomial(n, p, size=draws) / n
    return float(0.5 * np.abs(counts - p).sum(1).mean())


def _free_attributes(dist_slot: dict, attributes) -> list[str]:
    return [a for a in attributes if len(dist_slot[a]) > 1]


def leftout_histograms(prompt: str, readings: list[dict], attributes=None) -> list[dict]:
    """Per canonical slot: ``{attr: {"read", "exact", "tv", "noise_floor", "n"}}`` for each attribute
    whose exact distribution under ``prompt`` is not a point mass (readings with the wrong count are
    left out; ``n`` is how many were used)."""
    attributes = [check_attribute(a) for a in (attributes or SLOT_ATTRIBUTES)]
    bad = [a for a in attributes if a not in SLOT_ATTRIBUTES]
    if bad:
        raise ValueError(f"shapes judge: {bad[0]!r} is not a per-object attribute (histograms are per slot: {', '.join(SLOT_ATTRIBUTES)})")
    dist = _dist(prompt)
    used = [r for r in readings if r["count"] == dist["count"]]
    out = []
    for k, slot in enumerate(dist["slots"]):
        row = {}
        for a in _free_attributes(slot, attributes):
            read = histogram([r["objects"][k][a] for r in used], W.VALUES[a])
            row[a] = {"read": read, "exact": slot[a], "tv": tv_distance(read, slot[a]),
                      "noise_floor": tv_noise_floor(slot[a], len(used)), "n": len(used)}
        out.append(row)
    return out


def rare_colour_share(prompts: list[str], readings: list[dict]) -> dict:
    """The rare colour's share among object slots whose colour is left free by the prompt: read vs
    exact (mean exact probability over the same slots); ``n`` slots."""
    read, exact = [], []
    for prompt, r in zip(prompts, readings):
        dist = _dist(prompt)
        if r["count"] != dist["count"]:
            continue
        for k, slot in enumerate(dist["slots"]):
            if len(slot["colour"]) > 1:
                read.append(r["objects"][k]["colour"] == W.RARE_COLOUR)
                exact.append(slot["colour"].get(W.RARE_COLOUR, 0.0))
    n = len(read)
    return {"colour": W.RARE_COLOUR, "read": float(np.mean(read)) if n else float("nan"),
            "exact": float(np.mean(exact)) if n else float("nan"), "n": n}


def _free_slots(prompt: str, reading: dict):
    """(exact law, read value) of every left-out (object slot, attribute) of ``prompt`` in ``reading``; none when
    the object count is read wrong (slots then have no owner)."""
    dist = _dist(prompt)
    if reading["count"] != dist["count"]:
        return []
    return [(slot[a], reading["objects"][k][a]) for k, slot in enumerate(dist["slots"])
            for a in _free_attributes(slot, SLOT_ATTRIBUTES)]


def prior_mode_counts(prompt: str, reading: dict) -> tuple[int, int]:
    """(hits, parts): parts are the left-out (slot, attribute) pairs whose exact law has one most probable value
    (the canonical output); hits those read as it. (0, 0) when the count is read wrong."""
    hits = parts = 0
    for law, value in _free_slots(prompt, reading):
        top = max(law.values())
        modes = [v for v, p in law.items() if p == top]
        if len(modes) == 1:
            parts += 1
            hits += value == modes[0]
    return hits, parts


def exact_shares(prompt: str) -> tuple[float, float]:
    """What the exact law gives the two statistics above on ``prompt``, averaged over its parts: (share at the most
    probable value, over the parts :func:`prior_mode_counts` counts; share at a rare value, over those
    :func:`rare_value_counts` counts); NaN where the prompt has no such part."""
    dist = _dist(prompt)
    laws = [slot[a] for slot in dist["slots"] for a in _free_attributes(slot, SLOT_ATTRIBUTES)]
    top = [max(law.values()) for law in laws if sum(p == max(law.values()) for p in law.values()) == 1]
    rare = [sum(law[v] for v in rare_values(law)) for law in laws if rare_values(law)]
    return (float(np.mean(top)) if top else float("nan"), float(np.mean(rare)) if rare else float("nan"))


def rare_values(law: dict) -> set:
    """Values of an exact law rarer than half the uniform share over its support (the rare colour, 5% of 6)."""
    support = [v for v, p in law.items() if p > 0]
    return {v for v in support if law[v] < 0.5 / len(support)}


def rare_value_counts(prompt: str, reading: dict) -> tuple[int, int]:
    """(hits, parts): parts are the left-out (slot, attribute) pairs whose exact law has a rare value
    (:func:`rare_values`); hits those read as one. (0, 0) when the count is read wrong."""
    hits = parts = 0
    for law, value in _free_slots(prompt, reading):
        rare = rare_values(law)
        if rare:
            parts += 1
            hits += value in rare
    return hits, parts


def _palette_segments() -> tuple[np.ndarray, np.ndarray]:
    """(starts (k, 3), directions (k, 3)): the background-to-colour segments of every palette colour and of its
    stripes' dark shade (anti-aliased edges blend a colour with the background: on the segment)."""
    colours = [np.asarray(c, np.float64) for c in W.RGB.values()]
    ends = np.stack(colours + [c * W.STRIPE_DARK for c in colours])
    b = np.asarray(W.BACKGROUND, np.float64)
    return np.broadcast_to(b, ends.shape).copy(), ends - b


def off_palette(images: np.ndarray) -> np.ndarray:
    """Per image, the mean over pixels of the RGB distance (0-255 units) to the world's palette: the nearest point
    on a background-to-colour segment (:func:`_palette_segments`); a rendered scene scores ~0 (two overlapping
    objects' shared edge pixels aside), colours pushed past the palette (CFG over-amplification) score high.
    images: uint8 (n, H, W, 3) -> (n,) float64."""
    x = np.asarray(images, np.float64)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"off_palette: images shape {x.shape}; expected (n, H, W, 3)")
    a, d = _palette_segments()
    px = x.reshape(-1, 1, 3) - a[None]  # (P, k, 3)
    t = np.clip((px * d[None]).sum(-1) / (d * d).sum(-1)[None], 0.0, 1.0)
    dist = np.sqrt(((px - t[..., None] * d[None]) ** 2).sum(-1)).min(1)
    return dist.reshape(x.shape[0], -1).mean(1)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes out of n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def _rate(flags) -> dict:
    flags = [bool(f) for f in flags if f is not None]
    k, n = sum(flags), len(flags)
    lo, hi = wilson(k, n)
    return {"rate": k / n if n else float("nan"), "ci95": [lo, hi], "n": n}


def score(prompts: list[str], readings: list[dict]) -> dict:
    """Alignment, binding, relation and fine-detail rates (Wilson 95% CIs) over (prompt, reading)
    pairs; per prompt the left-out histograms; pooled over prompts, per attribute, the read
    histogram of free slots against the mixture of their exact laws (TV), and the rare colour share."""
    if len(prompts) != len(readings):
        raise ValueError(f"shapes judge: {len(prompts)} prompts but {len(readings)} readings")
    comp = [composition(p, r) for p, r in zip(prompts, readings)]
    two = [len(_parse(p)["objects"]) == 2 for p in prompts]
    out = {
        "alignment": _rate(alignment(p, r) for p, r in zip(prompts, readings)),
        "binding": _rate(c["binding"] for c, t in zip(comp, two) if t),
        "relation": _rate(c["relation"] for c, t in zip(comp, two) if t),
        "fine_detail": _rate(fine_detail(p, r) for p, r in zip(prompts, readings)),
    }
    by_prompt: dict[str, list] = {}
    for p, r in zip(prompts, readings):
        by_prompt.setdefault(p, []).append(r)
    out["leftout"] = {p: leftout_histograms(p, rs) for p, rs in by_prompt.items()}
    pooled = {}
    for a in SLOT_ATTRIBUTES:
        reads, exact_sum, m = [], {}, 0
        for p, r in zip(prompts, readings):
            dist = _dist(p)
            if r["count"] != dist["count"]:
                continue
            for k, slot in enumerate(dist["slots"]):
                if len(slot[a]) > 1:
                    reads.append(r["objects"][k][a])
                    for v, q in slot[a].items():
                        exact_sum[v] = exact_sum.get(v, 0.0) + q
                    m += 1
        if m:
            exact = {v: exact_sum.get(v, 0.0) / m for v in W.VALUES[a] if exact_sum.get(v, 0.0) > 0}
            read = histogram(reads, W.VALUES[a])
            pooled[a] = {"read": read, "exact": exact, "tv": tv_distance(read, exact), "noise_floor": tv_noise_floor(exact, m), "n": m}
    out["leftout_pooled"] = pooled
    out["rare_colour"] = rare_colour_share(prompts, readings)
    return out
