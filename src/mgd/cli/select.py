"""``mgd select``: choose a training subset of a budget from a (corrupted) pool; MGD vs baselines.

Parses flags and dispatches to :func:`mgd.apps.select.run_selection`; see that module for the
methods and ``docs/select.md`` for results.
"""

from __future__ import annotations

import argparse

from mgd.apps.protocol import Candidate, load_candidate, save_candidate, write_report
from mgd.apps.select import (
    CORRUPTION_PRESETS,
    GRADIENTS,
    KINDS,
    METHODS,
    MGDSettings,
    TASK_METHODS,
    check_task_methods,
    corrupt_pool,
    resolve_methods,
    run_selection,
    selection_markdown,
)
from mgd.cli.common import (
    given_flags,
    add_eval_workers_flag,
    add_run_dir_flags,
    add_replay_k_flag,
    add_run_flags,
    config_from_args,
    configure_torch,
    non_negative_int,
    positive_float,
    positive_int,
    progress_bars,
    seed_list,
    track_given_flags,
)
from mgd.cli.task import add_task_flag, task_identity, task_runs_from_args
from mgd.data import load_dataset, small_validation
from mgd.errors import UserError
from mgd.io import atomic_write_bytes
from mgd.plots import pyplot, save_figure
from mgd.runs import RunDirectory


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction, got {text!r}") from None
    return value  # range checked with a one-line UserError in run()


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "select",
        help="choose a training subset of a budget from a (corrupted) pool: MGD vs baselines",
        description="Pick k = budget x N examples of the training pool to maximise validation "
        "accuracy, by MGD (per-example weights, signed metagradient steps, then the top k) and by "
        "baselines (random, small-loss, margin, EL2N, val-agreement, TracIn, LESS-style, last-layer "
        "influence); references: the full pool, the oracle clean subset, val-only training. Every "
        "subset is retrained on fresh evaluation seeds and read on test once. Writes report.json, "
        "report.md, precision.png and mgd_progress.png.",
    )
    track_given_flags(parser)
    add_task_flag(parser, reseeded=True)
    add_run_flags(parser)
    parser.set_defaults(label_noise=None)  # None: take it from --corruption
    c = parser.add_argument_group("pool and budget")
    c.add_argument("--budget", type=_fraction, default=0.5,
                   help="subset size as a fraction in (0, 1] of the pool (default: %(default)s)")
    c.add_argument("--corruption", choices=sorted(CORRUPTION_PRESETS), default="none",
                   help="preset: mixed = 15%% label noise + 10%% off-distribution + 10%% near-duplicates; "
                        "noisy = 30%% label noise (default: %(default)s). The rate flags override it.")
    c.add_argument("--off-distribution", type=_fraction, metavar="RATE",
                   help="fraction of the pool replaced by off-distribution inputs with random labels")
    c.add_argument("--duplicates", type=_fraction, metavar="RATE",
                   help="fraction of the pool overwritten by near-copies of a few examples")
    c.add_argument("--corruption-seed", type=int, default=0, help="(default: %(default)s)")
    c.add_argument("--val-per-class", type=non_negative_int, default=0, metavar="N",
                   help="keep only N validation examples per class (a seeded choice, --corruption-seed): "
                        "a target known from a few examples; 0 keeps the whole validation split "
                        "(default: %(default)s)")
    m = parser.add_argument_group("methods")
    m.add_argument("--methods", default=",".join(METHODS),
                   help="comma list of methods to run (default: all: %(default)s; with --task: "
                        f"{','.join(TASK_METHODS)})")
    m.add_argument("--meta-steps", type=non_negative_int, default=MGDSettings().meta_steps,
                   help="MGD meta-steps (default: %(default)s)")
    m.add_argument("--meta-lr", type=positive_float, default=MGDSettings().step_size,
                   help="MGD signed step size on the weights (default: %(default)s)")
    m.add_argument("--mask-prob", type=float, default=MGDSettings().mask_prob,
                   help="probability that a weight is updated at a meta-step (default: %(default)s)")
    m.add_argument("--seeds-per-step", type=positive_int, default=MGDSettings().seeds_per_step,
                   help="MGD: average the metagradient over this many crafting seeds per meta-step "
                        "(default: %(default)s)")
    m.add_argument("--subset-seeds", type=positive_int, default=MGDSettings().subset_seeds,
                   help="MGD: training runs averaged when each iterate's top-k subset is scored on "
                        "validation to choose the iterate (default: %(default)s)")
    m.add_argument("--holdout", type=float, default=MGDSettings().holdout, metavar="FRACTION",
                   help="MGD: hold this fraction of the validation split out of the metagradient and "
                        "choose the iterate on it only (default: %(default)s, the whole split serves both)")
    m.add_argument("--mgd-gradient", choices=GRADIENTS, default=MGDSettings().gradient,
                   help="MGD: descend along the weights' metagradient through every step (full) or "
                        "the paper's one-step surrogate, which injects the whole pool at one late step "
                        "(surrogate; models without BatchNorm) (default: %(default)s)")
    m.add_argument("--inject-at", type=float, default=MGDSettings().inject_at, metavar="FRACTION",
                   help="MGD surrogate: the injection step as a fraction of training (default: %(default)s)")
    m.add_argument("--budget-aware", action="store_true",
                   help="MGD: keep the weights on the budget at every meta-step (mean 1, each at most "
                        "N/k), so that metagradients are taken near the subsets the top-k becomes")
    m.add_argument("--crafting-seeds", type=seed_list, default=[0, 1, 2, 3, 4],
                   help="seeds for MGD and the baselines (default: 0,1,2,3,4)")
    m.add_argument("--eval-seeds", type=seed_list, default=list(range(100, 110)),
                   help="fresh seeds for the final retraining (default: 100-109)")
    add_replay_k_flag(m)
    add_run_dir_flags(parser, "runs/select", resume_help="continue the run in DIR (finished methods are kept)")
    add_eval_workers_flag(parser)
    parser.set_defaults(run=run)


