"""The cross-attention section: token heat maps over the steps of the groups captured with --attention-maps
(trajlab.analysis.attention results), the teacher first, the students beside it."""
from __future__ import annotations

from trajlab.report.blocks import none, p


def attention_blocks(r, fig) -> list:
    res = r.get("attention") or {}
    if not res:
        return [none("no group holds cross-attention maps (capture with --attention-maps; the demo records them for "
                     "the teacher and the collapsing students)")]
    from trajlab.plots.attention import plot_token_maps

    order = sorted(res, key=lambda g: (g != fig.teacher, fig.info.get(g, {}).get("family", ""), g))
    first = res[order[0]]
    agg = str(first.attrs.get("aggregation", "")).replace("softmax(QK^T scale) recomputed from to_q/to_k; ", "")
    out = [p("Where each prompt token is attended, step by step (captured with --attention-maps): softmax(QK^T/sqrt(d)) "
             f"recomputed beside SDPA for every cross-attention layer; {agg}. First the share of the attention that goes "
             "to the prompt's words rather than the start/end tokens, against sigma; then token heat maps, one column "
             "per step (labelled with its sigma), averaged over the prompt's seeds, one colour scale per token row "
             "across groups and steps: a student that attends to the digit token earlier, later or in fewer places "
             "than the teacher shows it here.")]
    from trajlab.plots.attention import plot_word_mass

    out.append(fig(plot_word_mass({g: res[g] for g in order}, fig.labels), "attention_word_mass",
                   "how much of each latent cell's attention goes to the prompt's words (not the start/end tokens), "
                   "per step against its sigma (mean over prompts, seeds and cells; bars: 95% CI, two-way prompt x seed "
                   "jackknife)", groups=order))
    n_prompts = min(2, first.sizes.get("prompt", 1))
    for prompt in range(n_prompts):
        f = plot_token_maps({g: res[g] for g in order}, fig.labels, prompt=prompt)
        if f is not None:
            out.append(fig(f, "attention_maps", f"cross-attention per token over the steps, prompt {prompt}: "
                           + "; ".join(f"{fig.labels.get(g, g)} ({int(res[g].sizes['step'])} steps, "
                                       f"{int(res[g]['n_samples'].values[prompt])} seeds)" for g in order),
                           groups=order))
    return out


__all__ = ["attention_blocks"]
