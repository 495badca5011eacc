"""The robustness protocol: every application's claim over a grid of seeds, datasets and budgets.

One command runs every cell with the same ``mgd`` command a user would type, in its own run
directory (so a killed protocol resumes: finished cells are kept, an unfinished one continues
with ``--resume``), then writes ``docs/robustness.md`` with every cell and the criteria::

    python experiments/robustness.py select      # 5 corruption seeds x 2 datasets x 2 budgets x 2 validation sizes
    python experiments/robustness.py schedule    # 5 crafting-seed sets x 2 datasets x 2 training lengths
    python experiments/robustness.py poison      # 5 attack seeds x 2 datasets x 2 budgets
    python experiments/robustness.py report      # only rewrite docs/robustness.md from what has finished

Options: ``--out DIR`` (default ``runs/robustness``), ``--seeds 1,2,3,4,5``, ``--threads N``
(torch threads per cell, default 1), ``--only SUBSTRING`` (cells whose name contains it).

The grid and each claim's criterion were fixed before any cell ran (``issues``: issue 11):

* **Selection** (``mgd select --corruption mixed``): corruption seeds 1-5 (seed 0 is the
  documented example and was used to choose MGD's settings), digits and mnist1d, budgets 50%
  and 70%, the whole validation split and 10 examples per class. A cell is a *win* when
  MGD's selection minus the strongest baseline (by validation) has a paired 95% CI above 0,
  a *loss* when it is below 0. Claim: wins in at least 3/4 of the cells and no loss.
* **Poisoning** (``mgd poison``, label-fixed, poisons replacing clean points): attack seeds
  1-5, digits and mnist1d, budgets 3% and 5%. Claim: MGD's mean test drop is at least 3x
  GradCancel's and above the strongest baseline's (paired CI above 0) in 3/4 of the cells.
* **Schedules** (``mgd schedule``): crafting-seed sets ``{10s, ..., 10s+4}`` for s = 1-5,
  digits and mnist1d, at the default number of steps and at half of it. Claim: MGD from the
  poor start is within the best grid schedule's 95% CI with fewer training runs, in 3/4 of
  the cells.

Evaluation seeds are 100-109 in every cell (fresh: no crafting seed is in that range).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mgd.apps.poison import poisoning_summary  # noqa: E402
from mgd.io import atomic_write_bytes  # noqa: E402

DATASETS = ("digits", "mnist1d")
SELECT_BUDGETS = (0.5, 0.7)
SELECT_VAL = (0, 10)  # 0: the whole validation split; else examples per class
POISON_BUDGETS = (0.03, 0.05)
SCHEDULE_STEPS = {"digits": (150, 300), "mnist1d": (200, 400)}


@dataclass(frozen=True)
class Cell:
    app: str
    name: str
    argv: tuple[str, ...]
    labels: dict


def select_cells(seeds) -> list[Cell]:
    cells = []  # seeds outermost, so that a partial protocol covers every configuration
    for seed in seeds:
        for dataset in DATASETS:
            for budget in SELECT_BUDGETS:
                for val in SELECT_VAL:
                    argv = ("select", "--dataset", dataset, "--corruption", "mixed", "--corruption-seed", str(seed),
                            "--budget", str(budget), "--val-per-class", str(val))
                    labels = {"dataset": dataset, "budget": budget, "val": "all" if not val else f"{val}/class",
                              "seed": seed}
                    cells.append(Cell("select", f"{dataset}-b{budget}-v{val}-s{seed}", argv, labels))
    return cells


def poison_cells(seeds) -> list[Cell]:
    cells = []
    for seed in seeds:
        for dataset in DATASETS:
            for budget in POISON_BUDGETS:
                argv = ("poison", "--dataset", dataset, "--budget", str(budget), "--attack-seed", str(seed))
                cells.append(Cell("poison", f"{dataset}-b{budget}-s{seed}", argv,
                                  {"dataset": dataset, "budget": budget, "seed": seed}))
    return cells


def schedule_cells(seeds) -> list[Cell]:
    cells = []
    for seed in seeds:
        for dataset in DATASETS:
            for steps in SCHEDULE_STEPS[dataset]:
                crafting = ",".join(str(10 * seed + j) for j in range(5))
                argv = ("schedule", "--dataset", dataset, "--steps", str(steps), "--crafting-seeds", crafting)
                cells.append(Cell("schedule", f"{dataset}-T{steps}-s{seed}", argv,
                                  {"dataset": dataset, "steps": steps, "seed": seed}))
    return cells


GRIDS = {"select": select_cells, "poison": poison_cells, "schedule": schedule_cells}


def run_cell(cell: Cell, out: Path, threads: int) -> None:
    """Run (or continue) one cell; record each attempt's wall time and exit code."""
    folder = out / cell.app / cell.name
    if (folder / "report.json").is_file():
        return
    where = ("--resume", str(folder)) if (folder / "run.json").is_file() else ("--out", str(folder))
    command = [sys.executable, "-m", "mgd", *cell.argv, *where, "--threads", str(threads), "--quiet"]
    print(f"[robustness] {cell.app} {cell.name}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    # this checkout's mgd, whatever is installed: the protocol may run from a frozen worktree
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    code = subprocess.call(command, cwd=ROOT, env=env)
    seconds = time.perf_counter() - started
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "attempts.jsonl", "a") as handle:
        handle.write(json.dumps({"seconds": seconds, "exit_code": code, "command": command[2:]}) + "\n")
    if code != 0:
        print(f"[robustness] {cell.name} exited {code}; rerun to continue it", file=sys.stderr)


