#!/usr/bin/env python
"""bench_grad: what one exact metagradient costs, next to training and next to the peers.

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

* ``mgd-replay``: ``mgd.metagradient(trainer, objective)``, default settings: the lean
  two-level REPLAY tree (memory ``O(√T)``, ~1 extra training run) and the default per-step
  VJP, ``"fused"`` (the results file records the plan and the VJP);
* ``mgd-replay-db`` and ``mgd-replay-mixed``: the same with ``vjp="double-backward"`` (the
  oracle VJP: re-run the step with a graph) and ``vjp="mixed"`` (forward-over-reverse);
* ``mgd-unrolled``: ``mgd.metagradient(..., mode="unrolled")``, every state stored, default VJP;
* ``full-unroll``: ``mgd.check.full_unroll_metagradient``, plain autograd through one graph of
  the whole run (the peers' "reference" column);
* ``higher``, ``torchopt``, ``torchopt-meta``: the peer libraries (``benchmarks/peers.py``):
  higher's ``innerloop_ctx``, TorchOpt's functional ``sgd``/``adam`` with ``inplace=False``
  over ``torch.func.functional_call``, TorchOpt's ``MetaSGD``/``MetaAdam``. They need the
  ``bench`` extra (``pip install -e ".[bench]"``: higher 0.2.1, torchopt 0.7.3); without it
  the default method list leaves them out.

``full-unroll`` and the three libraries are the *peers*. Every row's "fastest peer ÷ this"
is the fastest peer's "÷ ours" ratio at that (optimizer, T) divided by the row's own: for an
``mgd`` row, how many times faster than the best peer it is (same-process ratios, so slow
drifts of a shared machine cancel).

Every (optimizer, T, method) cell runs ``--repeats`` times, each in a fresh subprocess that
builds the problem on ``--device``, warms up (training and the method at T = 3), then measures

1. our training, ``trainer.run()`` (time and peak extra memory),
2. plain ``torch.optim`` training of an identical ``nn.Module`` copy with the same batches,
3. the method (time and peak extra memory).

Peak extra memory is peak RSS during the call minus RSS just before it (``mgd._resources``);
on CUDA also the peak of ``torch.cuda.max_memory_allocated`` above the allocation before the
call ("GPU MB"), with ``torch.cuda.synchronize()`` around every timed call. Ratios are taken
within one process (method time / training time), then the median over the repeats is
reported, as are the medians of the other columns. "Above training" is the method's peak extra
memory minus that of training.

Exactness is checked once per (optimizer, T ≤ 100) in float64 on the same device: the
relative error of every method against ``full-unroll`` for both metaparameters (``-`` for
larger T). The peers' formulas differ from ``torch.optim``'s in places (higher's Adam ``ε``,
TorchOpt's float32 bias correction; see ``peers.py``): the column shows what they return.

Memory guard: the methods whose memory grows with T (every one but ``mgd-replay*``) are
probed once per optimizer in a fresh process at T = 50 and 100; a straight line through the
two peaks predicts the peak at each T. A cell that would exceed ``--memory-limit-gb`` (RSS;
default 60% of MemTotal) or, on CUDA, ``--gpu-memory-limit-gb`` (default 90% of the GPU) is
not run and reads "skipped: would need ~X GB".

Hardware and results
--------------------
The whole table, the command that produced it and its hardware are in ``docs/benchmark.md``.

How to run
----------
::

    pip install -e ".[bench]"                 # the peer libraries, pinned
    python benchmarks/bench_grad.py --markdown --out results.json
    python benchmarks/bench_grad.py --steps 100 300 --optimizers sgd --repeats 5
    python benchmarks/bench_grad.py --methods mgd-replay torchopt --steps 1000
    python benchmarks/bench_grad.py --device cuda --markdown --out results-cuda.json

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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # peers.py sits next to this file

from peers import PEER_METHODS, missing_libraries  # noqa: E402  (imports no peer library)

# ------------------------------------------------------------------------------- settings

SEED = 0
BATCH_SIZE = 100
MODEL = "mlp"  # the 64-128-128-10 tanh preset
METAPARAMS = ("lr", "data_weights")
WARMUP_STEPS = 3
EXACTNESS_MAX_STEPS = 100  # exactness (float64) only up to this T
PROBE_STEPS = (50, 100)  # the memory guard's two probe horizons

#: Inner optimizers: base learning rate and the torch.optim twin's keyword arguments.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.05, "momentum": 0.9},
    "adam": {"lr": 1e-3},
}
#: mgd methods: (mode, vjp); ``None`` keeps the engine's default VJP.
MGD_METHODS: dict[str, tuple[str, str | None]] = {
    "mgd-replay": ("replay", None),
    "mgd-replay-db": ("replay", "double-backward"),
    "mgd-replay-mixed": ("replay", "mixed"),
    "mgd-unrolled": ("unrolled", None),
}
METHODS = (*MGD_METHODS, "full-unroll", *PEER_METHODS)
#: What "fastest peer" is taken over.
PEERS = ("full-unroll", *PEER_METHODS)
#: Methods whose memory grows with T (they keep the whole trajectory): memory guard and
#: --max-unroll-steps apply to them.
UNROLLED_METHODS = ("mgd-unrolled", "full-unroll", *PEER_METHODS)
REFERENCE = "full-unroll"

DEFAULTS = {
    "steps": [100, 1000, 3000, 10000],
    "optimizers": list(OPTIMIZERS),
    "methods": list(METHODS),
    "repeats": 3,
}

MIB = 1024 * 1024
GIB = 1024 * MIB


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


def _load_data(dtype: Any, device: str) -> dict[str, Any]:
    """The digits splits as tensors of ``dtype`` on ``device`` (labels int64)."""
    import torch

    from mgd.data import load_dataset

    ds = load_dataset("digits")

    def tensor(array: Any, **kwargs: Any) -> Any:
        return torch.as_tensor(array, **kwargs).to(device)

    return {
        "x_train": tensor(ds.x_train, dtype=dtype),
        "y_train": tensor(ds.y_train),
        "x_val": tensor(ds.x_val, dtype=dtype),
        "y_val": tensor(ds.y_val),
        "input_shape": ds.input_shape,
        "num_classes": ds.num_classes,
        "dtype": dtype,
        "device": device,
    }


def _build_problem(data: dict[str, Any], optimizer: str, steps: int) -> tuple[Any, Callable]:
    """``(trainer, objective)`` for one optimizer and horizon T (fresh, identical init)."""
    import mgd
    from mgd.models import build_model

    model = build_model(
        MODEL, data["input_shape"], data["num_classes"], seed=SEED, dtype=data["dtype"]
    ).to(data["device"])
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


def engine_default_vjp() -> Any:
    """The default of ``mgd.metagradient``'s ``vjp=`` argument (a name, or a function)."""
    import inspect

    import mgd

    parameter = inspect.signature(mgd.metagradient).parameters.get("vjp")
    return None if parameter is None else parameter.default


