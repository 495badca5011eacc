"""A GPT-2-style language model: which training documents help or hurt validation loss?

What it shows: an exact metagradient through a whole `transformers` training run with the
pieces real LM training has: dropout on, tied input/output embeddings, padded documents of
varying length with an ``attention_mask``, AdamW with weight decay, a warm-up + cosine
schedule, gradient clipping and gradient accumulation over micro-batches. The metaparameters
are one weight per training document (``data_weights``) and one multiplier per step of the
learning rate (``lr``); the objective is the validation next-token loss.

The text is built at run time from files every Python installation has (no download), by a
fixed recipe (:func:`corpus_lines`): the Zen of Python (``this``) followed by the docstrings
of a few standard-library modules, split into lines. Each line becomes one document, cut at
its last word boundary that fits in the context, tokenised one character per token
(:func:`encode`: printable ASCII ``' '..'~'`` -> ids 1..95, id 0 for anything else and for
padding). The lines are shuffled with a fixed seed and split into training and validation
documents. (The docstrings, so the exact text, depend on the Python version.)

Run::

    python examples/gpt_lm.py                 # about 15 s on 2 idle CPU cores
    python examples/gpt_lm.py --check         # also the full-unroll reference, in float64 (~45 s)
    python examples/gpt_lm.py --steps 300 --train 320 --width 64 --layers 4

or from the command line with ``mgd grad --task examples/gpt_lm.py:build`` (which passes
``seed``, ``steps``, ``dtype`` and ``device`` when given).

It prints the run, the validation loss and next-token accuracy after training, the REPLAY
plan, the documents whose up-weighting lowers (helps) and raises (hurts) the validation loss
most, the learning-rate metagradient, and with ``--check`` the relative error of REPLAY
against :func:`mgd.check.full_unroll_metagradient`.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import inspect
import io
import random
import time
from typing import Sequence

import torch

import mgd
import mgd.check

#: Token ids: 0 = padding / any character outside printable ASCII, 1..95 = ' '..'~'.
VOCAB = 96
PAD_ID = 0
#: Standard-library modules whose docstrings make up the corpus (after the Zen of Python).
TEXT_MODULES = ("textwrap", "string", "json", "fnmatch", "glob", "shlex", "heapq", "bisect", "functools", "contextlib")
MIN_CHARS = 12  # shorter lines are dropped
SHUFFLE_SEED = 0  # the corpus order is fixed; the run's seed changes the model and the batches


# ----------------------------------------------------------------------------- the text


def encode(text: str) -> list[int]:
    """One id per character: printable ASCII ``' '..'~'`` -> 1..95, anything else -> 0."""
    return [ord(c) - 31 if 32 <= ord(c) <= 126 else PAD_ID for c in text]


def decode(ids: Sequence[int]) -> str:
    return "".join(chr(i + 31) if 1 <= i <= 95 else "?" for i in ids)


def zen_of_python() -> str:
    """The Zen of Python, read from the ``this`` module without printing it."""
    with contextlib.redirect_stdout(io.StringIO()):
        this = importlib.import_module("this")
    return codecs.decode(this.s, "rot13")


def _docstrings(module_name: str) -> list[str]:
    """The module's docstring, then those of its public functions and classes, by name."""
    module = importlib.import_module(module_name)
    docs = [inspect.getdoc(module)]
    for name in sorted(vars(module)):
        value = getattr(module, name)
        if name.startswith("_") or getattr(value, "__module__", None) != module_name:
            continue
        if inspect.isfunction(value) or inspect.isclass(value):
            docs.append(inspect.getdoc(value))
    return [d for d in docs if d]


def corpus_lines(min_chars: int = MIN_CHARS) -> list[str]:
    """The corpus recipe: non-empty stripped lines of the Zen of Python and of the docstrings of
    :data:`TEXT_MODULES`, in that order, printable ASCII only, at least ``min_chars`` long,
    each kept once (first occurrence)."""
    texts = [zen_of_python()] + [d for name in TEXT_MODULES for d in _docstrings(name)]
    seen, lines = set(), []
    for text in texts:
        for line in text.splitlines():
            line = " ".join(line.split())
            if len(line) >= min_chars and line.isascii() and line.isprintable() and line not in seen:
                seen.add(line)
                lines.append(line)
    return lines


