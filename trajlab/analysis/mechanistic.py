"""Jacobian contraction and covariance propagation of a store's groups, written as NetCDF results.

The one place these analyses are wired (and their defaults set): ``analyses/jacobian_contraction.py``,
``analyses/covariance_propagation.py`` and the demo call :func:`jacobian_results` /
:func:`covariance_results`; the report reads what they write (``<group>_contraction.nc``,
``<group>_covariance.nc``) through :func:`trajlab.analysis.results.analyses_results`.
``covariance_results(..., injections=True)`` also writes ``<group>_noise_injections.nc``: the
covariance propagated with the noise stochastic samplers inject at their steps
(``covariance.group_injected_covariance``, docs/theory.md §14).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from trajlab.analysis import io
from trajlab.progress import eta_line

JACOBIAN_DEFAULTS = {"samples": 4, "n_probes": 8, "n_power_iter": 10, "seed": 0}
COVARIANCE_DEFAULTS = {"n_prompts": None, "n_components": 16, "n_probes": 16, "dense_max": 256, "seed": 0}
COVARIANCE_VARIABLES = ("latent", "final_latent", "prompt_text")


def experiment_of(attrs) -> str:
    """The ``experiment`` a group was captured for (from its ``extra`` attr; "" when none)."""
    from trajlab.store import decode_attr

    extra = decode_attr(attrs.get("extra")) or {}
    return str(extra.get("experiment", "")) if isinstance(extra, dict) else ""


def analysed_groups(store, out_dir, keep=None, *, groups=None, model: str | None = None, variables=None):
    """(name, dataset, pipeline) of the complete non-hybrid groups of ``store`` (``groups``: only these)
    for which ``keep(dataset)`` holds; pipelines (``model`` overrides the group's attr) resolved once
    per (model, LoRAs); creates ``out_dir``. ``store``: a path or URL, or the groups already opened by
    :func:`trajlab.analysis.io.open_groups` with ``complete_only=True`` (several analyses, one validation)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    pipes = {}
    if isinstance(store, dict):
        opened = {n: store[n] for n in (groups or store)}
        if variables is not None:
            opened = {n: io.only(ds, variables) for n, ds in opened.items()}
    else:
        opened = io.open_groups(store, groups, variables=variables, complete_only=True)
    for name, ds in opened.items():
        if ds.attrs.get("scheduler_class") == "SwitchScheduler" or (keep is not None and not keep(ds)):
            continue
        key = (model,) if model else (str(ds.attrs.get("model", "")), str(ds.attrs.get("loras", "")))
        if key not in pipes:
            pipes[key] = io.resolve_pipeline(model or ds)
        yield name, ds, pipes[key]


def _with_eta(items, label: str):
    """A ``done(text)`` to call after each of ``items`` ((name, ds, pipe) from :func:`analysed_groups`, in
    order): prints ``label [i/n], ~S s left text``; a group's cost is its stored step count."""
    cost = [max(1, int(ds.sizes.get("step", 1))) for _, ds, _ in items]
    t0, state = time.perf_counter(), {"i": 0, "done": 0.0}

    def done(text: str) -> None:
        state["done"] += cost[state["i"]]
        state["i"] += 1
        eta = eta_line(state["done"], sum(cost), time.perf_counter() - t0, state["i"], len(items))
        print(f"{label} {eta} {text}", flush=True)

    return done


def jacobian_results(store, out_dir, *, groups=None, model: str | None = None, models=None, experiments=None,
                     samples: int = JACOBIAN_DEFAULTS["samples"], n_probes: int = JACOBIAN_DEFAULTS["n_probes"],
                     n_power_iter: int = JACOBIAN_DEFAULTS["n_power_iter"], seed: int = JACOBIAN_DEFAULTS["seed"],
                     callback=None) -> list[Path]:
    """Jacobian contraction (per step and whole sampler, JVPs; ``jacobian.contraction_profile``) of a
    store's groups, written as ``out_dir/<group>_contraction.nc`` (attr group); returns the paths.

    groups: names (default all); models: keep groups captured with these models; experiments: keep
    groups whose ``experiment`` tag is in these; hybrid groups are skipped. callback(name, group dataset,
    profile, pipe) is called per group (the script draws its figures there).
    """
    from trajlab.analysis import jacobian as jac

    def keep(ds):
        return ((models is None or str(ds.attrs.get("model", "")) in models)
                and (experiments is None or experiment_of(ds.attrs) in experiments))

    written = []
    items = list(analysed_groups(store, out_dir, keep, groups=groups, model=model))
    done = _with_eta(items, "jacobian")
    for name, ds, pipe in items:
        t = time.perf_counter()
        prof = jac.contraction_profile(ds, pipe, samples=samples, n_probes=n_probes, n_power_iter=n_power_iter,
                                       seed=seed)
        written.append(io.save_dataset(prof, Path(out_dir) / f"{name}_contraction.nc", attrs={"group": name}))
        done(f"{name}: whole-map ||J||_F^2 = {float(prof['whole_fro2'].mean()):.4g} "
             f"(+- {float(prof['whole_fro2_se'].mean()):.2g}) per unit latent_0 variance, "
             f"{float(prof['whole_fro2_unit_noise'].mean()):.4g} per unit noise variance "
             f"(init_noise_sigma {prof.attrs['init_noise_sigma']:.4g}); replay rel. error "
             f"{float(prof['replay_rel_error'].max()):.2g}; {time.perf_counter() - t:.0f} s")
        if callback is not None:
            callback(name, ds, prof, pipe)
    return written


def covariance_results(store, out_dir, *, groups=None, model: str | None = None, configs=None, experiments=None,
                       n_prompts: int | None = COVARIANCE_DEFAULTS["n_prompts"],
                       n_components: int = COVARIANCE_DEFAULTS["n_components"],
                       n_probes: int = COVARIANCE_DEFAULTS["n_probes"], dense_max: int = COVARIANCE_DEFAULTS["dense_max"],
                       seed: int = COVARIANCE_DEFAULTS["seed"], max_points: int | None = None,
                       injections: bool = False, plain: bool = True, callback=None) -> list[Path]:
    """Covariance propagation (empirical Cov[final latent] vs J Cov[latent_0] J^T;
    ``covariance.group_covariance_propagation``) over each group's first ``n_prompts`` prompts (None:
    all), dense Jacobians up to ``dense_max`` latent entries, else randomized SVD + ``n_probes``
    Hutchinson probes. Written as ``out_dir/<group>_covariance.nc`` (attr group); returns the paths.

    configs: keep groups whose (model, steps) is in these; experiments: keep groups whose
    ``experiment`` tag is in these; hybrid groups are skipped. max_points: linearisation points per
    prompt (its first noise samples; default ``covariance.DEFAULT_POINTS``). callback(name, result) per group.
    injections: also propagate the noise each group's sampler injects at its steps, replayed from the
    captured seeds (``covariance.group_injected_covariance``: share of the output variance from the initial
    noise vs the injections, trace ratios with and without them), written as
    ``out_dir/<group>_noise_injections.nc``; about (1 + number of noise draws) x the cost of the plain
    propagation per group, and a deterministic sampler gets share_initial = 1. plain=False (with injections):
    only the injected propagation (its ``trace_ratio_initial_only`` is the plain x_T-only ratio at its own
    settings); callback is then not called.
    """
    from trajlab.analysis import covariance as cov

    configs = None if configs is None else set(configs)

    def keep(ds):
        return ((configs is None or (str(ds.attrs.get("model", "")), int(ds.attrs.get("steps", -1))) in configs)
                and (experiments is None or experiment_of(ds.attrs) in experiments))

    written = []
    items = list(analysed_groups(store, out_dir, keep, groups=groups, model=model, variables=COVARIANCE_VARIABLES))
    done = _with_eta(items, "covariance")
    for name, ds, pipe in items:
        if n_prompts is not None:
            first = np.unique(ds["prompt_index"].values)[:n_prompts]
            ds = ds.isel(sample=np.flatnonzero(np.isin(ds["prompt_index"].values, first)))
        t = time.perf_counter()
        res, text = None, f"{name}:"
        if plain or not injections:
            res = cov.group_covariance_propagation(ds.load(), pipe, n_components=n_components, dense_max=dense_max,
                                                   n_probes=n_probes, seed=seed, max_points=max_points)
            written.append(io.save_dataset(res, Path(out_dir) / f"{name}_covariance.nc", attrs={"group": name}))
            text = f"{name}: trace ratio emp/pred = {np.round(res['trace_ratio'].values, 3)}"
        if injections:
            inj = cov.group_injected_covariance(ds, pipe, n_components=n_components, dense_max=dense_max,
                                                n_probes=n_probes, seed=seed, max_points=max_points)
            written.append(io.save_dataset(inj, Path(out_dir) / f"{name}_noise_injections.nc", attrs={"group": name}))
            text += (("; " if res is not None else " ") + f"with {inj.sizes['injection']} noise injections: emp/pred = "
                     f"{np.round(inj['trace_ratio'].values, 3)}, share of the initial noise "
                     f"{np.round(inj['share_initial'].values, 3)}")
        done(f"{text}, {time.perf_counter() - t:.0f} s")
        if callback is not None and res is not None:
            callback(name, res)
    return written


__all__ = ["COVARIANCE_DEFAULTS", "JACOBIAN_DEFAULTS", "analysed_groups", "covariance_results",
           "experiment_of", "jacobian_results"]
