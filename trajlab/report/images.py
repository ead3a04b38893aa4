"""Images of the report: the teacher's image grid beside each other group's on the same (prompt, seed)
cells, rows labelled with the prompt text and columns with the seed; x0-prediction filmstrips of every student
(and the other groups the results hold one for) beside the teacher's, lined up by sigma; and a step slider
(plain JavaScript in the page) over the teacher's and the other groups' x0 predictions.

Draws ``results["image_grid"]`` and ``results["filmstrip"]`` (:mod:`trajlab.analysis.result_images`) as they
are: the groups, prompts and samples are those the results hold. Prompts are named by their text when the
result carries a ``prompt_text`` coordinate, else by index.
"""
from __future__ import annotations

import numpy as np

from trajlab.report.blocks import h3, none, p

SLIDER_SCALE = 3
"""Each x0-prediction pixel of the slider is a SLIDER_SCALE x SLIDER_SCALE block."""
LABEL_WIDTH = 24
"""Row labels (prompt texts) wrap at this many characters, at most :data:`LABEL_LINES` lines."""
LABEL_LINES = 3


def _order(groups, fig) -> list[str]:
    """Groups by model family (students' families first, in order of appearance; the teacher's family last),
    plain groups before hybrids, then by steps, guidance, negative prompt and label."""
    tfam = fig.info.get(fig.teacher, {}).get("family", "")
    fams = list(dict.fromkeys(fig.info.get(g, {}).get("family", "") for g in groups))
    fams = [f for f in fams if f != tfam] + [tfam]

    def key(g):
        d = fig.info.get(g, {})
        return (fams.index(d.get("family", "")) if d.get("family", "") in fams else len(fams),
                d.get("hybrid") is not None, (d.get("hybrid") or {}).get("k", 0), d.get("steps", 0),
                d.get("guidance", 0.0) if d.get("guidance", 0.0) == d.get("guidance", 0.0) else 0.0,
                d.get("negative", False), fig.labels.get(g, g))
    return sorted(groups, key=key)


def _cells(ds):
    pi = np.asarray(ds["prompt_index"].values).tolist()
    seeds = np.asarray(ds["seed"].values).tolist()
    texts = np.asarray(ds["prompt_text"].values).tolist() if "prompt_text" in ds.coords else None
    return {(int(a), int(b)): i for i, (a, b) in enumerate(zip(pi, seeds))}, texts


def wrap_label(text: str, width: int = LABEL_WIDTH, lines: int = LABEL_LINES) -> str:
    """``text`` wrapped at word boundaries into at most ``lines`` lines of ``width`` characters; a longer text
    ends its last line with an ellipsis (the caption names every prompt in full)."""
    import textwrap

    out = textwrap.wrap(str(text), width) or [""]
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][:width - 1].rstrip() + "…"
    return "\n".join(out)


def _prompt_texts(prompts, seeds, sources) -> list[str | None]:
    """Each prompt's text from the first (cells, texts) source that has one, else None."""
    out = []
    for a in prompts:
        name = None
        for cells, texts in sources:
            k = next((cells[(a, s)] for s in seeds if (a, s) in cells), None)
            if texts is not None and k is not None:
                name = str(texts[k])
                break
        out.append(name)
    return out


def _prompt_names(prompts, seeds, sources) -> list[str]:
    """Row labels: each prompt's text (wrapped) from the first (cells, texts) source that has one, else
    "prompt i"."""
    return [wrap_label(t) if t else f"prompt {a}" for a, t in zip(prompts, _prompt_texts(prompts, seeds, sources))]


def _tiles(ds, cells, prompts, seeds):
    img = np.asarray(ds["image"].values)
    h, w = img.shape[1:3]
    tiles = np.zeros((len(prompts), len(seeds), h, w, 3), np.uint8)
    present = np.zeros((len(prompts), len(seeds)), bool)
    for i, pr in enumerate(prompts):
        for j, s in enumerate(seeds):
            k = cells.get((pr, s))
            if k is not None:
                tiles[i, j], present[i, j] = img[k][..., :3], True
    return tiles, present


