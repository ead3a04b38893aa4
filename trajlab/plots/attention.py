"""Token heat maps over the sampling steps: cross-attention maps of several groups side by side
(trajlab.analysis.attention results). Each group is drawn as one mosaic (tokens x steps), so a figure of many
maps costs one image per group."""
from __future__ import annotations

import numpy as np


def pick_steps(n_steps: int, most: int = 6) -> list[int]:
    """Up to ``most`` step indices spread over ``range(n_steps)``, first and last included."""
    if n_steps <= most:
        return list(range(n_steps))
    return sorted({int(round(x)) for x in np.linspace(0, n_steps - 1, most)})


def mosaic(maps: np.ndarray, scale: np.ndarray, gap: int = 1) -> np.ndarray:
    """(rows, cols, h, w) maps -> one (rows (h + gap) - gap, cols (w + gap) - gap) image, row r divided by
    ``scale[r]``; NaN between the tiles."""
    r, c, h, w = maps.shape
    out = np.full((r * (h + gap) - gap, c * (w + gap) - gap), np.nan, dtype=np.float32)
    for i in range(r):
        for j in range(c):
            out[i * (h + gap): i * (h + gap) + h, j * (w + gap): j * (w + gap) + w] = maps[i, j] / scale[i]
    return out


def plot_token_maps(results: dict, labels: dict | None = None, prompt: int = 0, most_steps: int = 6,
                    tokens: list[str] | None = None):
    """One row per word token of prompt ``prompt``, one block of columns per group (its steps, up to
    ``most_steps``, each labelled with its sigma), the groups side by side in ``results`` order
    ({group: attention result with ``attention_mean`` (prompt, step, token, y, x) and ``token_text``}).
    Each row shares one colour scale across groups and steps: maps are shown as a fraction of the row's largest
    mean attention (the row label gives that value). ``tokens``: only rows whose text is in it. Returns the
    figure (None without a group holding the prompt)."""
    import matplotlib.pyplot as plt

    from trajlab.analysis.attention import content_tokens

    labels = labels or {}
    groups = [g for g, r in results.items() if prompt in np.asarray(r["prompt"].values).tolist()]
    if not groups:
        return None
    first = results[groups[0]].sel(prompt=prompt)
    texts = [str(t) for t in first["token_text"].values]
    rows = [i for i in content_tokens(texts) if tokens is None or texts[i] in tokens]
    cols = {g: pick_steps(results[g].sizes["step"], most_steps) for g in groups}
    maps = {g: np.asarray(results[g].sel(prompt=prompt)["attention_mean"].values, dtype=np.float32)[cols[g]][:, rows]
            for g in groups}  # (steps, tokens, h, w)
    scale = np.nanmax(np.stack([np.nanmax(m, axis=(0, 2, 3)) for m in maps.values()]), axis=0)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    widths = [len(cols[g]) for g in groups]
    fig, axes = plt.subplots(1, len(groups), figsize=(1.05 * sum(widths) + 1.6, 0.95 * len(rows) + 1.3),
                             width_ratios=widths, layout="constrained", squeeze=False)
    for ax, g in zip(axes[0], groups):
        r = results[g].sel(prompt=prompt)
        h, w = maps[g].shape[2:]
        im = ax.imshow(mosaic(maps[g].transpose(1, 0, 2, 3), scale), cmap="magma", vmin=0, vmax=1,
                       interpolation="nearest")
        sigma = np.asarray(r["sigma"].values) if "sigma" in r.coords else None
        ax.set_xticks([j * (w + 1) + (w - 1) / 2 for j in range(len(cols[g]))],
                      [f"step {k + 1}" + (f"\nσ={sigma[k]:.3g}" if sigma is not None else "") for k in cols[g]], fontsize=7)
        ax.set_yticks([i * (h + 1) + (h - 1) / 2 for i in range(len(rows))],
                      [f"{texts[i]!r}\nmax {scale[n]:.3g}" for n, i in enumerate(rows)] if g == groups[0] else [],
                      fontsize=7)
        ax.tick_params(length=0)
        ax.set_title(labels.get(g, g), fontsize=8)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02, pad=0.01,
                 label="fraction of the row's max").ax.tick_params(labelsize=6)
    prompt_text = str(first["prompt_text"].values) if "prompt_text" in first else f"prompt {prompt}"
    fig.suptitle(f"cross-attention per token over the steps: {prompt_text!r} (mean over seeds)", fontsize=8)
    return fig


def word_mass(result) -> np.ndarray:
    """(prompt, step): the attention mass on the prompt's word tokens (not SOS/EOS/padding), summed over them and
    averaged over the latent cells, of an attention result."""
    from trajlab.analysis.attention import content_tokens

    a = np.asarray(result["attention_mean"].values, dtype=np.float64)  # (prompt, step, token, y, x)
    texts = np.asarray(result["token_text"].values)
    out = np.full(a.shape[:2], np.nan)
    for p in range(a.shape[0]):
        words = content_tokens([str(t) for t in texts[p]])
        out[p] = a[p][:, words].sum(axis=1).mean(axis=(-2, -1))
    return out


def plot_word_mass(results: dict, labels: dict | None = None):
    """Attention mass on the prompt's word tokens (mean over prompts, seeds and cells; bars: its 95% interval for
    the crossed prompt x seed design, ``word_mass_ci_*``) vs each step's sigma, one line per group, on the shared
    sigma axis. A result without ``word_mass`` (written before it existed) draws the range over prompts."""
    import matplotlib.pyplot as plt

    from trajlab.plots._style import legend_below, sigma_axis

    labels = labels or {}
    fig, ax = plt.subplots(figsize=(6.4, 3.2), layout="constrained")
    for g, r in results.items():
        sigma = np.asarray(r["sigma"].values)
        if "word_mass" in r:
            mean = np.asarray(r["word_mass"].values)
            lo, hi = np.asarray(r["word_mass_ci_low"].values), np.asarray(r["word_mass_ci_high"].values)
        else:
            m = word_mass(r)
            mean, lo, hi = np.nanmean(m, axis=0), np.nanmin(m, 0), np.nanmax(m, 0)
        ax.errorbar(sigma, mean, yerr=np.abs(np.stack([mean - lo, hi - mean])), marker="o", ms=3, capsize=2, lw=1,
                    label=labels.get(g, g))
    sigma_axis(ax)
    ax.set_ylabel("attention mass on the\nprompt's word tokens")
    legend_below(fig)
    return fig


__all__ = ["mosaic", "pick_steps", "plot_token_maps", "plot_word_mass", "word_mass"]
