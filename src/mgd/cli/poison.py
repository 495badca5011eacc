"""``mgd poison``: accuracy-degrading data poisoning, MGD against baselines (see docs/poison.md).

This module only parses flags, manages the run directory and draws plots; the attack and
the evaluation live in :mod:`mgd.apps.poison`.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mgd.apps.poison import (
    LABEL_REGIMES,
    METHODS,
    MODES,
    OBJECTIVES,
    TASK_METHODS,
    TaskPool,
    run_task_poisoning,
    PoisonBox,
    report_text,
    run_poisoning,
    transfer_config,
    victim_config,
)
from mgd.apps.protocol import load_candidate, save_candidate
from mgd.cli.task import add_task_flag, task_identity, task_runs_from_args
from mgd.cli.common import (
    add_eval_workers_flag,
    add_run_dir_flags,
    add_run_flags,
    configure_torch,
    given_flags,
    positive_float,
    positive_int,
    progress_bars,
    seed_list,
    track_given_flags,
)
from mgd.config import RunConfig
from mgd.data import load_dataset
from mgd.descent import state_from_arrays, state_to_arrays
from mgd.errors import UserError, check_choices
from mgd.plots import plot_progress, pyplot, save_figure
from mgd.recipes import parse_recipe
from mgd.runs import RunDirectory


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    return value  # the range is checked by the API (a one-line UserError)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "poison",
        help="accuracy-degrading data poisoning: MGD vs baselines",
        description="Craft poisons with MGD (projected signed ascent of the validation loss through "
        "whole training runs) and with baselines (random noise, label flips, error-max PGD, "
        "GradCancel, back-gradient), retrain the victim on fresh evaluation seeds, and report the "
        "paired test-accuracy drop against clean training. Writes report.md, report.json, "
        "poisons.png and mgd_progress.png into a resumable run directory.",
    )
    track_given_flags(parser)
    add_task_flag(parser, reseeded=True)
    add_run_flags(parser)
    # Unset run flags fall back to the frozen victim recipe of mgd.apps.poison.victim_config.
    parser.set_defaults(batch_size=None, warmup_steps=None, weight_decay=None)
    p = parser.add_argument_group("poisoning")
    p.add_argument("--budget", type=_budget, default=0.03,
                   help="poisons as a fraction of the training set (default: %(default)s)")
    p.add_argument("--mode", choices=MODES, default="replace",
                   help="poisons replace clean points (as in the paper) or are added (default: %(default)s)")
    p.add_argument("--labels", choices=LABEL_REGIMES, default="fixed",
                   help="poisons keep their copy's label, or the attacker picks labels (default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma list of methods (default: all: {','.join(METHODS)})")
    p.add_argument("--meta-steps", type=int, default=50, help="MGD meta-steps (default: %(default)s)")
    p.add_argument("--step-size", type=positive_float, default=0.05,
                   help="signed-step size as a fraction of each feature's range (default: %(default)s)")
    p.add_argument("--seeds-per-step", type=positive_int, default=2,
                   help="MGD: average the metagradient over this many crafting seeds per meta-step "
                        "(default: %(default)s)")
    p.add_argument("--objective", choices=OBJECTIVES, default="margin",
                   help="what MGD maximises on validation: cross-entropy, or the clipped margin "
                        "max_other_logit - label_logit (at most 1), which rewards flipped predictions "
                        "(default: %(default)s)")
    p.add_argument("--craft-also", action="append", default=[], metavar="NAME:knob=value,...",
                   help="MGD also crafts against this recipe on top of the victim (repeatable): crafting "
                        "seed i trains recipe i mod (1 + number of these); use --seeds-per-step to average "
                        "over them at every meta-step")
    p.add_argument("--crafting-seeds", type=seed_list, default=[0, 1, 2, 3, 4],
                   help="seeds rotated across meta-steps and used for tuning (default: 0-4)")
    p.add_argument("--eval-seeds", type=seed_list, default=list(range(100, 110)),
                   help="fresh seeds for the final retraining (default: 100-109)")
    p.add_argument("--transfer", default="auto",
                   help="victim recipe for the transfer check, NAME:knob=value,... on top of the victim; "
                        "'auto' = ReLU and double width, 'none' = skip (default: %(default)s)")
    p.add_argument("--attack-seed", type=int, default=0, help="which clean points are copied (default: %(default)s)")
    p.add_argument("--transfer-task", metavar="FILE.py:FUNCTION",
                   help="with --task: also evaluate the same poisoned training sets on this task (another "
                        "victim recipe on the same training data), never used in crafting")
    p.add_argument("--poison-field", default="0", metavar="FIELD",
                   help="with --task: the batch field holding the inputs to poison, a tuple position or a "
                        "dict key (default: %(default)s, the x of (x, y) batches)")
    add_run_dir_flags(parser, "runs/poison", resume_help="continue the run in DIR (finished methods are kept)")
    add_eval_workers_flag(parser)
    parser.set_defaults(run=run)


def _config(args: argparse.Namespace) -> RunConfig:
    overrides = {name: getattr(args, name) for name in RunConfig.field_names()
                 if hasattr(args, name) and getattr(args, name) is not None}
    if overrides.get("depth", 0) < 0:
        raise UserError(f"--depth must be >= 0, got {args.depth}")
    overrides.pop("dataset", None)
    return victim_config(args.dataset, **overrides)


def _methods(text: str) -> list[str]:
    return check_choices(text.split(","), METHODS, "--methods")


def _transfer(spec: str, config: RunConfig) -> RunConfig | None:
    if spec == "none":
        return None
    if spec == "auto":
        return transfer_config(config)
    return parse_recipe(spec).apply(config)


def run(args: argparse.Namespace) -> int:
    configure_torch(args)
    methods = _methods(args.methods)
    if args.meta_steps < 0:
        raise UserError(f"--meta-steps must be >= 0, got {args.meta_steps}")
    if not 0 < args.budget <= 1:
        raise UserError(f"--budget must be a fraction in (0, 1], got {args.budget}")
    if set(args.crafting_seeds) & set(args.eval_seeds):
        raise UserError("--crafting-seeds and --eval-seeds overlap; evaluation seeds must be fresh")
    if args.seeds_per_step > len(args.crafting_seeds):
        raise UserError(f"--seeds-per-step {args.seeds_per_step} exceeds the {len(args.crafting_seeds)} "
                        "--crafting-seeds; give more crafting seeds or average fewer")
    if args.task:
        return _run_task(args)
    config = _config(args)
    transfer = _transfer(args.transfer, config)
    craft_also = [parse_recipe(spec).apply(config) for spec in args.craft_also]
    options = {
        "budget": args.budget, "mode": args.mode, "labels": args.labels, "methods": methods,
        "meta_steps": args.meta_steps, "step_size": args.step_size, "crafting_seeds": list(args.crafting_seeds),
        "eval_seeds": list(args.eval_seeds), "transfer": transfer.to_dict() if transfer else None,
        "attack_seed": args.attack_seed, "threads": args.threads,
        "seeds_per_step": args.seeds_per_step, "objective": args.objective,
        "craft_also": [c.to_dict() for c in craft_also],
    }
    run_config = {"run": config.to_dict(), "poison": options}
    run_dir = RunDirectory.open(args.out, args.resume, command="poison", config=run_config)
    dataset = load_dataset(config.dataset)

    finished, mgd_state, on_mgd_step = _resume(args, run_dir, methods, torch.float64 if config.dtype == "float64" else torch.float32)
    total = {"meta": args.meta_steps + 1, "evaluate": (len(methods) + 1) * len(args.eval_seeds) * (2 if transfer else 1)}
    with progress_bars(total, enabled=not args.quiet) as progress:
        report = run_poisoning(
            config, dataset, budget=args.budget, mode=args.mode, labels=args.labels, methods=methods,
            meta_steps=args.meta_steps, step_size=args.step_size, seeds_per_step=args.seeds_per_step,
            objective=args.objective, craft_also=craft_also, crafting_seeds=args.crafting_seeds,
            eval_seeds=args.eval_seeds, transfer=transfer, attack_seed=args.attack_seed, finished=finished,
            on_candidate=lambda c: save_candidate(run_dir, c), mgd_state=mgd_state, on_mgd_step=on_mgd_step,
            progress=progress, eval_workers=args.eval_workers,
        )
    _write(args, run_dir, report, f"mgd poison: {args.dataset}, {100 * args.budget:g}% {args.mode}, labels {args.labels}")
    _plot_poisons(run_dir, report, dataset, methods)
    return 0


def _resume(args: argparse.Namespace, run_dir: RunDirectory, methods: list[str], dtype: torch.dtype):
    """The finished candidates, MGD's saved descent state and the hook that saves it."""
    finished = {}
    if args.resume:
        finished = {n: c for n in methods if (c := load_candidate(run_dir, n)) is not None}
    mgd_state = None
    saved = run_dir.load_state() if "mgd" not in finished else None
    if saved is not None:
        mgd_state = state_from_arrays(*saved, like={"poison_inputs": torch.zeros(0, dtype=dtype)})
        run_dir.truncate_history(mgd_state.step)
    elif args.resume:
        run_dir.truncate_history(0)

    def on_mgd_step(record, state) -> None:
        run_dir.append_history(record.to_dict())
        run_dir.save_state(*state_to_arrays(state))

    return finished, mgd_state, on_mgd_step


