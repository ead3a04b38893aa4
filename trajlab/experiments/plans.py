"""Capture plans from user input: seeds, prompts, one grid expander (CLI flags and TOML), preflight, run.

Everything here up to :func:`run_plans` imports no torch, so bad input is refused in well under a
second, before any model loads. Errors are :class:`InputError` (one line for the user).

Grid cell keys (a TOML table, a ``[[run]]`` entry merged over the top level, or the CLI flags):
``GRID_KEYS`` take a value or a list (lists expand as a product, one plan per combination);
``SCALAR_KEYS`` take one value.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Callable

from trajlab.progress import eta_line

GRID_KEYS = ("model", "scheduler", "steps", "guidance", "negative_prompt")
SCALAR_KEYS = ("prompts", "prompts_file", "seeds", "loras", "height", "width", "dtype", "device", "images",
               "batch_size", "group", "out", "taps", "attention_maps")
PLAN_DEFAULTS = {"seeds": "0:4", "dtype": "fp32", "device": "cpu", "images": True, "batch_size": 8}
"""Defaults of a grid cell's scalar keys (the CLI's flags default to the same)."""


class InputError(ValueError):
    """Bad user input (a flag, a TOML file, a prompt list): printed as one line, exit status 2."""


# -- seeds and prompts --------------------------------------------------------------------------
SEED_LIMIT = 2**63
"""Seeds are stored as int64 and seed torch generators: 0 <= seed < 2**63."""
MAX_SEEDS = 10_000_000
"""More seeds than this in one selection is a typo (``0:10000000000``), refused before any memory is used."""


def _check_seed(seed: int, text) -> int:
    if not 0 <= seed < SEED_LIMIT:
        raise InputError(f"--seeds {text!r}: seed {seed} is out of range; seeds must be in [0, 2**63)")
    return seed


def parse_seeds(text) -> list[int]:
    """``"0:32"`` (half-open range), ``"0,3,7"``, ``"5"``, or a list of ints -> list of seeds.

    Each seed must be in [0, 2**63) (int64, a torch generator seed); at most :data:`MAX_SEEDS`."""
    if isinstance(text, bool) or not isinstance(text, (str, int, list)):
        raise InputError(f"--seeds {text!r}: expected START:STOP, a comma list, an integer or a list of them, "
                         f"got {type_name(text)}")
    if isinstance(text, int):
        return [_check_seed(text, text)]
    if isinstance(text, list):
        if not text:
            raise InputError("--seeds []: selects no seeds")
        return [s for part in text for s in parse_seeds(part)]
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if ":" in part:
                a, b = part.split(":")
                a, b = int(a), int(b)
                _check_seed(a, text), _check_seed(max(b - 1, a), text)
                if b - a > MAX_SEEDS:
                    raise InputError(f"--seeds {text!r}: {b - a} seeds; at most {MAX_SEEDS} in one selection")
                seeds.extend(range(a, b))
            elif part:
                seeds.append(_check_seed(int(part), text))
        except ValueError as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"--seeds {text!r}: expected START:STOP, a comma list or an integer") from None
    if not seeds:
        raise InputError(f"--seeds {text!r} selects no seeds")
    return seeds


def read_text(path, flag: str) -> str:
    """A file's text as UTF-8; one clear line when it is not (or cannot be read)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{flag} {path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{flag} {path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); save it as "
                         "UTF-8") from None


def read_prompts(path) -> list[str]:
    """Prompts from a text file (one per line, ``#`` comments) or a prompt-suite TOML (``[[prompt]] text = ...``)."""
    import tomllib

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--prompts {path}: no such file")
    text = read_text(p, "--prompts")
    if p.suffix == ".toml":
        try:
            entries = tomllib.loads(text).get("prompt", [])
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"--prompts {path}: malformed TOML: {exc}") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("text"), str)
                                                    for e in entries):
            raise InputError(f"--prompts {path}: every [[prompt]] needs a text string")
        return [e["text"] for e in entries]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def listify(v) -> list:
    return v if isinstance(v, list) else [v]


