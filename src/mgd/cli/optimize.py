"""``mgd optimize``: metagradient descent on metaparameters, in a resumable run directory."""

from __future__ import annotations

import argparse

import torch

from mgd import __version__
from mgd.cli.common import (
    add_distributed_flags,
    add_eval_workers_flag,
    add_run_dir_flags,
    add_replay_k_flag,
    add_run_flags,
    configure_torch,
    meta_files,
    positive_float,
    progress_bars,
    seed_list,
    track_given_flags,
)
from mgd.cli.task import PRESET_METRICS, add_task_flag, meta_names, subject_from_args
from mgd.descent import (
    Box,
    Chain,
    FixedTotal,
    IntegerCounts,
    LInfBall,
    MetaAdam,
    SignedStep,
    descend,
    state_from_arrays,
    state_to_arrays,
)
from mgd.errors import UserError
from mgd.evaluation import paired_difference, summarize
from mgd.plots import plot_progress
from mgd.runs import RunDirectory

METRICS = PRESET_METRICS


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "optimize",
        help="metagradient descent on data weights, LR schedules or weight decay",
        description="Repeatedly train, compute the exact metagradient of the validation loss and "
        "take a projected meta-step; crafting seeds rotate. Writes a resumable run directory "
        "(run.json, history.jsonl, iterates/, state.npz, result.json, meta.npz, progress.png). The chosen "
        "iterate is the best on validation; it and the start are then retrained on fresh "
        "evaluation seeds and reported on the test split. With --task the task function is "
        "called with seed= for every crafting and evaluation seed, and as there is no test "
        "split the retrained runs are reported on the task's validation objective and metrics "
        "(the objective MGD optimised, so not a held-out number; add a held-out metric to "
        "Task.metrics for one).",
    )
    track_given_flags(parser)
    add_task_flag(parser, reseeded=True)
    add_run_flags(parser)
    o = parser.add_argument_group("metagradient descent")
    o.add_argument("--meta", default="data_weights",
                   help="metaparameters to optimise (default: %(default)s; with --task: kinds of the "
                        "task's run, default all of them)")
    o.add_argument("--meta-steps", type=int, default=20, help="meta-steps (default: %(default)s)")
    o.add_argument("--meta-optimizer", choices=("sign", "adam"), default="sign",
                   help="signed steps (with an optional coordinate mask) or Adam (default: %(default)s)")
    o.add_argument("--meta-lr", type=positive_float, default=None,
                   help="meta step size (default: 0.1 for sign, 0.05 for adam)")
    o.add_argument("--mask-prob", type=float, default=1.0,
                   help="probability that a coordinate is updated at a sign step (default: %(default)s)")
    o.add_argument("--lo", type=float, help="lower bound of the box projection (data weights default to 0)")
    o.add_argument("--hi", type=float, help="upper bound of the box projection")
    o.add_argument("--linf-radius", type=float, help="stay within this L-infinity distance of the start")
    o.add_argument("--fixed-total", action="store_true", help="keep the sum of each metaparameter at its start")
    o.add_argument("--integer", action="store_true", help="integer counts (round after each step)")
    o.add_argument("--maximize", action="store_true", help="ascend the validation loss instead")
    o.add_argument("--crafting-seeds", type=seed_list, default=[0, 1, 2, 3, 4],
                   help="training seeds rotated across meta-steps (default: 0,1,2,3,4)")
    o.add_argument("--eval-seeds", type=seed_list, default=[100, 101, 102, 103, 104],
                   help="fresh seeds for the final retraining (default: 100,...,104)")
    add_replay_k_flag(o)
    add_run_dir_flags(parser, "runs/optimize", resume_help="continue the run in DIR after a crash")
    add_eval_workers_flag(parser)
    add_distributed_flags(parser)
    parser.set_defaults(run=run)


def _open_on_rank_zero(collective, args: argparse.Namespace, run_config: dict) -> RunDirectory | None:
    """Rank 0 creates or resumes the run directory; every rank stops if that failed."""
    run_dir, problem = None, None
    if collective.is_main:
        try:
            run_dir = RunDirectory.open(args.out, args.resume, command="optimize", config=run_config)
        except UserError as error:
            problem = str(error)
    problems = [p for p in collective.all_gather_object(problem) if p is not None]
    if problems:
        raise UserError(problems[0])
    return run_dir


def _options(args: argparse.Namespace, names: list[str]) -> dict:
    """The MGD settings that, with the run config, define the result."""
    if args.meta_steps < 0:
        raise UserError(f"--meta-steps must be >= 0, got {args.meta_steps}")
    if not 0 < args.mask_prob <= 1:
        raise UserError(f"--mask-prob must be in (0, 1], got {args.mask_prob}")
    if set(args.crafting_seeds) & set(args.eval_seeds):
        raise UserError("--crafting-seeds and --eval-seeds overlap; evaluation seeds must be fresh")
    meta_lr = args.meta_lr if args.meta_lr is not None else (0.1 if args.meta_optimizer == "sign" else 0.05)
    return {
        "meta": names,
        "meta_steps": args.meta_steps,
        "meta_optimizer": args.meta_optimizer,
        "meta_lr": meta_lr,
        "mask_prob": args.mask_prob,
        "lo": args.lo,
        "hi": args.hi,
        "linf_radius": args.linf_radius,
        "fixed_total": args.fixed_total,
        "integer": args.integer,
        "maximize": args.maximize,
        "crafting_seeds": list(args.crafting_seeds),
        "eval_seeds": list(args.eval_seeds),
        "replay_k": args.replay_k,
        "threads": args.threads,
        "meta_files": meta_files(args),
    }


