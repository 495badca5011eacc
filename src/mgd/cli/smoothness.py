"""``mgd smoothness``: compare training recipes by metasmoothness (and, optionally, MGD progress)."""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from mgd import __version__
from mgd.cli.common import add_run_dir_flags, add_run_flags, config_from_args, configure_torch, positive_float, positive_int, progress_bars, seed_list
from mgd.config import build_problem
from mgd.data import load_dataset
from mgd.descent import Box, SignedStep, descend
from mgd.errors import UserError
from mgd.io import atomic_write_bytes
from mgd.recipes import DEFAULT_RECIPES, parse_recipe
from mgd.plots import pyplot, save_figure
from mgd.runs import RunDirectory
from mgd.smoothness import metasmoothness, trainer_probe_fn


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "smoothness",
        help="compare training recipes by metasmoothness (S and Ŝ), optionally by MGD progress",
        description="For each recipe (knob values on top of the run flags) estimate the curvature S "
        "(lower is smoother) and the sign-agreement score Ŝ (higher is smoother) from three "
        "training runs per random direction. With --mgd-steps N, also run N meta-steps of data "
        "reweighting and report the drop of the validation loss and its correlation with the "
        "scores across recipes. Writes report.json, report.md and smoothness.png.",
    )
    add_run_flags(parser)
    s = parser.add_argument_group("smoothness")
    s.add_argument("--recipe", action="append", metavar="NAME:knob=value,...",
                   help="a recipe (repeatable); default: a menu of logit scaling, BatchNorm placement, "
                        "width, warm-up, learning rate and activation")
    s.add_argument("--probe", choices=("data_weights", "lr"), default="data_weights",
                   help="metaparameter whose directions are probed (default: %(default)s)")
    s.add_argument("--directions", type=positive_int, default=4, help="random directions (default: %(default)s)")
    s.add_argument("--h", type=positive_float, default=0.05, help="finite-difference step (default: %(default)s)")
    s.add_argument("--mgd-steps", type=int, default=0,
                   help="meta-steps of data reweighting per recipe (0: scores only; default: %(default)s)")
    s.add_argument("--meta-lr", type=positive_float, default=0.1, help="signed step size (default: %(default)s)")
    s.add_argument("--crafting-seeds", type=seed_list, default=[0, 1, 2, 3, 4],
                   help="seeds rotated across meta-steps (default: 0,1,2,3,4)")
    add_run_dir_flags(parser, "runs/smoothness")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.mgd_steps < 0:
        raise UserError(f"--mgd-steps must be >= 0, got {args.mgd_steps}")
    configure_torch(args)
    base = config_from_args(args)
    recipes = [parse_recipe(spec) for spec in (args.recipe or DEFAULT_RECIPES)]
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise UserError(f"recipe names must be distinct: {', '.join(names)}")
    options = {
        "recipes": [{"name": r.name, "knobs": r.knobs} for r in recipes],
        "probe": args.probe, "directions": args.directions, "h": args.h,
        "mgd_steps": args.mgd_steps, "meta_lr": args.meta_lr,
        "crafting_seeds": list(args.crafting_seeds), "threads": args.threads,
    }
    run_config = {"run": base.to_dict(), "smoothness": options}
    dataset = load_dataset(base.dataset)
    configs = {}
    for recipe in recipes:  # validate every recipe before any work
        try:
            configs[recipe.name] = recipe.apply(base)
            build_problem(configs[recipe.name], dataset=dataset)
        except UserError as exc:
            raise UserError(f"recipe {recipe.name!r}: {exc}") from None
    run_dir = RunDirectory.open(args.out, args.resume, command="smoothness", config=run_config)

    done = {r["recipe"] for r in run_dir.history()}
    with progress_bars({"recipes": len(recipes)}, enabled=not args.quiet) as progress:
        for recipe in recipes:
            if recipe.name not in done:
                run_dir.append_history(_measure(recipe, configs[recipe.name], dataset, args))
            if progress is not None:
                progress("recipes", 1)

    rows = run_dir.history()
    report = {"rows": rows, "correlations": _correlations(rows), "config": run_config, "mgd_version": __version__}
    run_dir.write_json("report.json", report)
    atomic_write_bytes(run_dir.path / "report.md", _markdown(report).encode())
    _plot(run_dir, report)
    if not args.quiet:
        print(_markdown(report))
        print(f"wrote {run_dir.path}/report.json, report.md, smoothness.png")
    return 0


