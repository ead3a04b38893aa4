"""The Python capture API: record a pipeline the researcher already has, call by call.

    import torch, trajlab
    with trajlab.capture(pipe, "runs/x.zarr", taps=["mid_block"], attention_maps=True, model="micro-sd") as run:
        for prompt in prompts:
            pipe([prompt] * 4, generator=[torch.Generator().manual_seed(s) for s in range(4)],
                 num_inference_steps=30, guidance_scale=4.0)
    ds = run.open()                      # the last group written, an xarray.Dataset

Inside the ``with`` block every call of ``pipe`` runs as written and returns what it returns (bit for bit:
the taps only observe), and is recorded through :func:`trajlab.capture.run.capture`, the CLI's own capture:
same store, groups, checked config, taps and attention maps, writer, resume and growth by seeds.

What a call must give, so that its samples are (prompt, seed) pairs a re-run can reproduce: ``prompt`` (a
string or a list), one fresh ``torch.Generator`` per image (``generator=[...]``, seeded with ``manual_seed``
and not used yet), no ``latents``; the images prompt-major (every prompt of the call with the same seeds, in
the same order). Anything else is refused in one line before the call runs.

Groups: the call's settings (model, scheduler and its config, steps, guidance, negative prompt, size, dtype,
every other keyword given) name its group as the CLI's settings do; the group's prompts are ``prompts`` if
given, else those of the group's first call, and its seeds grow with the calls (later calls may bring new
seeds; new prompts need ``prompts=[...]`` up front). Its ``batch_size`` is the first call's image count.
A call whose samples are already complete in the store (a re-run of the notebook) runs unobserved and writes
nothing: the store ends as an uninterrupted run leaves it.
"""

from __future__ import annotations

import hashlib
import inspect
import json

import torch

from trajlab.capture.plan import CapturePlan, PlanError

NAMED = {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "generator", "height", "width",
         "num_images_per_prompt", "output_type", "return_dict", "latents", "callback_on_step_end",
         "callback_on_step_end_tensor_inputs", "callback", "callback_steps"}
"""Call keywords the group records as plan fields (or that do not change the samples)."""
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


class SessionError(PlanError):
    """A call the capture session cannot record (one line, before the call runs)."""


def _fresh(g: torch.Generator) -> bool:
    """Whether ``g`` is where ``manual_seed`` left it (no number drawn since)."""
    ref = torch.Generator(device=g.device)
    ref.manual_seed(g.initial_seed())
    return torch.equal(ref.get_state(), g.get_state())