# -- plans ----------------------------------------------------------------------------------------
def resolve_plan(**kw):
    """A CapturePlan with unset model-dependent fields (scheduler, steps, guidance) from the registry."""
    from trajlab.capture.plan import CapturePlan
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
    return CapturePlan(**kw)


# -- typed values ------------------------------------------------------------------------------------
def type_name(v) -> str:
    """How a value's type reads in a message ("a string", "a list", ...)."""
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(v) -> bool:
    return _is_int(v) and v >= 1


def _guidance(v) -> bool:
    import math

    return _is_number(v) and math.isfinite(v) and v >= 0


def _text(v) -> bool:
    return isinstance(v, str)


def _name(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _seeds(v) -> bool:
    return isinstance(v, str) or _is_int(v) or (isinstance(v, list) and all(isinstance(x, str) or _is_int(x) for x in v))


def _str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


CELL_TYPES: dict[str, tuple[Callable[[object], bool], str, tuple[type, ...]]] = {
    "model": (_name, "a model name", (str,)),
    "scheduler": (_name, "a scheduler name", (str,)),
    "steps": (_positive_int, "an integer >= 1", (int,)),
    "guidance": (_guidance, "a finite number >= 0", (int, float)),
    "negative_prompt": (_text, "a string", (str,)),
    "prompts": (_str_list, 'a list of strings (prompts = ["a cat", "a dog"])', (list,)),
    "prompts_file": (_name, "a file path", (str,)),
    "seeds": (_seeds, 'START:STOP, a comma list, an integer or a list of integers (seeds = "0:8")', (str, int, list)),
    "loras": (lambda v: _name(v) or _str_list(v), "a LoRA id or path, or a list of them", (str, list)),
    "height": (_positive_int, "a positive integer (pixels, a multiple of 8)", (int,)),
    "width": (_positive_int, "a positive integer (pixels, a multiple of 8)", (int,)),
    "dtype": (_name, "one of fp32, fp16, bf16, fp64", (str,)),
    "device": (_name, "cpu, cuda, cuda:N or mps", (str,)),
    "images": (lambda v: isinstance(v, bool), "true or false", (bool,)),
    "batch_size": (_positive_int, "an integer >= 1", (int,)),
    "group": (_text, "a group name", (str,)),
    "out": (_name, "a store path", (str,)),
    "taps": (lambda v: _name(v) or (isinstance(v, list) and all(_name(x) or isinstance(x, dict) for x in v)),
             'module names or tables (taps = ["mid_block", {name = "down_blocks.1", reduce = "spatial_mean"}])',
             (str, list)),
    "attention_maps": (lambda v: isinstance(v, bool), "true or false", (bool,)),
}
"""What each grid-cell key takes: (check, what to say, the types it may have). None (unset) is always
fine; GRID_KEYS may also take a non-empty list of such values (one plan each)."""


def _what_is_wrong(key: str, value) -> str:
    _, what, types = CELL_TYPES[key]
    wrong_type = isinstance(value, bool) and bool not in types or not isinstance(value, types)
    return f"expected {what}" + (f", got {type_name(value)}" if wrong_type else "")


def check_cell_types(cell: dict, where: str = "") -> None:
    """Refuse a cell value of the wrong type or range in one line naming key, value and what is expected
    (e.g. ``guidance = "4"``, ``prompts = "a cat"``, ``images = "no"``, ``batch_size = 0``, ``guidance = nan``)."""
    prefix = f"{where}: " if where else ""
    for key, (ok, what, _) in CELL_TYPES.items():
        value = cell.get(key)
        if value is None:
            continue
        if key in GRID_KEYS and isinstance(value, list):
            if not value:
                raise InputError(f"{prefix}{key}=[]: expected {what} or a non-empty list of them")
            bad = [v for v in value if not ok(v)]
            if bad:
                raise InputError(f"{prefix}{key}={value!r}: {bad[0]!r}: {_what_is_wrong(key, bad[0])}")
            continue
        if not ok(value):
            raise InputError(f"{prefix}{key}={value!r}: {_what_is_wrong(key, value)}")
    if cell.get("group") is not None:
        from trajlab import store

        try:
            store.check_group_name(cell["group"])
        except store.StoreError as exc:
            raise InputError(f"{prefix}{exc}") from None


def check_cell_keys(cell: dict, where: str) -> None:
    unknown = set(cell) - set(GRID_KEYS) - set(SCALAR_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(GRID_KEYS + SCALAR_KEYS)}")


def expand_cell(cell: dict, *, prompts: list[str], seeds: list[int], mapped: Callable[[str], str] = str,
                device: str | None = None, skip: Callable[[str, str | None], str | None] | None = None,
                notes: list[str] | None = None, where: str = "") -> list:
    """The one grid expander: every combination of the cell's GRID_KEYS values -> a CapturePlan.

    prompts/seeds: already resolved (see :func:`cell_prompts`); mapped: model-name substitution;
    device: overrides the cell's; skip(model, negative_prompt) -> a note (appended to ``notes``)
    when that combination cannot run, None to keep it. Every value is type-checked first
    (:func:`check_cell_types`; ``where`` prefixes its messages).
    """
    check_cell_types(cell, where)
    plans = []
    for model, sched, steps, guidance, neg in itertools.product(*[listify(cell.get(k)) for k in GRID_KEYS]):
        model = mapped(model)
        note = skip(model, neg) if skip is not None else None
        if note:
            if notes is not None:
                notes.append(note)
            continue
        plan = resolve_plan(model=model, scheduler=sched, steps=steps, guidance=guidance, negative_prompt=neg,
                            prompts=list(prompts), seeds=list(seeds), loras=listify(cell.get("loras", [])),
                            height=cell.get("height"), width=cell.get("width"),
                            dtype=cell.get("dtype", PLAN_DEFAULTS["dtype"]),
                            device=device or cell.get("device") or PLAN_DEFAULTS["device"],
                            images=cell.get("images", PLAN_DEFAULTS["images"]),
                            batch_size=_default(cell.get("batch_size"), PLAN_DEFAULTS["batch_size"]),
                            taps=_taps(cell.get("taps"), where), attention_maps=bool(cell.get("attention_maps", False)))
        if cell.get("group") and cell["group"] != plan.group_name():  # its own derived name is no change
            plan.extra["group"] = cell["group"]
        plans.append(plan)
    return plans


def _taps(value, where: str = "") -> list:
    """A cell's ``taps`` (module names or tables) in canonical form; a bad option in one line."""
    from trajlab.capture.module_taps import TapError, parse_taps

    try:
        return parse_taps(value)
    except TapError as exc:
        raise InputError(f"{where}: {exc}" if where else str(exc)) from None


def _default(value, default):
    """``value`` unless unset (None): a given 0 is refused by the plan, never silently the default."""
    return default if value is None else value


def cell_prompts(cell: dict, base: Path | None = None, read=read_prompts) -> list[str]:
    """``prompts`` (a list) + the prompts of ``prompts_file`` (resolved with ``read``)."""
    prompts = list(cell.get("prompts") or [])
    if cell.get("prompts_file"):
        f = Path(cell["prompts_file"])
        prompts += read(f if f.is_absolute() or base is None or f.is_file() else base / f)
    return prompts


def plans_from_config(path) -> tuple[list, dict]:
    """Plans from a TOML grid: top-level defaults, optional ``[[run]]`` tables; list values expand.

    Returns (plans, options) where options holds ``out`` if given.
    """
    import tomllib

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--config {path}: no such file")
    try:
        doc = tomllib.loads(read_text(p, "--config"))
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"--config {path}: malformed TOML: {exc}") from None
    runs = doc.pop("run", None) or [{}]
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise InputError(f"--config {path}: run = {runs!r}: expected [[run]] tables")
    plans = []
    where = f"--config {path}"
    for r in runs:
        cell = {**doc, **r}
        check_cell_keys(cell, where)
        if "model" not in cell:
            raise InputError(f"{where}: every run needs a 'model'")
        check_cell_types(cell, where)
        try:
            seeds = parse_seeds(cell.get("seeds", PLAN_DEFAULTS["seeds"]))
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        plans += expand_cell(cell, prompts=cell_prompts(cell), seeds=seeds, where=where)
    return plans, {"out": doc.get("out")}


