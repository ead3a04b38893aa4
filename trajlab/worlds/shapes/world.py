"""The shapes world: seeded procedural RGB scenes of one or two objects, with exact prompt distributions.

Nothing is downloaded; everything below is generated from a seed.

Scenes
------
A scene is ``{"objects": [obj, ...], "relation": r}`` (``"relation"`` only when there are two
objects). Each object is ``{"shape", "colour", "size", "texture", "x", "y", "position"}``: ``x, y``
are the object's centre in pixels (pixel ``i`` spans ``[i, i + 1)``, ``y`` grows downwards) and
``position`` is the name of its cell in a 3x3 grid (see below). ``objects`` are in caption order: for
two objects the scene reads "objects[0] <relation> objects[1]", e.g. ``relation == "left of"``
means objects[0] is the left one.

Attributes and their priors (what a left-out attribute follows; all non-uniform)::

    count     1: 0.55   2: 0.45
    shape     square 0.35  circle 0.30  triangle 0.20  cross 0.15
    colour    red 0.28  orange 0.12  yellow 0.14  green 0.18  blue 0.24  purple 0.04 (the rare colour)
    size      small 0.40 (7 px)  large 0.60 (12 px)
    texture   solid 0.70  striped 0.30 (vertical stripes 2 px wide: 2 px of the colour, 2 px of a
              dark shade of it (x 0.35), phase fixed to the pixel grid: the fine detail)
    row       top 0.30  middle 0.45  bottom 0.25
    column    left 0.35  centre 0.40  right 0.25
    relation  left of 0.40  right of 0.20  above 0.25  below 0.15

Every object attribute is drawn independently from its prior. Geometry: the grid centres are at
8, 16, 24 px on each axis (32 x 32 image); every centre gets an independent uniform jitter of
+-1.5 px. One object: row and column drawn independently (so ``position`` = row x column, nine
cells named ``top left, top, top right, left, centre, right, bottom left, bottom, bottom right``).
Two objects: for "left of" / "right of" both sit in one row (drawn from the row prior), in the left
and right columns; for "above" / "below" both sit in one column (drawn from the column prior), in the
top and bottom rows. Objects never overlap. Background: flat light grey (232).

Canonical slot order (what the judge reads): objects sorted left-to-right, then top-to-bottom, by
their grid cell (``canonical_order``). For two objects side by side slot 0 is the left one; for two
objects one above the other slot 0 is the top one.

Caption grammar
---------------
::

    prompt    := object [" " place]                   one object
               | object " " relation " " object       two objects
    object    := article [size " "] [colour " "] [texture " "] noun
    article   := "a" | "an"            ("an" exactly before a vowel: "an orange ...")
    size      := "small" | "large"
    colour    := "red" | "orange" | "yellow" | "green" | "blue" | "purple"
    texture   := "solid" | "striped"
    noun      := "square" | "circle" | "triangle" | "cross" | "shape"     ("shape": shape left out)
    relation  := "to the left of" | "to the right of" | "above" | "below" | "and"  ("and": left out)
    place     := "at the top left" | "at the top" | "at the top right" | "on the left"
               | "in the centre" | "on the right" | "at the bottom left" | "at the bottom"
               | "at the bottom right"

Words are lower case, separated by single spaces, modifiers in the fixed order size, colour, texture.
``parse`` normalises case, surrounding blanks, repeated blanks and one trailing full stop, and refuses
anything else with a ValueError naming the nearest valid form. Position can only be stated for a
single object (for two objects the relation states it).

``caption(scene, rng)`` leaves each attribute out independently of its value, with probability::

    shape 0.20  colour 0.35  size 0.50  texture 0.50  position 0.50 (one object)  relation 0.20

(``rng=None`` states everything). Because leaving out never depends on the value, conditioning the
scene distribution on a caption keeps every stated attribute fixed and every left-out one at its
prior: ``prompt_distribution`` gives those exact marginals per caption-order object, per canonical
slot (a mixture over the relation when the relation is left out or puts objects[0] second) and for
the relation and the axis (horizontal / vertical) of two objects. ``prompt_probability`` is the exact
probability that ``caption(sample)`` produces a prompt. Both can be checked by Monte Carlo with
``sample_scenes`` and ``caption`` alone.
"""