def _wall(folder: Path) -> float:
    path = folder / "attempts.jsonl"
    if not path.is_file():
        return math.nan
    return sum(json.loads(line)["seconds"] for line in path.read_text().splitlines() if line.strip())


def _finished(cells, out: Path):
    """``(cell, its folder, its report)`` for every cell that has finished."""
    for cell in cells:
        folder = out / cell.app / cell.name
        if (folder / "report.json").is_file():
            yield cell, folder, json.loads((folder / "report.json").read_text())


def _pm(stat: dict, scale: float = 100.0, sign: bool = False) -> str:
    return f"{scale * stat['mean']:{'+' if sign else ''}.2f} ± {scale * stat['ci']:.2f}"


def _verdict(diff: dict) -> str:
    if diff["mean"] - diff["ci"] > 0:
        return "win"
    if diff["mean"] + diff["ci"] < 0:
        return "loss"
    return "tie"


def select_rows(cells, out: Path) -> tuple[list[str], dict]:
    rows, verdicts = [], []
    for cell, folder, report in _finished(cells, out):
        methods = report["methods"]
        mgd = methods["mgd-selection"]
        best = report["best_baseline_by_val"]
        diff = mgd["vs_best_baseline"]["test_accuracy_diff"]
        verdict = _verdict(diff)
        verdicts.append(verdict)
        lab = cell.labels
        rows.append(
            f"| {lab['dataset']} | {lab['budget']:g} | {lab['val']} | {lab['seed']} | {best} {_pm(methods[best]['test_accuracy'])} "
            f"| {_pm(mgd['test_accuracy'])} | {_pm(diff, sign=True)} | **{verdict}** "
            f"| {_pm(methods['val-only']['test_accuracy']) if 'val-only' in methods else '-'} "
            f"| {mgd['cost']['training_runs']:.0f} / {methods[best]['cost']['training_runs']:.0f} | {_wall(folder):.0f} |"
        )
    header = [
        "| dataset | budget | validation | corruption seed | strongest baseline (by val), test acc | MGD selection | paired Δ (pts) | verdict | val-only | cost MGD / baseline (runs) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return header + rows, {"cells": len(verdicts), "wins": verdicts.count("win"), "losses": verdicts.count("loss")}


def poison_rows(cells, out: Path) -> tuple[list[str], dict]:
    rows, met = [], []
    for cell, folder, report in _finished(cells, out):
        summary = report.get("poisoning") or poisoning_summary(report)
        drops = summary["drops"]
        ratio = summary.get("mgd_over_gradcancel", math.nan)
        diff = summary["mgd_vs_strongest"]["test_drop_diff"]
        ok = ratio >= 3 and _verdict(diff) == "win"
        met.append(ok)
        lab = cell.labels
        rows.append(
            f"| {lab['dataset']} | {100 * lab['budget']:g}% | {lab['seed']} | {summary['strongest_baseline']} "
            f"{_pm(drops[summary['strongest_baseline']]['test_drop'], sign=True)} | {_pm(drops['gradcancel']['test_drop'], sign=True)} "
            f"| {_pm(drops['mgd']['test_drop'], sign=True)} | {_pm(diff, sign=True)} | {ratio:.1f} | **{'met' if ok else 'not met'}** | {_wall(folder):.0f} |"
        )
    header = [
        "| dataset | budget | attack seed | strongest baseline (by val), test drop | GradCancel drop | MGD drop | MGD − strongest (pts) | MGD / GradCancel | criterion | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return header + rows, {"cells": len(met), "met": sum(met)}


def schedule_rows(cells, out: Path) -> tuple[list[str], dict]:
    rows, met = [], []
    for cell, folder, report in _finished(cells, out):
        methods, bar = report["methods"], report.get("bar", {})
        poor = bar.get("mgd-poor", {})
        ok = bool(poor.get("within_grid_ci") and poor.get("fewer_runs_than_grid"))
        met.append(ok)
        lab = cell.labels
        rows.append(
            f"| {lab['dataset']} | {lab['steps']} | {lab['seed']} | {_pm(methods['grid']['test_accuracy'])} "
            f"({methods['grid']['cost']['training_runs']:.0f} runs) | {_pm(methods['mgd-poor']['test_accuracy'])} "
            f"({methods['mgd-poor']['cost']['training_runs']:.0f} runs) | {_pm(poor['paired_acc_diff_vs_grid'], sign=True)} "
            f"| {_pm(methods['mgd-reasonable']['test_accuracy']) if 'mgd-reasonable' in methods else '-'} "
            f"| **{'met' if ok else 'not met'}** | {_wall(folder):.0f} |"
        )
    header = [
        "| dataset | T | seed set | best grid schedule | MGD, poor start | paired Δ vs grid (pts) | MGD, reasonable start | criterion | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    return header + rows, {"cells": len(met), "met": sum(met)}


ROWS = {"select": select_rows, "poison": poison_rows, "schedule": schedule_rows}
TITLES = {
    "select": "Selection: MGD's top-k subset against the strongest baseline",
    "poison": "Poisoning: MGD's accuracy drop against GradCancel and the strongest baseline",
    "schedule": "Learning-rate schedules: MGD from the poor start against the best grid schedule",
}


def write_report(out: Path, seeds, path: Path, notes: Path | None) -> str:
    lines = [
        "# Robustness: each claim over seeds, datasets and budgets",
        "",
        "Generated by `python experiments/robustness.py report` from the cells in "
        f"`{os.path.relpath(out, ROOT)}`; the protocol, grid and criteria are in "
        "`experiments/robustness.py`'s docstring and were fixed before any cell ran. "
        "Every number is a test-split number from retraining on the evaluation seeds 100-109 "
        "(mean ± 95% CI, paired over seeds); every choice inside a cell used validation only. "
        "Cells not finished yet are missing from the tables and counted as such.",
        "",
    ]
    if notes is not None and notes.is_file():
        lines += [notes.read_text().strip(), ""]
    for app, grid in GRIDS.items():
        cells = grid(seeds)
        rows, counts = ROWS[app](cells, out)
        lines += [f"## {TITLES[app]}", ""]
        done = counts["cells"]
        if app == "select":
            lines.append(f"Finished cells: {done} of {len(cells)}. Wins (paired CI above 0): {counts['wins']}; "
                         f"losses (CI below 0): {counts['losses']}. The claim needs at least "
                         f"{math.ceil(0.75 * len(cells))} wins and no loss.")
        else:
            lines.append(f"Finished cells: {done} of {len(cells)}. Criterion met: {counts['met']}; the claim "
                         f"needs {math.ceil(0.75 * len(cells))}.")
        lines += [""] + (rows if done else []) + [""]
    text = "\n".join(lines)
    atomic_write_bytes(path, text.encode())
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=(*GRIDS, "all", "report"))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "robustness")
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help="run only the cells whose name contains this")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "robustness.md")
    parser.add_argument("--notes", type=Path, default=ROOT / "experiments" / "robustness_notes.md",
                        help="hand-written findings inserted at the top of the report")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    apps = list(GRIDS) if args.what == "all" else [] if args.what == "report" else [args.what]
    for app in apps:
        for cell in GRIDS[app](seeds):
            if args.only in cell.name:
                run_cell(cell, args.out, args.threads)
                write_report(args.out, seeds, args.report, args.notes)
    print(write_report(args.out, seeds, args.report, args.notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