def grids(r, fig) -> list:
    from trajlab.plots.study import image_pair

    data = r.get("image_grid", {})
    if not data:
        return [none("no group stores images")]
    teacher = fig.teacher if fig.teacher in data else next(iter(data))
    t = data[teacher]
    tcells, ttexts = _cells(t)
    tlab = fig.labels.get(teacher, teacher)
    n_all = int(t.attrs.get("n_prompts", 0))
    shown = len({a for a, _ in tcells})
    out = [p(f"The teacher {tlab} (left in every pair) beside each other group (right) on the same prompts (rows, by "
             "their text) and seeds (columns): a seed is the same initial noise in both, so a cell compares the two "
             "samplers on one starting point. Grey: a cell the group did not capture."
             + (f" The first {shown} of the store's {n_all} prompts." if n_all > shown else ""))]
    family = None
    for g in _order([g for g in data if g != teacher], fig):
        d = data[g]
        cells, texts = _cells(d)
        prompts = sorted({a for a, _ in cells} & {a for a, _ in tcells})
        seeds = sorted({b for _, b in cells} & {b for _, b in tcells})
        if not prompts or not seeds or d["image"].shape[1:] != t["image"].shape[1:]:
            continue
        fam = fig.info.get(g, {}).get("family", "")
        if fam != family:
            family = fam
            out.append(h3(f"{fam}" if fam else "other groups"))
        texts_ = _prompt_texts(prompts, seeds, ((tcells, ttexts), (cells, texts)))
        rows = _prompt_names(prompts, seeds, ((tcells, ttexts), (cells, texts)))
        tt, tp = _tiles(t, tcells, prompts, seeds)
        gt, gp = _tiles(d, cells, prompts, seeds)
        lab = fig.labels.get(g, g)
        named = all(texts_)
        out.append(fig(image_pair([(f"teacher: {tlab}", tt, tp), (lab, gt, gp)], rows, seeds), "grid",
                       f"teacher {tlab} (left) vs {lab} (right): the same {len(prompts)} prompts (rows"
                       + (", labelled with the prompt text" if named else ", by index: the results carry no prompt text")
                       + f") x {len(seeds)} seeds (columns, labelled with the seed)"
                       + (": " + "; ".join(f"'{x}'" for x in texts_) if named and any(len(x) > LABEL_WIDTH * LABEL_LINES
                                                                                  for x in texts_) else ""),
                       groups=[teacher, g]))
    return out


# -- x0 predictions ---------------------------------------------------------------------------------
def _columns(sig, ref_sig) -> list[int]:
    """Column of each frame: strictly increasing columns (no two frames share one) that minimise the summed
    log-sigma distance to the reference frames of those columns (dynamic programme); with more frames than
    reference columns, the extra frames go past the last column."""
    ls, lr = np.log(np.maximum(sig, 1e-8)), np.log(np.maximum(ref_sig, 1e-8))
    m, n = len(ls), len(lr)
    if m > n:
        return list(range(m))
    cost = np.abs(ls[:, None] - lr[None, :])
    best = np.full((m, n), np.inf)
    best[0] = cost[0]
    for j in range(1, m):
        run = np.minimum.accumulate(best[j - 1])  # best over columns < c, for column c: run[c - 1]
        best[j, 1:] = cost[j, 1:] + run[:-1]
    cols = [int(np.argmin(best[m - 1]))]
    for j in range(m - 2, -1, -1):
        cols.append(int(np.argmin(best[j, :cols[-1]])))
    return cols[::-1]


def _seed_text(ds, i) -> str:
    s = f"seed {int(ds['seed'].values[i])}" if "seed" in ds.coords else f"sample {i}"
    if "prompt_text" in ds.coords:
        return f"'{ds['prompt_text'].values[i]}', " + s
    return (f"prompt {int(ds['prompt_index'].values[i])}, " if "prompt_index" in ds.coords else "") + s