def _measure(recipe, config, dataset, args) -> dict:
    started = time.perf_counter()
    problem = build_problem(config, dataset=dataset)
    trainer = problem.trainer
    report = metasmoothness(
        trainer_probe_fn(trainer, problem.val_objective()), trainer.default_meta(), args.probe,
        directions=args.directions, h=args.h, seed=0,
    )
    row = {
        "recipe": recipe.name,
        "knobs": recipe.knobs,
        "val_loss": report.probes[0].values[0],
        **{k: v for k, v in report.to_dict().items() if k != "probes"},
        "probes": report.to_dict()["probes"],
    }
    if args.mgd_steps:
        values = []

        def make(seed):
            p = build_problem(type(config)(**{**config.to_dict(), "seed": seed}), dataset=dataset)
            return p.trainer, p.val_objective()

        ones = torch.ones(trainer.num_train, dtype=trainer.dtype, device=trainer.device)
        descend(
            make, {"data_weights": ones}, optimizer=SignedStep(args.meta_lr),
            projections={"data_weights": Box(0.0, None)}, steps=args.mgd_steps, seeds=args.crafting_seeds,
            on_step=lambda record, state: values.append(record.value),
        )
        row["mgd_val_objective"] = values
        # Paired where the seed cycle allows: the last step's seed equals the first's when
        # mgd_steps is a multiple of the number of crafting seeds.
        row["mgd_relative_drop"] = (values[0] - values[-1]) / values[0]
    row["seconds"] = time.perf_counter() - started
    return row


def _correlations(rows: list[dict]) -> dict:
    if len(rows) < 3 or "mgd_relative_drop" not in rows[0]:
        return {}
    from scipy.stats import pearsonr, spearmanr

    drop = [r["mgd_relative_drop"] for r in rows]
    out = {}
    for label, score in (
        ("sign_agreement", [r["sign_agreement"] for r in rows]),
        ("neg_log_curvature", [-math.log(max(r["curvature"], 1e-300)) for r in rows]),
    ):
        out[label] = {
            "pearson": float(pearsonr(score, drop)[0]),
            "spearman": float(spearmanr(score, drop)[0]),
            "n": len(rows),
        }
    return out


def _markdown(report: dict) -> str:
    rows = report["rows"]
    mgd = "mgd_relative_drop" in rows[0] if rows else False
    header = "| recipe | knobs | val loss | S (lower smoother) | Ŝ (higher smoother) |" + (" MGD drop |" if mgd else "")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        knobs = ", ".join(f"{k}={v}" for k, v in r["knobs"].items()) or "-"
        line = (
            f"| {r['recipe']} | {knobs} | {r['val_loss']:.4f} | {r['curvature']:.3g} ± {r['curvature_se']:.2g} "
            f"| {r['sign_agreement']:.3f} ± {r['sign_agreement_se']:.3f} |"
        )
        if mgd:
            line += f" {100 * r['mgd_relative_drop']:.1f}% |"
        lines.append(line)
    for label, c in report["correlations"].items():
        lines.append(f"\nCorrelation of {label} with the MGD drop over {c['n']} recipes: "
                     f"Pearson {c['pearson']:+.2f}, Spearman {c['spearman']:+.2f}")
    return "\n".join(lines) + "\n"


def _plot(run_dir: RunDirectory, report: dict) -> None:
    plt = pyplot()
    if plt is None:  # plots are optional
        return
    rows = report["rows"]
    mgd = bool(rows) and "mgd_relative_drop" in rows[0]
    fig, axes = plt.subplots(1, 3 if mgd else 2, figsize=(13 if mgd else 9, 3.8))
    names = [r["recipe"] for r in rows]
    y = np.arange(len(rows))
    axes[0].barh(y, [r["sign_agreement"] for r in rows], xerr=[r["sign_agreement_se"] for r in rows])
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].set_xlabel("Ŝ (higher is smoother)")
    axes[1].barh(y, [r["curvature"] for r in rows], xerr=[r["curvature_se"] for r in rows])
    axes[1].set_yticks(y, [""] * len(rows))
    axes[1].set_xscale("log")
    axes[1].set_xlabel("S (lower is smoother)")
    if mgd:
        drop = [100 * r["mgd_relative_drop"] for r in rows]
        axes[2].scatter([r["sign_agreement"] for r in rows], drop)
        for name, x, d in zip(names, [r["sign_agreement"] for r in rows], drop):
            axes[2].annotate(name, (x, d), fontsize=7)
        c = report["correlations"].get("sign_agreement", {})
        axes[2].set_xlabel("Ŝ")
        axes[2].set_ylabel("val-loss drop after MGD (%)")
        axes[2].set_title(f"Spearman {c.get('spearman', float('nan')):+.2f}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, run_dir.path / "smoothness.png")