def engine_takes_vjp_names() -> bool:
    """Whether ``mgd.metagradient`` takes ``vjp=`` as a name ("auto", "double-backward", ...).

    Engines from before the named VJPs take only a function, and their default is the
    double-backward VJP.
    """
    return isinstance(engine_default_vjp(), str)


def _mgd_call(mode: str, vjp: str | None) -> tuple[Callable[[Any, Callable], Any], str]:
    """``(fn(trainer, objective), the VJP it uses)`` for an mgd method.

    ``vjp=None`` keeps the engine's default. On an engine without named VJPs,
    ``"double-backward"`` is that default, so nothing is passed; any other name is an error.
    """
    import mgd

    kwargs: dict[str, Any] = {"mode": mode}
    if engine_takes_vjp_names():
        if vjp is not None:
            kwargs["vjp"] = vjp
        used = vjp if vjp is not None else f"default ({engine_default_vjp()})"
    elif vjp in (None, "double-backward"):
        used = "double-backward (engine without named VJPs)"
    else:
        raise RuntimeError(f"this mgd engine has no vjp={vjp!r} (no named VJPs yet)")
    return (lambda trainer, objective: mgd.metagradient(trainer, objective, **kwargs)), used


def _method(name: str) -> tuple[Callable[[Any, Callable], Any], str | None]:
    """``(fn(trainer, objective), VJP description or None)`` for a method name."""
    if name in MGD_METHODS:
        return _mgd_call(*MGD_METHODS[name])
    if name == REFERENCE:
        from mgd.check import full_unroll_metagradient

        return full_unroll_metagradient, None
    from peers import peer_metagradient

    return peer_metagradient(name), None


