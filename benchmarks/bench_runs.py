#!/usr/bin/env python
"""bench_runs: what an exact metagradient costs on real training runs (issue "Any PyTorch training run").

What it measures
----------------
For each (problem, optimizer, T, method) cell: the metagradient's wall time next to ``mgd``'s
own training of the same run in the same process (``run.run()``), their ratio, and the peak
resident memory the metagradient needs above training. CPU, float32, one torch thread
(``OMP/MKL/OPENBLAS_NUM_THREADS=1`` too). Horizons ``--steps`` (default T = 300 and 1000).

Problems (``--problems``):

* ``cnn``: the ResNet-9-style CNN of ``examples/cifar_resnet.py`` (``build(...)``: conv →
  BatchNorm → ReLU blocks, i.e. BatchNorm *before* the activation, two residual blocks,
  average pooling, logits times 0.1; ``RandomCropFlip`` crop + flip augmentation drawn per
  step) at width 8 (channels 8-16-32-64, ~104k parameters; ``--cnn-width``) on synthetic
  CIFAR-10-format binary data (the example's ``write_synthetic_cifar``: 1024 train + 256 val
  records) with SGD, Nesterov momentum 0.9, lr 0.1, weight decay 5e-4, batch 32. Where the
  example is missing or its ``build`` fails, ``--cnn-source auto`` (the default) falls back to
  the same network defined here (``resnet9``) on in-memory synthetic 3x32x32 data with
  ``mgd.images.RandomCropFlip``; the results file says which ran (``problem_info.source``,
  and ``why_builtin``).
* ``lm``: exactly the problem of ``benchmarks/peer_bergson.py`` (``make_problem(0, T)``): the
  2-layer GPT-2 (118,528 parameters, untied, no dropout), its 256 training and 64 query
  sequences of 32 tokens, bergson's batch order (passed as ``batch_order=``), batch 16. The
  per-sequence loss ``mgd.losses.causal_lm(mask=None)`` on ``{"input_ids": x, "labels": x}``
  is bergson's weighted mean cross-entropy (all sequences have equal length); the objective
  is the mean query next-token loss. Optimizers: AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8,
  eps_root 1e-16, weight decay 0.01) and SGD (lr 0.1, momentum 0.9), the harness's
  ``OPTIMIZERS``. Before the LM cells a check (fresh process, T = 3) compares our validation
  objective after training with the torch reference (``peer_bergson.full_unroll_reference``,
  float32) and with bergson's (tolerance 1e-5 relative), bergson's float32 data-weight
  metagradient with ours, and our float64 metagradient with the float64 full-unroll
  reference; a failed check makes the script exit with status 1.
* ``lm-lora``: the same LM with a peft LoRA adapter (r = 4, alpha 8, ``target_modules=
  ["c_attn"]``, ``fan_in_fan_out=True``, no LoRA dropout) on the frozen base; the same
  optimizers. The row reports ``state_bytes`` of one checkpoint (``run.init_state().nbytes()``)
  next to the adapter's parameters plus the optimizer's moments in bytes (they must be equal)
  and next to the full model's state bytes.

Metaparameters: per-example data weights and per-step LR multipliers (``data_weights``,
``lr``), both at all ones, both differentiated (bergson's MAGIC gives the data weights only).

Methods (``--methods``):

* ``mgd``: ``mgd.metagradient(run, objective)``, the default plan (lean two-level REPLAY tree,
  fused per-step VJP); the row gives the plan: ``k``, the peak of live checkpoints, of kept
  step graphs, the extra training passes and the VJP that ran;
* ``full-unroll``: ``mgd.check.full_unroll_metagradient``, store-everything autograd through
  one graph of the whole run (our reference). Its memory grows with T: it is probed once per
  (problem, optimizer) at T = 10 and 30 in a fresh process, and a cell whose straight-line
  projected peak exceeds ``--unroll-limit-gb`` (default 8 GB) is skipped with a note;
* ``bergson`` (``lm`` only): EleutherAI bergson 2.5.1's MAGIC through
  ``peer_bergson.run_bergson`` (its own warm-up, its ``Trainer.train`` as its training baseline,
  checkpoints written to a temporary folder with ``save_mode="sqrt"``).

How
---
Every cell runs ``--repeats`` times (default 1), each in a fresh interpreter (as
``bench_grad.py``; ``--in-process`` runs everything in the driver instead), which builds the
problem, warms up (training and the method at T = 3), then measures ``run.run()`` and the
method. Memory is peak RSS during a call minus RSS just before it (``/proc/self/clear_refs``
reset + ``VmHWM``, ``mgd._resources`` via ``bench_grad._measured``); "above train" subtracts
training's own peak extra RSS. Ratios are taken in one process, then the median over repeats.
For a bergson cell the same process first times ``mgd``'s ``run.run()``, then
``run_bergson``: its ratio against bergson's own training (``÷ own``) and against ``mgd``'s
training. "bergson ÷ mgd" on an ``mgd`` row is bergson's ``÷ own`` ratio divided by ``mgd``'s
ratio at the same (optimizer, T): how many times less overhead over its own training ``mgd``
adds (the JSON also has the same-baseline and the raw-seconds versions).

Columns: "train s" ``mgd``'s ``run.run()`` (bergson rows: and bergson's own training);
"metagrad s"; "÷ train" their ratio (bergson rows: also ``÷ own``); "extra MB" the
metagradient's peak RSS above the RSS before it; "above train MB" that minus training's own
peak extra RSS (bergson rows: also against bergson's training; bergson keeps its checkpoints
on disk, not in RAM, and the plan cell gives their size); "plan" ``k`` (or the tapered root's
segments), the peak numbers of live checkpoints and kept step graphs, the extra training
passes and the VJP; "bergson ÷ mgd" the speed-up above, with the relative difference of the
two float32 data-weight metagradients (``w Δ``); "state / notes" the parameters and
``state_bytes`` of one checkpoint (LoRA: against adapter + moments and the full model's).

Commands and results
--------------------
::

    make bench    # installs the hf and bench extras and bergson 2.5.1 (--no-deps), runs both benchmarks
    python benchmarks/bench_runs.py --markdown --out bench-runs.json          # everything (~1 h)
    python benchmarks/bench_runs.py --problems lm --methods mgd bergson --steps 300 1000 --markdown
    python benchmarks/bench_runs.py --problems cnn lm-lora --methods mgd full-unroll --markdown
    python benchmarks/bench_runs.py --smoke --markdown     # T = 4, tiny CNN, in one process (~1 min)

The full run's length is an estimate from T = 50 on 2 shared cores (LM: ~16 ms a training
step, metagradient ~4x training; the width-8 CNN ~0.1 s a step). ``--markdown`` prints a
Markdown table (else aligned text) and the LM check's lines; ``--out`` writes every row (with
its raw repeats), the checks, the memory probes, the settings and the environment (versions,
CPU) as JSON, after each group, so a long run leaves partial results. ``docs/benchmark.md``
quotes the table and the command that made it. Nothing else should run on the machine
meanwhile; compare the same-process ratios rather than raw seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # bergson's progress bars; read when tqdm is imported

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # bench_grad.py and peer_bergson.py sit next to this file

from bench_grad import (  # noqa: E402  (one thread, memory measurement, failures, formatting)
    _describe_failure,
    _flatten,
    _fmt,
    _list_arg,
    _measured,
    _median,
    _setup_torch,
    _unpack,
    environment,
    line_through,
)

# ------------------------------------------------------------------------------- settings

SEED = 0
WARMUP_STEPS = 3
CHECK_STEPS = 3
CHECK_RTOL = 1e-5  # float32 objectives after training must agree to this (relative)
PROBE_STEPS = (10, 30)  # full-unroll memory probe horizons
DEFAULT_STEPS = [300, 1000]
METHODS = ("mgd", "full-unroll", "bergson")
UNROLL = "full-unroll"
METAPARAMS = ["data_weights", "lr"]
#: Problems and the optimizers each runs with (``--optimizers`` filters them).
PROBLEMS: dict[str, tuple[str, ...]] = {
    "cnn": ("sgd-nesterov",),
    "lm": ("adamw", "sgd"),
    "lm-lora": ("adamw", "sgd"),
}
BERGSON_PROBLEMS = ("lm",)
#: The built-in ResNet-9-style problem (full size, and ``--smoke``).
CNN = {"width": 8, "n_train": 1024, "n_val": 256, "batch_size": 32, "lr": 0.1,
       "momentum": 0.9, "weight_decay": 5e-4, "padding": 4, "logit_scale": 0.1}
CNN_SMOKE = {**CNN, "width": 2, "n_train": 32, "n_val": 16, "batch_size": 8}
#: What ``examples/cifar_resnet.py:build`` is given of those, where it takes them.
EXAMPLE_OPTIONS = ("width", "n_train", "n_val", "batch_size", "lr", "momentum", "weight_decay")
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "lora_dropout": 0.0,
        "fan_in_fan_out": True}
MIB = 1024 * 1024


# =============================================================================== worker side


def _peer_bergson() -> Any:
    import peer_bergson

    return peer_bergson


def _bergson(**kwargs: Any) -> dict[str, Any]:
    """``peer_bergson.run_bergson(**kwargs)`` with its progress bars (stderr) swallowed."""
    with contextlib.redirect_stderr(io.StringIO()):
        return _peer_bergson().run_bergson(**kwargs)


# ------------------------------------------------------------------------------- the CNN


def resnet9(width: int, num_classes: int = 10, logit_scale: float = 0.1) -> Any:
    """ResNet-9 (Page's layout) with BatchNorm before ReLU and average pooling, logits scaled."""
    from torch import nn

    from mgd.models import Scale

    def block(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        return nn.Sequential(*layers, *([nn.AvgPool2d(2)] if pool else []))

    class Skip(nn.Sequential):  # x + layers(x)
        def forward(self, x):
            return x + super().forward(x)

    w = width
    return nn.Sequential(
        block(3, w), block(w, 2 * w, pool=True), Skip(block(2 * w, 2 * w), block(2 * w, 2 * w)),
        block(2 * w, 4 * w, pool=True), block(4 * w, 8 * w, pool=True),
        Skip(block(8 * w, 8 * w), block(8 * w, 8 * w)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, num_classes), Scale(logit_scale),
    )


def synthetic_cifar(n: int, seed: int) -> tuple[Any, Any]:
    """``(x (n, 3, 32, 32) in [0, 1], y (n,))``: a smooth random template per class plus noise."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(10, 3, 4, 4, generator=g), size=32, mode="bilinear",
                              align_corners=False)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (0.6 * templates[y] + 0.4 * torch.rand(n, 3, 32, 32, generator=g)).clamp(0.0, 1.0)
    return x, y


def _builtin_cnn(steps: int, settings: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    import torch

    import mgd
    from mgd.images import RandomCropFlip

    n_train = settings["n_train"]
    x, y = synthetic_cifar(n_train + settings["n_val"], SEED + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = resnet9(settings["width"], logit_scale=settings["logit_scale"])
    run = mgd.make_run(
        model, optimizer=mgd.SGD(momentum=settings["momentum"], nesterov=True),
        data=(x[:n_train], y[:n_train]), steps=steps, batch_size=settings["batch_size"],
        lr=settings["lr"], weight_decay=settings["weight_decay"], seed=SEED,
        augment=RandomCropFlip(padding=settings["padding"], field=0), metaparams=METAPARAMS,
    )
    objective = mgd.Objective(run.stateless, (x[n_train:], y[n_train:]), batch_size=256)
    return run, objective, {"source": "bench_runs.resnet9 on synthetic CIFAR-format data",
                            "settings": settings}


def _example_cnn(steps: int, settings: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]] | str:
    """The task of ``examples/cifar_resnet.py:build`` with ``settings``, or why it is unusable.

    The example's own synthetic data set is small (200 records); where the module offers
    ``write_synthetic_cifar`` and ``build`` takes ``data=``, a synthetic CIFAR-10 binary
    folder with ``n_train + n_val`` records is written to a temporary folder for it.
    """
    import atexit
    import shutil
    import tempfile

    import torch

    from mgd.task import TaskFunction, _as_task

    path = ROOT / "examples" / "cifar_resnet.py"
    if not path.is_file():
        return "examples/cifar_resnet.py does not exist"
    try:
        build = TaskFunction(f"{path}:build")
        options = {"seed": SEED, "steps": steps, "dtype": torch.float32, "device": torch.device("cpu"),
                   "n_test": 0, **{k: settings[k] for k in EXAMPLE_OPTIONS}}
        writer = getattr(sys.modules.get(build.function.__module__), "write_synthetic_cifar", None)
        if writer is not None and build.accepts("data"):
            folder = tempfile.mkdtemp(prefix="bench_runs_cifar_")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            options["data"] = str(writer(folder, train=settings["n_train"] + settings["n_val"],
                                         test=16, seed=SEED))
        passed = {k: v for k, v in options.items() if build.accepts(k)}
        task = _as_task(build.function(**passed), "examples/cifar_resnet.py:build")
    except (Exception, SystemExit) as error:  # noqa: BLE001  (fall back to the built-in one)
        return f"examples/cifar_resnet.py:build unusable: {type(error).__name__}: {error}"[:300]
    shown = {k: v for k, v in passed.items() if k in EXAMPLE_OPTIONS or k == "steps"}
    return task.run, task.objective, {"source": "examples/cifar_resnet.py:build", "passed": shown,
                                      "synthetic_data": "data" in passed}


def build_cnn(steps: int, smoke: bool, source: str, width: int | None) -> tuple[Any, Any, dict]:
    settings = dict(CNN_SMOKE if smoke else CNN)
    if width is not None:
        settings["width"] = width
    fallback = None
    if source in ("auto", "example"):
        built = _example_cnn(steps, settings)
        if not isinstance(built, str):
            return built
        if source == "example":
            raise RuntimeError(built)
        fallback = built
    run, objective, info = _builtin_cnn(steps, settings)
    if fallback is not None:
        info["why_builtin"] = fallback
    return run, objective, info


# ------------------------------------------------------------------------------- the LM


def lm_optimizer(name: str) -> tuple[Any, float, float]:
    """``(mgd optimizer, lr, weight decay)`` for the harness's ``OPTIMIZERS[name]``."""
    import mgd

    hp = _peer_bergson().OPTIMIZERS[name]
    if name == "adamw":
        beta1, beta2 = hp["betas"]
        return mgd.Adam(beta1, beta2, hp["eps"], hp["eps_root"], decoupled=True), hp["lr"], hp["weight_decay"]
    return mgd.SGD(momentum=hp["momentum"]), hp["lr"], hp["weight_decay"]


def lm_run(model: Any, problem: Any, optimizer: str, steps: int) -> tuple[Any, Any]:
    """``(run, objective)``: bergson's LM problem as an ``mgd`` run (same batches, same loss)."""
    import mgd
    from mgd.losses import causal_lm

    pb = _peer_bergson()
    opt, lr, weight_decay = lm_optimizer(optimizer)
    loss = causal_lm(mask=None)  # (1/31) sum of next-token CEs: bergson's per-sequence mean
    run = mgd.make_run(
        model, optimizer=opt, data={"input_ids": problem.train, "labels": problem.train},
        steps=steps, batch_size=problem.batch_size, lr=lr, weight_decay=weight_decay, loss=loss,
        seed=SEED, batch_order=problem.batches.__getitem__, metaparams=METAPARAMS,
    )
    query = {"input_ids": problem.query, "labels": problem.query}
    return run, mgd.Objective(run.stateless, query, loss=loss, batch_size=pb.N_QUERY)


def add_lora(model: Any) -> Any:
    """``model`` wrapped with the LoRA adapter of ``LORA``; only the adapter is trainable."""
    import peft
    import torch

    config = peft.LoraConfig(task_type="CAUSAL_LM", **LORA)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(SEED + 3)  # lora_A's random initialisation
        return peft.get_peft_model(model, config)


def build_lm(optimizer: str, steps: int, lora: bool) -> tuple[Any, Any, dict[str, Any]]:
    pb = _peer_bergson()
    problem = pb.make_problem(SEED, steps)
    model = add_lora(problem.model) if lora else problem.model
    run, objective = lm_run(model, problem, optimizer, steps)
    state = run.init_state()
    info: dict[str, Any] = {"source": "peer_bergson.make_problem", "state_bytes": state.nbytes()}
    if lora:
        adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
        moments = len(state.opt_state)
        full_run, _ = lm_run(pb.make_model(SEED), problem, optimizer, steps)
        info.update(
            lora=LORA,
            adapter_params=adapter,
            base_params=sum(p.numel() for p in model.parameters() if not p.requires_grad),
            optimizer_moments=moments,
            adapter_plus_moments_bytes=(1 + moments) * adapter * state.params.element_size(),
            full_model_state_bytes=full_run.init_state().nbytes(),
        )
        info["state_matches_adapter"] = info["state_bytes"] == info["adapter_plus_moments_bytes"]
    return run, objective, info


def build_problem(task: dict[str, Any], steps: int) -> tuple[Any, Any, dict[str, Any]]:
    """``(run, objective, info)`` for the task's problem and optimizer at horizon ``steps``."""
    problem = task["problem"]
    if problem == "cnn":
        run, objective, info = build_cnn(steps, task["smoke"], task["cnn_source"], task["cnn_width"])
    else:
        run, objective, info = build_lm(task["optimizer"], steps, lora=problem == "lm-lora")
    info.setdefault("num_params", run.num_params)
    info.setdefault("state_bytes", run.init_state().nbytes())
    return run, objective, info


# ------------------------------------------------------------------------------- methods


def _method(name: str) -> Callable[[Any, Any], Any]:
    import mgd
    from mgd.check import full_unroll_metagradient

    if name == "mgd":
        return lambda run, objective: mgd.metagradient(run, objective)
    if name == UNROLL:
        return full_unroll_metagradient
    raise ValueError(f"no in-process method {name!r}")


def _train_measured(task: dict[str, Any], compute: Callable | None) -> tuple[Any, Any, dict, dict]:
    """Warm up at T = 3, build the run at T, time ``run.run()``: ``(run, objective, info, m)``."""
    run, objective, _ = build_problem(task, WARMUP_STEPS)
    run.run()
    if compute is not None:
        compute(run, objective)
    run, objective, info = build_problem(task, task["steps"])
    _, train = _measured(run.run, device="cpu")
    return run, objective, info, train


def _data_weight_list(grads: dict[str, Any], info: dict[str, Any]) -> list[float] | None:
    """The data-weight metagradient as a list, for the LM (256 numbers), else ``None``."""
    if info.get("source") != "peer_bergson.make_problem":
        return None
    return [float(v) for v in grads["data_weights"].reshape(-1)]


def time_task(task: dict[str, Any]) -> dict[str, Any]:
    """Training and one method (``mgd`` or ``full-unroll``) in this process."""
    _setup_torch()
    compute = _method(task["method"])
    run, objective, info, train = _train_measured(task, compute)
    result, meta = _measured(compute, run, objective, device="cpu")
    value, grads, plan, phases = _unpack(result)
    return {
        "train_s": train["seconds"],
        "train_mb": train["rss_mb"],
        "metagrad_s": meta["seconds"],
        "metagrad_mb": meta["rss_mb"],
        "rss_before_metagrad_mb": meta["rss_before_mb"],
        "ratio": meta["seconds"] / train["seconds"],
        "above_train_mb": _minus(meta["rss_mb"], train["rss_mb"]),
        "plan": plan,
        "vjp": getattr(result, "vjp", None),
        "engine_memory": dict(getattr(result, "memory", {}) or {}),
        "phases_s": phases,
        "value": value,
        "grad_norms": {name: float(g.norm()) for name, g in grads.items()},
        "data_weight_grad": _data_weight_list(grads, info),
        "problem_info": info,
    }


def bergson_task(task: dict[str, Any]) -> dict[str, Any]:
    """``mgd``'s training, then bergson's training and MAGIC metagradient, in this process."""
    _setup_torch()
    _, _, info, train = _train_measured(task, None)
    record = _bergson(optimizer=task["optimizer"], steps=task["steps"], seed=SEED, threads=1,
                      torch_baseline=False)
    grad = record.pop("data_weight_grad")
    own_train_mb = record.get("train_peak_rss_growth_mb")
    metagrad_mb = record.get("metagrad_peak_rss_growth_mb")
    return {
        "train_s": train["seconds"],
        "train_mb": train["rss_mb"],
        "metagrad_s": record["metagrad_s"],
        "metagrad_mb": metagrad_mb,
        "ratio": record["metagrad_s"] / train["seconds"],
        "above_train_mb": _minus(metagrad_mb, train["rss_mb"]),
        "own_train_s": record["train_s"],
        "own_train_mb": own_train_mb,
        "own_ratio": record["ratio"],
        "above_own_train_mb": _minus(metagrad_mb, own_train_mb),
        "checkpoint_disk_mb": record.get("checkpoint_disk_mb"),
        "phases_s": {k: record[k] for k in ("forward_s", "query_grad_s", "backward_s")},
        "value": record["val_loss"],
        "grad_norms": {"data_weights": float((grad**2).sum() ** 0.5)},
        "data_weight_grad": [float(v) for v in grad],
        "bergson": {k: v for k, v in record.items() if not isinstance(v, (list, dict))},
        "problem_info": info,
    }


def probe_task(task: dict[str, Any]) -> dict[str, Any]:
    """Peak extra RSS of the full unroll at ``PROBE_STEPS``, for the memory guard."""
    _setup_torch()
    compute = _method(UNROLL)
    run, objective, _ = build_problem(task, WARMUP_STEPS)
    compute(run, objective)
    points = []
    for steps in PROBE_STEPS:
        run, objective, _ = build_problem(task, steps)
        _, m = _measured(compute, run, objective, device="cpu")
        points.append({"steps": steps, **m})
        del run, objective
    return {"points": points}


def check_task(task: dict[str, Any]) -> dict[str, Any]:
    """The LM is bergson's: objectives after T = 3 steps and the metagradients agree."""
    import torch

    import mgd

    _setup_torch()
    pb = _peer_bergson()
    optimizer, steps = task["optimizer"], CHECK_STEPS
    run, objective, _ = build_lm(optimizer, steps, lora=False)
    final = run.run()
    with torch.no_grad():
        ours = float(objective(run.named_tensors(final.params, final.buffers)))
    ours_w = mgd.metagradient(run, objective).grads["data_weights"].numpy()
    reference = pb.full_unroll_reference(optimizer=optimizer, steps=steps, dtype=torch.float32)
    out: dict[str, Any] = {
        "steps": steps,
        "objective_mgd": ours,
        "objective_torch": reference["val_loss"],
        "rel_diff_torch": _rel(ours, reference["val_loss"]),
        "w_rel_diff_torch_f32": pb.relative_error(ours_w, reference["data_weight_grad"]),
    }
    checks = [out["rel_diff_torch"]]
    if task["with_bergson"]:
        record = _bergson(optimizer=optimizer, steps=steps, seed=SEED, threads=1, warmup_steps=0,
                          torch_baseline=False)
        out["objective_bergson"] = record["val_loss"]
        out["rel_diff_bergson"] = _rel(ours, record["val_loss"])
        out["w_rel_diff_bergson_f32"] = pb.relative_error(ours_w, record["data_weight_grad"])
        checks.append(out["rel_diff_bergson"])
    # float64: our metagradient against the harness's own full unroll.
    problem = pb.make_problem(SEED, steps)
    run64, objective64 = lm_run(problem.model.to(torch.float64), problem, optimizer, steps)
    ours64 = mgd.metagradient(run64, objective64).grads["data_weights"].numpy()
    reference64 = pb.full_unroll_reference(optimizer=optimizer, steps=steps, dtype=torch.float64)
    out["w_rel_err_f64"] = pb.relative_error(ours64, reference64["data_weight_grad"])
    out["ok"] = all(c <= CHECK_RTOL for c in checks) and out["w_rel_err_f64"] <= 1e-9
    return out


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


TASKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "time": time_task, "bergson": bergson_task, "probe": probe_task, "check": check_task,
}


# =============================================================================== driver side

IN_PROCESS = False


def _run_here(task: dict[str, Any]) -> dict[str, Any]:
    """``--in-process``: the task in the driver; an exception is reported like a failed worker."""
    try:
        result = TASKS[task["kind"]](task)
    except Exception as error:  # noqa: BLE001
        return {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
    return {"ok": True, "result": result}


def run_worker(task: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """One task in a fresh interpreter (or here with ``--in-process``): ok + result, or why not."""
    if IN_PROCESS:
        return _run_here(task)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:g} s"}
    if done.returncode:
        return {"ok": False, **_describe_failure(done.returncode, done.stderr)}
    last = ([line for line in done.stdout.splitlines() if line.strip()] or [""])[-1]
    try:
        return {"ok": True, "result": json.loads(last)}
    except json.JSONDecodeError:
        return {"ok": False, "error": f"no result line; stdout ends {done.stdout[-300:]!r}"}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the numeric fields over the successful repeats (per-process ratios first)."""
    results = [r["result"] for r in runs if r["ok"]]
    row: dict[str, Any] = {
        "status": "ok" if results else "failed",
        "runs_ok": len(results),
        "runs": len(runs),
        "failures": [{k: v for k, v in r.items() if k != "ok"} for r in runs if not r["ok"]],
    }
    if not results:
        return row
    for key, first in results[0].items():
        numeric = isinstance(first, (int, float)) and not isinstance(first, bool)
        row[key] = _median([r.get(key) for r in results]) if numeric else first
    row["raw"] = [{k: v for k, v in r.items() if k != "data_weight_grad"} for r in results]
    return row


def _relative_difference(a: list[float] | None, b: list[float] | None) -> float | None:
    if not a or not b:
        return None
    diff = sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5
    norm = sum(y * y for y in b) ** 0.5
    return diff / norm if norm else None


def compare(rows: list[dict[str, Any]]) -> None:
    """Give the ``mgd`` row of a group its speed-up over bergson and over the full unroll."""
    ok = {r["method"]: r for r in rows if r["status"] == "ok"}
    ours = ok.get("mgd")
    if ours is None:
        return
    peer = ok.get("bergson")
    if peer is not None:
        ours["vs_bergson"] = {
            "speedup": peer["own_ratio"] / ours["ratio"],
            "speedup_same_baseline": peer["ratio"] / ours["ratio"],
            "seconds_speedup": peer["metagrad_s"] / ours["metagrad_s"],
            "data_weight_grad_rel_diff_f32": _relative_difference(
                ours.get("data_weight_grad"), peer.get("data_weight_grad")),
        }
    unroll = ok.get(UNROLL)
    if unroll is not None:
        ours["vs_full_unroll"] = {"speedup": unroll["ratio"] / ours["ratio"]}
        if unroll.get("above_train_mb") and ours.get("above_train_mb"):
            ours["vs_full_unroll"]["memory_ratio"] = unroll["above_train_mb"] / ours["above_train_mb"]


class UnrollGuard:
    """Probes the full unroll once per (problem, optimizer); skips cells projected too large."""

    def __init__(self, args: argparse.Namespace, log: Callable[[str], None]):
        self.args, self.log = args, log
        self.probes: dict[str, dict[str, Any]] = {}

    def verdict(self, task: dict[str, Any]) -> tuple[dict | None, str | None]:
        if task["steps"] <= PROBE_STEPS[-1]:
            return None, None
        key = f"{task['problem']}/{task['optimizer']}"
        if key not in self.probes:
            self.log(f"{key} full-unroll: memory probe at T={', '.join(map(str, PROBE_STEPS))}")
            self.probes[key] = run_worker({**task, "kind": "probe"}, self.args.timeout)
        probe = self.probes[key]
        if not probe["ok"]:
            self.log(f"{key} full-unroll: probe FAILED {probe['error']}")
            return None, None
        fit = line_through(probe["result"]["points"], "rss_mb")
        if fit is None:
            return None, None
        projected = fit[0] + fit[1] * task["steps"]
        prediction = {"rss_mb": projected, "rss_mb_per_step": fit[1]}
        if projected > self.args.unroll_limit_gb * 1024:
            return prediction, (f"skipped: projected ~{projected / 1024:.1f} GB above the process "
                                f"(from T={PROBE_STEPS[0]}/{PROBE_STEPS[1]}; limit "
                                f"{self.args.unroll_limit_gb:g} GB)")
        return prediction, None


def run_group(base: dict[str, Any], args: argparse.Namespace, guard: UnrollGuard,
              log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every method of one (problem, optimizer, T)."""
    methods = [m for m in args.methods if m != "bergson" or base["problem"] in BERGSON_PROBLEMS]
    label = f"{base['problem']} {base['optimizer']} T={base['steps']}"
    rows = []
    for method in methods:
        row: dict[str, Any] = {"problem": base["problem"], "optimizer": base["optimizer"],
                               "steps": base["steps"], "method": method}
        task = {**base, "method": method, "kind": "bergson" if method == "bergson" else "time"}
        if method == UNROLL:
            prediction, skip = guard.verdict(task)
            if prediction is not None:
                row["memory_prediction"] = prediction
            if skip is not None:
                log(f"{label} {method}: {skip}")
                rows.append({**row, "status": "skipped", "note": skip})
                continue
        runs = []
        for repeat in range(args.repeats):
            done = run_worker(task, args.timeout)
            runs.append(done)
            where = f"{label} {method} [{repeat + 1}/{args.repeats}]"
            if done["ok"]:
                r = done["result"]
                log(f"{where}: train {r['train_s']:.3g} s, metagradient {r['metagrad_s']:.3g} s = "
                    f"{r['ratio']:.2f}x, +{_fmt(r['above_train_mb'], '.1f')} MB above training")
            else:
                log(f"{where}: FAILED {done['error']}")
        rows.append({**row, **summarize(runs)})
    compare(rows)
    return rows


# ------------------------------------------------------------------------------- table

HEADER = ("problem", "opt", "T", "method", "train s", "metagrad s", "÷ train", "extra MB",
          "above train MB", "plan", "bergson ÷ mgd", "state / notes")


def _plan_cell(row: dict[str, Any]) -> str:
    if row["method"] == "bergson":
        return f"sqrt checkpoints, {_fmt(row.get('checkpoint_disk_mb'), '.1f')} MB on disk"
    plan = row.get("plan")
    if not plan:
        return "every step's graph"
    shape = f"tapered {plan['root']['segments']} segs" if plan.get("tapered") else f"k={plan['k']}"
    return (f"{shape} ckpts={plan['max_live_checkpoints']} graphs={plan['max_live_graphs']} "
            f"+{plan['extra_passes']:.2f} runs {row.get('vjp')}")


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / MIB:.2f} MB" if n >= MIB else f"{n / 1024:.1f} KB"


def _notes_cell(row: dict[str, Any]) -> str:
    info = row.get("problem_info") or {}
    if "adapter_plus_moments_bytes" in info:
        same = "=" if info["state_matches_adapter"] else "≠ (MISMATCH)"
        return (f"state {_bytes(info['state_bytes'])} {same} adapter {info['adapter_params']} "
                f"params + {info['optimizer_moments']} moments; full model "
                f"{_bytes(info['full_model_state_bytes'])}")
    text = f"{info.get('num_params', '?')} params, state {_bytes(info.get('state_bytes'))}"
    if row["problem"] == "cnn":
        text += "; " + ("examples/cifar_resnet.py" if info.get("source", "").startswith("examples/")
                        else "built-in resnet9")
    return text


def _versus_cell(versus: dict[str, Any] | None) -> str:
    """``speed-up (w Δ rel. difference of the two data-weight metagradients, float32)``."""
    if versus is None:
        return "-"
    diff = versus.get("data_weight_grad_rel_diff_f32")
    return f"{versus['speedup']:.2f}" + ("" if diff is None else f" (w Δ {diff:.1e})")


def table_rows(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    out = []
    for row in rows:
        head = (row["problem"], row["optimizer"], str(row["steps"]), row["method"])
        if row["status"] != "ok":
            text = row.get("note") or "failed: " + (row["failures"][0]["error"][:90] if row.get("failures") else "?")
            out.append((*head, text, *["-"] * (len(HEADER) - len(head) - 1)))
            continue
        bergson = row["method"] == "bergson"
        train = _fmt(row["train_s"], ".3g") + (f" (own {row['own_train_s']:.3g})" if bergson else "")
        ratio = _fmt(row["ratio"], ".2f") + (f" (÷ own {row['own_ratio']:.2f})" if bergson else "")
        above = _fmt(row["above_train_mb"], ".1f")
        if bergson:
            above += f" (own {_fmt(row['above_own_train_mb'], '.1f')})"
        out.append((*head, train, _fmt(row["metagrad_s"], ".3g"), ratio, _fmt(row["metagrad_mb"], ".1f"),
                    above, _plan_cell(row), _versus_cell(row.get("vs_bergson")), _notes_cell(row)))
    return out


def format_table(rows: list[dict[str, Any]], markdown: bool) -> str:
    cells = [HEADER, *table_rows(rows)]
    if markdown:
        lines = [f"| {' | '.join(r)} |" for r in cells]
        return "\n".join([lines[0], "|" + "---|" * len(HEADER), *lines[1:]])
    widths = [max(len(r[i]) for r in cells) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def format_checks(checks: dict[str, dict[str, Any]]) -> str:
    lines = []
    for optimizer, check in checks.items():
        if "error" in check:
            lines.append(f"* LM check {optimizer}: FAILED {check['error']}")
            continue
        text = (f"* LM check {optimizer} (T={check['steps']}, float32): objective mgd "
                f"{check['objective_mgd']:.7f}, torch {check['objective_torch']:.7f} "
                f"(rel. {check['rel_diff_torch']:.1e})")
        if "objective_bergson" in check:
            text += (f", bergson {check['objective_bergson']:.7f} (rel. {check['rel_diff_bergson']:.1e});"
                     f" data-weight metagradient vs bergson rel. {check['w_rel_diff_bergson_f32']:.1e}")
        text += (f"; float64 vs full unroll rel. err. {check['w_rel_err_f64']:.1e}: "
                 + ("ok" if check["ok"] else "MISMATCH"))
        lines.append(text)
    return "\n".join(lines)


# ------------------------------------------------------------------------------- main


def _versions() -> dict[str, str | None]:
    import importlib.metadata

    found = {}
    for package in ("transformers", "peft", "bergson", "torchopt", "datasets"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Metagradient ÷ training time and memory above training on a ResNet-9-style "
                    "CNN, bergson's GPT-2 LM and its LoRA variant; mgd vs full unroll vs bergson.")
    parser.add_argument("--steps", nargs="+", type=_list_arg(int),
                        help=f"horizons T (default {' '.join(map(str, DEFAULT_STEPS))})")
    parser.add_argument("--problems", nargs="+", type=_list_arg(str),
                        help=f"from {', '.join(PROBLEMS)} (default: all)")
    parser.add_argument("--optimizers", nargs="+", type=_list_arg(str),
                        help="keep only these optimizers (cnn: sgd-nesterov; lm, lm-lora: adamw, sgd)")
    parser.add_argument("--methods", nargs="+", type=_list_arg(str),
                        help=f"from {', '.join(METHODS)} (default: all; bergson runs on lm only)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per cell (median)")
    parser.add_argument("--unroll-limit-gb", type=float, default=8.0,
                        help="skip full-unroll cells projected above this many GB (default 8)")
    parser.add_argument("--cnn-source", choices=("auto", "example", "builtin"), default="auto",
                        help="cnn problem: examples/cifar_resnet.py:build if usable (auto), "
                             "always it (example), or the built-in ResNet-9 (builtin)")
    parser.add_argument("--cnn-width", type=int, default=None,
                        help=f"ResNet-9 base width (default {CNN['width']}; {CNN_SMOKE['width']} with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="T=4, the tiny CNN, everything in this process (a quick test)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every measurement in this process (less isolated memory numbers)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before a worker is killed")
    parser.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--worker", metavar="TASK_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return args
    args.steps = _flatten(args.steps) if args.steps else ([4] if args.smoke else DEFAULT_STEPS)
    args.problems = _flatten(args.problems) if args.problems else list(PROBLEMS)
    args.methods = _flatten(args.methods) if args.methods else list(METHODS)
    known = sorted({o for opts in PROBLEMS.values() for o in opts})
    args.optimizers = _flatten(args.optimizers) if args.optimizers else known
    for name, chosen, allowed in (("problem", args.problems, PROBLEMS), ("method", args.methods, METHODS),
                                  ("optimizer", args.optimizers, known)):
        unknown = [c for c in chosen if c not in allowed]
        if unknown:
            parser.error(f"unknown {name}(s) {', '.join(unknown)}; choose from {', '.join(allowed)}")
    if any(t < 1 for t in args.steps) or args.repeats < 1:
        parser.error("--steps and --repeats must be positive")
    args.in_process = args.in_process or args.smoke
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        task = json.loads(args.worker)
        print(json.dumps(TASKS[task["kind"]](task)), flush=True)
        return 0
    global IN_PROCESS
    IN_PROCESS = args.in_process
    if IN_PROCESS:
        _setup_torch()

    from mgd.io import write_json

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    report: dict[str, Any] = {
        "benchmark": "bench_runs",
        "argv": sys.argv[1:],
        "settings": {
            "steps": args.steps, "problems": args.problems, "optimizers": args.optimizers,
            "methods": args.methods, "repeats": args.repeats, "smoke": args.smoke,
            "in_process": args.in_process, "unroll_limit_gb": args.unroll_limit_gb,
            "probe_steps": list(PROBE_STEPS), "warmup_steps": WARMUP_STEPS, "seed": SEED,
            "metaparams": METAPARAMS, "dtype": "float32", "device": "cpu", "torch_threads": 1,
            "cnn": {**(CNN_SMOKE if args.smoke else CNN), "source": args.cnn_source,
                    **({"width": args.cnn_width} if args.cnn_width else {})},
            "lora": LORA, "check_steps": CHECK_STEPS, "check_rtol": CHECK_RTOL,
        },
        "environment": {**environment("cpu"), **_versions()},
        "checks": {},
        "rows": [],
    }

    def save() -> None:
        if args.out is not None:
            write_json(args.out, report)

    failed_check = False
    if "lm" in args.problems or "lm-lora" in args.problems:
        for optimizer in (o for o in PROBLEMS["lm"] if o in args.optimizers):
            log(f"lm {optimizer}: check at T={CHECK_STEPS} (ours vs torch"
                + (" vs bergson)" if "bergson" in args.methods else ")"))
            done = run_worker({"kind": "check", "optimizer": optimizer,
                               "with_bergson": "bergson" in args.methods}, args.timeout)
            check = done["result"] if done["ok"] else {"error": done["error"], "ok": False}
            report["checks"][optimizer] = check
            failed_check |= not check["ok"]
            log(format_checks({optimizer: check})[2:])
        save()

    guard = UnrollGuard(args, log)
    for problem in args.problems:
        for optimizer in (o for o in PROBLEMS[problem] if o in args.optimizers):
            for steps in args.steps:
                base = {"problem": problem, "optimizer": optimizer, "steps": steps, "smoke": args.smoke,
                        "cnn_source": args.cnn_source, "cnn_width": args.cnn_width}
                report["rows"].extend(run_group(base, args, guard, log))
                save()

    report["memory_probes"] = guard.probes
    report["total_s"] = time.perf_counter() - started
    save()
    if args.out is not None:
        log(f"wrote {args.out}")
    print(format_table(report["rows"], markdown=args.markdown))
    if report["checks"]:
        print()
        print(format_checks(report["checks"]))
    mismatched = [r for r in report["rows"] if (r.get("problem_info") or {}).get("state_matches_adapter") is False]
    for row in mismatched:
        log(f"{row['problem']} {row['optimizer']} T={row['steps']}: state bytes are not adapter + moments")
    return 1 if failed_check or mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
