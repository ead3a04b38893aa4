"""Token heat maps over the sampling steps: cross-attention maps of several groups side by side
(trajlab.analysis.attention results)."""
from __future__ import annotations

import numpy as np


def pick_steps(n_steps: int, most: int = 6) -> list[int]:
    """Up to ``most`` step indices spread over ``range(n_steps)``, first and last included."""
    if n_steps <= most:
        return list(range(n_steps))
    return sorted({int(round(x)) for x in np.linspace(0, n_steps - 1, most)})


def plot_token_maps(results: dict, labels: dict | None = None, prompt: int = 0, most_steps: int = 6,
                    tokens: list[str] | None = None):
    """One row per word token of prompt ``prompt``, one block of columns per group (its steps, up to
    ``most_steps``, each titled with its sigma), the groups side by side in ``results`` order
    ({group: attention result with ``attention_mean`` (prompt, step, token, y, x) and ``token_text``}).
    Each row shares one colour scale (0 to the row's largest mean attention), so groups and steps compare.
    ``tokens``: only rows whose text is in it. Returns the figure (None without a group for the prompt)."""
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
    widths = [len(cols[g]) + (0.35 if g == groups[-1] else 0) for g in groups]
    fig = plt.figure(figsize=(1.0 * sum(widths) + 0.8, 1.0 * len(rows) + 1.2), layout="constrained")
    subs = np.atleast_1d(fig.subfigures(1, len(groups), width_ratios=widths, wspace=0.04))
    vmax = {i: max(float(np.nanmax(results[g].sel(prompt=prompt)["attention_mean"].isel(token=i).values)) for g in groups)
            or 1.0 for i in rows}
    for sub, g in zip(subs, groups):
        r = results[g].sel(prompt=prompt)
        sigma = np.asarray(r["sigma"].values) if "sigma" in r.coords else None
        axes = np.atleast_2d(sub.subplots(len(rows), len(cols[g]), squeeze=False))
        sub.suptitle(labels.get(g, g), fontsize=8)
        for k, step in enumerate(cols[g]):
            for row, i in enumerate(rows):
                ax = axes[row, k]
                im = ax.imshow(np.asarray(r["attention_mean"].isel(step=step, token=i).values), cmap="magma", vmin=0,
                               vmax=vmax[i], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"step {step + 1}" + (f"\nσ={sigma[step]:.3g}" if sigma is not None else ""), fontsize=7)
                if k == 0 and g == groups[0]:
                    ax.set_ylabel(repr(texts[i]), fontsize=8)
                if k == len(cols[g]) - 1 and g == groups[-1]:
                    sub.colorbar(im, ax=ax, fraction=0.08, pad=0.03).ax.tick_params(labelsize=6)
    prompt_text = str(first["prompt_text"].values) if "prompt_text" in first else f"prompt {prompt}"
    fig.suptitle(f"cross-attention per token over the steps: {prompt_text!r} (mean over seeds; one colour scale "
                 "per row)", fontsize=8)
    return fig


__all__ = ["pick_steps", "plot_token_maps"]