def cut_to_context(line: str, context: int) -> str:
    """``line`` if it fits in ``context`` tokens, else cut at its last space that fits."""
    if len(line) <= context:
        return line
    head = line[: context + 1]
    space = head.rfind(" ")
    return head[:space] if space > 0 else line[:context]


def documents(n_train: int, n_val: int, context: int, *, skip: int = 0) -> tuple[list[str], list[str]]:
    """``(train, val)`` documents: the corpus lines cut to the context (kept if still at least
    :data:`MIN_CHARS` long, once each), shuffled with a fixed seed; the first ``skip`` are left
    out (another use, e.g. pretraining), then ``n_train`` training and ``n_val`` validation
    documents."""
    cut = (cut_to_context(line, context) for line in corpus_lines())
    lines = list(dict.fromkeys(doc for doc in cut if len(doc) >= MIN_CHARS))
    random.Random(SHUFFLE_SEED).shuffle(lines)
    need = skip + n_train + n_val
    if need > len(lines):
        raise mgd.UserError(f"the corpus has {len(lines)} documents; asked for {need} (fewer --train/--val)")
    return lines[skip : skip + n_train], lines[skip + n_train : need]


def tokenize(docs: Sequence[str], context: int, device="cpu") -> dict[str, torch.Tensor]:
    """A batch dict ``{"input_ids", "attention_mask", "labels"}`` of shape ``(N, context)``:
    documents left-aligned and right-padded with id 0, mask 0 and label -100 on padding."""
    ids = torch.full((len(docs), context), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(docs), context), dtype=torch.long)
    for i, doc in enumerate(docs):
        tokens = encode(doc)[:context]
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


# ----------------------------------------------------------------------------- the model


