"""``python -m trajlab``: capture, info, models (and the study commands built on them).

Bad input is refused before any model loads, with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

EXIT_USAGE = 2


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


# -- parsing helpers ----------------------------------------------------------------------------
def parse_seeds(text) -> list[int]:
    """``"0:32"`` (half-open range), ``"0,3,7"``, ``"5"``, or a list of ints -> list of seeds."""
    if isinstance(text, int):
        return [text]
    if isinstance(text, list):
        return [s for part in text for s in parse_seeds(part)]
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if ":" in part:
                a, b = part.split(":")
                seeds.extend(range(int(a), int(b)))
            elif part:
                seeds.append(int(part))
        except ValueError:
            raise CliError(f"--seeds {text!r}: expected START:STOP, a comma list or an integer") from None
    if not seeds:
        raise CliError(f"--seeds {text!r} selects no seeds")
    return seeds


def read_prompts(path) -> list[str]:
    """Prompts from a text file (one per line, ``#`` comments) or a prompt-suite TOML (``[[prompt]] text = ...``)."""
    import tomllib

    p = Path(path)
    if not p.is_file():
        raise CliError(f"--prompts {path}: no such file")
    if p.suffix == ".toml":
        try:
            entries = tomllib.loads(p.read_text()).get("prompt", [])
        except tomllib.TOMLDecodeError as exc:
            raise CliError(f"--prompts {path}: malformed TOML: {exc}") from None
        if not all(isinstance(e, dict) and isinstance(e.get("text"), str) for e in entries):
            raise CliError(f"--prompts {path}: every [[prompt]] needs a text string")
        return [e["text"] for e in entries]
    return [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _listify(v):
    return v if isinstance(v, list) else [v]


GRID_KEYS = ("model", "scheduler", "steps", "guidance", "negative_prompt")
SCALAR_KEYS = ("prompts", "prompts_file", "seeds", "loras", "height", "width", "dtype", "device", "images",
               "batch_size", "group", "out")


def plans_from_config(path) -> tuple[list, dict]:
    """Plans from a TOML grid: top-level defaults, optional ``[[run]]`` tables; list values expand.

    Returns (plans, options) where options holds ``out`` if given.
    """
    import tomllib

    from trajlab.capture import CapturePlan

    p = Path(path)
    if not p.is_file():
        raise CliError(f"--config {path}: no such file")
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"--config {path}: malformed TOML: {exc}") from None
    runs = doc.pop("run", None) or [{}]
    unknown = set(doc) - set(GRID_KEYS) - set(SCALAR_KEYS)
    for r in runs:
        unknown |= set(r) - set(GRID_KEYS) - set(SCALAR_KEYS)
    if unknown:
        raise CliError(f"--config {path}: unknown keys {sorted(unknown)}; allowed: {sorted(GRID_KEYS + SCALAR_KEYS)}")
    plans = []
    for r in runs:
        cell = {**doc, **r}
        if "model" not in cell:
            raise CliError(f"--config {path}: every run needs a 'model'")
        prompts = cell.get("prompts") or (read_prompts(cell["prompts_file"]) if "prompts_file" in cell else [])
        seeds = parse_seeds(cell.get("seeds", "0:4"))
        axes = [_listify(cell.get(k)) for k in GRID_KEYS]
        for model, sched, steps, guidance, neg in itertools.product(*axes):
            plans.append(_resolve_plan(CapturePlan, model=model, scheduler=sched, steps=steps, guidance=guidance,
                                       negative_prompt=neg, prompts=list(prompts), seeds=seeds,
                                       loras=_listify(cell.get("loras", [])), height=cell.get("height"),
                                       width=cell.get("width"), dtype=cell.get("dtype", "fp32"),
                                       device=cell.get("device", "cpu"), images=cell.get("images", True),
                                       batch_size=cell.get("batch_size", 8)))
    return plans, {"out": doc.get("out")}


def _resolve_plan(cls, **kw):
    """Fill unset model-dependent fields (scheduler, steps, guidance) from the registry."""
    from trajlab.models.registry import get

    spec = get(kw["model"]) if isinstance(kw["model"], str) else None
    defaults = {"scheduler": spec.scheduler if spec else "default", "steps": spec.steps if spec else 30,
                "guidance": spec.guidance if spec else 7.5}
    for k, v in defaults.items():
        if kw.get(k) is None:
            kw[k] = v
    if spec is not None and spec.role == "exact":
        kw["images"] = False  # exact worlds have no decoder
    if kw.get("negative_prompt") == "":
        kw["negative_prompt"] = None
    return cls(**kw)


def check_writable(out: str) -> None:
    p = Path(out)
    parent = p if p.exists() else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if p.exists() and not p.is_dir():
        raise CliError(f"--out {out}: exists and is not a store directory")
    if not parent.is_dir():
        raise CliError(f"--out {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise CliError(f"--out {out}: {parent} is not writable")


def preflight(plans, out: str) -> None:
    """Every check that can fail, done before any model loads."""
    from trajlab import store
    from trajlab.capture import PlanError
    from trajlab.models.loading import ModelNotAvailable, check_available
    from trajlab.models.registry import parse_lora

    check_writable(out)
    existing = []
    if Path(out).exists():
        try:
            store.validate(out)
        except store.StoreError as exc:
            raise CliError(f"--out {out}: not a valid trajlab store ({exc})") from None
        existing = store.group_names(out)
    seen = set()
    for plan in plans:
        try:
            plan.validate()
            check_available(plan.model, tuple(parse_lora(x) for x in plan.loras))
        except (PlanError, ModelNotAvailable) as exc:
            raise CliError(str(exc)) from None
        group = plan.extra.get("group") or plan.group_name()
        if group in seen:
            raise CliError(f"two runs of the config map to the same group {group!r}")
        seen.add(group)
        if group in existing:
            try:
                store.check_config(out, group, plan.config())
            except store.ConfigMismatch as exc:
                raise CliError(str(exc)) from None


# -- commands -----------------------------------------------------------------------------------
def cmd_capture(args) -> int:
    from trajlab.capture import CapturePlan

    if args.config:
        plans, opts = plans_from_config(args.config)
        out = args.out or opts.get("out")
    else:
        if not args.model:
            raise CliError("capture needs --model (or --config FILE.toml)")
        prompts = list(args.prompt or [])
        if args.prompts:
            prompts += read_prompts(args.prompts)
        plans = [_resolve_plan(CapturePlan, model=args.model, scheduler=args.scheduler, steps=args.steps,
                               guidance=args.guidance, negative_prompt=args.negative_prompt, prompts=prompts,
                               seeds=parse_seeds(args.seeds), loras=list(args.lora or []), height=args.height,
                               width=args.width, dtype=args.dtype, device=args.device, images=not args.no_images,
                               batch_size=args.batch_size)]
        out = args.out
        if args.group:
            plans[0].extra["group"] = args.group
    if not out:
        raise CliError("capture needs --out STORE")
    for plan in plans:
        if args.batch_size and args.config:
            plan.batch_size = args.batch_size
        if args.device and args.config:
            plan.device = args.device
    preflight(plans, out)
    return run_plans(plans, out, progress=not args.quiet)


def run_plans(plans, out: str, progress: bool = True) -> int:
    """Load each model once, capture every plan into ``out``; print a one-line summary."""
    from trajlab import store
    from trajlab.capture import capture
    from trajlab.models.loading import load_pipeline
    from trajlab.models.registry import parse_lora
    from trajlab.models.schedulers import make_scheduler

    t0 = time.perf_counter()
    written = skipped = 0
    cache: dict = {}
    for plan in plans:
        key = (plan.model, tuple(plan.loras), plan.dtype, plan.device)
        if key not in cache:
            cache.clear()
            pipe = load_pipeline(plan.model, loras=tuple(parse_lora(x) for x in plan.loras), dtype=plan.dtype,
                                 device=plan.device, scheduler="default")
            cache[key] = (pipe, dict(pipe.scheduler.config))
        pipe, base_config = cache[key]
        pipe.scheduler = make_scheduler(plan.scheduler, base_config)
        res = capture(pipe, plan, out, group=plan.extra.get("group"), progress=progress)
        written += res.samples_written
        skipped += res.samples_skipped
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    print(f"captured {written} samples ({skipped} already complete) in {len(plans)} group(s) into {out}: "
          f"{size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s")
    store.validate(out)
    return 0


def cmd_info(args) -> int:
    from trajlab import store

    try:
        rows = store.summary(args.store)
    except store.StoreError as exc:
        raise CliError(str(exc)) from None
    print(f"{args.store}: {len(rows)} group(s)")
    for r in rows:
        state = "complete" if r["complete"] == r["samples"] else f"{r['complete']}/{r['samples']} complete"
        print(f"  {r['group']}\n    samples={r['samples']} steps={r['steps']} latent={'x'.join(map(str, r['latent']))} "
              f"images={'yes' if r['images'] else 'no'} size={r['bytes'] / 1e6:.2f} MB  {state}")
    return 0


def cmd_models(args) -> int:
    from trajlab.models.loading import ModelNotAvailable, check_available
    from trajlab.models.registry import registry

    print(f"{'name':24} {'role':8} {'sched':16} {'steps':>5} {'cfg':>5}  {'available':9}  source / loras")
    for m in registry().values():
        try:
            check_available(m.name)
            avail = "yes"
        except ModelNotAvailable:
            avail = "no"
        loras = " + ".join(lo.source + (f"/{lo.subfolder}" if lo.subfolder else "") + (f"/{lo.weight_name}" if lo.weight_name else "")
                           for lo in m.loras)
        src = m.source + (f" (unet {m.unet})" if m.unet else "") + (f" + lora {loras}" if loras else "")
        print(f"{m.name:24} {m.role:8} {m.scheduler:16} {m.steps:>5} {m.guidance:>5g}  {avail:9}  {src}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="trajlab", description="Trajectory capture and analysis for diffusion samplers.")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("capture", help="run pipelines with capture on into a Zarr store")
    c.add_argument("--model", help="registry name (see `trajlab models`), hub id or local diffusers folder")
    c.add_argument("--lora", action="append", metavar="PATH_OR_ID[:SCALE]", help="add a LoRA (repeatable)")
    c.add_argument("--scheduler", default=None, help="scheduler name (default: the model's recommended one)")
    c.add_argument("--steps", type=int, default=None)
    c.add_argument("--guidance", type=float, default=None)
    c.add_argument("--negative-prompt", default=None)
    c.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    c.add_argument("--prompts", help="file with one prompt per line")
    c.add_argument("--seeds", default="0:4", help="START:STOP, comma list or int (default 0:4)")
    c.add_argument("--height", type=int)
    c.add_argument("--width", type=int)
    c.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16 | fp64")
    c.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default cpu)")
    c.add_argument("--batch-size", type=int, default=None)
    c.add_argument("--out", help="store path (a directory, e.g. runs/study.zarr)")
    c.add_argument("--group", help="group name (default: derived from the configuration)")
    c.add_argument("--no-images", action="store_true", help="do not decode and store final images")
    c.add_argument("--config", help="TOML grid of runs (one group per cell)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_capture)

    i = sub.add_parser("info", help="groups, dims, sizes and completeness of a store")
    i.add_argument("store")
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("models", help="list the model registry")
    m.set_defaults(func=cmd_models)

    for extra in _extra_commands():
        extra(sub)
    return ap


def _extra_commands():
    """Study commands that live in their own modules (registered if importable)."""
    out = []
    for mod in ("trajlab.study.cli",):
        try:
            module = __import__(mod, fromlist=["register"])
        except ImportError:
            continue
        out.append(module.register)
    return out


def _quiet_libraries() -> None:
    """No per-component loading bars or LoRA notices from diffusers/transformers on the command line."""
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:
        pass


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 0) is None and args.command == "capture":
        args.batch_size = None if args.config else 8
    if getattr(args, "device", 0) is None and args.command == "capture" and not args.config:
        args.device = "cpu"
    if args.command in ("capture", "demo", "experiment", "report"):
        _quiet_libraries()
    try:
        return args.func(args)
    except CliError as exc:
        print(f"trajlab: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