def _rates(args: argparse.Namespace) -> dict:
    rates = dict(CORRUPTION_PRESETS[args.corruption])
    for key, value in (("label_noise", args.label_noise), ("off_distribution", args.off_distribution),
                       ("duplicates", args.duplicates)):
        if value is not None:
            if not 0.0 <= value < 1.0:
                raise UserError(f"--{key.replace('_', '-')} must be in [0, 1), got {value}")
            rates[key] = value
    return rates


def _load_candidates(run_dir: RunDirectory) -> dict[str, Candidate]:
    """Every candidate a previous run of this directory finished (MGD yields two names)."""
    folder = run_dir.path / "candidates"
    found = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        candidate = load_candidate(run_dir, path.stem)
        if candidate is not None:
            found[candidate.name] = candidate
    return found


def run(args: argparse.Namespace) -> int:
    if not 0.0 < args.budget <= 1.0:
        raise UserError(f"--budget must be a fraction in (0, 1] of the pool, got {args.budget}")
    if not 0.0 < args.mask_prob <= 1.0:
        raise UserError(f"--mask-prob must be in (0, 1], got {args.mask_prob}")
    if args.noise_seed != 0:
        raise UserError("use --corruption-seed to seed the pool corruption (--noise-seed is not used by mgd select)")
    methods = resolve_methods(args.methods.split(","))
    if args.seeds_per_step > len(args.crafting_seeds):
        raise UserError(f"--seeds-per-step {args.seeds_per_step} exceeds the {len(args.crafting_seeds)} "
                        "--crafting-seeds; give more crafting seeds or average fewer")
    settings = MGDSettings(args.meta_steps, args.meta_lr, args.mask_prob, args.replay_k,
                           seeds_per_step=args.seeds_per_step, subset_seeds=args.subset_seeds,
                           budget_aware=args.budget_aware, holdout=args.holdout,
                           gradient=args.mgd_gradient, inject_at=args.inject_at)
    if args.task:
        return _run_task(args, methods, settings)
    rates = _rates(args)
    configure_torch(args)
    args.label_noise = 0.0  # the pool is corrupted here, not by the training recipe
    config = config_from_args(args)
    run_config = {
        "run": config.to_dict(), "budget": args.budget, "corruption": {**rates, "seed": args.corruption_seed},
        "val_per_class": args.val_per_class,
        "methods": methods, "mgd": settings.to_dict(), "crafting_seeds": args.crafting_seeds,
        "eval_seeds": args.eval_seeds, "threads": args.threads,
    }
    run_dir = RunDirectory.open(args.out, args.resume, command="select", config=run_config)
    dataset = load_dataset(config.dataset)
    if args.val_per_class:
        dataset = small_validation(dataset, args.val_per_class, seed=args.corruption_seed)
    pool = corrupt_pool(dataset, seed=args.corruption_seed, **rates)
    finished = _load_candidates(run_dir)

    total_candidates = sum(2 if m == "mgd" else 1 for m in methods)
    totals = {"methods": total_candidates, "meta": args.meta_steps + 1, "evaluate": total_candidates * len(args.eval_seeds)}
    with progress_bars(totals, enabled=not args.quiet) as progress:
        report = run_selection(
            config, pool, budget=args.budget, methods=methods, mgd=settings,
            crafting_seeds=args.crafting_seeds, eval_seeds=args.eval_seeds, finished=finished,
            on_candidate=lambda c: save_candidate(run_dir, c), store=run_dir, progress=progress,
            eval_workers=args.eval_workers,
        )
    described = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in rates.items() if v) or "none"
    _write(args, run_dir, report, run_config, _title(pool.dataset.name, args, described))
    return 0


#: Flags of mgd select that describe the built-in pool, so do not apply to --task.
POOL_FLAGS = ("corruption", "off_distribution", "duplicates", "corruption_seed", "val_per_class", "label_noise")


