#!/usr/bin/env python
"""bench_grad: what one exact metagradient costs, next to the training run it differentiates.

What it measures
----------------
Problem (the one of ``peers.md`` §2, on mgd's own digits split): scikit-learn digits,
1000 train / 300 val (``mgd.data.load_dataset("digits")``), the 64-128-128-10 tanh MLP
(``build_model("mlp", ..., seed=0)``, 26,122 parameters), batches of 100 in the trainer's
``(seed, step)`` order, float32, one torch thread. Inner optimizers: SGD (momentum 0.9,
lr 0.05) and Adam (lr 1e-3, mgd defaults). Metaparameters: per-step LR multipliers ``lr`` and
per-example weights ``data_weights``, both at their neutral all-ones value. Objective: mean
validation cross-entropy after T steps; the metagradient is ``(dL/dlr, dL/dw)``.

Methods (``--methods``):

* ``mgd-replay``: ``mgd.metagradient(trainer, objective)``, the REPLAY checkpoint tree with
  the default branching factor ``k = ⌈√T⌉`` (memory ~ ``2√T`` states, ~1 extra training run);
* ``mgd-unrolled``: ``mgd.metagradient(..., mode="unrolled")``, every state stored;
* ``full-unroll``: ``mgd.check.full_unroll_metagradient``, plain autograd through one graph of
  the whole run (the peers' "reference" column).

Every (optimizer, T, method) cell runs ``--repeats`` times, each in a fresh subprocess that
builds the problem, warms up (training and the method at T = 3), then measures

1. our training, ``trainer.run()`` (time and peak extra memory),
2. plain ``torch.optim`` training of an identical ``nn.Module`` copy with the same batches,
3. the method (time and peak extra memory).

Peak extra memory is peak RSS during the call minus RSS just before it (``mgd._resources``).
Ratios are taken within one process (method time / training time), then the median over the
repeats is reported, as are the medians of the other columns. "Above training" is the method's
peak extra memory minus that of training. Exactness is checked once per (optimizer, T ≤ 100)
in float64: the relative error of ``mgd-replay`` and ``mgd-unrolled`` against ``full-unroll``
for both metaparameters (``-`` for larger T).

Hardware and results
--------------------
Last run on 2 AMD EPYC cores, 24 GB RAM, Linux; Python 3.11.7, torch 2.13.0+cpu, numpy 2.4.6,
one torch thread. ``python benchmarks/bench_grad.py --markdown --out results.json`` took 640 s.
At T = 3000, median of 3: SGD 4.28x our training (5.04x torch.optim) and +25 MB above
training; Adam 4.64x (4.60x) and +37 MB; the full unroll needs +1.6 GB / +2.9 GB.
The whole table is in ``docs/benchmark.md``.

How to run
----------
::

    python benchmarks/bench_grad.py --markdown
    python benchmarks/bench_grad.py --steps 100 300 --optimizers sgd --repeats 5 --out r.json
    python benchmarks/bench_grad.py --max-unroll-steps 1000   # skip O(T)-memory methods above

Nothing else should run on the machine meanwhile: timings on a shared machine vary by tens of
percent (``peers.md`` §2); compare the same-process ratios rather than raw seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

# ------------------------------------------------------------------------------- settings

SEED = 0
BATCH_SIZE = 100
MODEL = "mlp"  # the 64-128-128-10 tanh preset
METAPARAMS = ("lr", "data_weights")
WARMUP_STEPS = 3
EXACTNESS_MAX_STEPS = 100  # exactness (float64) only up to this T

#: Inner optimizers: base learning rate and the torch.optim twin's keyword arguments.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.05, "momentum": 0.9},
    "adam": {"lr": 1e-3},
}
METHODS = ("mgd-replay", "mgd-unrolled", "full-unroll")
#: Methods whose memory grows with T (they keep the whole trajectory): --max-unroll-steps.
UNROLLED_METHODS = ("mgd-unrolled", "full-unroll")

DEFAULTS = {
    "steps": [100, 1000, 3000],
    "optimizers": list(OPTIMIZERS),
    "methods": list(METHODS),
    "repeats": 3,
}

MIB = 1024 * 1024


# =============================================================================== worker side
# Everything below runs inside a fresh subprocess (``--worker``), one measurement per process.


def _setup_torch() -> Any:
    """Import torch pinned to one thread; the inter-op pool must be sized before any work."""
    import torch

    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already started (cannot happen in a fresh worker)
        pass
    torch.set_num_threads(1)
    return torch


def _load_data(dtype: Any) -> dict[str, Any]:
    """The digits splits as tensors of ``dtype`` (labels int64)."""
    import torch

    from mgd.data import load_dataset

    ds = load_dataset("digits")
    return {
        "x_train": torch.as_tensor(ds.x_train, dtype=dtype),
        "y_train": torch.as_tensor(ds.y_train),
        "x_val": torch.as_tensor(ds.x_val, dtype=dtype),
        "y_val": torch.as_tensor(ds.y_val),
        "input_shape": ds.input_shape,
        "num_classes": ds.num_classes,
        "dtype": dtype,
    }


def _build_problem(data: dict[str, Any], optimizer: str, steps: int) -> tuple[Any, Callable]:
    """``(trainer, objective)`` for one optimizer and horizon T (fresh, identical init)."""
    import mgd
    from mgd.models import build_model

    model = build_model(
        MODEL, data["input_shape"], data["num_classes"], seed=SEED, dtype=data["dtype"]
    )
    settings = OPTIMIZERS[optimizer]
    inner = mgd.SGD(momentum=settings["momentum"]) if optimizer == "sgd" else mgd.Adam()
    trainer = mgd.Trainer(
        model,
        inner,
        data["x_train"],
        data["y_train"],
        steps=steps,
        batch_size=BATCH_SIZE,
        lr=settings["lr"],
        seed=SEED,
        metaparams=list(METAPARAMS),
    )
    objective = mgd.cross_entropy_objective(model, data["x_val"], data["y_val"])
    return trainer, objective


def _torch_optim_training(trainer: Any, optimizer: str) -> Any:
    """Plain ``torch.optim`` training of a copy of the trainer's model, same batch order."""
    import copy

    import torch
    import torch.nn.functional as F

    model = copy.deepcopy(trainer.model)  # the trainer never writes to its model
    settings = dict(OPTIMIZERS[optimizer])
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), **settings)
    else:
        opt = torch.optim.Adam(model.parameters(), **settings)
    for t in range(trainer.steps):
        index = trainer.batch_indices(t)
        loss = F.cross_entropy(model(trainer.x_train[index]), trainer.y_train[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def _method(name: str) -> Callable[[Any, Callable], Any]:
    """The metagradient call of a method, as ``fn(trainer, objective)``."""
    import mgd
    from mgd.check import full_unroll_metagradient

    calls = {
        "mgd-replay": lambda trainer, objective: mgd.metagradient(trainer, objective),
        "mgd-unrolled": lambda trainer, objective: mgd.metagradient(
            trainer, objective, mode="unrolled"
        ),
        "full-unroll": full_unroll_metagradient,
    }
    return calls[name]


def _unpack(result: Any) -> tuple[float, dict[str, Any], dict | None, dict | None]:
    """``(value, grads, plan, phase timings)`` from a MetaGradient or a ``(value, grads)`` pair."""
    if isinstance(result, tuple):
        value, grads = result
        return value, grads, None, None
    return result.value, result.grads, result.plan.to_dict(), dict(result.timings)


def time_task(optimizer: str, steps: int, method: str) -> dict[str, Any]:
    """Measure training, torch.optim training and one method in this (fresh) process."""
    torch = _setup_torch()
    from mgd._resources import measure

    data = _load_data(torch.float32)
    compute = _method(method)

    # Warm-up at T = 3: first-call costs (imports, allocator growth, autograd set-up) must not
    # be charged to the measured calls.
    trainer, objective = _build_problem(data, optimizer, WARMUP_STEPS)
    trainer.run()
    _torch_optim_training(trainer, optimizer)
    compute(trainer, objective)
    del trainer, objective

    trainer, objective = _build_problem(data, optimizer, steps)
    final, train = measure(trainer.run)
    model, torch_train = measure(_torch_optim_training, trainer, optimizer)
    result, meta = measure(compute, trainer, objective)
    value, grads, plan, phases = _unpack(result)

    # Sanity numbers (not timed): both trainings should reach about the same validation loss,
    # and all methods should report about the same gradient norms.
    with torch.no_grad():
        ours_loss = float(objective(trainer.named_tensors(final.params, final.buffers)))
        torch_loss = float(objective(dict(model.named_parameters())))

    def mb(m: Any) -> float | None:
        return m.peak_extra_mb

    return {
        "train_s": train.seconds,
        "train_mb": mb(train),
        "torch_train_s": torch_train.seconds,
        "torch_train_mb": mb(torch_train),
        "method_s": meta.seconds,
        "method_mb": mb(meta),
        "rss_before_method_mb": (
            None if meta.rss_before_bytes is None else meta.rss_before_bytes / MIB
        ),
        "phases_s": phases,
        "plan": plan,
        "value": value,
        "grad_norms": {name: float(g.norm()) for name, g in grads.items()},
        "val_loss_ours": ours_loss,
        "val_loss_torch_optim": torch_loss,
    }


def exactness_task(optimizer: str, steps: int) -> dict[str, dict[str, float]]:
    """Relative error of the mgd modes against the full unroll, float64, per metaparameter."""
    torch = _setup_torch()
    from mgd.check import full_unroll_metagradient, relative_error

    trainer, objective = _build_problem(_load_data(torch.float64), optimizer, steps)
    _, reference = full_unroll_metagradient(trainer, objective)
    errors = {}
    for method in ("mgd-replay", "mgd-unrolled"):
        _, grads, _, _ = _unpack(_method(method)(trainer, objective))
        errors[method] = {name: relative_error(grads[name], reference[name]) for name in METAPARAMS}
    return errors


def worker_main(task_json: str) -> None:
    """Entry point of a worker: run one task, print its result as one JSON line on stdout."""
    task = json.loads(task_json)
    if task["kind"] == "time":
        result = time_task(task["optimizer"], task["steps"], task["method"])
    elif task["kind"] == "exactness":
        result = exactness_task(task["optimizer"], task["steps"])
    else:
        raise ValueError(f"unknown worker task {task['kind']!r}")
    print(json.dumps(result), flush=True)


# =============================================================================== driver side


def run_worker(task: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Run one task in a fresh interpreter: ``{"ok": True, "result": ...}`` or the failure."""
    env = dict(os.environ)
    # One thread everywhere, also for OpenMP/MKL pools that torch may start before the
    # worker calls set_num_threads.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:g} s"}
    if done.returncode != 0:
        return {"ok": False, **_describe_failure(done.returncode, done.stderr)}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    try:
        return {"ok": True, "result": json.loads(lines[-1])}
    except (IndexError, json.JSONDecodeError):
        return {"ok": False, "error": f"worker printed no result; stdout: {done.stdout[-500:]!r}"}


def _describe_failure(returncode: int, stderr: str) -> dict[str, str]:
    """A failed worker: a one-line ``error`` (signal or exception) and the end of stderr."""
    lines = stderr.strip().splitlines()
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        error = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    else:
        error = f"exit code {returncode}" + (f": {lines[-1].strip()}" if lines else "")
    return {"error": error, "stderr_tail": "\n".join(lines[-15:])}


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the successful repeats of one cell; ratios are per process first."""
    results = [run["result"] for run in runs if run["ok"]]
    failures = [{k: v for k, v in run.items() if k != "ok"} for run in runs if not run["ok"]]
    summary: dict[str, Any] = {
        "status": "ok" if results else "failed",
        "runs_ok": len(results),
        "runs": len(runs),
        "failures": failures,
        "raw": results,
    }
    if not results:
        return summary

    def column(fn: Callable[[dict], float | None]) -> float | None:
        return _median([fn(r) for r in results])

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    summary.update(
        method_s=column(lambda r: r["method_s"]),
        train_s=column(lambda r: r["train_s"]),
        torch_train_s=column(lambda r: r["torch_train_s"]),
        ratio_train=column(lambda r: r["method_s"] / r["train_s"]),
        ratio_torch=column(lambda r: r["method_s"] / r["torch_train_s"]),
        method_mb=column(lambda r: r["method_mb"]),
        train_mb=column(lambda r: r["train_mb"]),
        above_train_mb=column(lambda r: diff(r["method_mb"], r["train_mb"])),
        plan=results[0]["plan"],  # deterministic
    )
    return summary


def environment() -> dict[str, Any]:
    """Versions and hardware, for the results file (the header's placeholders)."""
    import numpy
    import torch

    import mgd

    def first_line(path: str, prefix: str) -> str | None:
        try:
            with open(path) as handle:
                for line in handle:
                    if line.startswith(prefix):
                        return line.split(":", 1)[1].strip()
        except OSError:
            return None
        return None

    return {
        "cpu": first_line("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "memory_total": first_line("/proc/meminfo", "MemTotal"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "mgd": mgd.__version__,
        "torch_threads": 1,
    }


# ------------------------------------------------------------------------------- table


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _plan_cell(plan: dict | None) -> str:
    if plan is None:
        return "-"
    return (
        f"k={plan['k']} d={plan['depth']} live={plan['max_live_checkpoints']} "
        f"+{plan['extra_passes']:.2f} runs"
    )


def _exactness_cell(row: dict[str, Any]) -> str:
    errors = row.get("exactness")
    if row.get("exactness_error"):
        return "failed"
    if row["method"] == "full-unroll" and errors is not None:
        return "reference"
    if not errors:
        return "-"
    # An exact 0 means bit-identical gradients; print it as such.
    cells = ("0" if errors[name] == 0 else _fmt(errors[name], ".1e") for name in METAPARAMS)
    return " / ".join(cells)


HEADER = (
    "opt", "T", "method", "metagrad s", "train s (ours / torch.optim)",
    "÷ ours", "÷ torch.optim", "extra MB", "train MB", "above train MB",
    "replay plan", "rel. err. lr / w",
)


def table_rows(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One tuple of cells per result row."""
    out = []
    for row in rows:
        method = row["method"]
        if row["status"] in ("skipped", "failed"):
            if row["status"] == "skipped":
                text = row["note"]
            else:
                text = "failed: " + (row["failures"][0]["error"][:80] if row["failures"] else "?")
            blanks = ["-"] * (len(HEADER) - 4)
            out.append((row["optimizer"], str(row["steps"]), method, text, *blanks))
            continue
        if row["runs_ok"] < row["runs"]:
            method += f" ({row['runs_ok']}/{row['runs']} runs)"
        out.append((
            row["optimizer"],
            str(row["steps"]),
            method,
            _fmt(row["method_s"], ".3g"),
            f"{_fmt(row['train_s'], '.3g')} / {_fmt(row['torch_train_s'], '.3g')}",
            _fmt(row["ratio_train"], ".2f"),
            _fmt(row["ratio_torch"], ".2f"),
            _fmt(row["method_mb"], ".1f"),
            _fmt(row["train_mb"], ".1f"),
            _fmt(row["above_train_mb"], ".1f"),
            _plan_cell(row["plan"]),
            _exactness_cell(row),
        ))
    return out


def format_table(rows: list[dict[str, Any]], markdown: bool) -> str:
    """A Markdown table, or aligned plain text."""
    cells = [HEADER, *table_rows(rows)]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        lines.insert(1, "|" + "|".join("---" for _ in HEADER) + "|")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


# ------------------------------------------------------------------------------- main


def _list_arg(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """Parse ``"a,b"`` into a list (used with ``nargs="+"``, so ``a b`` works too)."""
    return lambda text: [kind(part) for part in text.split(",") if part.strip()]


def _flatten(values: list[list]) -> list:
    return [v for group in values for v in group]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time and memory of one exact metagradient on the digits MLP, vs training.",
    )
    parser.add_argument("--steps", nargs="+", type=_list_arg(int),
                        help=f"horizons T (default {' '.join(map(str, DEFAULTS['steps']))})")
    parser.add_argument("--optimizers", nargs="+", type=_list_arg(str),
                        help=f"inner optimizers, from {', '.join(OPTIMIZERS)} (default: all)")
    parser.add_argument("--methods", nargs="+", type=_list_arg(str),
                        help=f"methods, from {', '.join(METHODS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"],
                        help="fresh subprocesses per cell; medians are reported (default 3)")
    parser.add_argument("--max-unroll-steps", type=int, default=None,
                        help="skip methods that store the whole run (mgd-unrolled, full-unroll) "
                             "for T above this (default: no limit)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds before a worker is killed and recorded as failed")
    parser.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--worker", metavar="TASK_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return args

    args.steps = _flatten(args.steps) if args.steps else DEFAULTS["steps"]
    args.optimizers = _flatten(args.optimizers) if args.optimizers else DEFAULTS["optimizers"]
    args.methods = _flatten(args.methods) if args.methods else DEFAULTS["methods"]
    for name, chosen, allowed in (("optimizer", args.optimizers, OPTIMIZERS),
                                  ("method", args.methods, METHODS)):
        unknown = [c for c in chosen if c not in allowed]
        if unknown:
            parser.error(
                f"unknown {name}(s) {', '.join(unknown)}; choose from {', '.join(allowed)}"
            )
    if any(t < 1 for t in args.steps):
        parser.error("--steps must be positive")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def run_group(
    optimizer: str, steps: int, args: argparse.Namespace, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """All methods for one (optimizer, T): the exactness check, then the timed repeats."""

    def skipped(method: str) -> bool:
        limit = args.max_unroll_steps
        return method in UNROLLED_METHODS and limit is not None and steps > limit

    active = [m for m in args.methods if not skipped(m)]

    # Exactness, once per group, in float64; it needs the full unroll as its reference.
    exactness, exactness_error = None, None
    wanted = {"mgd-replay", "mgd-unrolled"} & set(active)
    if wanted and steps <= EXACTNESS_MAX_STEPS and not skipped("full-unroll"):
        log(f"{optimizer} T={steps}: exactness (float64)")
        task = {"kind": "exactness", "optimizer": optimizer, "steps": steps}
        run = run_worker(task, args.timeout)
        if run["ok"]:
            exactness = run["result"]
        else:
            exactness_error = run["error"]
            log(f"{optimizer} T={steps}: exactness FAILED {exactness_error}")

    # Repeats outermost, so that slow drifts of the machine hit every method alike.
    runs: dict[str, list] = {m: [] for m in active}
    for repeat in range(args.repeats):
        for method in active:
            task = {"kind": "time", "optimizer": optimizer, "steps": steps, "method": method}
            run = run_worker(task, args.timeout)
            runs[method].append(run)
            label = f"{optimizer} T={steps} {method} [{repeat + 1}/{args.repeats}]"
            if run["ok"]:
                r = run["result"]
                log(f"{label}: {r['method_s']:.3g} s = {r['method_s'] / r['train_s']:.2f}x "
                    f"training, +{_fmt(r['method_mb'], '.1f')} MB")
            else:
                log(f"{label}: FAILED {run['error']}")

    rows = []
    for method in args.methods:
        row: dict[str, Any] = {"optimizer": optimizer, "steps": steps, "method": method}
        if skipped(method):
            row.update(status="skipped",
                       note=f"skipped (T > --max-unroll-steps {args.max_unroll_steps})")
        else:
            row.update(summarize(runs[method]))
            if exactness is None:
                row["exactness"] = None
            elif method == "full-unroll":
                row["exactness"] = {"reference": True}
            else:
                row["exactness"] = exactness.get(method)
            if exactness_error is not None:
                row["exactness_error"] = exactness_error
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return 0

    from mgd.io import write_json

    settings = {
        "steps": args.steps,
        "optimizers": {name: OPTIMIZERS[name] for name in args.optimizers},
        "methods": args.methods,
        "repeats": args.repeats,
        "max_unroll_steps": args.max_unroll_steps,
        "dataset": "digits",
        "model": MODEL,
        "batch_size": BATCH_SIZE,
        "seed": SEED,
        "metaparams": list(METAPARAMS),
        "dtype": "float32",
        "exactness": f"float64, T <= {EXACTNESS_MAX_STEPS}",
    }
    report: dict[str, Any] = {
        "benchmark": "bench_grad",
        "argv": sys.argv[1:],
        "settings": settings,
        "environment": environment(),
        "rows": [],
    }
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    for optimizer in args.optimizers:
        for steps in args.steps:
            report["rows"].extend(run_group(optimizer, steps, args, log))
            if args.out is not None:  # after every group, so a long run leaves partial results
                write_json(args.out, report)

    report["total_s"] = time.perf_counter() - started
    if args.out is not None:
        write_json(args.out, report)
        log(f"wrote {args.out}")
    print(format_table(report["rows"], markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