def _unpack(result: Any) -> tuple[float, dict[str, Any], dict | None, dict | None]:
    """``(value, grads, plan, phase timings)`` from a MetaGradient or a ``(value, grads)`` pair."""
    if isinstance(result, tuple):
        value, grads = result
        return value, grads, None, None
    return result.value, result.grads, result.plan.to_dict(), dict(result.timings)


def _measured(fn: Callable, *args: Any, device: str) -> tuple[Any, dict[str, float | None]]:
    """Run ``fn(*args)``: its result, wall seconds, peak extra RSS MB and (CUDA) GPU MB.

    On CUDA the call is timed up to a ``synchronize`` (kernels are asynchronous) and its GPU
    memory is the peak allocation above the allocation just before it.
    """
    import torch

    from mgd._resources import measure

    cuda = torch.device(device) if device.startswith("cuda") else None
    if cuda is not None:
        torch.cuda.synchronize(cuda)
        torch.cuda.reset_peak_memory_stats(cuda)
        allocated_before = torch.cuda.memory_allocated(cuda)

    def call() -> Any:
        result = fn(*args)
        if cuda is not None:
            torch.cuda.synchronize(cuda)
        return result

    result, m = measure(call)
    gpu_mb = None
    if cuda is not None:
        gpu_mb = (torch.cuda.max_memory_allocated(cuda) - allocated_before) / MIB
    return result, {
        "seconds": m.seconds,
        "rss_mb": m.peak_extra_mb,
        "rss_before_mb": None if m.rss_before_bytes is None else m.rss_before_bytes / MIB,
        "gpu_mb": gpu_mb,
    }


def _warm_up(data: dict[str, Any], optimizer: str, compute: Callable) -> None:
    """First-call costs (imports, allocator growth, autograd set-up, CUDA context) at T = 3."""
    trainer, objective = _build_problem(data, optimizer, WARMUP_STEPS)
    trainer.run()
    _torch_optim_training(trainer, optimizer)
    compute(trainer, objective)


def time_task(optimizer: str, steps: int, method: str, device: str) -> dict[str, Any]:
    """Measure training, torch.optim training and one method in this (fresh) process."""
    torch = _setup_torch()
    data = _load_data(torch.float32, device)
    compute, vjp = _method(method)
    _warm_up(data, optimizer, compute)

    trainer, objective = _build_problem(data, optimizer, steps)
    final, train = _measured(trainer.run, device=device)
    model, torch_train = _measured(_torch_optim_training, trainer, optimizer, device=device)
    result, meta = _measured(compute, trainer, objective, device=device)
    value, grads, plan, phases = _unpack(result)

    # Sanity numbers (not timed): both trainings should reach about the same validation loss,
    # and all methods should report about the same value and gradient norms.
    with torch.no_grad():
        ours_loss = float(objective(trainer.named_tensors(final.params, final.buffers)))
        torch_loss = float(objective(dict(model.named_parameters())))

    return {
        "train_s": train["seconds"],
        "train_mb": train["rss_mb"],
        "train_gpu_mb": train["gpu_mb"],
        "torch_train_s": torch_train["seconds"],
        "torch_train_mb": torch_train["rss_mb"],
        "method_s": meta["seconds"],
        "method_mb": meta["rss_mb"],
        "method_gpu_mb": meta["gpu_mb"],
        "rss_before_method_mb": meta["rss_before_mb"],
        "phases_s": phases,
        "plan": plan,
        "vjp": vjp,
        "value": value,
        "grad_norms": {name: float(g.norm()) for name, g in grads.items()},
        "val_loss_ours": ours_loss,
        "val_loss_torch_optim": torch_loss,
    }