def _title(name: str, args: argparse.Namespace, corruption: str | None) -> str:
    title = f"mgd select on {name}: budget {args.budget:g}"
    if corruption is not None:
        title += f", corruption: {corruption}"
    if args.val_per_class:
        title += f", {args.val_per_class} validation examples per class"
    return title


def _run_task(args: argparse.Namespace, methods: list[str], settings: MGDSettings) -> int:
    """``mgd select --task``: the task's training data is the pool."""
    given = [f"--{n.replace('_', '-')}" for n in POOL_FLAGS if n in given_flags(args)]
    if given:
        raise UserError(f"{', '.join(given)} describe{'s' if len(given) == 1 else ''} the built-in pool and "
                        "do not apply with --task: the task function defines the pool (its training data) "
                        "and the validation set")
    if "methods" not in given_flags(args):
        methods = list(TASK_METHODS)  # the default: every method a task can run
    configure_torch(args)
    runs = task_runs_from_args(args, command="mgd select")
    check_task_methods(runs, methods)
    run_config = {
        **task_identity(args, runs), "budget": args.budget, "methods": methods, "mgd": settings.to_dict(),
        "crafting_seeds": args.crafting_seeds, "eval_seeds": args.eval_seeds, "threads": args.threads,
    }
    run_dir = RunDirectory.open(args.out, args.resume, command="select", config=run_config)
    finished = _load_candidates(run_dir)
    total_candidates = sum(2 if m == "mgd" else 1 for m in methods)
    totals = {"methods": total_candidates, "meta": args.meta_steps + 1, "evaluate": total_candidates * len(args.eval_seeds)}
    with progress_bars(totals, enabled=not args.quiet) as progress:
        report = run_selection(
            None, None, runs=runs, budget=args.budget, methods=methods, mgd=settings,
            crafting_seeds=args.crafting_seeds, eval_seeds=args.eval_seeds, finished=finished,
            on_candidate=lambda c: save_candidate(run_dir, c), store=run_dir, progress=progress, eval_workers=args.eval_workers,
        )
    _write(args, run_dir, report, run_config, _title(args.task, args, None))
    return 0


def _write(args: argparse.Namespace, run_dir: RunDirectory, report: dict, run_config: dict, title: str) -> None:
    """report.json, report.md and the plots (the precision plot only where there is ground truth)."""
    report["config"] = run_config
    text = write_report(run_dir, report, title) + selection_markdown(report)
    atomic_write_bytes(run_dir.path / "report.md", text.encode())
    truth = report["selection"]["corruption"] is not None
    if truth:
        _plot_precision(run_dir, report)
    _plot_progress(run_dir, report["selection"]["mgd_history"])
    if not args.quiet:
        print(text)
        print(f"wrote {run_dir.path}/report.md, report.json" + (", precision.png" if truth else ""))


def _plot_precision(run_dir: RunDirectory, report: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    methods = {n: m for n, m in report["methods"].items() if "precision" in m["info"]}
    curves = report["selection"]["precision_vs_budget"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(methods)
    left.barh(names, [100 * methods[n]["info"]["precision"] for n in names], color="tab:blue")
    left.axvline(100 * report["selection"]["pool_composition"]["precision"], color="gray", ls="--", lw=1, label="pool")
    left.set_xlabel(f"precision of the kept set (% clean), budget {report['selection']['budget']:g}")
    left.invert_yaxis()
    left.legend(fontsize=8)
    for name, curve in curves.items():
        if name in ("oracle",):
            continue
        budgets = [float(b) for b in curve]
        right.plot(budgets, [100 * v for v in curve.values()], marker="o", ms=3, label=name,
                   lw=2.5 if name.startswith("mgd") else 1)
    right.set_xlabel("budget (fraction of the pool), one ranking per method")
    right.set_ylabel("precision (%)")
    right.legend(fontsize=7, ncol=2)
    fig.suptitle("Diagnostic (ground truth read for reporting only)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, run_dir.path / "precision.png")


def _plot_progress(run_dir: RunDirectory, history: list[dict]) -> None:
    plt = pyplot()
    if plt is None or not history:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    steps = [h["step"] for h in history]
    left.plot(steps, [h["val_objective"] for h in history], marker="o", ms=3, label="weighted run (val CE)")
    if "subset_val_loss" in history[0]:
        left.plot(steps, [h["subset_val_loss"] for h in history], marker="s", ms=3, label="top-k subset (val CE)")
    left.set_xlabel("meta-step")
    left.set_ylabel("validation loss")
    left.legend(fontsize=8)
    for kind in KINDS:  # the ground truth of a corrupted preset pool; a user's pool has none
        values = [h["mean_weight_by_kind"].get(kind) for h in history]
        if values[0] is not None:
            right.plot(steps, values, label=kind)
    if not history[0]["mean_weight_by_kind"]:
        right.set_axis_off()
    else:
        right.set_xlabel("meta-step")
        right.set_ylabel("mean weight (diagnostic)")
        right.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, run_dir.path / "mgd_progress.png")