# -- checks before any load -----------------------------------------------------------------------
def check_writable(out: str) -> None:
    """Refuse an output that cannot be written, before any work: a file, a path under a file, a folder
    where a test file cannot be created (permissions, a read-only filesystem). Remote URLs are left to
    the store layer; ``file://`` URLs are checked as paths."""
    from trajlab import store

    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise InputError(f"--out {out!r}: expected a path")
    if not store.is_local(out):
        return
    p = Path(store.local_path(out))
    if p.exists() and not p.is_dir():
        raise InputError(f"--out {out}: is a file, not a directory")
    parent = p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"--out {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or not _can_create_in(parent):
        raise InputError(f"--out {out}: {parent} is not writable")


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (permission bits do not bind root; a read-only mount does)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".trajlab-write-test-"):
            return True
    except OSError:
        return False


def check_device(device: str) -> None:
    """Refuse a device this machine cannot run, before any model loads: an unknown name, ``cuda`` without
    CUDA (or ``cuda:N`` past the last GPU), ``mps`` without MPS. ``cpu`` costs nothing; the others import
    torch (a second), never a model."""
    from trajlab.capture.plan import DEVICE_PATTERN

    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise InputError(f"device {device!r}: expected cpu, cuda, cuda:N or mps")
    if device == "cpu":
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InputError(f"--device {device}: CUDA is not available here ({why}); use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps: MPS is not available here; use --device cpu")