def tiny_gpt2(*, context: int = 32, width: int = 32, layers: int = 2, heads: int = 2, dropout: float = 0.1,
              seed: int = 0, dtype=torch.float32, device="cpu"):
    """A randomly initialised ``GPT2LMHeadModel`` (tied embeddings, the transformers default)."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=context, n_embd=width, n_layer=layers, n_head=heads,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=PAD_ID, eos_token_id=PAD_ID, pad_token_id=PAD_ID,
    )
    with torch.random.fork_rng(devices=[]):  # the initialisation never touches the caller's RNG
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(config)
    return model.to(dtype=mgd.task.as_dtype(dtype), device=device)


def lm_run(model, train: dict, *, steps: int, batch_size: int, micro_batch: int | None, lr: float,
           weight_decay: float = 0.1, warmup: int | None = None, seed: int = 0) -> mgd.TrainingRun:
    """The training run: AdamW, warm-up + cosine, clipping at 1, micro-batches, per-document
    data weights and per-step LR multipliers as metaparameters."""
    warmup = max(1, steps // 10) if warmup is None else warmup
    return mgd.make_run(
        model, optimizer=mgd.Adam(decoupled=True), data=train, steps=steps, batch_size=batch_size,
        lr=lr, weight_decay=weight_decay, loss=mgd.losses.causal_lm(),
        schedule=mgd.schedules.warmup_cosine(warmup_steps=warmup), clip_norm=1.0,
        micro_batch=micro_batch, seed=seed, metaparams=["data_weights", "lr"],
    )


def lm_task(run: mgd.TrainingRun, val: dict, eval_batch: int) -> mgd.Task:
    """Objective: validation per-document next-token loss; metric: next-token accuracy."""
    objective = mgd.Objective(run.stateless, val, loss=mgd.losses.causal_lm(), batch_size=eval_batch)
    accuracy = mgd.Metric(run.stateless, val, mgd.losses.next_token_accuracy(), batch_size=eval_batch)
    return mgd.Task(run, objective, metrics={"val_next_token_accuracy": accuracy})


def build(seed: int = 0, steps: int = 150, dtype="float32", device="cpu", *, n_train: int = 256, n_val: int = 64,
          context: int = 32, width: int = 32, layers: int = 2, heads: int = 2, batch_size: int = 16,
          micro_batch: int = 8, lr: float = 3e-3) -> mgd.Task:
    """The task: a tiny GPT-2 trained on ``n_train`` documents, validated on ``n_val``.

    ``mgd grad --task examples/gpt_lm.py:build`` calls it with ``seed``/``steps``/``dtype``/``device``.
    """
    train_docs, val_docs = documents(n_train, n_val, context)
    model = tiny_gpt2(context=context, width=width, layers=layers, heads=heads, seed=seed, dtype=dtype, device=device)
    run = lm_run(model, tokenize(train_docs, context, device), steps=steps, batch_size=batch_size,
                 micro_batch=micro_batch, lr=lr, seed=seed)
    task = lm_task(run, tokenize(val_docs, context, device), eval_batch=max(1, min(n_val, 4 * micro_batch)))
    task.documents = train_docs  # for printing which documents matter
    return task


# ----------------------------------------------------------------------------- reporting


def evaluate(task: mgd.Task, state: mgd.TrainState) -> dict[str, float]:
    """The objective and every metric at a state."""
    named = task.run.named_tensors(state.params, state.buffers)
    with torch.no_grad(), mgd.step.math_attention():
        out = {"val_loss": float(task.objective(named))}
        out.update({name: float(metric(named)) for name, metric in task.metrics.items()})
    return out


def describe_documents(grad: torch.Tensor, docs: Sequence[str], top: int = 3) -> list[str]:
    """The documents whose up-weighting lowers (helps) and raises (hurts) the objective most."""
    order = torch.argsort(grad.detach().cpu())
    top = min(top, len(docs))
    lines = ["up-weighting these documents lowers the validation loss most (helps):"]
    lines += [f"  {float(grad[i]):+.3e}  #{int(i):<4d} {docs[int(i)]!r}" for i in order[:top]]
    lines.append("up-weighting these documents raises the validation loss most (hurts):")
    lines += [f"  {float(grad[i]):+.3e}  #{int(i):<4d} {docs[int(i)]!r}" for i in order.flip(0)[:top]]
    return lines


def describe_lr(grad: torch.Tensor) -> str:
    quarter = max(1, len(grad) // 4)
    return (f"dL/d lr multiplier: first quarter of training {float(grad[:quarter].sum()):+.3e}, "
            f"last quarter {float(grad[-quarter:].sum()):+.3e} (negative: a larger LR there helps)")


def parse_args(argv, description: str, **defaults) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=defaults.get("steps", 150))
    parser.add_argument("--train", type=int, default=defaults.get("train", 256), help="training documents")
    parser.add_argument("--val", type=int, default=defaults.get("val", 64), help="validation documents")
    parser.add_argument("--context", type=int, default=32, help="tokens per document (characters)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=defaults.get("lr", 3e-3))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--top", type=int, default=3, help="documents to print each way")
    parser.add_argument("--check", action="store_true",
                        help="run in float64 and compare with mgd.check.full_unroll_metagradient")
    for flag, kwargs in defaults.get("extra", ()):
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    if args.check and args.dtype != "float64":
        print("--check: running in float64")
        args.dtype = "float64"
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv, "Exact metagradients of a tiny GPT-2's validation loss w.r.t. document weights and LRs.")
    task = build(args.seed, args.steps, args.dtype, args.device, n_train=args.train, n_val=args.val,
                 context=args.context, width=args.width, layers=args.layers, heads=args.heads,
                 batch_size=args.batch_size, micro_batch=args.micro_batch, lr=args.lr)
    run = task.run
    print(f"GPT-2: {args.layers} layers, width {args.width}, {run.num_params} parameters ({args.dtype}); "
          f"{args.train} training / {args.val} validation documents of up to {args.context} characters; "
          f"{args.steps} AdamW steps of {args.batch_size} (micro-batches of {args.micro_batch})")
    before = evaluate(task, run.init_state())
    started = time.perf_counter()
    result = mgd.metagradient(run, task.objective)  # REPLAY with the default plan
    seconds = time.perf_counter() - started
    after = evaluate(task, result.final_state)
    plan = result.plan
    print(f"val loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}, next-token accuracy "
          f"{before['val_next_token_accuracy']:.3f} -> {after['val_next_token_accuracy']:.3f}")
    print(f"metagradient (training + REPLAY) in {seconds:.1f}s: k={plan.k}, {plan.max_live_checkpoints} "
          f"checkpoints, {plan.extra_passes:.2f} extra passes, vjp={result.vjp}")
    for line in describe_documents(result.grads["data_weights"], task.documents, args.top):
        print(line)
    print(describe_lr(result.grads["lr"]))
    summary = {"result": result, "task": task, **after}
    if args.check:
        errors = mgd.check.errors_against_full_unroll(task.run, task.objective, result)
        print("relative error vs full unroll (float64): "
              + ", ".join(f"{name} {error:.2e}" for name, error in errors.items()))
        summary["errors"] = errors
    return summary


if __name__ == "__main__":
    main()
