#!/usr/bin/env python
"""EleutherAI bergson's MAGIC (``bergson.magic``) as a peer: exact data-weight metagradients.

bergson 2.5.1's ``bergson.magic`` computes the exact gradient of a query loss with respect to
per-example training data weights by replaying a checkpointed training run backwards
(``Trainer.train`` with ``save_dir`` writes checkpoints with ``torch.distributed.checkpoint``,
``Trainer.backward`` re-materialises and differentiates each step). This module runs it on a
small GPT-2 language-modelling problem and times it next to bergson's own plain training run.

Install (on top of an existing torch; none of these pulls another torch)::

    pip install --no-deps bergson==2.5.1
    pip install datasets simple-parsing ml_dtypes petname jaxtyping optree graphviz scipy
    pip install --no-deps torchopt==0.7.3

The problem (``make_problem(seed, steps)``; import it to build the identical run elsewhere)
-------------------------------------------------------------------------------------------

* **Model**: ``transformers.GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64,
  vocab_size=128, n_positions=32, n_ctx=32, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
  tie_word_embeddings=False, attn_implementation="eager", bos/eos/pad_token_id=None))``,
  built under ``torch.random.fork_rng()`` after ``torch.manual_seed(seed)`` (transformers'
  own random init; 118,528 parameters, 29 tensors, no buffers), put in ``eval()`` mode,
  float32 (``run_bergson(dtype=torch.float64)`` / the reference cast it with ``.to``).
  Input and output embeddings are separate tensors (untied). bergson itself would load the
  model with ``attn_implementation="eager"`` too (its ``prepare_trainer``).
  ``make_problem(seed, steps, batch_size, **shape)`` resizes it: ``shape=LM100M`` (15 layers,
  12 heads, width 768: 106,540,800 parameters) is the same LM at the 100M scale
  (``benchmarks/bench_lm100m_bergson.py``); the data and the batch order do not change.
* **Data**: a seeded random bigram chain over the 128 tokens. With
  ``g = torch.Generator().manual_seed(seed + 1)``: ``P = softmax(3 * randn(128, 128, g), -1)``;
  320 first tokens ``randint(0, 128, (320,), g)``; then for positions 1..31, in order,
  ``multinomial(P[previous tokens], 1, generator=g)`` for all 320 rows at once. Rows 0..255 are
  the training set ``train`` (256, 32), rows 256..319 the query set ``query`` (64, 32), int64.
* **Batch order**: with ``h = torch.Generator().manual_seed(seed + 2)``, epochs are
  ``torch.randperm(256, generator=h)`` one after another, concatenated; step ``t`` (0-based)
  uses the training rows ``order[16 t : 16 t + 16]`` (batch 16, 16 steps per epoch). The order
  for T steps is the first T batches of the order for any larger T.
* **Training loss at step t** (bergson's ``weighted_causal_lm_ce``, ``reduction="mean"``):
  ``sum_{i in batch} w_i * sum_{s=0}^{30} CE(logits[i, s], x[i, s+1]) / (16 * 31)``, i.e.
  ``(1/B) sum_i w_i CE_i`` with ``CE_i`` the mean next-token cross-entropy of sequence ``i``;
  ``w`` (256,) are the data weights, all ones.
* **Inner optimizers** (``OPTIMIZERS``; torchopt's functional forms, which bergson uses):
  AdamW ``torchopt.adamw(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, eps_root=1e-16,
  weight_decay=0.01)``: ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``;
  ``p -= lr * (m/(1-b1^t) / (sqrt(v/(1-b2^t) + eps_root) + eps) + wd * p)`` (torch.optim.AdamW's
  formula plus ``eps_root`` inside the root, the placement ``mgd`` uses); SGD
  ``torchopt.sgd(lr=0.1, momentum=0.9)``: ``buf = g`` at the first step, then
  ``buf = 0.9 buf + g``; ``p -= lr * buf`` (torch.optim.SGD's). Constant learning rate, no
  clipping, no gradient accumulation.
* **Objective**: the mean next-token cross-entropy over the 64 query sequences (all 64*31
  tokens equally weighted) at the parameters after T steps; the metagradient is
  ``dObjective/dw`` at ``w = 1`` (256 numbers).

What is timed
-------------

``run_bergson`` warms up (training + metagradient at T = 3), then in the same process times

* ``train_s``: bergson's own plain training, ``Trainer.train(state, stream, inplace=True)``
  without checkpoints (``trace=False``) on the same ``DataStream``;
* ``torch_train_s`` (extra): a plain ``torch.optim.AdamW``/``SGD`` loop over an
  ``nn.Module`` copy with the same batches and loss, for scale;
* ``metagrad_s``: the full bergson metagradient: ``Trainer.train(..., save_dir=ckpts,
  save_mode="sqrt")`` (the forward with checkpoints), ``compute_query_gradients`` (query
  gradient at the final state, ``bergson.magic.cli``) and ``Trainer.backward(...)``, the way
  ``bergson.magic.cli.worker`` calls them; the three parts are also reported.

``ratio = metagrad_s / train_s``. Memory: ``peak_rss_mb`` is the process's peak RSS
(``VmHWM``) during the metagradient call, ``backward_peak_rss_growth_mb`` the peak RSS during
``Trainer.backward`` minus the RSS just before it (``/proc/self/clear_refs`` reset, as
``mgd._resources``), ``checkpoint_disk_mb`` the size of bergson's checkpoint folder after the
forward. Checkpoints go to ``workdir`` (a temporary folder by default).

Precision: bergson's ``DataStream`` makes float32 data weights; ``run_bergson`` replaces them
by ones of ``dtype``. torchopt computes Adam's bias correction ``1 - b^t`` in the *default*
dtype (``pow(float, int64 tensor)``), so for ``dtype=torch.float64`` ``run_bergson`` sets
``torch.set_default_dtype(torch.float64)`` around bergson's calls (``default_dtype_follows``);
without it AdamW's agreement with a float64 reference stops near 3e-5 (T = 8).

CLI: ``python benchmarks/peer_bergson.py --optimizer adamw --steps 100 [--check]`` prints one
JSON line (``--check`` adds bergson's float64 relative error against
``full_unroll_reference`` at ``--check-steps`` (8)).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import ctypes.util
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

__all__ = [
    "BATCH_SIZE",
    "LM100M",
    "N_QUERY",
    "N_TRAIN",
    "OPTIMIZERS",
    "SEQ_LEN",
    "SMALL",
    "VOCAB",
    "Problem",
    "full_unroll_reference",
    "make_batches",
    "make_config",
    "make_model",
    "make_problem",
    "make_tokens",
    "query_loss",
    "run_bergson",
    "train_loss",
]

VOCAB = 128
SEQ_LEN = 32
N_TRAIN = 256
N_QUERY = 64
BATCH_SIZE = 16

#: Inner-optimizer hyperparameters (``lr`` is overridable per call).
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "eps_root": 1e-16,
        "weight_decay": 0.01,
    },
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
}

# ------------------------------------------------------------------------------------ problem


#: The model's shape: ``make_config``'s defaults; ``LM100M`` is the same LM at 106.5M parameters.
SMALL = {"layers": 2, "heads": 2, "width": 64}
LM100M = {"layers": 15, "heads": 12, "width": 768}


def make_config(layers: int = 2, heads: int = 2, width: int = 64) -> Any:
    """The GPT-2 configuration (default 2 layers, 2 heads, width 64; vocab 128, context 32, untied)."""
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=layers,
        n_head=heads,
        n_embd=width,
        vocab_size=VOCAB,
        n_positions=SEQ_LEN,
        n_ctx=SEQ_LEN,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        attn_implementation="eager",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def make_model(seed: int = 0, **shape: int) -> torch.nn.Module:
    """``GPT2LMHeadModel(make_config(**shape))``, transformers' random init after ``manual_seed(seed)``.

    The global RNG is restored afterwards (``fork_rng``). float32, ``eval()`` mode.
    """
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(make_config(**shape))
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr(), "tied"
    return model


def make_tokens(seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(train (256, 32), query (64, 32))`` int64 token ids from a seeded random bigram chain."""
    g = torch.Generator().manual_seed(seed + 1)
    probs = torch.softmax(3.0 * torch.randn(VOCAB, VOCAB, generator=g), dim=-1)
    n = N_TRAIN + N_QUERY
    tokens = torch.empty(n, SEQ_LEN, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for s in range(1, SEQ_LEN):
        tokens[:, s] = torch.multinomial(probs[tokens[:, s - 1]], 1, generator=g).squeeze(1)
    return tokens[:N_TRAIN].clone(), tokens[N_TRAIN:].clone()


def make_batches(seed: int = 0, steps: int = 1000, batch_size: int = BATCH_SIZE) -> list[Tensor]:
    """Per-step training-row indices: consecutive ``randperm(256)`` epochs, ``batch_size`` rows a step."""
    h = torch.Generator().manual_seed(seed + 2)
    per_epoch = N_TRAIN // batch_size
    epochs = -(-steps // per_epoch)
    order = torch.cat([torch.randperm(N_TRAIN, generator=h) for _ in range(epochs)])
    return [order[t * batch_size : (t + 1) * batch_size].clone() for t in range(steps)]


class Problem(NamedTuple):
    model: torch.nn.Module
    train: Tensor  # (256, 32) int64
    query: Tensor  # (64, 32) int64
    batches: list[Tensor]  # steps x (batch size,) int64 rows of ``train``

    @property
    def batch_size(self) -> int:
        return len(self.batches[0])


def make_problem(
    seed: int = 0, steps: int = 1000, batch_size: int = BATCH_SIZE, **shape: int
) -> Problem:
    """``(model, train, query, batches)``; see the module docstring for the exact definition.

    ``shape`` (``layers``, ``heads``, ``width``) sizes the model; the data do not depend on it.
    """
    train, query = make_tokens(seed)
    return Problem(make_model(seed, **shape), train, query, make_batches(seed, steps, batch_size))


def _per_sequence_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """``(n, 31)`` next-token cross-entropies."""
    n, length, vocab = logits.shape
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1), reduction="none"
    ).view(n, length - 1)