def filmstrips(r, fig) -> list:
    from trajlab.plots.study import filmstrip_rows

    data = r.get("filmstrip", {})
    if not data:
        return [none("no trajectory with >= 2 steps")]
    teacher = fig.teacher if fig.teacher in data else next(iter(data))
    t = data[teacher]
    tsig = np.asarray(t["sigma"].values, dtype=np.float64)
    tlab = fig.labels.get(teacher, teacher)
    others = _order([g for g in data if g != teacher], fig)
    students = [g for g in others if fig.info.get(g, {}).get("role") == "student"]
    out = [p(f"x0 predictions (the denoiser's estimate of the final image at each step; {t.attrs.get('how', '')}) of "
             f"every student ({len(students)}) and {len(others) - len(students)} other group(s), each beside the "
             f"teacher {tlab}: a frame sits under the teacher's frame nearest in sigma, so columns line up in noise "
             "level; a 1-step student has one frame. Rows: the same prompt and seed in both. Groups: "
             f"{'; '.join(fig.labels.get(g, g) for g in others)}.")]
    missing = [g for g, d in fig.info.items() if g not in data and d["role"] == "student"]
    if missing:
        out.append(p(f"No filmstrip in the results for {len(missing)} student group(s) (results computed before every "
                     "student got one: recompute the report): " + "; ".join(fig.labels.get(g, g) for g in missing) + "."))
    out += slider(data, teacher, others, fig)
    for g in others:
        d = data[g]
        sig = np.asarray(d["sigma"].values, dtype=np.float64)
        cols = _columns(sig, tsig)
        rows = []
        n = min(t.sizes["sample"], d.sizes["sample"])
        for i in range(n):
            rows.append((f"teacher\n{_wrap(_seed_text(t, i))}", t["frame"].values[i], list(range(len(tsig))), tsig))
            rows.append((f"{_wrap(fig.labels.get(g, g))}\n{_wrap(_seed_text(d, i))}", d["frame"].values[i], cols, sig))
        lab = fig.labels.get(g, g)
        tr = ", ".join(str(2 * i + 1) for i in range(n))
        out.append(fig(filmstrip_rows(rows, max(len(tsig), cols[-1] + 1)), "filmstrip",
                       f"x0 predictions: teacher {tlab} (rows {tr}) and {lab} (rows "
                       f"{', '.join(str(2 * i + 2) for i in range(n))}), each row labelled with its prompt and seed; tick "
                       "labels: each frame's EDM sigma", groups=[teacher, g]))
    return out


def _wrap(label: str, width: int = 22) -> str:
    """A group label or row text on at most two lines, broken after a comma near ``width``."""
    if len(label) <= width:
        return label
    cut = label.rfind(", ", 0, width + 2)
    return label if cut < 0 else label[:cut + 1] + "\n" + label[cut + 2:]


def slider(data: dict, teacher: str, others: list, fig) -> list:
    """One ``slider`` block: the teacher's x0 predictions and every other group's side by side under one range
    input over the teacher's frames; each group shows its frame nearest in log sigma (the page's JavaScript)."""
    from trajlab.plots.study import sprite

    t = data[teacher]
    tsig = np.asarray(t["sigma"].values, dtype=np.float64)
    panels = []
    for g in [teacher] + others:
        d = data[g]
        sig = np.asarray(d["sigma"].values, dtype=np.float64)
        n = d.sizes["sample"]
        frames = np.asarray(d["frame"].values)[..., :3]
        strip = np.concatenate([sprite(frames[i], SLIDER_SCALE) for i in range(n)], axis=0)
        src = fig.image(strip, "x0_slider")
        near = [int(np.argmin(np.abs(np.log(np.maximum(sig, 1e-8)) - np.log(max(v, 1e-8))))) for v in tsig]
        panels.append({"group": g, "label": fig.labels.get(g, g), "src": src, "tile": int(frames.shape[3] * SLIDER_SCALE),
                       "height": int(frames.shape[2] * SLIDER_SCALE * n), "map": near,
                       "sigmas": [round(float(s), 4) for s in sig], "seeds": _seed_text(d, 0) +
                       (f" (top), {_seed_text(d, 1)}" if n > 1 else "")})
    return [{"kind": "slider", "panels": panels, "n": len(tsig), "teacher_sigmas": [round(float(s), 4) for s in tsig],
             "caption": f"step slider: x0 predictions of the teacher {fig.labels.get(teacher, teacher)} and of "
                        + "; ".join(fig.labels.get(g, g) for g in others)
                        + "; the slider walks the teacher's frames, every other group shows its frame nearest in log "
                          "sigma (its sigma under it)", "groups": [fig.labels.get(g, g) for g in [teacher] + others]}]


order_groups = _order

__all__ = ["SLIDER_SCALE", "filmstrips", "grids", "order_groups", "slider"]