def _projection(name: str, start: torch.Tensor, options: dict):
    lo = options["lo"]
    if lo is None and name == "data_weights":
        lo = 0.0  # negative loss weights would reward errors
    parts = []
    if lo is not None or options["hi"] is not None:
        parts.append(Box(lo, options["hi"]))
    if options["linf_radius"] is not None:
        parts.append(LInfBall(start.clone(), options["linf_radius"]))
    if options["integer"]:
        parts.append(IntegerCounts())
    if options["fixed_total"]:
        parts.append(FixedTotal(float(start.sum()), upper=options["hi"], integer=options["integer"]))
    return Chain(tuple(parts)) if parts else None


def run(args: argparse.Namespace) -> int:
    configure_torch(args)
    subject = subject_from_args(args, reseeded=True, command="mgd optimize")
    names = meta_names(args, subject.run)
    options = _options(args, names)
    collective = subject.collective
    # The world size and backend are part of what defines the run: a resume must match them.
    run_config = {**subject.identity(), "mgd": options}
    run_dir = _open_on_rank_zero(collective, args, run_config)

    start = subject.meta
    z0 = {name: start[name] for name in names}
    fixed = {name: v for name, v in start.items() if name not in names}
    projections = {}
    for name in names:
        projection = _projection(name, z0[name], options)
        if projection is not None:
            projection.check(z0[name])
            projections[name] = projection
    optimizer = (
        SignedStep(options["meta_lr"], options["mask_prob"], mask_seed=subject.run.seed)
        if options["meta_optimizer"] == "sign"
        else MetaAdam(options["meta_lr"])
    )

    def make_full(z):
        return {**fixed, **z}

    state = None
    # Rank 0 reads the saved state and hands it to the others (they never touch the directory).
    saved = collective.all_gather_object(run_dir.load_state() if run_dir is not None else None)[0]
    if saved is not None:
        state = state_from_arrays(*saved, like=z0)
    if run_dir is not None and (saved is not None or args.resume):
        run_dir.truncate_history(state.step if state is not None else 0)

    def on_step(record, new_state) -> None:
        if run_dir is None:
            return
        run_dir.write_npz(
            f"iterates/{record.step:05d}.npz", {n: v.cpu().numpy() for n, v in record.iterate.items()}
        )
        run_dir.append_history(record.to_dict())
        run_dir.save_state(*state_to_arrays(new_state))

    total = options["meta_steps"] + 1
    with progress_bars({"meta": total}, enabled=not args.quiet and collective.is_main) as progress:
        if progress is not None and state is not None:
            progress("meta", state.step)
        state = descend(
            subject.reseeded,
            z0,
            fixed=fixed,
            optimizer=optimizer,
            projections=projections,
            steps=options["meta_steps"],
            seeds=options["crafting_seeds"],
            maximize=options["maximize"],
            k=options["replay_k"],
            state=state,
            on_step=on_step,
            diagnostics=subject.diagnostics,
            progress=progress,
        )

    # Final evaluation: retrain the start and the chosen iterate on fresh seeds; test read here.
    # (With --task: the task function with each evaluation seed, on its objective and metrics.)
    start_eval = subject.retrain(make_full(z0), options["eval_seeds"], workers=args.eval_workers)
    best_eval = subject.retrain(make_full(state.best_z), options["eval_seeds"], workers=args.eval_workers)
    metrics = subject.metrics
    if run_dir is None:
        return 0
    history = run_dir.history()
    result = {
        "best_step": state.best_step,
        "best_val_objective": state.best_value,
        "val_objective_by_step": [r["val_objective"] for r in history],
        "evaluation": {
            "seeds": options["eval_seeds"],
            "start": summarize(start_eval, metrics),
            "best": summarize(best_eval, metrics),
            "best_minus_start": {key: paired_difference(best_eval, start_eval, key) for key in metrics},
            "per_seed": {"start": start_eval, "best": best_eval},
            **({"note": subject.evaluation_note} if subject.evaluation_note else {}),
        },
        "config": run_config,
        "mgd_version": __version__,
    }
    run_dir.write_npz(
        "meta.npz",
        {**{f"best_{n}": v.cpu().numpy() for n, v in state.best_z.items()},
         **{f"final_{n}": v.cpu().numpy() for n, v in state.z.items()}},
    )
    run_dir.write_json("result.json", result)
    plot_progress(history, run_dir.path / "progress.png", ylabel="validation objective",
                  title="MGD progress (each step: a different crafting seed)")
    if not args.quiet:
        print(describe(result))
        print(f"wrote {run_dir.path}/result.json, meta.npz, history.jsonl")
    return 0


def describe(result: dict) -> str:
    ev = result["evaluation"]
    values = result["val_objective_by_step"]
    lines = [
        f"validation objective: {values[0]:.4f} at the start, best {result['best_val_objective']:.4f} "
        f"at meta-step {result['best_step']} of {len(values) - 1}",
        f"retrained on {len(ev['seeds'])} fresh seeds (mean ± 95% CI"
        + ("; no test split: the task's objective and metrics" if "note" in ev else "") + "):",
    ]
    for key in ev["start"]:
        s, b, d = ev["start"][key], ev["best"][key], ev["best_minus_start"][key]
        lines.append(
            f"  {key:<14} start {s['mean']:.4f} ± {s['ci']:.4f}   chosen {b['mean']:.4f} ± {b['ci']:.4f}"
            f"   paired diff {d['mean']:+.4f} ± {d['ci']:.4f}"
        )
    return "\n".join(lines)
