"""Study subcommands of ``python -m trajlab``: experiment, report, demo (registered by trajlab.cli)."""

from __future__ import annotations


def _map_arg(items) -> dict:
    from trajlab.cli import CliError

    out = {}
    for it in items or []:
        a, sep, b = it.partition("=")
        if not sep or not a or not b:
            raise CliError(f"--map {it!r}: expected FROM=TO (e.g. micro-sd=tiny-sd)")
        out[a] = b
    return out


def cmd_experiment(args) -> int:
    from trajlab.cli import CliError
    from trajlab.study.experiments import ExperimentError, list_experiments, load_experiment, run_experiment

    if args.list or not args.name:
        for n in list_experiments():
            e = load_experiment(n)
            print(f"{n:18} {e.kind:17} {e.description}")
        return 0
    if not args.out:
        raise CliError("experiment needs --out STORE")
    try:
        exp = load_experiment(args.name)
        res = run_experiment(exp, args.out, offline=args.offline, quick=args.quick, seeds=args.seeds,
                             model_map=_map_arg(args.map), device=args.device, progress=not args.quiet)
    except ExperimentError as exc:
        raise CliError(str(exc)) from None
    print(f"experiment {exp.name}: {len(res['groups'])} group(s) in {args.out}")
    return 0


def cmd_report(args) -> int:
    from trajlab import store
    from trajlab.cli import CliError
    from trajlab.report import build_report

    try:
        store.validate(args.store)
    except store.StoreError as exc:
        raise CliError(f"{args.store}: {exc}") from None
    path = build_report(args.store, args.out, model=args.model, analyses_dir=args.analyses, lpips=not args.no_lpips,
                        n_boot=args.n_boot)
    print(path)
    return 0


def cmd_demo(args) -> int:
    from trajlab.study.demo import run_demo

    path = run_demo(args.out, quick=args.quick, tiny=args.tiny, hybrid=not args.no_hybrid,
                    mechanistic=not args.no_jacobian, control=not args.no_control)
    print(f"report: {path}")
    return 0


def register(sub) -> None:
    e = sub.add_parser("experiment", help="run a study experiment (data/experiments/NAME.toml or a file)")
    e.add_argument("name", nargs="?", help="experiment name or TOML file (omit to list)")
    e.add_argument("--out", help="store path")
    e.add_argument("--offline", action="store_true", help="use the config's offline models (micro-world)")
    e.add_argument("--quick", action="store_true", help="the config's quick overrides (few seeds/prompts)")
    e.add_argument("--seeds", help="override the seeds (START:STOP, list or int)")
    e.add_argument("--map", action="append", metavar="FROM=TO", help="substitute a model (repeatable)")
    e.add_argument("--device", default=None)
    e.add_argument("--list", action="store_true", help="list the experiments")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_experiment)

    r = sub.add_parser("report", help="static HTML report (+ PNGs) of a store")
    r.add_argument("store")
    r.add_argument("--out", required=True, help="report directory (index.html is written there)")
    r.add_argument("--model", help="pipeline whose VAE decodes x0 filmstrips (default: the store's teacher if "
                                   "available)")
    r.add_argument("--analyses", help="directory with results written by analyses/*.py (*.nc) to include")
    r.add_argument("--no-lpips", action="store_true", help="skip LPIPS diversity (pixel diversity only)")
    r.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates for metric CIs")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="the micro-world study end to end on the CPU (report at OUT/report)")
    d.add_argument("--out", required=True)
    d.add_argument("--quick", action="store_true", help="fewer prompts and seeds")
    d.add_argument("--tiny", action="store_true", help="use the random tiny models even if the micro-world exists")
    d.add_argument("--no-hybrid", action="store_true", help="skip the hybrid k sweep")
    d.add_argument("--no-jacobian", action="store_true",
                   help="skip the JVP analyses (contraction, covariance propagation) of teacher and students")
    d.add_argument("--no-control", action="store_true",
                   help="skip the guidance-sweep and negative-prompt groups")
    d.set_defaults(func=cmd_demo)