def plan_group(plan) -> str:
    """The store group a plan writes (its ``extra["group"]`` if set, else its derived name)."""
    return plan.extra.get("group") or plan.group_name()


def preflight(plans, out: str) -> None:
    """Every check that can fail, done before any model loads (plans, checkpoints, store, groups)."""
    from trajlab import store
    from trajlab.capture.plan import PlanError
    from trajlab.models.loading import ModelNotAvailable, check_available
    from trajlab.models.registry import parse_lora
    from trajlab.store_groups import rebuild_root, resolve_group

    check_writable(out)
    try:  # an s3:// store: endpoint, credentials and bucket answer within seconds, before any model loads
        store.check_remote(out)
    except store.StoreError as exc:
        raise InputError(f"--out {exc}") from None
    existing = []
    if store.is_local(out) and Path(store.local_path(out)).exists():
        try:  # what an interrupted allocation left is fine: the capture completes or rebuilds it
            rebuild_root(out)  # a lost root zarr.json (groups there): re-created from their metadata
            store.validate(out, resumable=True)
        except store.StoreError as exc:
            raise InputError(f"--out {out}: not a valid trajlab store ({exc})") from None
        existing = store.group_names(out)
    if any(plan.taps or plan.attention_maps for plan in plans):  # tap names against the module trees, no weights
        from trajlab.capture.module_taps import TapError, preflight as taps_preflight

        try:
            taps_preflight(plans)
        except (TapError, ModelNotAvailable) as exc:
            raise InputError(str(exc)) from None
    seen = set()
    for plan in plans:
        try:
            plan.validate()
            check_available(plan.model, tuple(parse_lora(x) for x in plan.loras))
            hybrid = plan.extra.get("hybrid")
            if hybrid:
                check_available(hybrid["student"])
        except (PlanError, ModelNotAvailable) as exc:
            raise InputError(str(exc)) from None
        group = plan_group(plan)
        try:
            store.check_group_name(group)
            if existing:  # a label, or a group an older trajlab named with its seeds in the hash
                group = resolve_group(out, group, plan.group_config())
        except store.StoreError as exc:
            raise InputError(f"--group: {exc}") from None
        if group in seen:
            raise InputError(f"two runs of the config map to the same group {group!r}")
        seen.add(group)
        if group in existing:
            try:
                store.check_config(out, group, plan.group_config(), seeds_may_differ=True)  # more seeds: it grows
            except store.ConfigMismatch as exc:
                raise InputError(str(exc)) from None
    for device in sorted({plan.device for plan in plans}, key=str):  # after the checkpoints: a missing
        check_device(device)                                         # checkpoint is named first