def train_loss(logits: Tensor, tokens: Tensor, weights: Tensor) -> Tensor:
    """``sum_i w_i sum_s CE_is / (B * 31)``: bergson's weighted ``"mean"`` reduction."""
    ce = _per_sequence_ce(logits, tokens)
    return (ce * weights.to(ce.dtype)[:, None]).sum() / ce.numel()


def query_loss(model: torch.nn.Module, params: dict[str, Tensor] | None, query: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the query set (the objective)."""
    logits = (
        model(query).logits if params is None else functional_call(model, params, (query,)).logits
    )
    return _per_sequence_ce(logits, query).mean()


# ---------------------------------------------------------------------------------- reference


def _hyper(optimizer: str, lr: float | None) -> dict[str, Any]:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, not {optimizer!r}")
    hp = dict(OPTIMIZERS[optimizer])
    if lr is not None:
        hp["lr"] = lr
    return hp


def full_unroll_reference(
    *,
    optimizer: str,
    steps: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    lr: float | None = None,
    batch_size: int = BATCH_SIZE,
    shape: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The same metagradient by plain autograd through the whole unrolled run.

    A hand-written functional AdamW/SGD (the formulas of the module docstring, bias
    corrections as Python floats) over ``torch.func.functional_call``; the data weights are a
    leaf of ``dtype``; one ``torch.autograd.grad`` of the query loss. Memory grows with T:
    meant for small T (8). Returns ``{"data_weight_grad": (256,) numpy, "val_loss": float}``.
    """
    hp = _hyper(optimizer, lr)
    model, train, query, batches = make_problem(seed, steps, batch_size, **(shape or {}))
    model = model.to(dtype)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    weights = torch.ones(N_TRAIN, dtype=dtype, requires_grad=True)
    state: dict[str, dict[str, Tensor]] = {
        k: {"m": torch.zeros_like(v), "v": torch.zeros_like(v)} for k, v in params.items()
    }
    for t in range(steps):
        rows = batches[t]
        x = train[rows]
        logits = functional_call(model, params, (x,)).logits
        loss = train_loss(logits, x, weights[rows])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        new = {}
        for (k, p), g in zip(params.items(), grads):
            s = state[k]
            if optimizer == "adamw":
                b1, b2 = hp["betas"]
                m = b1 * s["m"] + (1 - b1) * g
                v = b2 * s["v"] + (1 - b2) * g * g
                m_hat = m / (1 - b1 ** (t + 1))
                v_hat = v / (1 - b2 ** (t + 1))
                update = (
                    m_hat / ((v_hat + hp["eps_root"]).sqrt() + hp["eps"]) + hp["weight_decay"] * p
                )
                state[k] = {"m": m, "v": v}
            else:
                if hp["weight_decay"]:
                    g = g + hp["weight_decay"] * p
                buf = g if t == 0 else hp["momentum"] * s["m"] + g
                update = buf
                state[k] = {"m": buf, "v": s["v"]}
            new[k] = p - hp["lr"] * update
        params = new
    val = query_loss(model, params, query)
    (grad,) = torch.autograd.grad(val, weights)
    return {"data_weight_grad": grad.detach().cpu().numpy(), "val_loss": float(val.detach())}


# ------------------------------------------------------------------------------------ memory

_LIBC = None
with contextlib.suppress(OSError, TypeError):
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _release() -> None:
    gc.collect()
    if _LIBC is not None:
        with contextlib.suppress(Exception):
            _LIBC.malloc_trim(0)


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


@contextlib.contextmanager
def _peak(record: dict[str, float | None], name: str) -> Iterator[None]:
    """Record ``{name}_rss_before_mb`` and ``{name}_peak_rss_mb`` (VmHWM) around the block."""
    _release()
    record[f"{name}_rss_before_mb"] = _status_mb("VmRSS")
    _reset_peak()
    yield
    record[f"{name}_peak_rss_mb"] = _status_mb("VmHWM")


def _growth(record: dict[str, float | None], name: str) -> float | None:
    before, peak = record.get(f"{name}_rss_before_mb"), record.get(f"{name}_peak_rss_mb")
    return None if before is None or peak is None else peak - before


def _dir_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total / 2**20


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ------------------------------------------------------------------------------------ bergson


def _torchopt_optimizer(optimizer: str, hp: dict[str, Any]) -> Any:
    import torchopt

    if optimizer == "adamw":
        return torchopt.adamw(
            hp["lr"],
            betas=hp["betas"],
            eps=hp["eps"],
            eps_root=hp["eps_root"],
            weight_decay=hp["weight_decay"],
        )
    return torchopt.sgd(hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])


