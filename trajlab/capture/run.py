"""Capture runs: a plan (one store group) executed batch by batch with taps and a background writer.

Samples are ordered prompt-major (sample = prompt_index * n_seeds + seed_index) and processed in
fixed blocks of ``batch_size``; a block is skipped on resume only when all of its samples are
complete, and redone whole otherwise, so a resumed store is identical to an uninterrupted one.
Sharded captures (``--shard I/N``, torchrun ranks) run only their own blocks, block ``b`` going to
shard ``b % N`` (:mod:`trajlab.capture.shard`), into the same store.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import inspect
import json
import time
from dataclasses import dataclass

import numpy as np
import torch

from trajlab import store, store_groups
from trajlab.capture import shard as _shard
from trajlab.capture.claims import claims_for
from trajlab.capture.module_taps import TapError
from trajlab.capture.views import CaptureViews
from trajlab.capture.plan import CapturePlan, PlanError
from trajlab.capture.records import BatchRecorder, to_host
from trajlab.capture.taps import tap_pipeline
from trajlab.capture.writer import STEP_FIELDS, BatchEnd, StoreWriter, numpy_dtype


@dataclass
class CaptureResult:
    group: str
    samples_written: int
    samples_skipped: int
    wall_s: float
    store_bytes: int
    shard: str | None = None
    """``"I/N"`` for a sharded capture (samples_written / samples_skipped then count this shard's only)."""
    n_samples: int = 0
    n_complete: int = 0
    """Samples of the whole group, and how many are complete once this process is done (all shards')."""
    missing_shards: tuple[str, ...] = ()
    """For a sharded capture: the shards (``"I/N"``) that own a block still incomplete."""
    by_others: int = 0
    """Samples this process found incomplete at its start that another process resuming the same group captured
    meanwhile (:mod:`trajlab.capture.claims`)."""

    def completeness(self) -> str:
        """One line: whether the group is complete, and if not which shards still have blocks to do."""
        if self.n_complete >= self.n_samples:
            return f"group {self.group}: complete ({self.n_complete}/{self.n_samples} samples)"
        todo = f"; incomplete blocks belong to shard(s) {', '.join(self.missing_shards)} (still running, or to run)" \
            if self.missing_shards else ""
        return f"group {self.group}: INCOMPLETE, {self.n_complete}/{self.n_samples} samples complete{todo}"


def _versions() -> dict:
    import diffusers

    import trajlab

    return {"trajlab": trajlab.__version__, "diffusers": diffusers.__version__, "torch": torch.__version__}


def pipeline_kwargs(pipe, plan: CapturePlan, prompts: list[str], generators: list[torch.Generator]) -> dict:
    """Keyword arguments of one pipeline call; refuses options the pipeline cannot honour."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs = {"prompt": prompts, "num_inference_steps": plan.steps, "generator": generators,
              "output_type": "np" if plan.images else "latent"}
    if "guidance_scale" in params:
        kwargs["guidance_scale"] = plan.guidance
    if plan.negative_prompt:
        if "negative_prompt" not in params:
            raise PlanError(f"{type(pipe).__name__} takes no negative prompt (LCM pipelines guide through a "
                            "w-embedding and ignore negative prompts by construction); drop --negative-prompt")
        kwargs["negative_prompt"] = [plan.negative_prompt] * len(prompts)
    for side in ("height", "width"):
        if getattr(plan, side) is not None:
            kwargs[side] = getattr(plan, side)
    return kwargs


def to_uint8(images) -> np.ndarray:
    """Pipeline ``np`` output (B, H, W, 3) floats in [0, 1] -> uint8, as diffusers' ``numpy_to_pil`` rounds."""
    images = np.asarray(images)
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def images_of(out) -> np.ndarray:
    """A pipeline output's images as uint8 (B, H, W, 3), whatever its ``output_type``: ``np`` floats rounded as
    diffusers' ``numpy_to_pil`` rounds (so ``pil`` images are these very bytes), ``pt`` (B, 3, H, W) tensors;
    the first item of a ``return_dict=False`` tuple."""
    images = out[0] if isinstance(out, tuple) else out.images
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    if isinstance(images, (list, tuple)) and images and hasattr(images[0], "convert"):  # PIL images
        return np.stack([np.asarray(im.convert("RGB")) for im in images])
    return to_uint8(images)


def _step_variables(records) -> tuple[str, ...]:
    r = records[0]
    out = ["latent", "x0_pred", "model_output"]
    if r.uncond is not None:
        out += ["model_output_uncond", "model_output_cond"]
    if r.denoised is not None:
        out.append("denoised")
    return tuple(v for v in STEP_FIELDS if v in out)


def _scheduler_config(sched) -> dict:
    """The scheduler's config as stored; diffusers' ``_use_default_values`` comes from a set, so its order
    changes from process to process: sorted, so that every process writes the same attrs."""
    cfg = dict(sched.config)
    if isinstance(cfg.get("_use_default_values"), (list, tuple)):
        cfg["_use_default_values"] = sorted(cfg["_use_default_values"])
    return cfg


def _still_todo(path, group: str, wanted: np.ndarray, start: int, stop: int) -> bool:
    """Whether block ``[start, stop)`` still has a wanted sample to capture (re-read once it is claimed)."""
    if group not in store.group_names(path):
        return True
    return bool((wanted[start:stop] & ~store.completed(path, group, start, stop)).any())


def repair_damage(path, group: str, done: np.ndarray, samples, may_allocate: bool) -> np.ndarray:
    """What a resumed group's damage needs (:func:`trajlab.store.damage` over its complete ``samples``, this
    process's; every chunk read against its checksum): damaged samples marked incomplete so that their blocks
    are captured again, one note line; damage a re-run cannot repair (a coordinate) refused in one line. The new
    done mask. (A lost ``zarr.json`` is restored before, by a process that may allocate.)"""
    damage = store.damage(path, group, samples=samples)
    if any("not repairable" in d.what for d in damage):
        bad = next(d for d in damage if "not repairable" in d.what)
        raise store.StoreError(f"{path}: {bad}; capture into another group (--group NAME) or store")
    bad = sorted({s for d in damage for s in d.samples})
    if bad:
        store.note(f"{path}: group {group}: {len(bad)} complete sample(s) damaged ({'; '.join(str(d) for d in damage if d.samples)}): "
                   "capturing them again")
        store.mark_incomplete(path, group, bad)
        done = done.copy()
        done[bad] = False
    return done


def _group_attrs(pipe, plan: CapturePlan, config: dict) -> dict:
    """The attrs a new group is allocated with: versions, model, pipeline and scheduler, the run's settings, its
    checked ``config``; an exact world's recipe itself (so a file's world replays without the file)."""
    sched = pipe.scheduler
    attrs = {**_versions(), "model": plan.model, "loras": plan.loras, "pipeline_class": type(pipe).__name__,
             "scheduler_class": type(sched).__name__, "scheduler_config": _scheduler_config(sched),
             "steps": plan.steps, "guidance": plan.guidance, "negative_prompt": plan.negative_prompt,
             "height": plan.height or 0, "width": plan.width or 0, "dtype": plan.dtype, "device": str(plan.device),
             "created": _dt.datetime.now(_dt.timezone.utc).isoformat(), "config": config, "extra": plan.extra}
    if str(plan.model).startswith("exact:"):
        from trajlab.models.exact_presets import exact_recipe

        attrs["exact_recipe"] = exact_recipe(str(plan.model))
    return attrs


def capture(pipe, plan: CapturePlan, path, *, group: str | None = None, progress: bool = True,
            shard=None, select=None, call=None) -> CaptureResult:
    """Run ``plan`` on ``pipe`` and record it into group ``group`` (default ``plan.group_name()``) of ``path``.

    Any pipeline with a ``scheduler`` and a ``unet``/``transformer`` module works, hybrids included
    (:class:`trajlab.models.hybrid.HybridPipeline`). ``path``: a local path or an fsspec URL
    (``file://``, ``s3://``).
    Resumes: complete blocks are skipped, incomplete blocks redone, damaged samples' blocks (a chunk truncated,
    missing or altered since it was written: :func:`repair_damage`) captured again. A group with a different config is
    refused (:class:`trajlab.store.ConfigMismatch`); one that differs only in lacking some of the plan's
    seeds is grown (:func:`trajlab.store_groups.extend_group`: stored samples kept, new ones appended),
    and a plan with fewer seeds than the group captures only its own. ``group`` may be a label, and a
    group an older trajlab named with the seeds in its hash is found by its config
    (:func:`trajlab.store_groups.resolve_group`).
    ``shard``: ``"I/N"`` (or a :class:`~trajlab.capture.shard.Shard`) captures only blocks ``b`` with
    ``b % N == I``; under torchrun the ranks split the blocks the same way (see
    :mod:`trajlab.capture.shard`). Either way the store ends bitwise identical to a one-process capture.
    ``select(prompt_index, seeds) -> [(start, stop), ...]`` and ``call(kwargs) -> output``: capture only these sample
    ranges of the group (as it is after any growth), each by ``call`` instead of ``pipe(**kwargs)``: how the Python
    capture API records a researcher's own pipeline call (:mod:`trajlab.capture.session`).
    """
    plan.validate()
    try:  # named taps / attention maps: checked against the denoiser before anything is written
        views = CaptureViews.for_plan(pipe, plan)
    except TapError as exc:
        raise PlanError(str(exc)) from None
    coord = _shard.coordinator(path, shard)
    config = json.loads(json.dumps(plan.group_config(), default=str))
    images = plan.images and getattr(pipe, "vae", None) is not None
    if images != plan.images:
        plan.images = images
        config["images"] = images
    group = store.check_group_name(store_groups.resolve_group(path, group or plan.group_name(), config))
    exists, done = coord.group_state(group, plan.n_samples)
    prompt_index, seeds = plan.sample_table()
    segments = [0]
    if exists:
        store.check_config(path, group, config, seeds_may_differ=True)
        if coord.may_allocate():  # a lost zarr.json back from the consolidated copy, before anything re-consolidates
            store.restore_metadata(path, group)
        if coord.may_allocate() and store.consolidated_is_stale(path):
            store.repair_consolidated(path)
        coord.grow(group, lambda: store_groups.extend_group(path, group, plan.seeds), plan.seeds)
        prompt_index, seeds, _ = store.sample_table(path, group)  # the group's samples, grown or not
        done, segments = store.completed(path, group), store_groups.segments(path, group)
    n_samples = len(seeds)
    wanted = np.isin(seeds, plan.seeds)
    t0 = time.perf_counter()

    def allocate(records, end: BatchEnd):
        levels = [r.level for r in records]
        ab = [lv.alpha_bar for lv in levels]
        first = records[0].sample
        image_shape = None if end.images is None else tuple(end.images.shape[1:])
        layout = store.GroupLayout(n_samples=n_samples, n_steps=len(records), latent_shape=tuple(first.shape[1:]),
                                   dtype=str(numpy_dtype(first.dtype)), step_variables=_step_variables(records),
                                   image_shape=image_shape, step_arrays=views.step_arrays(records) if views else ())
        attrs = _group_attrs(pipe, plan, config)

        def allocate_here():
            try:
                store.allocate_group(path, group, layout, timesteps=[r.timestep for r in records], alpha_bar=ab,
                                     seeds=seeds, prompt_index=prompt_index, prompts=plan.prompts, attrs=attrs)
            except store.GroupExists:  # another process allocated it since the check above: same config or refuse
                store.check_config(path, group, config)

        coord.obtain(group, allocate_here, lambda: store.check_config(path, group, config))

    bar = None
    blocks = _shard.blocks(n_samples, plan.batch_size, segments) if select is None else select(prompt_index, seeds)
    mine = coord.shard.mine(blocks)
    if exists:  # a truncated, missing or altered chunk of a complete sample: captured again
        done = repair_damage(path, group, done, [s for a, b in mine for s in range(a, b)], coord.may_allocate())
    todo = [(a, b) for a, b in mine if (wanted[a:b] & ~done[a:b]).any()]
    n_todo = sum(b - a for a, b in todo)
    n_skipped = sum(int(wanted[a:b].sum()) for a, b in mine if (a, b) not in todo)
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_todo, unit="sample", desc=group[:40] + coord.label, dynamic_ncols=True)
    claims = claims_for(path, group)  # two processes resuming one group take disjoint blocks
    writer = StoreWriter(path, group, allocate, on_batch_written=claims.releasing(bar.update if bar else None),
                         check=None if exists else lambda: store.check_config(path, group, config))
    first_put = True
    try:
        for start, stop in claims.blocks(todo, lambda a, b: _still_todo(path, group, wanted, a, b)):
            prompts = [plan.prompts[i] for i in prompt_index[start:stop]]
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:stop]]
            kwargs = pipeline_kwargs(pipe, plan, prompts, gens)
            recorder = BatchRecorder(batch_size=stop - start, sink=writer.put)
            with tap_pipeline(pipe, recorder.on_step, recorder.on_denoiser), \
                    (views.batch(recorder, stop - start) if views else contextlib.nullcontext()):
                out = pipe(**kwargs) if call is None else call(kwargs)
            imgs = images_of(out) if plan.images else None
            final = recorder.final_latent()
            ev = None
            if final.is_pinned():
                ev = torch.cuda.Event()
                ev.record()
            if first_put and not exists:
                coord.before_first_put()
            writer.put(BatchEnd(start, stop - start, final, imgs, ev))
            if first_put and not exists:
                coord.after_first_put(writer.allocated)
            first_put = False
    finally:
        writer.close()
        claims.close()
        if bar is not None:
            bar.close()
    listed = group in store.group_names(path)
    if not exists and first_put and listed:  # every block taken by another process that allocated the group
        store.check_config(path, group, config)  # meanwhile: same config or refuse
    coord.end_group(new_group=not exists, any_put=not first_put)
    size = store.store_bytes(path, group)
    now = store.completed(path, group) if listed else np.zeros(n_samples, dtype=bool)
    count = coord.shard.count
    missing = sorted({b % count for b, (s, e) in enumerate(blocks) if not now[s:e].all()}) if count > 1 else []
    by_others = sum(b - a for a, b in claims.by_others)
    return CaptureResult(group, n_todo - by_others, n_skipped, time.perf_counter() - t0, size, by_others=by_others,
                         shard=str(coord.shard) if count > 1 else None, n_samples=len(now),
                         n_complete=int(now.sum()), missing_shards=tuple(f"{i}/{count}" for i in missing))


def capture_dataset(pipe, plan: CapturePlan):
    """Capture ``plan`` into a temporary store and return its group loaded in memory (an ``xr.Dataset``).

    For tests, notebooks and theory checks: the same taps and writer as :func:`capture`.
    """
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="trajlab-capture-")
    try:
        res = capture(pipe, plan, f"{tmp}/s.zarr", progress=False)
        return store.open_group(f"{tmp}/s.zarr", res.group).load()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["capture_dataset", "CapturePlan", "CaptureResult", "PlanError", "capture", "images_of", "pipeline_kwargs", "to_host",
           "to_uint8"]