from __future__ import annotations

import difflib
import re

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4
BACKGROUND = (232, 232, 232)
GRID = (8.0, 16.0, 24.0)
JITTER = 1.5
STRIPE_WIDTH = 2
STRIPE_DARK = 0.35
HALF_SIZE = {"small": 3.5, "large": 6.0}
CROSS_ARM = 0.34  # half-width of a cross arm, as a fraction of the half size

SHAPES = ("square", "circle", "triangle", "cross")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SIZES = ("small", "large")
TEXTURES = ("solid", "striped")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")
AXES = ("horizontal", "vertical")
RARE_COLOUR = "purple"

OBJECT_ATTRIBUTES = ("shape", "colour", "size", "texture", "position")
VALUES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "texture": TEXTURES, "position": POSITIONS}

RGB = {
    "red": (215, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (235, 205, 40),
    "green": (40, 160, 70),
    "blue": (40, 90, 215),
    "purple": (140, 60, 180),
}

PRIORS = {
    "count": {1: 0.55, 2: 0.45},
    "shape": {"square": 0.35, "circle": 0.30, "triangle": 0.20, "cross": 0.15},
    "colour": {"red": 0.28, "orange": 0.12, "yellow": 0.14, "green": 0.18, "blue": 0.24, "purple": 0.04},
    "size": {"small": 0.40, "large": 0.60},
    "texture": {"solid": 0.70, "striped": 0.30},
    "row": {"top": 0.30, "middle": 0.45, "bottom": 0.25},
    "column": {"left": 0.35, "centre": 0.40, "right": 0.25},
    "relation": {"left of": 0.40, "right of": 0.20, "above": 0.25, "below": 0.15},
}

#: Uniform priors over the same values (the judge trains on these, so it carries no prior of its own).
UNIFORM_PRIORS = {k: {v: 1.0 / len(d) for v in d} for k, d in PRIORS.items()}

OMIT = {"shape": 0.20, "colour": 0.35, "size": 0.50, "texture": 0.50, "position": 0.50, "relation": 0.20}

PLACE_PHRASES = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
OMITTED_RELATION = "and"


def position_name(row: int, col: int) -> str:
    """Grid cell name for row, column indices (0..2 each)."""
    return POSITIONS[3 * row + col]


def position_cell(position: str) -> tuple[int, int]:
    """(row, column) indices of a grid cell name."""
    i = POSITIONS.index(position)
    return divmod(i, 3)


def position_bucket(x: float, y: float) -> str:
    """The grid cell containing a centre (boundaries half-way between grid centres: 12 and 20 px)."""
    def idx(t):
        return 0 if t < (GRID[0] + GRID[1]) / 2 else (1 if t < (GRID[1] + GRID[2]) / 2 else 2)

    return position_name(idx(y), idx(x))


def position_prior(priors: dict | None = None) -> dict[str, float]:
    """Prior of a single object's cell: row prior x column prior."""
    p = PRIORS if priors is None else priors
    return {position_name(r, c): p["row"][ROWS[r]] * p["column"][COLUMNS[c]] for r in range(3) for c in range(3)}


# ----------------------------------------------------------------------------------------------
# sampling


def _cdf(prior: dict) -> tuple[list, np.ndarray]:
    keys = list(prior)
    c = np.cumsum([prior[k] for k in keys])
    c[-1] = np.inf  # u < 1 always lands in range whatever the float rounding
    return keys, c


def _draw(prior: dict, u: np.ndarray) -> list:
    keys, c = _cdf(prior)
    return [keys[i] for i in np.searchsorted(c, u, side="right")]


_COLS = {"count": 0, "relation": 1, "line": 2}  # per-scene uniforms; then 7 per object slot
_PER_OBJECT = ("shape", "colour", "size", "texture", "row", "column", "jx", "jy")
_NU = 3 + 2 * len(_PER_OBJECT)


def sample_scenes(n: int, seed: int, priors: dict | None = None) -> list[dict]:
    """``n`` scenes from the world's priors (or ``priors``, e.g. ``UNIFORM_PRIORS``), seeded.

    Reproducible and prefix-stable: ``sample_scenes(m, s) == sample_scenes(n, s)[:m]`` for m <= n.
    """
    p = PRIORS if priors is None else priors
    rng = np.random.default_rng(seed)
    u = rng.random((int(n), _NU))
    count = _draw(p["count"], u[:, 0])
    relation = _draw(p["relation"], u[:, 1])
    line_row = _draw(p["row"], u[:, 2])
    line_col = _draw(p["column"], u[:, 2])
    per = []
    for k in range(2):
        off = 3 + k * len(_PER_OBJECT)
        col = {a: u[:, off + i] for i, a in enumerate(_PER_OBJECT)}
        per.append({
            "shape": _draw(p["shape"], col["shape"]),
            "colour": _draw(p["colour"], col["colour"]),
            "size": _draw(p["size"], col["size"]),
            "texture": _draw(p["texture"], col["texture"]),
            "row": [ROWS.index(r) for r in _draw(p["row"], col["row"])],
            "column": [COLUMNS.index(c) for c in _draw(p["column"], col["column"])],
            "jx": ((2 * col["jx"] - 1) * JITTER).tolist(),
            "jy": ((2 * col["jy"] - 1) * JITTER).tolist(),
        })
    scenes = []
    for i in range(int(n)):
        if count[i] == 1:
            cells = [(per[0]["row"][i], per[0]["column"][i])]
        else:
            r = relation[i]
            if r in ("left of", "right of"):
                row = ROWS.index(line_row[i])
                cells = [(row, 0), (row, 2)] if r == "left of" else [(row, 2), (row, 0)]
            else:
                c = COLUMNS.index(line_col[i])
                cells = [(0, c), (2, c)] if r == "above" else [(2, c), (0, c)]
        objects = []
        for k, (row, c) in enumerate(cells):
            q = per[k]
            objects.append({
                "shape": q["shape"][i],
                "colour": q["colour"][i],
                "size": q["size"][i],
                "texture": q["texture"][i],
                "x": GRID[c] + q["jx"][i],
                "y": GRID[row] + q["jy"][i],
                "position": position_name(row, c),
            })
        scene = {"objects": objects}
        if count[i] == 2:
            scene["relation"] = relation[i]
        scenes.append(scene)
    return scenes


def canonical_order(scene: dict) -> list[int]:
    """Indices of ``scene["objects"]`` left-to-right, then top-to-bottom (by grid cell)."""
    def key(i):
        o = scene["objects"][i]
        row, col = position_cell(o.get("position") or position_bucket(o["x"], o["y"]))
        return (col, row)

    return sorted(range(len(scene["objects"])), key=key)


def canonical_objects(scene: dict) -> list[dict]:
    """The scene's objects in canonical slot order."""
    return [scene["objects"][i] for i in canonical_order(scene)]


def scene_axis(scene: dict) -> str | None:
    """"horizontal" (side by side) or "vertical" (one above the other) for two objects, else None."""
    if len(scene["objects"]) != 2:
        return None
    return "horizontal" if scene["relation"] in ("left of", "right of") else "vertical"


# ----------------------------------------------------------------------------------------------
# rendering


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "square":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "triangle":  # apex up (y grows downwards)
        return (v <= 1) & (np.abs(u) <= (v + 1) / 2)
    if shape == "cross":
        a = CROSS_ARM
        return ((np.abs(u) <= a) & (np.abs(v) <= 1)) | ((np.abs(v) <= a) & (np.abs(u) <= 1))
    raise ValueError(f"shapes world: unknown shape {shape!r} (it has {', '.join(SHAPES)})")


_SUB = (np.arange(IMAGE_SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sub-pixel centres, pixel units


def render(scene: dict) -> np.ndarray:
    """The scene as uint8 (32, 32, 3): anti-aliased shapes (coverage from 4x4 sub-samples per pixel),
    stripes on the pixel grid (a pixel's colour is constant, so it blends by its coverage)."""
    s, n = SUPERSAMPLE, IMAGE_SIZE
    img = np.empty((n, n, 3), np.float64)
    img[:] = BACKGROUND
    for o in scene["objects"]:
        if o["colour"] not in RGB:
            raise ValueError(f"shapes world: unknown colour {o['colour']!r} (it has {', '.join(COLOURS)})")
        if o["texture"] not in TEXTURES:
            raise ValueError(f"shapes world: unknown texture {o['texture']!r} (it has {', '.join(TEXTURES)})")
        h = HALF_SIZE[o["size"]]
        cx, cy = float(o["x"]), float(o["y"])
        x0, x1 = max(0, int(cx - h - 1)), min(n, int(cx + h + 1) + 1)  # pixel bounding box
        y0, y1 = max(0, int(cy - h - 1)), min(n, int(cy + h + 1) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        X, Y = _SUB[x0 * s:x1 * s][None, :], _SUB[y0 * s:y1 * s][:, None]
        mask = _shape_mask(o["shape"], (X - cx) / h, (Y - cy) / h)
        cover = mask.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))[..., None]  # (h, w, 1)
        rgb = np.asarray(RGB[o["colour"]], np.float64)
        if o["texture"] == "striped":
            dark = (np.arange(x0, x1) // STRIPE_WIDTH) % 2 == 1
            cols = np.where(dark[:, None], rgb * STRIPE_DARK, rgb)[None]  # (1, w, 3)
        else:
            cols = rgb
        patch = img[y0:y1, x0:x1]
        patch += cover * (cols - patch)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_batch(scenes: list[dict]) -> np.ndarray:
    """uint8 (N, 32, 32, 3)."""
    out = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, sc in enumerate(scenes):
        out[i] = render(sc)
    return out


# ----------------------------------------------------------------------------------------------
# captions and the grammar


def _object_phrase(o: dict) -> str:
    words = [o[a] for a in ("size", "colour", "texture") if o.get(a) is not None]
    words.append(o.get("shape") or "shape")
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def format_prompt(spec: dict) -> str:
    """The grammar's string for a spec (``parse``'s output; ``None`` = left out)."""
    objs = spec["objects"]
    if len(objs) == 1:
        text = _object_phrase(objs[0])
        if objs[0].get("position") is not None:
            text += " " + PLACE_PHRASES[objs[0]["position"]]
        return text
    if len(objs) == 2:
        rel = spec.get("relation")
        phrase = OMITTED_RELATION if rel is None else RELATION_PHRASES[rel]
        return f"{_object_phrase(objs[0])} {phrase} {_object_phrase(objs[1])}"
    raise ValueError(f"shapes world: a prompt has one or two objects, not {len(objs)}")


def caption(scene: dict, rng=None) -> str:
    """A caption from the grammar; with ``rng`` (a numpy Generator or a seed) attributes are left out
    independently with probabilities ``OMIT``; ``rng=None`` states everything."""
    objs = scene["objects"]
    if rng is None:
        u = np.ones(11)
    else:
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        u = rng.random(11)  # fixed draw count per caption: reproducible streams
    spec_objs = []
    for k, o in enumerate(objs):
        d = {}
        for j, a in enumerate(OBJECT_ATTRIBUTES):
            if a == "position" and len(objs) != 1:
                d[a] = None
                continue
            value = o[a] if a != "position" else (o.get("position") or position_bucket(o["x"], o["y"]))
            d[a] = None if u[5 * k + j] < OMIT[a] else value
        spec_objs.append(d)
    spec = {"objects": spec_objs}
    if len(objs) == 2:
        spec["relation"] = None if u[10] < OMIT["relation"] else scene["relation"]
    return format_prompt(spec)


_ALT = lambda xs: "|".join(re.escape(x) for x in sorted(xs, key=len, reverse=True))  # noqa: E731
_OBJ_RE = (rf"(a|an) (?:({_ALT(SIZES)}) )?(?:({_ALT(COLOURS)}) )?(?:({_ALT(TEXTURES)}) )?({_ALT(SHAPES + ('shape',))})")
_ONE_RE = re.compile(rf"^{_OBJ_RE}(?: ({_ALT(PLACE_PHRASES.values())}))?$")
_TWO_RE = re.compile(rf"^{_OBJ_RE} ({_ALT([*RELATION_PHRASES.values(), OMITTED_RELATION])}) {_OBJ_RE}$")
_PLACE_OF = {v: k for k, v in PLACE_PHRASES.items()}
_RELATION_OF = {v: k for k, v in RELATION_PHRASES.items()}

_VOCAB = sorted({w for text in [*SIZES, *COLOURS, *TEXTURES, *SHAPES, "shape", "a", "an", *PLACE_PHRASES.values(),
                                *RELATION_PHRASES.values(), OMITTED_RELATION] for w in text.split()})


def _normalise(prompt: str) -> str:
    text = " ".join(str(prompt).lower().split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def _spec_object(groups) -> dict:
    _article, size, colour, texture, noun = groups
    return {"shape": None if noun == "shape" else noun, "colour": colour, "size": size, "texture": texture, "position": None}


def _match(text: str) -> dict | None:
    m = _ONE_RE.match(text)
    if m:
        o = _spec_object(m.groups()[:5])
        o["position"] = _PLACE_OF[m.group(6)] if m.group(6) else None
        return {"objects": [o]}
    m = _TWO_RE.match(text)
    if m:
        g = m.groups()
        rel = g[5]
        return {"objects": [_spec_object(g[:5]), _spec_object(g[6:11])], "relation": None if rel == OMITTED_RELATION else _RELATION_OF[rel]}
    return None


def _object_from_words(words: list[str]) -> dict:
    o = {a: None for a in OBJECT_ATTRIBUTES}
    for w in words:
        for a, vals in (("size", SIZES), ("colour", COLOURS), ("texture", TEXTURES), ("shape", SHAPES)):
            if w in vals and o[a] is None:
                o[a] = w
    return o


def _position_from_words(words: list[str]) -> str | None:
    row = 0 if "top" in words else (2 if "bottom" in words else 1)
    col = 0 if "left" in words else (2 if "right" in words else 1)
    if not any(w in words for w in ("top", "bottom", "left", "right", "centre")):
        return None
    return position_name(row, col)


_PLACE_WORDS = {"to", "the", "left", "right", "on", "top", "bottom", "at", "in", "centre"}


def nearest_form(prompt: str) -> str:
    """The valid prompt nearest to ``prompt``: words corrected to the grammar's vocabulary (difflib),
    unknown words dropped, attributes put in grammar order, the article agreed."""
    fixed = []
    for t in _normalise(prompt).replace(",", " ").split():
        if t in _VOCAB:
            fixed.append(t)
            continue
        m = difflib.get_close_matches(t, _VOCAB, n=1, cutoff=0.6)
        if not m and t.endswith("s"):
            m = difflib.get_close_matches(t[:-1], _VOCAB, n=1, cutoff=0.6)
        if m:
            fixed.append(m[0])
    spec = _match(" ".join(fixed))
    if spec is not None:
        return format_prompt(spec)
    rel, start, end = None, None, None
    for i, t in enumerate(fixed):
        if t in ("above", "below", OMITTED_RELATION):
            rel, start, end = (None if t == OMITTED_RELATION else t), i, i + 1
            break
        if t == "of":
            j = i
            while j > 0 and fixed[j - 1] in _PLACE_WORDS:
                j -= 1
            before = fixed[j:i]
            rel = ("left of" if "left" in before else "right of" if "right" in before else
                   "above" if "top" in before else "below" if "bottom" in before else None)
            start, end = j, i + 1
            break
    if start is not None:
        spec = {"objects": [_object_from_words(fixed[:start]), _object_from_words(fixed[end:])], "relation": rel}
    else:
        o = _object_from_words(fixed)
        o["position"] = _position_from_words(fixed)
        spec = {"objects": [o]}
    return format_prompt(spec)


def parse(prompt: str) -> dict:
    """``{"objects": [{"shape", "colour", "size", "texture", "position"}, ...], "relation"}`` (None = left
    out; ``"relation"`` only for two objects). Raises ValueError naming the nearest valid form."""
    text = _normalise(prompt)
    spec = _match(text)
    if spec is None or format_prompt(spec) != text:
        raise ValueError(f"prompt outside the shapes grammar: {prompt!r}; nearest valid form: {nearest_form(prompt)!r}")
    return spec


# ----------------------------------------------------------------------------------------------
# exact distributions


def _object_marginals(o: dict, priors: dict) -> dict:
    return {a: ({o[a]: 1.0} if o.get(a) is not None else dict(priors[a])) for a in ("shape", "colour", "size", "texture")}


def _add(d: dict, key, p: float) -> None:
    d[key] = d.get(key, 0.0) + p


def _ordered(d: dict, values) -> dict:
    return {v: d[v] for v in values if d.get(v, 0.0) > 0}


def prompt_distribution(prompt: str, priors: dict | None = None) -> dict:
    """Exact attribute marginals of the scenes whose caption is ``prompt``.

    Returns ``{"prompt", "count", "objects": [{attr: {value: p}}] (caption order), "slots": [...]
    (canonical slot order, what the judge reads)}`` plus ``"relation"`` and ``"axis"`` for two
    objects. Attributes: shape, colour, size, texture, position. Conditioning: leaving out is
    independent of the value, so a stated attribute is a point mass and a left-out one its prior; the
    only coupling is through the relation (which object sits where).
    """
    p = PRIORS if priors is None else priors
    spec = parse(prompt)
    objs = spec["objects"]
    marg = [_object_marginals(o, p) for o in objs]
    if len(objs) == 1:
        o = objs[0]
        marg[0]["position"] = {o["position"]: 1.0} if o["position"] is not None else position_prior(p)
        marg[0]["position"] = _ordered(marg[0]["position"], POSITIONS)
        return {"prompt": format_prompt(spec), "count": 1, "objects": marg, "slots": [dict(marg[0])]}

    rel_dist = {spec["relation"]: 1.0} if spec["relation"] is not None else dict(p["relation"])
    pos = [{}, {}]
    slots = [{a: {} for a in OBJECT_ATTRIBUTES} for _ in range(2)]
    axis = {}
    for rel, pr in rel_dist.items():
        horizontal = rel in ("left of", "right of")
        _add(axis, "horizontal" if horizontal else "vertical", pr)
        first = 0 if rel in ("left of", "above") else 1  # caption object in canonical slot 0
        perm = (first, 1 - first)
        for slot, k in enumerate(perm):
            for a in ("shape", "colour", "size", "texture"):
                for v, q in marg[k][a].items():
                    _add(slots[slot][a], v, pr * q)
        line = p["row"] if horizontal else p["column"]
        for lv, pl in line.items():
            li = (ROWS if horizontal else COLUMNS).index(lv)
            cells = [(li, 0), (li, 2)] if horizontal else [(0, li), (2, li)]  # canonical slot cells
            for slot, k in enumerate(perm):
                name = position_name(*cells[slot])
                _add(pos[k], name, pr * pl)
                _add(slots[slot]["position"], name, pr * pl)
    for k in range(2):
        marg[k]["position"] = _ordered(pos[k], POSITIONS)
        for a in OBJECT_ATTRIBUTES:
            slots[k][a] = _ordered(slots[k][a], VALUES[a])
    return {
        "prompt": format_prompt(spec),
        "count": 2,
        "objects": marg,
        "slots": slots,
        "relation": _ordered(rel_dist, RELATIONS),
        "axis": _ordered(axis, AXES),
    }


def prompt_probability(prompt: str) -> float:
    """Exact probability that ``caption(sample_scenes(1, s)[0], rng)`` equals ``prompt`` (world priors)."""
    spec = parse(prompt)
    objs = spec["objects"]
    prob = PRIORS["count"][len(objs)]
    for o in objs:
        for a in OBJECT_ATTRIBUTES:
            if a == "position":
                if len(objs) != 1:
                    continue
                prior = position_prior()
            else:
                prior = PRIORS[a]
            prob *= OMIT[a] if o[a] is None else (1 - OMIT[a]) * prior[o[a]]
    if len(objs) == 2:
        r = spec["relation"]
        prob *= OMIT["relation"] if r is None else (1 - OMIT["relation"]) * PRIORS["relation"][r]
    return prob
