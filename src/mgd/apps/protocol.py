"""One evaluation protocol for every application and baseline (``protocols.md`` §2).

A method (MGD or a baseline) produces a :class:`Candidate`: the training set it proposes
(possibly a subset, with poisons, or reweighted) and/or metaparameter values (e.g. an LR
schedule), plus what it cost. :func:`evaluate` then retrains every candidate **from scratch**
with the same fresh evaluation seeds (disjoint from all crafting seeds), reads the test split
once, and reports per method the mean and 95% CI of test accuracy and loss, per-seed values,
compute, and paired differences against the best baseline. Nothing here makes a choice on test.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np
import torch

from mgd.config import RunConfig
from mgd.data import Dataset
from mgd.errors import UserError
from mgd.evaluation import mean_ci, parallel_map, retrain_and_evaluate
from mgd.io import atomic_write_bytes

__all__ = [
    "Candidate", "Cost", "evaluate", "evaluate_task", "report_markdown", "training_run_seconds", "with_training_set", "check_seeds",
    "save_candidate", "load_candidate",
]


@dataclass
class Cost:
    """What a method spent: wall-clock seconds and training-run equivalents.

    A training-run equivalent is one training run of the evaluation recipe; a metagradient
    counts as its measured time divided by the time of one training run.
    """

    seconds: float = 0.0
    training_runs: float = 0.0

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "training_runs": self.training_runs}


def training_run_seconds(run, *, repeats: int = 3) -> float:
    """The cost unit of every application: seconds of one plain training run of ``run``, the
    median of ``repeats`` runs after one warm-up run (thread pools, allocations).

    A method's cost in training-run equivalents is its seconds divided by this, measured the
    same way for every method and application.
    """
    run.run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run.run()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


@dataclass
class Candidate:
    """A method's proposal, to be evaluated by retraining.

    Attributes:
        name: the method's name in reports.
        x_train, y_train: the training set to train on (``None``: the dataset's own).
        subset: for a user's task, the indices of the task's training examples to train on
            (``None``: all of them); the built-in presets give ``x_train, y_train`` instead.
        meta: metaparameter values for training (``data_weights`` must match ``x_train``).
        cost: what producing it cost.
        kind: ``"mgd"``, ``"baseline"`` or ``"reference"`` (references, e.g. an oracle, are
            reported but never count as "the best baseline").
        info: diagnostics (e.g. the precision of a selection); never used for choices.
    """

    name: str
    x_train: np.ndarray | None = None
    y_train: np.ndarray | None = None
    meta: Mapping[str, np.ndarray] = field(default_factory=dict)
    subset: np.ndarray | None = None
    cost: Cost = field(default_factory=Cost)
    kind: str = "baseline"
    info: dict = field(default_factory=dict)


def with_training_set(dataset: Dataset, x: np.ndarray | None, y: np.ndarray | None) -> Dataset:
    """``dataset`` with its training split replaced (validation and test untouched)."""
    if x is None and y is None:
        return dataset
    x = dataset.x_train if x is None else np.ascontiguousarray(x, dtype=np.float64)
    y = dataset.y_train if y is None else np.ascontiguousarray(y, dtype=np.int64)
    if len(x) != len(y):
        raise UserError(f"training set has {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise UserError("a method proposed an empty training set")
    return replace(dataset, x_train=x, y_train=y)


def check_seeds(crafting: Sequence[int], evaluation: Sequence[int]) -> None:
    if not evaluation:
        raise UserError("need at least one evaluation seed")
    overlap = sorted(set(crafting) & set(evaluation))
    if overlap:
        raise UserError(f"evaluation seeds {overlap} are also crafting seeds; evaluation seeds must be fresh")


def _train_once(config: RunConfig, dataset: Dataset, candidate: Candidate, seed: int) -> dict:
    train = with_training_set(dataset, candidate.x_train, candidate.y_train)
    cfg = RunConfig(**{**config.to_dict(), "batch_size": min(config.batch_size, len(train.x_train))})
    meta = {name: torch.as_tensor(np.asarray(v, dtype=np.float64)) for name, v in candidate.meta.items()}
    (result,) = retrain_and_evaluate(cfg, train, meta, [seed])
    return result


def evaluate(
    config: RunConfig,
    dataset: Dataset,
    candidates: Sequence[Candidate],
    seeds: Sequence[int],
    *,
    attack: bool = False,
    progress=None,
    workers: int = 1,
) -> dict:
    """Retrain every candidate on every evaluation seed and summarise (see the module doc).

    ``attack=True`` (poisoning) makes the reference baseline the one with the *lowest*
    validation accuracy, i.e. the strongest attack, instead of the highest. ``workers > 1``
    spreads the retraining runs over that many processes (identical results).
    """
    tasks = [(config, dataset, candidate, seed) for candidate in candidates for seed in seeds]
    return _evaluate(_train_once, tasks, candidates, seeds, attack=attack, progress=progress, workers=workers,
                     keys=("test_accuracy", "test_loss", "val_accuracy", "val_loss"),
                     val_key="val_accuracy", higher_is_better=True, diff_keys=("test_accuracy",),
                     train_size=lambda c: len(c.y_train) if c.y_train is not None else len(dataset.y_train))


def evaluate_task(
    runs,
    candidates: Sequence[Candidate],
    seeds: Sequence[int],
    *,
    attack: bool = False,
    primary: str | None = None,
    progress=None,
    workers: int = 1,
) -> dict:
    """:func:`evaluate` for a user's task (:class:`mgd.apps.tasks.TaskRuns`): every candidate is
    retrained by the task function with each evaluation seed (on its subset, with its
    metaparameters) and measured by the task's objective, ``metrics`` and held-out ``test``
    metrics. The strongest baseline is the one with the lowest validation objective (the
    highest, for an attack); paired differences are given for every test metric, ``primary``
    (e.g. ``test_accuracy``) first, as the headline of the table."""
    tasks = [(runs.spec, runs.options, candidate, seed) for candidate in candidates for seed in seeds]
    keys = ("val_objective", *runs.metric_names, *runs.test_names)
    tests = sorted(runs.test_names, key=lambda name: name != primary)  # ``primary`` first: the headline
    return _evaluate(_train_task_once, tasks, candidates, seeds, attack=attack, progress=progress, workers=workers,
                     keys=keys, val_key="val_objective", higher_is_better=False,
                     diff_keys=tuple(tests) or ("val_objective",),
                     train_size=lambda c: len(c.subset) if c.subset is not None else runs.size)


def _train_task_once(spec, options, candidate: Candidate, seed: int) -> dict:
    from mgd.apps.tasks import TaskRuns

    return TaskRuns.cached(spec, options).evaluate(candidate, seed)


def _evaluate(train_once, tasks, candidates, seeds, *, attack, progress, workers, keys, val_key,
              higher_is_better, diff_keys, train_size) -> dict:
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise UserError(f"method names must be distinct: {names}")
    started = time.perf_counter()
    done = (lambda: progress("evaluate", 1)) if progress is not None else None
    results = iter(parallel_map(train_once, tasks, workers=workers, on_done=done))
    methods = {}
    for candidate in candidates:
        per_seed = [next(results) for _ in seeds]
        methods[candidate.name] = {
            "kind": candidate.kind,
            **{key: mean_ci([r[key] for r in per_seed]) for key in keys},
            "per_seed": per_seed,
            "cost": candidate.cost.to_dict(),
            "train_size": int(train_size(candidate)),
            "info": candidate.info,
        }
    baselines = [n for n, m in methods.items() if m["kind"] == "baseline"]
    # The reference point for paired differences is the strongest baseline by *validation*:
    # choosing it on test would leak the test split into the comparison. For an attack the
    # strongest is the one that makes validation worst.
    pick = max if higher_is_better != attack else min
    best = pick(baselines, key=lambda n: methods[n][val_key]["mean"]) if baselines else None
    for name, m in methods.items():
        if best is not None and name != best:
            m["vs_best_baseline"] = {"baseline": best}
            for key in diff_keys:
                diffs = [a[key] - b[key] for a, b in zip(m["per_seed"], methods[best]["per_seed"])]
                m["vs_best_baseline"][f"{key}_diff"] = mean_ci(diffs)
    return {
        "evaluation_seeds": list(seeds),
        "attack": attack,
        "best_baseline_by_val": best,
        "keys": {"val": val_key, "test": list(diff_keys)},
        "methods": methods,
        "evaluation_seconds": time.perf_counter() - started,
    }


def report_markdown(report: dict, title: str) -> str:
    """The comparison table: test metrics (mean ± 95% CI), paired difference, compute."""
    keys = report.get("keys", {"val": "val_accuracy", "test": ["test_accuracy"]})
    preset = keys["val"] == "val_accuracy"
    strongest = ("lowest, for an attack" if report.get("attack") else "highest") if preset else (
        "highest, for an attack" if report.get("attack") else "lowest")
    lines = [
        f"## {title}",
        "",
        f"Retrained on {len(report['evaluation_seeds'])} fresh evaluation seeds; mean ± 95% CI. Paired "
        f"differences are against the strongest baseline by validation "
        f"{'accuracy' if preset else 'objective'} ({strongest}: {report['best_baseline_by_val']}).",
        "",
    ]
    if preset:
        lines += ["| method | kind | train size | test acc (%) | test loss | Δ acc vs best baseline (pts) | cost (runs / s) |",
                  "|---|---|---|---|---|---|---|"]
    else:
        shown = list(dict.fromkeys([*keys["test"], "val_objective"]))
        lines += [f"| method | kind | train size | {' | '.join(shown)} | Δ {keys['test'][0]} vs best baseline | cost (runs / s) |",
                  "|---|---|---|" + "---|" * len(shown) + "---|---|"]
    for name, m in report["methods"].items():
        diff = m.get("vs_best_baseline", {}).get(f"{keys['test'][0]}_diff")
        cost = f"{m['cost']['training_runs']:.1f} / {m['cost']['seconds']:.1f}"
        if preset:
            acc, loss = m["test_accuracy"], m["test_loss"]
            diff_text = f"{100 * diff['mean']:+.2f} ± {100 * diff['ci']:.2f}" if diff else "-"
            lines.append(
                f"| {name} | {m['kind']} | {m['train_size']} | {100 * acc['mean']:.2f} ± {100 * acc['ci']:.2f} "
                f"| {loss['mean']:.4f} ± {loss['ci']:.4f} | {diff_text} | {cost} |"
            )
        else:
            values = " | ".join(f"{m[k]['mean']:.4f} ± {m[k]['ci']:.4f}" for k in shown)
            diff_text = f"{diff['mean']:+.4f} ± {diff['ci']:.4f}" if diff else "-"
            lines.append(f"| {name} | {m['kind']} | {m['train_size']} | {values} | {diff_text} | {cost} |")
    return "\n".join(lines) + "\n"


def write_report(run_dir, report: dict, title: str) -> str:
    """``report.json`` and ``report.md`` in a run directory; returns the Markdown."""
    text = report_markdown(report, title)
    run_dir.write_json("report.json", report)
    atomic_write_bytes(run_dir.path / "report.md", text.encode())
    return text


# ------------------------------------------------------------------------------ resume support


def save_candidate(run_dir, candidate: Candidate) -> None:
    """Store a finished candidate under ``candidates/`` (arrays as ``.npz``, the rest as JSON).

    The JSON file is written last and marks the candidate complete, so a run killed between
    the two writes simply recomputes that method on resume.
    """
    arrays = {f"meta/{k}": np.asarray(v) for k, v in candidate.meta.items()}
    for key in ("x_train", "y_train", "subset"):
        if getattr(candidate, key) is not None:
            arrays[key] = np.asarray(getattr(candidate, key))
    info = {}
    for key, value in candidate.info.items():
        if isinstance(value, np.ndarray):
            arrays[f"info/{key}"] = value
        else:
            info[key] = value
    run_dir.write_npz(f"candidates/{candidate.name}.npz", arrays)
    run_dir.write_json(
        f"candidates/{candidate.name}.json",
        {"name": candidate.name, "kind": candidate.kind, "cost": candidate.cost.to_dict(), "info": info},
    )


def load_candidate(run_dir, name: str) -> Candidate | None:
    """A candidate stored by :func:`save_candidate`, or ``None`` if it never finished."""
    import json

    from mgd.io import load_npz

    folder = run_dir.path / "candidates"
    if not (folder / f"{name}.json").is_file() or not (folder / f"{name}.npz").is_file():
        return None
    try:
        saved = json.loads((folder / f"{name}.json").read_text())
        cost, kind, info = Cost(**saved["cost"]), saved["kind"], dict(saved["info"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--resume {run_dir.path}: candidates/{name}.json is corrupt ({exc})") from None
    arrays = load_npz(folder / f"{name}.npz", what=f"--resume {run_dir.path}")
    info.update({k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("info/")})
    return Candidate(
        name,
        x_train=arrays.get("x_train"),
        y_train=arrays.get("y_train"),
        subset=arrays.get("subset"),
        meta={k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("meta/")},
        cost=cost,
        kind=kind,
        info=info,
    )