def probe_task(optimizer: str, method: str, device: str) -> dict[str, Any]:
    """Peak memory of a method at the probe horizons, for the memory guard (float32)."""
    torch = _setup_torch()
    data = _load_data(torch.float32, device)
    compute, _ = _method(method)
    _warm_up(data, optimizer, compute)
    points = []
    for steps in PROBE_STEPS:
        trainer, objective = _build_problem(data, optimizer, steps)
        _, m = _measured(compute, trainer, objective, device=device)
        points.append({"steps": steps, **m})
        del trainer, objective
    total_gpu = (
        torch.cuda.get_device_properties(torch.device(device)).total_memory / MIB
        if device.startswith("cuda") else None
    )
    return {"points": points, "gpu_total_mb": total_gpu}


def exactness_task(optimizer: str, steps: int, methods: list[str], device: str) -> dict[str, Any]:
    """Relative error of each method against the full unroll, float64, per metaparameter.

    A method that raises is recorded as ``{"error": ...}`` so that the others still report.
    """
    torch = _setup_torch()
    from mgd.check import full_unroll_metagradient, relative_error

    trainer, objective = _build_problem(_load_data(torch.float64, device), optimizer, steps)
    reference_value, reference = full_unroll_metagradient(trainer, objective)
    errors: dict[str, Any] = {}
    for method in methods:
        try:
            compute, _ = _method(method)
            value, grads, _, _ = _unpack(compute(trainer, objective))
        except Exception as error:  # noqa: BLE001  (reported in the table, never hidden)
            errors[method] = {"error": f"{type(error).__name__}: {error}"[:300]}
            continue
        errors[method] = {name: relative_error(grads[name], reference[name]) for name in METAPARAMS}
        errors[method]["value"] = relative_error(value, reference_value)
    return errors


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """One measurement task (``time``, ``probe`` or ``exactness``), in this process."""
    kind, device = task["kind"], task["device"]
    if kind == "time":
        return time_task(task["optimizer"], task["steps"], task["method"], device)
    if kind == "probe":
        return probe_task(task["optimizer"], task["method"], device)
    if kind == "exactness":
        return exactness_task(task["optimizer"], task["steps"], task["methods"], device)
    raise ValueError(f"unknown worker task {kind!r}")


def worker_main(task_json: str) -> None:
    """Entry point of a worker: run one task, print its result as one JSON line on stdout."""
    print(json.dumps(run_task(json.loads(task_json))), flush=True)


# =============================================================================== driver side


#: ``--in-process``: run every task in the driver's process instead of a fresh interpreter.
IN_PROCESS = False


