"""Real-network nulls: comparisons where nothing differs, judged by the store-verdict code.

- Seed blocks: the teacher's own samples on two disjoint seed blocks, the second relabelled as a "student"
  (its seeds renumbered to pair with the first block's: independent noise, the same distribution).
- Another deterministic sampler: the teacher's own weights under TCD at gamma 0 on the same prompts and
  seeds (the same network, another discretisation of the same probability flow).

A verdict engine that supports a failure here is wrong; the test suite and ``trajlab calibrate`` run these
on the shipped micro-world teacher (micro-sd), with its real-data reference and its VAE.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from trajlab.store import decode_attr
from trajlab.verdicts.store import store_verdicts

PAIR_MODES = ("diversity_collapse", "canonical_bias", "mode_dropping", "fine_detail", "early_commitment")
"""The modes a teacher-vs-student pair of groups can test (the control modes need sweeps)."""


def seed_blocks(ds: xr.Dataset, n: int) -> tuple[xr.Dataset, xr.Dataset]:
    """(first block, second block relabelled as a student) of a group: seeds sorted, the first ``n`` and the next
    ``n``; the second block's seeds renumbered onto the first's and its ``extra.role`` set to "student"."""
    seeds = np.unique(np.asarray(ds["seed"].values))
    if len(seeds) < 2 * n:
        raise ValueError(f"seed_blocks: the group has {len(seeds)} seeds; expected >= {2 * n} for two blocks of {n}")
    a, b = seeds[:n], seeds[n:2 * n]
    s = np.asarray(ds["seed"].values)
    first = ds.isel(sample=np.flatnonzero(np.isin(s, a)))
    second = ds.isel(sample=np.flatnonzero(np.isin(s, b)))
    renumber = dict(zip(b.tolist(), a.tolist()))
    second = second.assign_coords(seed=("sample", [renumber[int(v)] for v in second["seed"].values]))
    extra = decode_attr(ds.attrs.get("extra", {})) or {}
    second.attrs = {**ds.attrs, "extra": {**(extra if isinstance(extra, dict) else {}), "role": "student",
                                          "null": f"seeds {int(b[0])}-{int(b[-1])} of {ds.attrs.get('model', '')}"},
                    "model": f"{ds.attrs.get('model', '')} (null block)"}
    return first, second


def null_verdicts(groups: dict[str, xr.Dataset], *, data: dict | None, decode=None) -> xr.Dataset:
    """Pair-mode verdicts of a store of null comparisons (Holm over their own family: a smaller family makes a
    false "supported" easier, so none supported is the stronger claim)."""
    if "seed" not in next(iter(groups.values())).coords and "seed" in next(iter(groups.values())):
        groups = {k: v.set_coords("seed") for k, v in groups.items()}
    return store_verdicts(groups, data=data, decode=decode, modes=set(PAIR_MODES))


__all__ = ["PAIR_MODES", "null_verdicts", "seed_blocks"]


def capture_real_nulls(store, *, model: str = "micro-sd", n_prompts: int = 10, n_seeds: int = 16, steps: int = 30,
                       progress: bool = False) -> xr.Dataset:
    """Capture ``model`` (DDIM, ``steps`` steps) on 2 x ``n_seeds`` seeds and under TCD gamma 0 on the first
    ``n_seeds``, ``n_prompts`` of its prompts, into ``store``; return the pair-mode verdicts of the two nulls
    (rows: candidate "<model> (null block)" and the TCD group)."""
    from trajlab.analysis.io import open_groups
    from trajlab.analysis.result_images import vae_decoder
    from trajlab.analysis.sweeps import describe_all
    from trajlab.experiments.plans import resolve_plan, run_plans
    from trajlab.models.micro import PROMPTS
    from trajlab.verdicts.reference import micro_data_reference

    prompts = list(PROMPTS[:n_prompts])
    plans = [resolve_plan(model=model, scheduler=sched, steps=steps, guidance=None, negative_prompt=None,
                          prompts=prompts, seeds=list(range(k * n_seeds)), batch_size=32)
             for sched, k in (("ddim", 2), ("tcd", 1))]
    run_plans(plans, str(store), progress=progress)
    groups = open_groups(str(store), load=True)
    desc = describe_all(groups)
    ddim = next(n for n, d in desc.items() if d["scheduler"] == "DDIMScheduler")
    tcd = next(n for n, d in desc.items() if d["scheduler"] == "TCDScheduler")
    first, second = seed_blocks(groups[ddim], n_seeds)
    decode = vae_decoder(desc, model)

    def decode_x0(ds, idx, step):
        img = decode(np.asarray(ds["x0_pred"].isel(sample=idx, step=step).values))
        return (np.asarray(img) * 255).round().astype(np.uint8)

    return null_verdicts({"teacher": first, "null block": second, "tcd gamma 0": groups[tcd]},
                         data=micro_data_reference(), decode=decode_x0 if decode is not None else None)


__all__ += ["capture_real_nulls"]