def _write(args: argparse.Namespace, run_dir: RunDirectory, report: dict, title: str) -> None:
    from mgd.io import atomic_write_bytes

    text = report_text(report, title)
    run_dir.write_json("report.json", report)
    atomic_write_bytes(run_dir.path / "report.md", text.encode())
    plot_progress(run_dir.history(), run_dir.path / "mgd_progress.png", ylabel="validation objective (maximised)",
                  title="MGD poisoning (each step: a different crafting seed)")
    if not args.quiet:
        print(text)
        print(f"wrote {run_dir.path}/report.md, report.json")


def _run_task(args: argparse.Namespace) -> int:
    """``mgd poison --task``: poisons replace points of the task's training data (see
    :func:`mgd.apps.poison.run_task_poisoning`)."""
    given = given_flags(args)
    refused = [f"--{n.replace('_', '-')}" for n in ("mode", "transfer", "craft_also") if n in given]
    if refused:
        raise UserError(f"{', '.join(refused)} do{'es' if len(refused) == 1 else ''} not apply with --task: a task's "
                        "poisons replace its own points, and another victim is --transfer-task FILE.py:FUNCTION")
    methods = _methods(args.methods) if "methods" in given else list(TASK_METHODS)
    runs = task_runs_from_args(args, command="mgd poison")
    transfer = None
    if args.transfer_task:
        transfer = task_runs_from_args(argparse.Namespace(**{**vars(args), "task": args.transfer_task}),
                                       command="mgd poison --transfer-task")
    field = args.poison_field
    pool = TaskPool.of(runs, int(field) if field.isdigit() else field)
    if any(m not in TASK_METHODS for m in methods):
        raise UserError(f"a task can be poisoned by {', '.join(TASK_METHODS)}; drop the others from --methods")
    options = {
        "budget": args.budget, "labels": args.labels, "methods": methods, "meta_steps": args.meta_steps,
        "step_size": args.step_size, "crafting_seeds": list(args.crafting_seeds), "eval_seeds": list(args.eval_seeds),
        "attack_seed": args.attack_seed, "threads": args.threads, "seeds_per_step": args.seeds_per_step,
        "objective": args.objective, "poison_field": field, "transfer_task": transfer.spec if transfer else None,
    }
    run_dir = RunDirectory.open(args.out, args.resume, command="poison", config={**task_identity(args, runs), "poison": options})
    finished, mgd_state, on_mgd_step = _resume(args, run_dir, methods, runs.task(0).run.dtype)
    total = {"meta": args.meta_steps + 1, "evaluate": (len(methods) + 1) * len(args.eval_seeds)}
    with progress_bars(total, enabled=not args.quiet) as progress:
        report = run_task_poisoning(
            pool, budget=args.budget, labels=args.labels, methods=methods, meta_steps=args.meta_steps,
            step_size=args.step_size, seeds_per_step=args.seeds_per_step, objective=args.objective,
            crafting_seeds=args.crafting_seeds, eval_seeds=args.eval_seeds, attack_seed=args.attack_seed,
            finished=finished, on_candidate=lambda c: save_candidate(run_dir, c), mgd_state=mgd_state,
            on_mgd_step=on_mgd_step, progress=progress, eval_workers=args.eval_workers, transfer=transfer,
        )
    _write(args, run_dir, report, f"mgd poison: {args.task}, {100 * args.budget:g}% replaced, labels {args.labels}")
    return 0


