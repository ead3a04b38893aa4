"""``python -m trajlab``: argument parsing, printing and exit codes; the work lives in the library.

Every argument is checked before torch, diffusers or a model is imported: bad input costs well under a second and
prints one line on stderr (exit status 2). Ctrl-C exits 130 with a line saying how to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_THREADS = 1
"""Intra-op torch threads by default: micro/tiny models gain nothing from more and lose badly when the
cores are shared (README, "Threads"). Override with ``--threads`` or ``TRAJLAB_THREADS``."""

SHARD_HELP = ("capture only sample blocks b with b %% N == I (blocks of --batch-size, prompt-major); run I = 0..N-1 "
              "anywhere into one store (a path, file:// or s3:// URL); re-running a shard resumes it. Under torchrun "
              "the ranks split the blocks the same way without this flag")


class CliError(Exception):
    """A user error found by the CLI itself: printed as one line, exit status 2."""


# -- small helpers ----------------------------------------------------------------------------------
def _check_model_name(name: str) -> None:
    """Refuse a model that is neither registered, a local folder, ``exact:...`` nor a hub id; suggest close names."""
    from trajlab.models.registry import registry

    names = list(registry())
    if name in names or name.startswith("exact:") or Path(name).exists() or "/" in name:
        return
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see `trajlab models`"
    raise CliError(f"--model {name!r}: not a registered model, local folder or hub id{hint}")


def _check_scheduler(name: str | None) -> None:
    from trajlab.models.schedulers import scheduler_names

    if name is None or name in scheduler_names():
        return
    close = difflib.get_close_matches(name, scheduler_names(), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise CliError(f"--scheduler: unknown scheduler {name!r}; expected one of {', '.join(scheduler_names())}{hint}")


def _map_arg(items) -> dict:
    out = {}
    for it in items or []:
        a, sep, b = it.partition("=")
        if not sep or not a or not b:
            raise CliError(f"--map {it!r}: expected FROM=TO (e.g. micro-sd=tiny-sd)")
        out[a] = b
    return out


def _shard_arg(text):
    """``--shard I/N`` checked (and against torchrun's environment) before any heavy import."""
    from trajlab.capture.shard import ShardError, check

    try:
        check(text)
    except ShardError as exc:
        raise CliError(str(exc)) from None
    return text


def set_threads(n: int | None) -> int:
    """Intra-op threads for torch (and BLAS/OpenMP through the environment, read when torch loads).
    ``--threads 0`` (or a bad ``TRAJLAB_THREADS``) is refused, never silently the default."""
    if n is None:
        env = os.environ.get("TRAJLAB_THREADS", "").strip()
        try:
            n = int(env) if env else DEFAULT_THREADS
        except ValueError:
            raise CliError(f"TRAJLAB_THREADS={env!r}: expected an integer >= 1") from None
        if n < 1:
            raise CliError(f"TRAJLAB_THREADS={env!r}: expected an integer >= 1")
    if n < 1:
        raise CliError(f"--threads {n}: must be >= 1")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n


# -- commands ---------------------------------------------------------------------------------------
def cmd_capture(args) -> int:
    from trajlab.experiments import plans as P

    if args.batch_size is not None and args.batch_size < 1:  # never silently the default
        raise CliError(f"--batch-size {args.batch_size}: must be >= 1")
    taps = _tap_args(args)
    if args.config:
        plans, opts = P.plans_from_config(args.config)
        out = args.out or opts.get("out")
        for plan in plans:
            plan.batch_size = plan.batch_size if args.batch_size is None else args.batch_size
            plan.device = args.device or plan.device
            plan.taps += [t for t in taps if t["name"] not in {x["name"] for x in plan.taps}]
            plan.attention_maps = plan.attention_maps or args.attention_maps
    else:
        if not args.model:
            raise CliError("capture needs --model (or --config FILE.toml)")
        _check_model_name(args.model)
        _check_scheduler(args.scheduler)
        cell = {"model": args.model, "scheduler": args.scheduler, "steps": args.steps, "guidance": args.guidance,
                "negative_prompt": args.negative_prompt, "loras": list(args.lora or []), "height": args.height,
                "width": args.width, "dtype": args.dtype, "device": args.device, "images": not args.no_images,
                "batch_size": args.batch_size, "group": args.group, "taps": taps, "attention_maps": args.attention_maps}
        prompts = list(args.prompt or []) + (P.read_prompts(args.prompts) if args.prompts else [])
        plans = P.expand_cell(cell, prompts=prompts, seeds=P.parse_seeds(args.seeds))
        out = args.out
    if not out:
        raise CliError("capture needs --out STORE")
    if args.group is not None:
        from trajlab.store import StoreError, check_group_name

        try:
            check_group_name(args.group)
        except StoreError as exc:
            raise CliError(f"--group: {exc}") from None
    shard = _shard_arg(args.shard)
    P.preflight(plans, out)
    args.store_path = out  # what a Ctrl-C message speaks of
    _quiet_libraries()
    P.run_plans(plans, out, progress=not args.quiet, shard=shard)
    return 0


def _tap_args(args) -> list[dict]:
    from trajlab.capture.module_taps import TapError, taps_from_flags

    try:
        return taps_from_flags(args.tap, reduce=args.tap_reduce, channels=args.tap_channels, dtype=args.tap_dtype,
                               branch=args.tap_branch)
    except TapError as exc:
        raise CliError(f"--tap: {exc}") from None


def cmd_taps(args) -> int:
    from trajlab.capture.module_taps import TapError, module_listing
    from trajlab.models.loading import ModelNotAvailable

    _check_model_name(args.model)
    try:
        print("\n".join(module_listing(args.model, args.lora or [], depth=args.depth, grep=args.grep)))
    except (ModelNotAvailable, TapError) as exc:
        raise CliError(str(exc)) from None
    return 0


def _quoted(items, limit: int = 4) -> str:
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _info_verify(path, names) -> int:
    """``info --verify`` after the listing: damage named on stdout (trajlab.store_groups.verify_lines), exit 1 if any."""
    from trajlab.store_groups import damage_line, verify_lines

    lines, damage = verify_lines(path, names)
    print("\n".join(lines))
    if damage:
        print(f"trajlab: error: {damage_line(path, damage)}", file=sys.stderr)
    return 1 if damage else 0


def cmd_info(args) -> int:
    if getattr(args, "verify", False):  # the listing, then the verification
        args.verify = False
        cmd_info(args)
        from trajlab.store_groups import split_group_path

        path, only = split_group_path(args.store)
        return _info_verify(path, [only] if only else None)
    from trajlab import store
    from trajlab.store_groups import describe, seed_ranges, split_group_path, step_array_line

    try:
        store.check_remote(args.store)  # s3://: endpoint, credentials and bucket, within seconds
        path, only = split_group_path(args.store)  # STORE/NAME or STORE/LABEL: that group only
        rows = [r for r in describe(path) if only is None or r["group"] == only]
    except store.StoreError as exc:
        raise CliError(str(exc)) from None
    print(f"{path}: {len(rows)} group(s)" if only is None else f"{path}: group {only}")
    for r in rows:
        state = "complete" if r["complete"] == r["samples"] else f"INCOMPLETE, {r['complete']}/{r['samples']} complete"
        per = r["seeds_per_prompt"]
        per_text = f"{per[0]} per prompt" if len(per) == 1 else f"{min(per)}-{max(per)} per prompt"
        guidance = r["guidance"] if r["guidance"] is not None else "?"
        neg = f" negative={r['negative_prompt']!r}" if r["negative_prompt"] else ""
        print(f"  {r['label']}" + (f"  (group {r['group']})" if r["label"] != r["group"] else ""))
        print(f"    model={r['model'] or '?'} scheduler={r['scheduler']} steps={r['steps']} guidance={guidance}{neg}")
        print(f"    prompts ({len(r['prompts'])}): {_quoted(r['prompts'])}")
        print(f"    seeds {seed_ranges(r['seeds'])} ({per_text})")
        print(f"    samples={r['samples']} steps={r['steps']} latent={'x'.join(map(str, r['latent']))} "
              f"images={'yes' if r['images'] else 'no'} size={r['bytes'] / 1e6:.2f} MB  {state}")
        for a in r.get("step_arrays", []):  # named module taps, attention maps: bytes per sample
            print(f"    {step_array_line(a)}")
    return 0


def cmd_models(args) -> int:
    from trajlab.models.loading import ModelNotAvailable, check_available
    from trajlab.models.registry import SEED_SYSTEMS, registry

    print(f"{'name':24} {'role':8} {'sched':24} {'steps':>5} {'cfg':>5}  {'available':9}  {'offline analogue':16}  "
          "source / loras")
    for m in registry().values():
        try:
            check_available(m.name)
            avail = "yes"
        except ModelNotAvailable:
            avail = "no"
        loras = " + ".join(lo.source + (f"/{lo.subfolder}" if lo.subfolder else "") + (f"/{lo.weight_name}" if lo.weight_name else "")
                           for lo in m.loras)
        src = m.source + (f" (unet {m.unet})" if m.unet else "") + (f" + lora {loras}" if loras else "")
        analogue = SEED_SYSTEMS.get(m.name, "-")
        print(f"{m.name:24} {m.role:8} {m.scheduler:24} {m.steps:>5} {m.guidance:>5g}  {avail:9}  {analogue:16}  {src}")
    print("offline analogue: the micro-world model trained with the same recipe (`make train-micro`), what "
          "`trajlab experiment NAME --offline` substitutes")
    return 0


def _experiment_models(exp, model_map: dict) -> list[str]:
    """The models an experiment names when run online: every run's, the hybrid's teacher and student."""
    names = []
    for run in exp.grid.get("run") or [{}]:
        model = run.get("model", exp.grid.get("model"))
        names += model if isinstance(model, list) else [model]
    if exp.hybrid:
        names += [exp.hybrid.get("teacher"), exp.hybrid.get("student")]
    return list(dict.fromkeys(model_map.get(n, n) for n in names if isinstance(n, str)))


def _check_online_models(exp, model_map: dict, out) -> None:
    """A checkpoint missing here, for an experiment that has micro-world substitutes: one line suggesting
    ``--offline``, before any heavy import (other problems are left to the preflight)."""
    from trajlab.models.loading import ModelNotAvailable, check_available

    if not exp.offline:
        return
    for name in _experiment_models(exp, model_map):
        try:
            check_available(name)
        except ModelNotAvailable as exc:
            raise CliError(f"experiment {exp.name} needs checkpoints that are not here: add --offline to run it on "
                           f"its micro-world substitutes (trajlab experiment {exp.name} --offline --out {out}), or "
                           f"fetch them: {exc}") from None
        except Exception:  # noqa: BLE001 - an unknown name: the preflight says it
            continue


def cmd_experiment(args) -> int:
    from trajlab.experiments.configs import build_plans, list_experiments, load_experiment, run_experiment
    from trajlab.experiments.plans import preflight

    if args.list or not args.name:
        for n in list_experiments():
            e = load_experiment(n)
            print(f"{n:18} {e.kind:17} {e.description}")
        from trajlab.experiments.patching import LISTING

        print(f"{'patching':18} {'patching':17} {LISTING}")
        return 0
    if not args.out:
        raise CliError("experiment needs --out STORE")
    if args.name == "patching":  # its own runs and map, no store (trajlab.experiments.patching)
        from trajlab.experiments.patching import cli_patching

        _quiet_libraries()
        return cli_patching(args)
    exp = load_experiment(args.name)
    model_map = _map_arg(args.map)
    if not args.offline:
        _check_online_models(exp, model_map, args.out)  # before the plans import torch and diffusers
    plans, hplans, _ = build_plans(exp, offline=args.offline, quick=args.quick, seeds=args.seeds,
                                   model_map=model_map, device=args.device)
    shard = _shard_arg(args.shard)
    preflight(plans + hplans, args.out)
    args.store_path = args.out
    _quiet_libraries()
    res = run_experiment(exp, args.out, offline=args.offline, quick=args.quick, seeds=args.seeds,
                         model_map=model_map, device=args.device, progress=not args.quiet, shard=shard)
    print(f"experiment {exp.name}: {len(res['groups'])} group(s) in {args.out}")
    return 0


def cmd_report(args) -> int:
    from trajlab import store
    from trajlab.analysis.cluster import ClusterError, check_address, dask_cluster, probe_scheduler

    if args.scheduler is not None and args.workers is not None:
        raise CliError("give --scheduler ADDRESS or --workers N, not both")
    if args.workers is not None and args.workers < 1:
        raise CliError(f"--workers {args.workers}: expected >= 1 worker processes")
    try:
        address = check_address(args.scheduler) if args.scheduler is not None else None
    except ClusterError as exc:
        raise CliError(f"--scheduler: {exc}") from None
    if args.n_boot < 1:
        raise CliError(f"--n-boot {args.n_boot}: expected >= 1 bootstrap replicates")
    try:
        store.check_remote(args.store)  # s3://: endpoint, credentials and bucket, within seconds
        store.validate(args.store)
        rows = store.summary(args.store)
    except store.StoreError as exc:
        raise CliError(f"{args.store}: {exc}") from None
    if not any(r["complete"] for r in rows):
        raise CliError(f"{args.store}: no complete samples in {len(rows)} group(s): nothing to report "
                       "(capture first, or resume the capture)")
    if args.analyses and not Path(args.analyses).is_dir():
        raise CliError(f"--analyses {args.analyses}: no such directory")
    from trajlab.experiments.plans import check_writable

    check_writable(args.out)  # a file, or a read-only place: refused before any analysis
    from trajlab.analysis.io import check_chunks
    from trajlab.store_groups import damage_line

    check_chunks(args.store)  # a missing chunk of a complete sample: one line, never NaN (a listing, no data read)
    try:  # a port that is not a dask scheduler: one line within seconds, before the heavy imports
        probe_scheduler(address) if address is not None else None
    except ClusterError as exc:
        raise CliError(str(exc)) from None
    _quiet_libraries()
    from trajlab.experiments.reporting import report_store

    with contextlib.ExitStack() as stack:
        try:  # connects (or starts the workers) before any analysis: a bad address costs seconds, not a run
            client = stack.enter_context(dask_cluster(address=address, workers=args.workers))
        except ClusterError as exc:
            raise CliError(str(exc)) from None
        if client is not None:
            print(f"analyses on dask cluster {client.scheduler.address} ({len(client.scheduler_info()['workers'])} "
                  "worker(s))", flush=True)
        try:
            path = report_store(args.store, args.out, model=args.model, analyses_dir=args.analyses,
                                lpips=not args.no_lpips, n_boot=args.n_boot)
        except Exception:  # a chunk that cannot be read (truncated, corrupt): named, not the codec's error
            if damage := store.verify(args.store):
                raise CliError(damage_line(args.store, damage)) from None
            raise
    print(path)
    return 0


def cmd_demo(args) -> int:
    from trajlab.experiments.demo import run_demo  # (imports nothing heavy)
    from trajlab.experiments.plans import check_writable

    check_writable(args.out)
    if args.capture_processes < 1:
        raise CliError(f"--capture-processes {args.capture_processes}: must be >= 1")
    _quiet_libraries()
    run_demo(args.out, world=args.world, quick=args.quick, tiny=args.tiny, hybrid=not args.no_hybrid, mechanistic=not
             args.no_jacobian, control=not args.no_control, capture_processes=args.capture_processes)  # ends: summary, path
    return 0


def cmd_calibrate(args) -> int:
    from trajlab.experiments.plans import check_writable

    check_writable(args.out)
    if args.replicates is not None and args.replicates < 2:
        raise CliError(f"--replicates {args.replicates}: must be >= 2")
    from trajlab.experiments.calibrate import run_calibrate

    run_calibrate(args.out, quick=args.quick, replicates=args.replicates, progress=not args.quiet)
    return 0


# -- the parser -------------------------------------------------------------------------------------
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; one default per flag: the help's own "(default ...)" where it says one,
    else "(default: X)" for a flag whose default is a value (not None or False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings
                or action.default is None or action.default is False or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def _sub(sub, name, help_, epilog, func):
    p = sub.add_parser(name, help=help_, description=help_, epilog=epilog, formatter_class=_Formatter,
                       allow_abbrev=False)
    p.set_defaults(func=func)
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch intra-op threads (default {DEFAULT_THREADS}, or $TRAJLAB_THREADS)")
    return p


def _scheduler_list() -> str:
    from trajlab.models.schedulers import scheduler_names

    return ", ".join(scheduler_names())


def add_capture(sub) -> None:
    c = _sub(sub, "capture", "run pipelines with capture on into a Zarr store", """examples:
  trajlab capture --model micro-sd --steps 30 --prompt "a photo of the digit 3" --seeds 0:8 --out runs/q.zarr
  trajlab capture --model tiny-sd --scheduler ddim --steps 10 --guidance 5 --prompts data/prompts/micro.toml \\
      --seeds 0:4 --height 64 --width 64 --out runs/q.zarr
  trajlab capture --config grid.toml --out runs/grid.zarr      # one group per cell of a TOML grid
re-running the same command resumes (complete samples are skipped).""", cmd_capture)
    c.add_argument("--model", help="registry name (see `trajlab models`), hub id, local diffusers folder, or "
                                   "exact:PRESET / exact:path/to/world.toml")
    c.add_argument("--lora", action="append", metavar="PATH_OR_ID[:SCALE]", help="add a LoRA (repeatable)")
    c.add_argument("--scheduler", default=None, metavar="NAME",
                   help=f"scheduler (default: the model's recommended one); one of: {_scheduler_list()}")
    c.add_argument("--steps", type=int, default=None, help="inference steps (default: the model's recommended)")
    c.add_argument("--guidance", type=float, default=None,
                   help="guidance_scale: CFG weight, or the LCM w-embedding (default: the model's recommended)")
    c.add_argument("--negative-prompt", default=None, help="negative prompt (CFG pipelines only)")
    c.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    c.add_argument("--prompts", metavar="FILE", help="prompts: a text file (one per line, # comments) or a "
                                                     "prompt-suite TOML ([[prompt]] text = ...)")
    c.add_argument("--seeds", default="0:4", help="START:STOP (half-open), comma list or int")
    c.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 (default: the model's)")
    c.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: the model's)")
    c.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16", "fp64"), help="run dtype")
    c.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default cpu)")
    c.add_argument("--batch-size", type=int, default=None, help="samples per pipeline call (default 8)")
    c.add_argument("--out", help="store path (a directory, e.g. runs/study.zarr)")
    c.add_argument("--group", help="group name, or the label of a group in the store (default: derived from the "
                                   "configuration; re-running with more --seeds grows that group)")
    c.add_argument("--no-images", action="store_true", help="do not decode and store final images")
    c.add_argument("--config", metavar="FILE", help="TOML grid of runs (one group per cell)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--shard", metavar="I/N", default=None, help=SHARD_HELP)
    c.add_argument("--tap", action="append", metavar="MODULE", help="store this denoiser module's output per sample "
                   "and step (repeatable; the names: `trajlab taps MODEL`)")
    c.add_argument("--tap-reduce", choices=("none", "spatial_mean"), help="reduce --tap outputs (default none)")
    c.add_argument("--tap-channels", metavar="A:B|I,J", help="store only these channels of --tap outputs (default all)")
    c.add_argument("--tap-dtype", choices=("native", "float16", "float32"), help="--tap storage (default native)")
    c.add_argument("--tap-branch", choices=("cond", "uncond", "both"), help="CFG half of --tap outputs (default cond)")
    c.add_argument("--attention-maps", action="store_true", help="store cross-attention maps per token and step")


def add_study(sub) -> None:
    e = _sub(sub, "experiment", "run a study experiment (data/experiments/NAME.toml or a file)", """examples:
  trajlab experiment --list
  trajlab experiment hybrid --offline --out runs/hybrid.zarr     # micro-world substitutes for SD1.5 names
  trajlab experiment seed_table --out runs/table.zarr            # real checkpoints from the HF cache""",
             cmd_experiment)
    e.add_argument("name", nargs="?", help="experiment name or TOML file (omit to list)")
    e.add_argument("--out", help="store path")
    e.add_argument("--offline", action="store_true", help="use the config's offline models (micro-world)")
    e.add_argument("--quick", action="store_true", help="the config's quick overrides (few seeds/prompts)")
    e.add_argument("--seeds", help="override the seeds (START:STOP, list or int)")
    e.add_argument("--map", action="append", metavar="FROM=TO", help="substitute a model (repeatable)")
    e.add_argument("--device", default=None, help="cpu | cuda | cuda:N")
    e.add_argument("--list", action="store_true", help="list the experiments")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.add_argument("--shard", metavar="I/N", default=None, help=SHARD_HELP)
    e.add_argument("--receiver", action="append", metavar="MODEL",
                   help="patching only: a receiver model (repeatable; default micro-turbo and micro-dmd)")
    e.add_argument("--site", action="append", metavar="MODULE",
                   help="patching only: a UNet module name or 'latent' (repeatable; default down_blocks.1, mid_block, "
                        "up_blocks.1 and latent)")

    r = _sub(sub, "report", "static HTML report (+ PNGs, result datasets) of a store", """examples:
  trajlab report runs/hybrid.zarr --out runs/hybrid-report
  trajlab report s3://bucket/study.zarr --out runs/r --scheduler tcp://10.0.0.5:8786   # existing dask cluster
  trajlab report runs/big.zarr --out runs/r --workers 4                                  # local dask cluster
  trajlab report runs/demo/study.zarr --out runs/r --analyses runs/demo/analyses""", cmd_report)
    r.add_argument("store")
    r.add_argument("--out", required=True, help="report directory (index.html is written there)")
    r.add_argument("--model", help="pipeline whose VAE decodes x0 filmstrips (default: the store's teacher if "
                                   "available)")
    r.add_argument("--analyses", help="directory with result datasets written by analyses/*.py to include")
    r.add_argument("--no-lpips", action="store_true", help="skip the perceptual distance (pixel diversity only)")
    r.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates for metric CIs")
    r.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="run the analyses on an existing dask.distributed scheduler (tcp://HOST:PORT, as printed "
                        "by `dask scheduler`); its workers must reach the store by the same path or URL")
    r.add_argument("--workers", type=int, metavar="N", default=None, help="run the analyses on a local dask "
                   "cluster of N worker processes (default: dask's threaded scheduler in this process)")
    d = _sub(sub, "demo", "a trained world's study end to end on the CPU (report at OUT/report)", """examples:
  trajlab demo --out runs/demo              # what `make demo` runs: the shapes world
  trajlab demo --out runs/d --world micro   # the digit world's study; --quick: fewer prompts and seeds""", cmd_demo)
    d.add_argument("--out", required=True, help="output directory (study.zarr, analyses/, report/)")
    d.add_argument("--world", choices=("shapes", "micro"), default="shapes",
                   help="shapes (default): teacher vs every shapes-world student, judged; micro: the digit world")
    d.add_argument("--quick", action="store_true", help="fewer prompts and seeds")
    d.add_argument("--tiny", action="store_true", help="the random tiny models (digit world's design) in any case")
    d.add_argument("--no-hybrid", action="store_true", help="skip the hybrid k sweep")
    d.add_argument("--no-jacobian", action="store_true",
                   help="skip the JVP analyses (contraction, covariance propagation) of teacher and students "
                        "and the patching map")
    d.add_argument("--no-control", action="store_true", help="skip the guidance-sweep and negative-prompt groups")
    d.add_argument("--capture-processes", type=int, default=2, metavar="N", help="processes that capture together "
                   "(each sample block once, bitwise as one process; the store's group order varies)")


def add_calibrate(sub) -> None:
    c = _sub(sub, "calibrate", "false-positive rate and power of the store verdicts on planted failures "
                               "(an exact pixel world whose seeds share noise across prompts) and real-network "
                               "nulls", """examples:
  trajlab calibrate --out runs/calibration            # full: solve magnitudes, 100 replicates, micro-sd nulls
  trajlab calibrate --out runs/calibration --quick    # CI-sized: shipped magnitudes, 20 replicates, no nulls
last line: `calibration: N/M failure modes with FPR <= 0.05 over the whole null region ... and power >= 0.8 at
2x the margin`.""", cmd_calibrate)
    c.add_argument("--out", required=True, help="directory for calibration.nc, calibration.csv, power_curves.png")
    c.add_argument("--quick", action="store_true", help="20 replicates, the shipped knob magnitudes, no real-network nulls")
    c.add_argument("--replicates", type=int, default=None, help="replicate seed sets (default 100; quick 20)")
    c.add_argument("--quiet", action="store_true", help="no progress lines")


def build_parser() -> argparse.ArgumentParser:
    from trajlab import __version__

    ap = argparse.ArgumentParser(prog="trajlab", allow_abbrev=False, formatter_class=_Formatter,
                                 description="Trajectory capture and analysis for diffusion samplers.",
                                 epilog="run `trajlab COMMAND --help` for each command's flags and examples")
    ap.add_argument("--version", action="version", version=f"trajlab {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_capture(sub)
    i = _sub(sub, "info", "each group of a store: label, model, scheduler, steps, guidance, prompts, seeds, "
                          "dims, size and completeness",
             "examples:\n  trajlab info runs/q.zarr\n  trajlab info runs/q.zarr/LABEL     # one group, by label or name\n"
             "  trajlab info --verify runs/q.zarr  # every chunk against its checksum",
             cmd_info)
    i.add_argument("store", help="a store, or STORE/GROUP for one group (its name or its label)")
    i.add_argument("--verify", action="store_true", help="also read every chunk of every complete sample against the "
                   "checksum recorded when it was written; names group, variable and samples of any damage (exit 1)")
    _sub(sub, "models", "list the model registry (name, role, scheduler, steps, guidance, availability)",
         "example:\n  trajlab models", cmd_models)
    t = _sub(sub, "taps", "list the denoiser modules --tap can name (no weights read)",
             "examples:\n  trajlab taps micro-sd --depth 4\n  trajlab taps sd15 --grep attn2", cmd_taps)
    t.add_argument("model", help="registry name, hub id or local diffusers folder")
    t.add_argument("--lora", action="append", metavar="PATH_OR_ID[:SCALE]", help="with this LoRA (repeatable)")
    t.add_argument("--depth", type=int, help="only names of at most N dotted parts (default all)")
    t.add_argument("--grep", help="only names or classes containing this text")
    add_study(sub)
    add_calibrate(sub)
    return ap


def _parse(argv):
    """Parse, reporting unknown flags with the subcommand's usage (not the top-level one)."""
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if extra:
        sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


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
    from trajlab.experiments.plans import InputError
    from trajlab.store import StoreError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _parse(argv)
    try:
        set_threads(getattr(args, "threads", None))
        return args.func(args)
    except (CliError, InputError, StoreError) as exc:
        print(f"trajlab: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\n{_interrupted(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _interrupted(args) -> str:
    """The Ctrl-C line, saying only what exists: a store's complete samples (kept: a re-run resumes), or
    that nothing was written yet (e.g. during a model load into a new store)."""
    path = getattr(args, "store_path", None)
    if path is None and args.command == "demo":
        path = os.path.join(args.out, "study.zarr")
    if path is not None:
        from trajlab import store

        try:
            if not store.exists(path):
                return f"interrupted before anything was written (no store at {path}); re-run the same command to start"
            names = store.group_names(path)
            n = sum(int(store.completed(path, g).sum()) for g in names)
        except Exception:  # noqa: BLE001 - an unreadable store: say no more than that
            return f"interrupted; {path} may hold complete samples: re-run the same command to resume"
        if n == 0:
            return f"interrupted: {path} holds no complete sample yet; re-run the same command to resume"
        return (f"interrupted: {path} keeps its {n} complete sample(s) in {len(names)} group(s); re-run the same "
                "command to resume")
    out = getattr(args, "out", None)
    if out and args.command in ("report", "calibrate"):
        if Path(out).exists():
            return f"interrupted: {out} may be incomplete; re-run the same command to write it"
        return f"interrupted before anything was written to {out}"
    return "interrupted"


if __name__ == "__main__":
    sys.exit(main())