def run_worker(task: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Run one task in a fresh interpreter: ``{"ok": True, "result": ...}`` or the failure."""
    if IN_PROCESS:
        try:
            return {"ok": True, "result": run_task(task)}
        except Exception as error:  # reported in the table like a failed worker
            return {"ok": False, "error": f"{type(error).__name__}: {error}"}
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
        method_gpu_mb=column(lambda r: r.get("method_gpu_mb")),
        plan=results[0]["plan"],  # deterministic
        vjp=results[0].get("vjp"),
    )
    return summary


# ------------------------------------------------------------------------------- memory guard


def line_through(points: list[dict[str, Any]], key: str) -> tuple[float, float] | None:
    """``(intercept, slope)`` in MB and MB/step through the probe's two peaks, or ``None``.

    Both are clamped at 0: a noisy pair must not predict less memory for more steps.
    """
    (a, b) = points
    if a[key] is None or b[key] is None:
        return None
    slope = max(0.0, (b[key] - a[key]) / (b["steps"] - a["steps"]))
    intercept = max(0.0, b[key] - slope * b["steps"])
    return intercept, slope


def predict_peak(probe: dict[str, Any], steps: int) -> dict[str, float | None]:
    """Predicted peak extra RSS and GPU memory (MB) of the probed method at T = ``steps``."""
    prediction: dict[str, float | None] = {}
    for key in ("rss_mb", "gpu_mb"):
        fit = line_through(probe["points"], key)
        prediction[key] = None if fit is None else fit[0] + fit[1] * steps
        prediction[key.replace("_mb", "_mb_per_step")] = None if fit is None else fit[1]
    # The process's own RSS before the call counts against the machine's memory too.
    prediction["rss_before_mb"] = probe["points"][-1]["rss_before_mb"]
    return prediction


def memory_verdict(
    probe: dict[str, Any], steps: int, args: argparse.Namespace
) -> tuple[dict[str, Any], str | None]:
    """``(prediction, reason to skip or None)`` for one O(T)-memory cell."""
    prediction = predict_peak(probe, steps)
    rss_total = (prediction["rss_mb"] or 0.0) + (prediction["rss_before_mb"] or 0.0)
    prediction["rss_total_mb"] = rss_total
    if rss_total > args.memory_limit_gb * 1024:
        return prediction, (
            f"skipped: would need ~{rss_total / 1024:.1f} GB RAM "
            f"(limit {args.memory_limit_gb:.3g} GB)"
        )
    gpu = prediction["gpu_mb"]
    if gpu is not None:
        limit_gb = args.gpu_memory_limit_gb
        if limit_gb is None and probe.get("gpu_total_mb"):
            limit_gb = 0.9 * probe["gpu_total_mb"] / 1024
        prediction["gpu_limit_gb"] = limit_gb
        if limit_gb is not None and gpu > limit_gb * 1024:
            return prediction, (
                f"skipped: would need ~{gpu / 1024:.1f} GB GPU memory (limit {limit_gb:.3g} GB)"
            )
    return prediction, None


class MemoryGuard:
    """Probes each O(T)-memory method once per optimizer and answers "run this cell?"."""

    def __init__(self, args: argparse.Namespace, log: Callable[[str], None]) -> None:
        self.args = args
        self.log = log
        self.probes: dict[tuple[str, str], dict[str, Any]] = {}

    def check(self, optimizer: str, method: str, steps: int) -> tuple[dict | None, str | None]:
        """``(prediction or None, skip reason or None)``; probes only where T is past the probe."""
        if method not in UNROLLED_METHODS or steps <= PROBE_STEPS[-1]:
            return None, None
        key = (optimizer, method)
        if key not in self.probes:
            self.log(f"{optimizer} {method}: memory probe at T={', '.join(map(str, PROBE_STEPS))}")
            task = {"kind": "probe", "optimizer": optimizer, "method": method,
                    "device": self.args.device}
            self.probes[key] = run_worker(task, self.args.timeout)
        probe = self.probes[key]
        if not probe["ok"]:
            # No prediction: run the cell anyway; the worker's own failure will be reported.
            self.log(f"{optimizer} {method}: memory probe FAILED {probe['error']}")
            return None, None
        prediction, reason = memory_verdict(probe["result"], steps, self.args)
        return prediction, reason


# ------------------------------------------------------------------------------- environment


def _first_line(path: str, prefix: str) -> str | None:
    """The value of the first ``prefix: value`` line of a file (``/proc`` files)."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def default_memory_limit_gb() -> float | None:
    """60% of the machine's memory (``MemTotal``), in GB; ``None`` without ``/proc/meminfo``."""
    total = _first_line("/proc/meminfo", "MemTotal")  # e.g. "24567892 kB"
    if total is None:
        return None
    return 0.6 * int(total.split()[0]) * 1024 / GIB


def environment(device: str) -> dict[str, Any]:
    """Versions and hardware, for the results file."""
    import importlib.metadata

    import numpy
    import torch

    import mgd

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    gpu = None
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {
        "cpu": _first_line("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "memory_total": _first_line("/proc/meminfo", "MemTotal"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "mgd": mgd.__version__,
        "higher": version("higher"),
        "torchopt": version("torchopt"),
        "device": device,
        "gpu": gpu,
        "engine_named_vjps": engine_takes_vjp_names(),
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
    if row["method"] == REFERENCE and errors is not None:
        return "reference"
    if not errors:
        return "-"
    if "error" in errors:
        return "failed: " + errors["error"][:60]
    # An exact 0 means bit-identical gradients; print it as such.
    cells = ("0" if errors[name] == 0 else _fmt(errors[name], ".1e") for name in METAPARAMS)
    return " / ".join(cells)


def _peer_cell(row: dict[str, Any]) -> str:
    versus = row.get("vs_fastest_peer")
    if not versus:
        return "-"
    return f"{versus['speedup']:.2f} ({versus['peer']})"


def mark_fastest_peer(rows: list[dict[str, Any]]) -> None:
    """Give every timed row of one (optimizer, T) group its speed-up over the fastest peer.

    Speed-up = the fastest peer's "÷ ours" ratio / this row's "÷ ours" ratio (same-process
    ratios, so a machine that drifts between processes does not bias it).
    """
    timed = [r for r in rows if r.get("status") == "ok" and r.get("ratio_train") is not None]
    peers = [r for r in timed if r["method"] in PEERS]
    if not peers:
        return
    fastest = min(peers, key=lambda r: r["ratio_train"])
    for row in timed:
        row["vs_fastest_peer"] = {
            "peer": fastest["method"],
            "speedup": fastest["ratio_train"] / row["ratio_train"],
        }


def header(gpu: bool) -> tuple[str, ...]:
    return (
        "opt", "T", "method", "metagrad s", "train s (ours / torch.optim)",
        "÷ ours", "÷ torch.optim", "fastest peer ÷ this", "extra MB", "train MB",
        "above train MB", *(("GPU MB",) if gpu else ()), "replay plan", "rel. err. lr / w",
    )


def table_rows(rows: list[dict[str, Any]], gpu: bool) -> list[tuple[str, ...]]:
    """One tuple of cells per result row."""
    width = len(header(gpu))
    out = []
    for row in rows:
        method = row["method"]
        if row["status"] in ("skipped", "failed"):
            if row["status"] == "skipped":
                text = row["note"]
            else:
                text = "failed: " + (row["failures"][0]["error"][:80] if row["failures"] else "?")
            out.append((row["optimizer"], str(row["steps"]), method, text, *["-"] * (width - 4)))
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
            _peer_cell(row),
            _fmt(row["method_mb"], ".1f"),
            _fmt(row["train_mb"], ".1f"),
            _fmt(row["above_train_mb"], ".1f"),
            *((_fmt(row.get("method_gpu_mb"), ".1f"),) if gpu else ()),
            _plan_cell(row["plan"]),
            _exactness_cell(row),
        ))
    return out


def format_table(rows: list[dict[str, Any]], markdown: bool, gpu: bool = False) -> str:
    """A Markdown table, or aligned plain text."""
    head = header(gpu)
    cells = [head, *table_rows(rows, gpu)]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        lines.insert(1, "|" + "|".join("---" for _ in head) + "|")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


# ------------------------------------------------------------------------------- main


def _list_arg(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """Parse ``"a,b"`` into a list (used with ``nargs="+"``, so ``a b`` works too)."""
    return lambda text: [kind(part) for part in text.split(",") if part.strip()]


def _flatten(values: list[list]) -> list:
    return [v for group in values for v in group]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time and memory of one exact metagradient on the digits MLP, vs training "
                    "and vs the peer libraries.",
    )
    parser.add_argument("--steps", nargs="+", type=_list_arg(int),
                        help=f"horizons T (default {' '.join(map(str, DEFAULTS['steps']))})")
    parser.add_argument("--optimizers", nargs="+", type=_list_arg(str),
                        help=f"inner optimizers, from {', '.join(OPTIMIZERS)} (default: all)")
    parser.add_argument("--methods", nargs="+", type=_list_arg(str),
                        help=f"methods, from {', '.join(METHODS)} (default: all whose "
                             "library is installed)")
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"],
                        help="fresh subprocesses per cell; medians are reported (default 3)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:N; data, model and every method run there "
                             "(default cpu)")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="skip a cell whose predicted RSS exceeds this (default: 60%% of "
                             "MemTotal)")
    parser.add_argument("--gpu-memory-limit-gb", type=float, default=None,
                        help="on CUDA, skip a cell whose predicted GPU memory exceeds this "
                             "(default: 90%% of the GPU's memory)")
    parser.add_argument("--max-unroll-steps", type=int, default=None,
                        help=f"skip the methods that store the whole run "
                             f"({', '.join(UNROLLED_METHODS)}) for T above this "
                             "(default: no limit)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every measurement in this process instead of a fresh one each "
                             "(for CUDA, where starting a process costs ~15 s; RSS numbers are then "
                             "less isolated, GPU memory numbers are not affected)")
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
    if args.methods:
        args.methods = _flatten(args.methods)
        args.dropped_methods = {}
    else:
        # Without the bench extra, the default leaves the peers out (and says so).
        args.dropped_methods = missing_libraries(DEFAULTS["methods"])
        args.methods = [m for m in DEFAULTS["methods"] if m not in args.dropped_methods]
    for name, chosen, allowed in (("optimizer", args.optimizers, OPTIMIZERS),
                                  ("method", args.methods, METHODS)):
        unknown = [c for c in chosen if c not in allowed]
        if unknown:
            parser.error(
                f"unknown {name}(s) {', '.join(unknown)}; choose from {', '.join(allowed)}"
            )
    missing = missing_libraries(args.methods)
    if missing:
        parser.error(
            f"{', '.join(missing)} need(s) {', '.join(sorted(set(missing.values())))}: "
            'pip install -e ".[bench]" (or leave them out of --methods)'
        )
    if any(t < 1 for t in args.steps):
        parser.error("--steps must be positive")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no GPU")
    if args.memory_limit_gb is None:
        args.memory_limit_gb = default_memory_limit_gb() or float("inf")
    for flag in ("memory_limit_gb", "gpu_memory_limit_gb"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    return args


def run_exactness(
    optimizer: str, steps: int, methods: list[str], args: argparse.Namespace,
    log: Callable[[str], None],
) -> tuple[dict | None, str | None]:
    """``(per-method errors, failure)`` of the float64 check, or ``(None, None)`` if not run."""
    checked = [m for m in methods if m != REFERENCE]
    if not checked or steps > EXACTNESS_MAX_STEPS:
        return None, None
    log(f"{optimizer} T={steps}: exactness (float64) of {', '.join(checked)}")
    task = {"kind": "exactness", "optimizer": optimizer, "steps": steps, "methods": checked,
            "device": args.device}
    run = run_worker(task, args.timeout)
    if not run["ok"]:
        log(f"{optimizer} T={steps}: exactness FAILED {run['error']}")
        return None, run["error"]
    for method, errors in run["result"].items():
        if "error" in errors:
            log(f"{optimizer} T={steps}: exactness of {method} FAILED {errors['error']}")
        else:
            log(f"{optimizer} T={steps}: {method} rel. err. lr {errors['lr']:.2e}, "
                f"w {errors['data_weights']:.2e}")
    return run["result"], None


def run_group(
    optimizer: str, steps: int, args: argparse.Namespace, guard: MemoryGuard,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """All methods for one (optimizer, T): skips, the exactness check, then the timed repeats."""
    skips: dict[str, str] = {}
    predictions: dict[str, dict] = {}
    for method in args.methods:
        limit = args.max_unroll_steps
        if method in UNROLLED_METHODS and limit is not None and steps > limit:
            skips[method] = f"skipped (T > --max-unroll-steps {limit})"
            continue
        prediction, reason = guard.check(optimizer, method, steps)
        if prediction is not None:
            predictions[method] = prediction
        if reason is not None:
            skips[method] = reason
            log(f"{optimizer} T={steps} {method}: {reason}")
    active = [m for m in args.methods if m not in skips]

    # Exactness, once per group, in float64; it needs the full unroll as its reference.
    exactness, exactness_error = None, None
    if REFERENCE not in skips:
        exactness, exactness_error = run_exactness(optimizer, steps, active, args, log)

    # Repeats outermost, so that slow drifts of the machine hit every method alike.
    runs: dict[str, list] = {m: [] for m in active}
    for repeat in range(args.repeats):
        for method in active:
            task = {"kind": "time", "optimizer": optimizer, "steps": steps, "method": method,
                    "device": args.device}
            run = run_worker(task, args.timeout)
            runs[method].append(run)
            label = f"{optimizer} T={steps} {method} [{repeat + 1}/{args.repeats}]"
            if run["ok"]:
                r = run["result"]
                gpu = r.get("method_gpu_mb")
                log(f"{label}: {r['method_s']:.3g} s = {r['method_s'] / r['train_s']:.2f}x "
                    f"training, +{_fmt(r['method_mb'], '.1f')} MB"
                    + ("" if gpu is None else f", GPU +{gpu:.1f} MB"))
            else:
                log(f"{label}: FAILED {run['error']}")

    rows = []
    for method in args.methods:
        row: dict[str, Any] = {"optimizer": optimizer, "steps": steps, "method": method}
        if method in predictions:
            row["memory_prediction"] = predictions[method]
        if method in skips:
            row.update(status="skipped", note=skips[method])
        else:
            row.update(summarize(runs[method]))
            if exactness is None:
                row["exactness"] = None
            elif method == REFERENCE:
                row["exactness"] = {"reference": True}
            else:
                row["exactness"] = exactness.get(method)
            if exactness_error is not None:
                row["exactness_error"] = exactness_error
        rows.append(row)
    mark_fastest_peer(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return 0
    global IN_PROCESS
    IN_PROCESS = args.in_process

    from mgd.io import write_json

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    if args.dropped_methods:
        log(f"left out {', '.join(args.dropped_methods)}: not installed "
            '(pip install -e ".[bench]")')
    settings = {
        "steps": args.steps,
        "optimizers": {name: OPTIMIZERS[name] for name in args.optimizers},
        "methods": args.methods,
        "repeats": args.repeats,
        "device": args.device,
        "in_process": args.in_process,
        "max_unroll_steps": args.max_unroll_steps,
        "memory_limit_gb": args.memory_limit_gb,
        "gpu_memory_limit_gb": args.gpu_memory_limit_gb,
        "memory_probe_steps": list(PROBE_STEPS),
        "dataset": "digits",
        "model": MODEL,
        "batch_size": BATCH_SIZE,
        "seed": SEED,
        "metaparams": list(METAPARAMS),
        "dtype": "float32",
        "exactness": f"float64, T <= {EXACTNESS_MAX_STEPS}, against {REFERENCE}",
        "peers": list(PEERS),
    }
    report: dict[str, Any] = {
        "benchmark": "bench_grad",
        "argv": sys.argv[1:],
        "settings": settings,
        "environment": environment(args.device),
        "rows": [],
    }
    guard = MemoryGuard(args, log)
    for optimizer in args.optimizers:
        for steps in args.steps:
            report["rows"].extend(run_group(optimizer, steps, args, guard, log))
            if args.out is not None:  # after every group, so a long run leaves partial results
                write_json(args.out, report)

    report["memory_probes"] = {
        f"{opt}/{method}": probe for (opt, method), probe in guard.probes.items()
    }
    report["total_s"] = time.perf_counter() - started
    if args.out is not None:
        write_json(args.out, report)
        log(f"wrote {args.out}")
    gpu = args.device.startswith("cuda")
    print(format_table(report["rows"], markdown=args.markdown, gpu=gpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