class _Run:
    """One bergson setup: model copy on meta, TrainerState, train/query DataStreams."""

    def __init__(
        self, problem: Problem, optimizer: str, hp: dict[str, Any], steps: int, dtype: torch.dtype
    ):
        from functools import partial

        from bergson.magic.data_stream import DataStream
        from bergson.magic.trainer import Trainer
        from bergson.utils.math import weighted_causal_lm_ce
        from datasets import Dataset
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
        model = copy.deepcopy(problem.model).to(dtype)
        # What bergson's setup_model_and_peft does: the weighted causal-LM loss.
        model.loss_function = partial(weighted_causal_lm_ce, reduction="mean")
        model.requires_grad_(True)
        model.eval()
        rows = torch.cat(problem.batches[:steps])
        train_ds = Dataset.from_dict(
            {"input_ids": problem.train[rows].tolist(), "doc_ids": rows.tolist()}
        )
        self.stream = DataStream(train_ds, problem.batch_size, device="cpu", weight_shape=(N_TRAIN,))
        self.stream.weights = torch.nn.Parameter(torch.ones(N_TRAIN, dtype=dtype))
        self.stream.requires_grad = False
        query_ds = Dataset.from_dict({"input_ids": problem.query.tolist()})
        self.query_stream = DataStream(query_ds, problem.batch_size, device="cpu", weight_shape=(N_QUERY,))
        self.trainer, self.state = Trainer.initialize(model, _torchopt_optimizer(optimizer, hp))
        self.model = model
        assert len(self.stream) == steps


