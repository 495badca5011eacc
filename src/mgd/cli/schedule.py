"""``mgd schedule``: learn an LR schedule by MGD and compare it with tuned baselines.

Parses flags and dispatches to :func:`mgd.apps.schedule.run_schedule_search`; see that module
for the methods and ``docs/schedule.md`` for measured results.
"""

from __future__ import annotations

import argparse

from mgd import __version__
from mgd.apps import schedule as app
from mgd.apps.protocol import write_report
from mgd.cli.common import (
    given_flags,
    add_eval_workers_flag,
    add_run_dir_flags,
    add_replay_k_flag,
    add_run_flags,
    config_from_args,
    configure_torch,
    positive_float,
    positive_int,
    progress_bars,
    seed_list,
    track_given_flags,
)
from mgd.cli.task import add_task_flag, task_identity, task_runs_from_args
from mgd.data import load_dataset
from mgd.errors import UserError
from mgd.io import atomic_write_bytes
from mgd.runs import RunDirectory

# The frozen recipe of protocols.md §2/§5 per dataset: (steps, batch size).
_RECIPE = {"digits": (300, 100), "mnist1d": (400, 128)}


def _comma(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in _comma(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.01,0.02,0.04, got {text!r}") from None
    if not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "schedule",
        help="learn a learning-rate schedule by MGD and compare it with grid, random search and SGD-HD",
        description="MGD (Adam on the metagradient of the validation loss w.r.t. log-LR knots) from a "
        "poor (constant 0.01) and a reasonable (constant 0.1) start, against a grid over shapes x "
        "peaks, random search with MGD's compute and hypergradient descent (SGD-HD). All choices use "
        "the validation split; every schedule is then retrained on fresh evaluation seeds and tested. "
        "Defaults follow protocols.md: 400 steps / batch 128 on mnist1d, 300 / 100 on digits, "
        "weight decay 5e-4. Writes report.json, report.md and schedules.png in --out.",
    )
    track_given_flags(parser)
    add_task_flag(parser, reseeded=True)
    add_run_flags(parser)
    # The recipe's step count and batch size depend on the dataset (filled in by run()).
    parser.set_defaults(steps=None, batch_size=None, weight_decay=5e-4)
    s = parser.add_argument_group("schedule search")
    s.add_argument("--methods", type=_comma, default=list(app.METHODS),
                   help=f"comma list from {','.join(app.METHODS)} (default: all)")
    s.add_argument("--start", choices=("poor", "reasonable", "both"), default="both",
                   help="MGD start: constant 0.01 (poor), 0.1 (reasonable) or both (default: %(default)s)")
    s.add_argument("--meta-steps", type=int, default=20, help="MGD meta-steps per start (default: %(default)s)")
    s.add_argument("--meta-lr", type=positive_float, default=0.3,
                   help="Adam step in log-LR space (default: %(default)s)")
    s.add_argument("--crafting-seeds", type=seed_list, default=[0, 1, 2, 3, 4],
                   help="seeds MGD rotates over; the first --selection-seeds of them score every "
                        "choice (default: 0-4)")
    s.add_argument("--selection-seeds", type=positive_int, default=3,
                   help="crafting seeds averaged for every validation choice (default: %(default)s)")
    s.add_argument("--eval-seeds", type=seed_list, default=list(range(100, 110)),
                   help="fresh seeds for the final retraining (default: 100-109)")
    s.add_argument("--select-by", choices=app.SELECT_BY, default="loss",
                   help="validation metric every method is chosen by (default: %(default)s)")
    s.add_argument("--peaks", type=_floats, default=list(app.DEFAULT_PEAKS),
                   help="grid peak LRs (default: 0.01 x 2^i, i=0..8; widened if the best is on an edge)")
    s.add_argument("--shapes", type=_comma, default=list(app.SHAPES),
                   help=f"grid shapes from {','.join(app.SHAPES)} (default: all)")
    s.add_argument("--random-runs", type=positive_int,
                   help="random-search budget in training runs (default: what one MGD start cost)")
    add_replay_k_flag(s)
    add_run_dir_flags(parser, "runs/schedule", resume_help="continue the run in DIR (finished methods are kept)")
    add_eval_workers_flag(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.meta_steps < 1:
        raise UserError(f"--meta-steps must be >= 1, got {args.meta_steps}")
    methods = app._parse_list(args.methods, app.METHODS, "methods")
    shapes = app._parse_list(args.shapes, app.SHAPES, "shapes")
    starts = ["poor", "reasonable"] if args.start == "both" else [args.start]
    if args.task:
        return _run_task(args, methods, shapes, starts)
    steps, batch = _RECIPE.get(args.dataset, (300, 100))
    args.steps = steps if args.steps is None else args.steps
    args.batch_size = batch if args.batch_size is None else args.batch_size
    configure_torch(args)
    config = config_from_args(args)
    _check(args, config, methods, starts)  # before any data is loaded
    dataset = load_dataset(config.dataset)
    _search(args, config, dataset, {"run": config.to_dict()}, methods, starts, shapes, args.peaks,
            name=dataset.name, steps=config.steps)
    return 0


def _run_task(args: argparse.Namespace, methods: list[str], shapes: list[str], starts: list[str]) -> int:
    """``mgd schedule --task``: the search on the task's run (it needs the lr_knots kind); peaks,
    starts and bounds default to multiples of the run's base LR (:func:`mgd.apps.schedule.task_defaults`)."""
    configure_torch(args)
    runs = task_runs_from_args(args, command="mgd schedule")
    source = app.ScheduleSource(runs)
    defaults = app.task_defaults(source.lr)
    peaks = args.peaks if "peaks" in given_flags(args) else list(defaults["peaks"])
    _check(args, source, methods, starts)
    _search(args, source, None, task_identity(args, runs), methods, starts, shapes, peaks,
            name=args.task, steps=source.steps, start_lrs=defaults["start_lrs"], lr_bounds=defaults["lr_bounds"])
    return 0


def _check(args: argparse.Namespace, config, methods, starts) -> None:
    app.check_options(config, methods=methods, starts=starts, meta_steps=args.meta_steps,
                      crafting_seeds=args.crafting_seeds, eval_seeds=args.eval_seeds,
                      selection_seeds=args.selection_seeds, select_by=args.select_by)


def _search(args: argparse.Namespace, config, dataset, identity: dict, methods, starts, shapes, peaks, *,
            name: str, steps: int, **absolute_lrs) -> None:
    """Open the run directory, search, write the report: the same for a preset (``config`` and
    ``dataset``) and a task (a ``ScheduleSource``, ``dataset=None``); ``absolute_lrs``: a
    task's ``start_lrs`` and ``lr_bounds``."""
    run_config = {**identity, "schedule": _options(args, methods, starts, shapes, peaks)}
    run_dir = RunDirectory.open(args.out, args.resume, command="schedule", config=run_config)
    totals = {"mgd": (args.meta_steps + 1) * len(starts), "evaluate": 0}
    with progress_bars(totals, enabled=not args.quiet) as progress:
        report = app.run_schedule_search(
            config, dataset, methods=methods, meta_steps=args.meta_steps, starts=starts,
            crafting_seeds=args.crafting_seeds, eval_seeds=args.eval_seeds,
            selection_seeds=args.selection_seeds, meta_lr=args.meta_lr, select_by=args.select_by,
            peaks=peaks, shapes=shapes, random_runs=args.random_runs, k=args.replay_k,
            store=run_dir, progress=progress, eval_workers=args.eval_workers, **absolute_lrs,
        )
    _write(args, run_dir, report, run_config, f"mgd schedule on {name} (T={steps}, "
           f"{len(args.eval_seeds)} evaluation seeds)")


def _options(args: argparse.Namespace, methods, starts, shapes, peaks) -> dict:
    """The search settings that, with the run, define the result (a resume must match them)."""
    return {
        "methods": methods, "starts": starts, "meta_steps": args.meta_steps, "meta_lr": args.meta_lr,
        "crafting_seeds": list(args.crafting_seeds), "selection_seeds": args.selection_seeds,
        "eval_seeds": list(args.eval_seeds), "select_by": args.select_by, "peaks": list(peaks),
        "shapes": shapes, "random_runs": args.random_runs, "replay_k": args.replay_k, "threads": args.threads,
    }


def _write(args: argparse.Namespace, run_dir: RunDirectory, report: dict, run_config: dict, title: str) -> None:
    report["config"] = run_config
    report["mgd_version"] = __version__
    text = write_report(run_dir, report, title) + app.bar_markdown(report)
    atomic_write_bytes(run_dir.path / "report.md", text.encode())
    app.plot_schedules(report, run_dir.path / "schedules.png")
    if not args.quiet:
        print(text)
        print(f"wrote {run_dir.path}/report.json, report.md, schedules.png")