def _plot_poisons(run_dir: RunDirectory, report: dict, dataset, methods: list[str]) -> None:
    """Up to 8 poisons of MGD (or the first method) next to the clean points they started from."""
    plt = pyplot()
    if plt is None:
        return
    name = "mgd" if "mgd" in methods else methods[0]
    path = run_dir.path / "candidates" / f"{name}.npz"
    if not path.is_file():
        return
    from mgd.io import load_npz

    x = load_npz(path, what="poisons")["x_train"]
    setup = report["setup"]
    slots, sources = np.asarray(setup["slots"])[:8], np.asarray(setup["sources"])[:8]
    box = PoisonBox.for_dataset(dataset)
    images = dataset.x_train.ndim == 4
    fig, axes = plt.subplots(2 if images else 1, len(slots), figsize=(1.4 * len(slots), 3.0 if images else 2.0),
                             squeeze=False)
    for j, (slot, source) in enumerate(zip(slots, sources)):
        if images:
            for row, (img, label) in enumerate(((dataset.x_train[source], "original"), (x[slot], name))):
                ax = axes[row, j]
                ax.imshow(img.reshape(img.shape[-2:]), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(label, fontsize=8)
        else:
            ax = axes[0, j]
            ax.fill_between(np.arange(box.lo.size), box.lo.ravel(), box.hi.ravel(), color="0.9")
            ax.plot(dataset.x_train[source].ravel(), lw=1, label="original")
            ax.plot(x[slot].ravel(), lw=1, label=name)
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.legend(fontsize=6)
        axes[0, j].set_title(f"y={dataset.y_train[source]}", fontsize=8)
    fig.suptitle(f"{name} poisons vs the clean points they started from", fontsize=9)
    fig.tight_layout()
    save_figure(fig, run_dir.path / "poisons.png")