def _bergson_metagradient(run: _Run, ckpt_dir: str, record: dict[str, Any]) -> tuple[Tensor, float]:
    from bergson.magic.cli import compute_query_gradients
    from bergson.magic.trainer import BackwardState
    from torchopt.pytree import tree_iter

    t0 = time.perf_counter()
    state = run.trainer.train(
        run.state, run.stream, inplace=True, save_dir=ckpt_dir, save_mode="sqrt"
    )
    t1 = time.perf_counter()
    record["checkpoint_disk_mb"] = _dir_mb(ckpt_dir)
    t1b = time.perf_counter()
    query_grads, val_loss = compute_query_gradients(state, run.model, run.query_stream, "mean")
    state.detach_()
    run.stream.requires_grad = True
    opt_grads = [
        torch.zeros_like(b)
        for b in tree_iter(state.opt_state)
        if isinstance(b, torch.Tensor) and b.is_floating_point()
    ]
    bwd = BackwardState(query_grads, opt_grads, torch.zeros_like(run.stream.weights))
    t2 = time.perf_counter()
    with _peak(record, "backward"):
        t2b = time.perf_counter()
        bwd = run.trainer.backward(
            ckpt_dir, run.stream, bwd, state, cleanup=True, inplace=True, save_mode="sqrt"
        )
        t3 = time.perf_counter()
    record["forward_s"] = t1 - t0
    record["query_grad_s"] = t2 - t1b
    record["backward_s"] = t3 - t2b
    record["metagrad_s"] = record["forward_s"] + record["query_grad_s"] + record["backward_s"]
    run.stream.requires_grad = False
    return bwd.weight_grads.detach().clone(), float(val_loss)


