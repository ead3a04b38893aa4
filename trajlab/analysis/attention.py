"""Cross-attention maps of a store (captured with ``--attention-maps``; see trajlab.capture.module_taps):
per group and prompt, the mean map over its seeds at every step, with the tokens' texts and the step's sigma.

    from trajlab.analysis.attention import attention_results, token_maps
    res = attention_results("runs/x.zarr")           # {group: Dataset(prompt, step, token, y, x)}
    token_maps(trajlab.open("runs/x.zarr", group="micro-sd__ddim__30steps__cfg4__none"), prompt=0)

``attention[sample, step, token, y, x]`` is the mean attention mass latent cell (y, x) gives the token at that
step (over heads and cross-attention layers); the result's ``attention_mean`` averages it over the complete
samples (seeds) of each prompt, and ``word_mass`` (step) is the attention mass on the prompts' word tokens (not
SOS/EOS/padding; summed over them, averaged over the latent cells, then over every complete sample) with its 95%
interval for the crossed prompt x seed design (:func:`trajlab.analysis.intervals.crossed_mean_ci`). No torch.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

VARIABLE = "attention"
DIMS = ("step", "token", "y", "x")


def _maps(read, done, prompt_index, prompts, shape, columns: dict, seeds=None) -> xr.Dataset:
    """The result Dataset: per prompt the mean of ``read(its complete sample indices)`` (one read per prompt);
    with ``seeds`` (sample,) and ``token_text`` in ``columns``, the word mass and its crossed interval per step."""
    means, counts = [], []
    mass, mass_prompt, mass_seed = [], [], []  # per sample: (step,) word mass, its prompt and seed
    texts = columns.get("token_text", (None, None))[1]
    for p in prompts:
        idx = np.flatnonzero(done & (prompt_index == p))
        counts.append(idx.size)
        if not idx.size:
            means.append(np.full(shape, np.nan, np.float32))
            continue
        a = np.asarray(read(idx), dtype=np.float32)
        means.append(a.mean(0))
        if texts is not None and seeds is not None:  # (n, step): words summed, cells averaged
            mass.append(a[:, :, content_tokens(texts[p])].astype(np.float64).sum(2).mean((-2, -1)))
            mass_prompt.append(np.full(idx.size, p))
            mass_seed.append(np.asarray(seeds)[idx])
    out = xr.Dataset({"attention_mean": (("prompt", *DIMS), np.stack(means)),
                      "n_samples": ("prompt", np.asarray(counts, dtype=np.int64))},
                     coords={"prompt": np.asarray(list(prompts), dtype=np.int64)})
    if mass:
        out = out.assign(_word_mass(np.concatenate(mass), np.concatenate(mass_prompt), np.concatenate(mass_seed)))
    for k, (dims, v) in columns.items():
        v = np.asarray(v)
        if dims[0] == "prompt":
            v = v[list(prompts)]
        out = out.assign_coords({k: (dims, v)}) if dims == ("step",) else out.assign({k: (dims, v)})
    out["attention_mean"].attrs = {"long_name": "mean attention mass per latent cell (heads, layers, seeds)"}
    return out


def _word_mass(values: np.ndarray, p: np.ndarray, s: np.ndarray) -> dict:
    """{word_mass, word_mass_ci_low, word_mass_ci_high} on step from per-sample values (sample, step) with each
    sample's prompt and seed (sample,)."""
    from trajlab.analysis.intervals import METHOD, crossed_mean_ci

    cis = [crossed_mean_ci(values[:, k], p, s, bounds=(0.0, 1.0)) for k in range(values.shape[1])]
    attrs = {"long_name": "attention mass on the prompt's word tokens (mean over cells and samples)",
             "units": "fraction of a latent cell's cross-attention", "interval": METHOD}
    return {name: ("step", np.array([c[key] for c in cis]), attrs) for name, key in
            (("word_mass", "estimate"), ("word_mass_ci_low", "ci_low"), ("word_mass_ci_high", "ci_high"))}


def _texts(values) -> np.ndarray:
    return np.array(np.asarray(values).tolist(), dtype=str)


def token_maps(ds: xr.Dataset, prompt: int | None = None) -> xr.Dataset:
    """``attention_mean`` (prompt, step, token, y, x): the mean over complete samples of each prompt (or only
    ``prompt``), float32, with ``token_text`` (prompt, token), ``prompt_text``, ``n_samples`` (prompt), sigma and
    timestep on step, and ``word_mass`` (step) with ``word_mass_ci_low`` / ``_ci_high`` over those samples."""
    if VARIABLE not in ds:
        raise KeyError(f"this group has no {VARIABLE!r} array: capture it with --attention-maps")
    pidx = np.asarray(ds["prompt_index"].values)
    done = np.asarray(ds["complete"].values, dtype=bool) if "complete" in ds else np.ones(pidx.size, bool)
    n = ds.sizes.get("prompt", int(pidx.max()) + 1)
    columns = {k: (ds[k].dims, _texts(ds[k].values)) for k in ("token_text", "prompt_text") if k in ds}
    columns.update({k: (("step",), np.asarray(ds[k].values)) for k in ("sigma", "timestep") if k in ds.coords})
    seeds = np.asarray(ds["seed"].values) if "seed" in ds.coords else None
    return _maps(lambda idx: ds[VARIABLE].isel(sample=idx).values, done, pidx, range(n) if prompt is None else [prompt],
                 ds[VARIABLE].shape[1:], columns, seeds)


def attention_results(store, groups=None) -> dict[str, xr.Dataset]:
    """{group: :func:`token_maps`} of every group (or ``groups``) of ``store`` that holds attention maps, each with
    attrs group, model, steps, scheduler_class and the aggregation of its capture. Reads the zarr arrays directly
    (one selection per prompt): per-chunk dask tasks cost seconds on a loaded machine."""
    import json

    from trajlab import store as S
    from trajlab.store_fs import target, zarr

    S.validate(store)
    root = zarr().open_group(target(store), mode="r", zarr_format=3)
    out = {}
    for name in groups or S.group_names(store):
        g = root[name]
        if VARIABLE not in g:
            continue
        attrs = S.decode_attrs(g.attrs)
        entry = next((e for e in (attrs.get("step_arrays") or []) if e.get("name") == VARIABLE), {})
        arr = g[VARIABLE]
        columns = {k: (dims, _texts(g[k][:])) for k, dims in (("token_text", ("prompt", "token")),
                                                               ("prompt_text", ("prompt",))) if k in g}
        columns.update({k: (("step",), np.asarray(g[k][:])) for k in ("sigma", "timestep") if k in g})
        res = _maps(lambda idx, arr=arr: arr.oindex[np.asarray(idx, dtype=np.int64)], np.asarray(g["complete"][:], bool),
                    np.asarray(g["prompt_index"][:]), range(g["prompt_text"].shape[0]), arr.shape[1:], columns,
                    np.asarray(g["seed"][:]))
        res.attrs = {"group": name, "model": str(attrs.get("model", "")), "steps": int(arr.shape[1]),
                     "scheduler_class": str(attrs.get("scheduler_class", "")),
                     "aggregation": str(entry.get("aggregation", "")), "layers": json.dumps(entry.get("layers", ""))}
        out[name] = res
    return out


def content_tokens(texts) -> list[int]:
    """Positions of a prompt's word tokens: not SOS/EOS, not padding (``""``)."""
    return [i for i, t in enumerate(texts) if t and not (t.startswith("<|") and t.endswith("|>"))]


__all__ = ["VARIABLE", "attention_results", "content_tokens", "token_maps"]
