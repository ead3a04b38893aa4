"""Cross-attention maps of a store (captured with ``--attention-maps``; see trajlab.capture.module_taps):
per group and prompt, the mean map over its seeds at every step, with the tokens' texts and the step's sigma.

    from trajlab.analysis.attention import attention_results, token_maps
    res = attention_results("runs/x.zarr")           # {group: Dataset(prompt, step, token, y, x)}
    token_maps(trajlab.open("runs/x.zarr", group="micro-sd__ddim__30steps__cfg4__none"), prompt=0)

``attention[sample, step, token, y, x]`` is the mean attention mass latent cell (y, x) gives the token at that
step (over heads and cross-attention layers); the result's ``attention_mean`` averages it over the complete
samples (seeds) of each prompt. No torch.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

VARIABLE = "attention"


def token_maps(ds: xr.Dataset, prompt: int | None = None) -> xr.Dataset:
    """``attention_mean`` (prompt, step, token, y, x): the mean over complete samples of each prompt (or only
    ``prompt``), float32, with ``token_text`` (prompt, token), ``n_samples`` (prompt), sigma and timestep on step."""
    if VARIABLE not in ds:
        raise KeyError(f"this group has no {VARIABLE!r} array: capture it with --attention-maps")
    done = np.asarray(ds["complete"].values, dtype=bool) if "complete" in ds else np.ones(ds.sizes["sample"], bool)
    pidx = np.asarray(ds["prompt_index"].values)
    prompts = range(ds.sizes.get("prompt", int(pidx.max()) + 1)) if prompt is None else [prompt]
    means, counts = [], []
    for p in prompts:
        idx = np.flatnonzero(done & (pidx == p))
        counts.append(idx.size)
        a = ds[VARIABLE].isel(sample=idx).astype(np.float32).mean("sample") if idx.size else \
            xr.full_like(ds[VARIABLE].isel(sample=0, drop=True), np.nan, dtype=np.float32)
        means.append(a)
    out = xr.Dataset({"attention_mean": xr.concat(means, "prompt").transpose("prompt", "step", "token", "y", "x"),
                      "n_samples": ("prompt", np.asarray(counts, dtype=np.int64))})
    out = out.assign_coords(prompt=np.asarray(list(prompts), dtype=np.int64))
    for v in ("token_text", "prompt_text"):  # as plain str arrays (NetCDF writes them)
        if v in ds:
            vals = np.asarray(ds[v].isel(prompt=list(prompts)).values).tolist()
            out[v] = (ds[v].dims, np.array(vals, dtype=str))
    for c in ("sigma", "timestep"):
        if c in ds.coords:
            out = out.assign_coords({c: ("step", np.asarray(ds[c].values))})
    out["attention_mean"].attrs = {"long_name": "mean attention mass per latent cell (heads, layers, seeds)"}
    return out


def attention_results(store, groups=None) -> dict[str, xr.Dataset]:
    """{group: :func:`token_maps`} of every group (or ``groups``) of ``store`` that holds attention maps, each with
    attrs group, model, steps, scheduler_class and the aggregation of its capture."""
    import json

    import trajlab
    from trajlab.store import decode_attrs

    tree = trajlab.open(store)
    out = {}
    for name in groups or list(tree.attrs.get("groups", [])):
        ds = tree[name].to_dataset()
        if VARIABLE not in ds:
            continue
        attrs = decode_attrs(ds.attrs)
        entry = next((e for e in (attrs.get("step_arrays") or []) if e.get("name") == VARIABLE), {})
        res = token_maps(ds)
        res.attrs = {"group": name, "model": str(attrs.get("model", "")), "steps": int(ds.sizes["step"]),
                     "scheduler_class": str(attrs.get("scheduler_class", "")),
                     "aggregation": str(entry.get("aggregation", "")), "layers": json.dumps(entry.get("layers", ""))}
        out[name] = res
    return out


def content_tokens(texts) -> list[int]:
    """Positions of a prompt's word tokens: not SOS/EOS, not padding (``""``)."""
    return [i for i, t in enumerate(texts) if t and not (t.startswith("<|") and t.endswith("|>"))]


__all__ = ["VARIABLE", "attention_results", "content_tokens", "token_maps"]