def _json_value(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def scheduler_name(sched) -> str:
    """The trajlab name of a scheduler instance (``ddim``, ``euler-trailing``, ...): the most specific entry of
    :data:`trajlab.models.schedulers.SCHEDULERS` its class and config match; ``default`` when none does."""
    from trajlab.models.schedulers import SCHEDULERS

    hits = [(len(over), name) for name, (cls, over) in SCHEDULERS.items()
            if type(sched).__name__ == cls and all(sched.config.get(k) == v for k, v in over.items())]
    return max(hits)[1] if hits else "default"


class CaptureSession:
    """``trajlab.capture(pipe, path, ...)``: records every call of ``pipe`` made inside the ``with`` block.

    ``taps``/``attention_maps``: as ``--tap``/``--attention-maps`` (:mod:`trajlab.capture.module_taps`);
    ``model``: the name the groups record (default the pipeline's ``name_or_path``); ``group``: a group name or
    label for every call; ``prompts``/``seeds``: the groups' design declared up front (optional).
    ``results``: one :class:`~trajlab.capture.run.CaptureResult` per recorded call."""

    def __init__(self, pipe, path, *, taps=(), attention_maps: bool = False, model: str | None = None,
                 group: str | None = None, prompts=None, seeds=None, progress: bool = False):
        from trajlab.capture.module_taps import TapError, parse_taps

        self.pipe, self.path, self.group, self.progress = pipe, path, group, progress
        try:
            self.taps = parse_taps(list(taps))
        except TapError as exc:
            raise SessionError(str(exc)) from None
        self.attention_maps = bool(attention_maps)
        self.model = model or getattr(pipe, "name_or_path", None) or type(pipe).__name__
        self.prompts = None if prompts is None else [str(p) for p in prompts]
        self.seeds = None if seeds is None else [int(s) for s in seeds]
        self.results: list = []
        self._designs: dict[str, dict] = {}
        self._cls = None

    # -- the with block
    def __enter__(self) -> CaptureSession:
        if self._cls is not None:
            raise RuntimeError("this capture session is already active")
        cls = type(self.pipe)
        session = self

        def __call__(pipe_self, *args, **kwargs):
            if pipe_self is not session.pipe:
                return cls.__call__(pipe_self, *args, **kwargs)
            return session._record(cls.__call__, args, kwargs)

        self._cls = cls
        self.pipe.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                          "__doc__": cls.__doc__})
        return self

    def __exit__(self, *exc) -> bool:
        if self._cls is not None:
            self.pipe.__class__, self._cls = self._cls, None
        return False

    def open(self, group: str | None = None):
        """Group ``group`` (default: the last one written) as an ``xarray.Dataset`` (lazy)."""
        import trajlab

        name = group or (self.results[-1].group if self.results else None)
        if name is None:
            raise SessionError("nothing was recorded yet")
        return trajlab.open(self.path, group=name)

    # -- one call
    def plan_for(self, call, args, kwargs) -> tuple[CapturePlan, list[str], list[int]]:
        """(the call's group plan, its prompts, its seeds); :class:`SessionError` when it cannot be recorded."""
        bound = inspect.signature(call).bind(self.pipe, *args, **kwargs)
        given = {k: v for k, v in bound.arguments.items() if k not in ("self", "kwargs")}
        given.update(bound.arguments.get("kwargs") or {})
        defaults = {k: p.default for k, p in inspect.signature(call).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        a = {**defaults, **given}
        prompt = a.get("prompt")
        if prompt is None or (not isinstance(prompt, str) and not all(isinstance(p, str) for p in prompt)):
            raise SessionError("give the call a prompt (a string or a list of strings): the store keeps the samples' "
                               "prompts (prompt_embeds alone cannot be recorded)")
        if a.get("latents") is not None:
            raise SessionError("latents= given: the store's samples start from their seeds' noise; pass one "
                               "torch.Generator per image instead")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per = int(a.get("num_images_per_prompt") or 1)
        images = [p for p in prompts for _ in range(per)]
        gens = a.get("generator")
        gens = [gens] if isinstance(gens, torch.Generator) else list(gens or [])
        if len(gens) != len(images) or not all(isinstance(g, torch.Generator) for g in gens):
            raise SessionError(f"this call makes {len(images)} image(s) and gives {len(gens)} generator(s): pass one "
                               "torch.Generator per image, e.g. generator=[torch.Generator().manual_seed(s) for s in seeds]")
        if not all(_fresh(g) for g in gens):
            raise SessionError("a generator has been used since manual_seed: pass freshly seeded generators (the "
                               "store keeps seeds, and a re-run must draw the same noise from them)")
        seeds = [int(g.initial_seed()) for g in gens]
        P, S = list(dict.fromkeys(images)), list(dict.fromkeys(seeds))
        if list(zip(images, seeds)) != [(p, s) for p in P for s in S]:
            raise SessionError("the call's images must be prompt-major with the same seeds for every prompt: "
                               "prompt=[p for p in prompts for _ in seeds], generator=[torch.Generator().manual_seed(s) "
                               "for _ in prompts for s in seeds]")
        neg = a.get("negative_prompt")
        if isinstance(neg, (list, tuple)):
            if len(set(neg)) > 1:
                raise SessionError("negative_prompt: one negative prompt for every image (a group has one)")
            neg = neg[0] if neg else None
        other = {k: v for k, v in given.items() if k not in NAMED and not (k in defaults and _same(v, defaults[k]))}
        bad = [k for k, v in other.items() if not _json_value(v)]
        if bad:
            raise SessionError(f"{bad[0]}={type(other[bad[0]]).__name__}: the store records the call's settings as JSON; "
                               "this one is not (capture without it, or outside trajlab.capture)")
        from trajlab.capture.run import _scheduler_config
        from trajlab.capture.taps import denoiser_of

        den = denoiser_of(self.pipe)
        param = next(den.parameters(), None)
        sched_cfg = json.dumps(_scheduler_config(self.pipe.scheduler), sort_keys=True, default=str)
        extra = {"api": "python", "scheduler_class": type(self.pipe.scheduler).__name__,
                 "scheduler_config": hashlib.sha1(sched_cfg.encode()).hexdigest()[:8],
                 "generator_device": str(gens[0].device), "call": dict(sorted(other.items()))}
        guidance = a.get("guidance_scale", 0.0)
        plan = CapturePlan(model=str(self.model), prompts=P, seeds=S, scheduler=scheduler_name(self.pipe.scheduler),
                           steps=int(a.get("num_inference_steps") or 0), guidance=float(guidance or 0.0),
                           negative_prompt=neg or None, height=a.get("height"), width=a.get("width"),
                           dtype=DTYPES.get(param.dtype, "fp32") if param is not None else "fp32",
                           device=_device(param), images=a.get("output_type", "pil") != "latent",
                           batch_size=len(images), extra=extra, taps=self.taps, attention_maps=self.attention_maps)
        return self._design(plan), P, S

    def _design(self, plan: CapturePlan) -> CapturePlan:
        """The group's design: declared prompts (or the first call's) and every seed seen so far (grown)."""
        key = json.dumps({k: v for k, v in plan.config().items() if k not in ("prompts", "seeds")}, sort_keys=True,
                         default=str)
        if key not in self._designs:
            stored = self._stored_design(plan)
            self._designs[key] = {"prompts": self.prompts or stored.get("prompts") or list(plan.prompts),
                                  "seeds": list(self.seeds or stored.get("seeds") or []),
                                  "batch_size": stored.get("batch_size") or plan.batch_size}
        d = self._designs[key]
        missing = [p for p in plan.prompts if p not in d["prompts"]]
        if missing:
            raise SessionError(f"prompt {missing[0]!r} is not among the group's prompts {d['prompts']}: declare every "
                               "prompt up front, trajlab.capture(pipe, path, prompts=[...])")
        d["seeds"] += [s for s in plan.seeds if s not in d["seeds"]]
        plan.prompts, plan.seeds, plan.batch_size = list(d["prompts"]), list(d["seeds"]), d["batch_size"]
        return plan

    def _stored_design(self, plan: CapturePlan) -> dict:
        """The config of a group already in the store that differs from ``plan``'s only in prompts (a superset),
        seeds and batch size (a notebook re-run): its design is adopted, so the re-run resumes that group."""
        from trajlab import store

        if not store.exists(self.path):
            return {}
        for name in store.group_names(self.path):
            cfg = store.decode_attrs(store.group_attrs(self.path, name)).get("config")
            if not isinstance(cfg, dict) or not set(plan.prompts) <= set(cfg.get("prompts") or []):
                continue
            diffs = store.config_differences(cfg, plan.group_config())
            if all(d.split(":")[0] in ("prompts", "seeds", "batch_size") for d in diffs):
                return cfg
        return {}

    def _record(self, call, args, kwargs):
        from trajlab.capture.run import capture

        plan, P, S = self.plan_for(call, args, kwargs)
        out = []

        def select(prompt_index, seeds):
            pos = {(int(p), int(s)): i for i, (p, s) in enumerate(zip(prompt_index, seeds))}
            idx = [pos[(plan.prompts.index(p), s)] for p in P for s in S]
            if idx != list(range(idx[0], idx[0] + len(idx))):
                raise SessionError(f"this call's samples are not consecutive in the group (samples {idx}): call with "
                                   "whole prompts of the group's seeds, in its prompt order, or declare prompts=[...]")
            return [(idx[0], idx[-1] + 1)]

        def run_call(_kwargs):
            out.append(call(self.pipe, *args, **kwargs))
            return out[-1]

        res = capture(self.pipe, plan, self.path, group=self.group, progress=self.progress, select=select,
                      call=run_call)
        self.results.append(res)
        return out[-1] if out else call(self.pipe, *args, **kwargs)  # complete already: run unobserved


def _same(a, b) -> bool:
    try:
        return bool(a == b) if not isinstance(a, torch.Tensor) else False
    except Exception:  # noqa: BLE001 - incomparable values differ
        return False


def _device(param) -> str:
    if param is None or param.device.type == "cpu":
        return "cpu"
    return f"{param.device.type}:{param.device.index}" if param.device.index is not None else param.device.type


__all__ = ["CaptureSession", "SessionError", "scheduler_name"]