def _torch_train(
    problem: Problem, optimizer: str, hp: dict[str, Any], steps: int, dtype: torch.dtype
) -> float:
    """Seconds for a plain torch.optim loop of the same run (for scale)."""
    model = copy.deepcopy(problem.model).to(dtype)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(
            model.parameters(),
            lr=hp["lr"],
            betas=hp["betas"],
            eps=hp["eps"],
            weight_decay=hp["weight_decay"],
        )
    else:
        opt = torch.optim.SGD(
            model.parameters(),
            lr=hp["lr"],
            momentum=hp["momentum"],
            weight_decay=hp["weight_decay"],
        )
    weights = torch.ones(problem.batch_size, dtype=dtype)
    start = time.perf_counter()
    for t in range(steps):
        x = problem.train[problem.batches[t]]
        opt.zero_grad(set_to_none=True)
        train_loss(model(x).logits, x, weights).backward()
        opt.step()
    return time.perf_counter() - start


def run_bergson(
    *,
    optimizer: str,
    steps: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    lr: float | None = None,
    workdir: str | None = None,
    threads: int | None = 1,
    warmup_steps: int = 3,
    torch_baseline: bool = True,
    default_dtype_follows: bool = True,
    batch_size: int = BATCH_SIZE,
    shape: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Time bergson's plain training and its full MAGIC metagradient on the problem.

    ``batch_size`` and ``shape`` (``make_config``'s ``layers``, ``heads``, ``width``; e.g.
    ``LM100M``) resize the problem; the defaults are the module docstring's.

    Returns ``train_s`` (bergson ``Trainer.train`` without checkpoints), ``metagrad_s``
    (forward with checkpoints + query gradient + ``Trainer.backward``) and its parts,
    ``ratio``, memory (MB), ``checkpoint_disk_mb``, ``data_weight_grad`` ((256,) numpy) and
    ``val_loss`` (the objective after T steps). ``lr=None`` takes ``OPTIMIZERS``' value.
    """
    from tqdm import tqdm  # noqa: F401  (bergson's progress bars; silenced below)

    hp = _hyper(optimizer, lr)
    if threads is not None:
        torch.set_num_threads(threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    problem = make_problem(seed, max(steps, warmup_steps), batch_size, **(shape or {}))
    own_dir = workdir is None
    base = tempfile.mkdtemp(prefix="peer_bergson_") if own_dir else workdir
    os.makedirs(base, exist_ok=True)
    dtype_ctx = _default_dtype(dtype) if default_dtype_follows else contextlib.nullcontext()
    record: dict[str, Any] = {
        "library": "bergson " + _version("bergson"),
        "optimizer": optimizer,
        "steps": steps,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "lr": hp["lr"],
        "batch_size": batch_size,
        "shape": {**SMALL, **(shape or {})},
        "train_call": "bergson.magic.Trainer.train(state, stream, inplace=True) (no save_dir)",
    }
    try:
        with dtype_ctx:
            # Warm-up: a short training and metagradient (imports, allocator, DCP threads).
            if warmup_steps:
                warm = _Run(problem, optimizer, hp, warmup_steps, dtype)
                warm.trainer.train(warm.state, warm.stream, inplace=True)
                warm = _Run(problem, optimizer, hp, warmup_steps, dtype)
                _bergson_metagradient(warm, os.path.join(base, "warmup_ckpts"), {})
                if torch_baseline:
                    _torch_train(problem, optimizer, hp, warmup_steps, dtype)
                del warm

            # 1. bergson's plain training.
            run = _Run(problem, optimizer, hp, steps, dtype)
            with _peak(record, "train"):
                start = time.perf_counter()
                run.trainer.train(run.state, run.stream, inplace=True)
                record["train_s"] = time.perf_counter() - start
            del run

            # 2. plain torch.optim training (for scale).
            if torch_baseline:
                record["torch_train_s"] = _torch_train(problem, optimizer, hp, steps, dtype)

            # 3. the full bergson metagradient.
            run = _Run(problem, optimizer, hp, steps, dtype)
            ckpt_dir = os.path.join(base, "checkpoints")
            if os.path.exists(ckpt_dir):
                shutil.rmtree(ckpt_dir)
            inner: dict[str, Any] = {}
            with _peak(inner, "metagrad"):
                grad, val_loss = _bergson_metagradient(run, ckpt_dir, inner)
            del run
    finally:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)

    record.update(
        {
            "metagrad_s": inner["metagrad_s"],
            "forward_s": inner["forward_s"],
            "query_grad_s": inner["query_grad_s"],
            "backward_s": inner["backward_s"],
            "ratio": inner["metagrad_s"] / record["train_s"],
            "peak_rss_mb": inner.get("metagrad_peak_rss_mb"),
            "metagrad_peak_rss_growth_mb": _growth(inner, "metagrad"),
            "backward_peak_rss_growth_mb": _growth(inner, "backward"),
            "train_peak_rss_growth_mb": _growth(record, "train"),
            "checkpoint_disk_mb": inner["checkpoint_disk_mb"],
            "data_weight_grad": grad.cpu().numpy(),
            "val_loss": val_loss,
        }
    )
    if "torch_train_s" in record:
        record["ratio_vs_torch_train"] = record["metagrad_s"] / record["torch_train_s"]
    for key in ("train_rss_before_mb", "train_peak_rss_mb"):
        record.pop(key, None)
    return record


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b|| / ||b||``."""
    return float(
        np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / np.linalg.norm(b)
    )


# ---------------------------------------------------------------------------------------- CLI


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in record.items():
        if isinstance(v, np.ndarray):
            out[k + "_norm"] = float(np.linalg.norm(v))
            out[k + "_head"] = [float(x) for x in v[:4]]
        elif isinstance(v, float):
            out[k] = float(f"{v:.6g}") if math.isfinite(v) else str(v)
        else:
            out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--check", action="store_true", help="also bergson vs full unroll, float64")
    parser.add_argument("--check-steps", type=int, default=8)
    parser.add_argument("--no-timing", action="store_true", help="only the --check")
    parser.add_argument("--save-grad", default=None, help="write data_weight_grad to this .npy")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    out: dict[str, Any] = {}
    if not args.no_timing:
        result = run_bergson(
            optimizer=args.optimizer,
            steps=args.steps,
            seed=args.seed,
            dtype=dtype,
            lr=args.lr,
            workdir=args.workdir,
            threads=args.threads,
        )
        if args.save_grad:
            np.save(args.save_grad, result["data_weight_grad"])
        out.update(result)
    if args.check:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        ref = full_unroll_reference(
            optimizer=args.optimizer, steps=args.check_steps, seed=args.seed, lr=args.lr
        )
        check = dict(
            optimizer=args.optimizer, steps=args.check_steps, seed=args.seed, dtype=torch.float64,
            lr=args.lr, threads=args.threads, warmup_steps=0, torch_baseline=False,
        )
        chk = run_bergson(**check)
        out["check_steps"] = args.check_steps
        out["check_rel_err_float64"] = relative_error(
            chk["data_weight_grad"], ref["data_weight_grad"]
        )
        out["check_val_loss_abs_err"] = abs(chk["val_loss"] - ref["val_loss"])
        if args.optimizer == "adamw":
            # torchopt's bias correction in the float32 default dtype, for comparison.
            chk32 = run_bergson(**check, default_dtype_follows=False)
            out["check_rel_err_float64_f32_bias_correction"] = relative_error(
                chk32["data_weight_grad"], ref["data_weight_grad"]
            )
    print(json.dumps(_jsonable(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