# -- running ----------------------------------------------------------------------------------------
class PipelineCache:
    """Loaded pipelines keyed by what they were loaded from; holds one key at a time (memory)."""

    def __init__(self):
        self._key, self._value = None, None

    def get(self, key, load: Callable[[], object]):
        if key != self._key:
            self._key, self._value = None, None
            self._value, self._key = load(), key
        return self._value


def plan_pipeline(plan, cache: PipelineCache):
    """The pipeline a plan captures: loaded (or reused from ``cache``) with the plan's scheduler set."""
    from trajlab.models.loading import load_pipeline
    from trajlab.models.registry import parse_lora
    from trajlab.models.schedulers import make_scheduler

    hybrid = plan.extra.get("hybrid")
    if hybrid:
        from trajlab.models.hybrid import load_hybrid_pipeline

        key = ("hybrid", hybrid["teacher"], hybrid["student"], hybrid["mechanism"], plan.dtype, plan.device)
        pipe = cache.get(key, lambda: load_hybrid_pipeline(hybrid, dtype=plan.dtype, device=plan.device))
        pipe.configure(hybrid)
        return pipe
    key = (plan.model, tuple(plan.loras), plan.dtype, plan.device)

    def load():
        pipe = load_pipeline(plan.model, loras=tuple(parse_lora(x) for x in plan.loras), dtype=plan.dtype,
                             device=plan.device, scheduler="default")
        return pipe, dict(pipe.scheduler.config)

    pipe, base_config = cache.get(key, load)
    pipe.scheduler = make_scheduler(plan.scheduler, base_config)
    return pipe


def run_plans(plans, out: str, progress: bool = True, cache: PipelineCache | None = None, shard=None,
              validate: bool = True) -> list:
    """Capture every plan into ``out`` (each model loaded once); print a one-line summary.

    Returns the CaptureResults. ``cache`` lets several calls share loaded pipelines. ``shard``: ``"I/N"``
    captures only this shard's sample blocks of every plan (torchrun ranks split them by themselves;
    see :mod:`trajlab.capture.shard`). ``validate``: validate the store at the end (a caller whose other
    processes may still be writing validates once they have ended).
    """
    from trajlab import store
    from trajlab.capture.run import capture
    from trajlab.capture.shard import setup as shard_setup

    shard_setup(shard)  # under torchrun: join the process group before pipelines load
    t0 = time.perf_counter()
    cache = cache or PipelineCache()
    results = []
    cost = [plan.n_samples * plan.steps for plan in plans]  # what a group's capture time scales with
    for i, plan in enumerate(plans):
        if progress and len(plans) > 1:
            print(f"capture group {eta_line(sum(cost[:i]), sum(cost), time.perf_counter() - t0, i, len(plans))}",
                  flush=True)
        pipe = plan_pipeline(plan, cache)
        results.append(capture(pipe, plan, out, group=plan.extra.get("group"), progress=progress, shard=shard))
    written = sum(r.samples_written for r in results)
    skipped = sum(r.samples_skipped for r in results)
    size = store.store_bytes(out)
    others = sum(r.by_others for r in results)
    others = f"; {others} captured meanwhile by another process" if others else ""
    print(f"captured {written} samples ({skipped} already complete{others}) in {len(plans)} group(s) into {out}: "
          f"{size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s")
    for r in results:  # a shard (or a run that shared its group) says whether its group is complete
        if r.by_others or r.shard is not None and (shard is not None or r.shard.startswith("0/")):
            print(r.completeness())
    if validate:
        store.validate(out)
    return results


__all__ = ["GRID_KEYS", "InputError", "PLAN_DEFAULTS", "PipelineCache", "SCALAR_KEYS", "cell_prompts",
           "check_cell_keys", "check_writable", "expand_cell", "listify", "parse_seeds", "plan_group",
           "plan_pipeline", "plans_from_config", "preflight", "read_prompts", "resolve_plan", "run_plans"]
