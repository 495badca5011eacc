"""LoRA fine-tuning of a GPT-2-style model: metagradients through an adapter-only training run.

What it shows: the language model of ``gpt_lm.py`` (same text, tokeniser and training
recipe: AdamW, warm-up + cosine, clipping, micro-batches, dropout on) is first pretrained
for a few steps with plain PyTorch on documents of its own, then wrapped with ``peft``::

    LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.1, fan_in_fan_out=True)

so that only the adapter has ``requires_grad=True``. ``mgd`` then trains the adapter alone: the
training state (what REPLAY checkpoints) holds only the adapter's parameters and their two
AdamW moments, and the frozen base is a constant of the run, shared with the user's module,
never copied, never written. ``main()`` asserts all three and prints the sizes.

Run::

    python examples/gpt_lora.py               # about 20 s on 2 idle CPU cores
    python examples/gpt_lora.py --check       # also the full-unroll reference, in float64 (~25 s)

or ``mgd grad --task examples/gpt_lora.py:build`` (``seed``, ``steps``, ``dtype``, ``device``).

It prints the sizes (adapter vs. base parameters, state bytes), the validation loss and
next-token accuracy before and after fine-tuning, the REPLAY plan, the training documents
whose up-weighting helps/hurts the validation loss most, the learning-rate metagradient,
and with ``--check`` the relative error against :func:`mgd.check.full_unroll_metagradient`.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

import mgd


def _load_gpt_lm():
    """``gpt_lm.py`` next to this file, imported once under a private name."""
    name = "_mgd_example_gpt_lm"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("gpt_lm.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


gpt_lm = _load_gpt_lm()


def pretrain(model: torch.nn.Module, data: dict, *, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """A few steps of plain ``torch.optim.AdamW`` on the mean per-document next-token loss
    (in place, dropout on, seeded without touching the caller's RNG)."""
    if steps <= 0:
        return
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    loss_fn = mgd.losses.causal_lm()
    n = len(data["input_ids"])
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            index = torch.randperm(n)[:batch_size]
            batch = {k: v[index] for k, v in data.items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = loss_fn(out, batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    model.zero_grad(set_to_none=True)


def add_lora(model: torch.nn.Module, *, seed: int, dtype) -> torch.nn.Module:
    """Wrap ``model`` with a LoRA adapter on ``c_attn``; only the adapter stays trainable."""
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.1,
                             fan_in_fan_out=True, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # lora_A's random initialisation
        warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers a deprecated question
        torch.manual_seed(seed + 1)
        wrapped = peft.get_peft_model(model, config)
    return wrapped.to(dtype=mgd.task.as_dtype(dtype))


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def frozen_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the frozen (base) parameters, to check later that none changed."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def frozen_unchanged(run: mgd.TrainingRun, snapshot: dict[str, torch.Tensor]) -> bool:
    """Whether every frozen parameter, in the user's module and in the run's private copy,
    still equals ``snapshot`` bit for bit."""
    current = {n: p for n, p in run.model.named_parameters() if not p.requires_grad}
    if current.keys() != snapshot.keys():
        return False
    constants = run.stateless.frozen_tensors()
    return all(torch.equal(current[n], snapshot[n]) for n in snapshot) and all(
        torch.equal(t, snapshot[n]) for n, t in constants.items()
    )


def state_bytes_expected(run: mgd.TrainingRun) -> int:
    """The adapter's parameters plus the optimizer's moments (two for AdamW), no buffers."""
    n_adapter = sum(p.numel() for p in adapter_parameters(run.model).values())
    element = torch.empty((), dtype=run.dtype).element_size()
    return (1 + len(run.optimizer.init(torch.zeros(1, dtype=run.dtype)))) * n_adapter * element


def build(seed: int = 0, steps: int = 100, dtype="float32", device="cpu", *, n_pretrain: int = 96,
          pretrain_steps: int = 100, n_train: int = 128, n_val: int = 64, context: int = 32, width: int = 32,
          layers: int = 2, heads: int = 2, batch_size: int = 16, micro_batch: int = 8, lr: float = 1e-2) -> mgd.Task:
    """The task: pretrain a tiny GPT-2 briefly, add LoRA, fine-tune only the adapter with ``mgd``.

    Pretraining uses the first ``n_pretrain`` documents; fine-tuning the next ``n_train``;
    validation the ``n_val`` after those.
    """
    pre_docs, _ = gpt_lm.documents(n_pretrain, 0, context)
    train_docs, val_docs = gpt_lm.documents(n_train, n_val, context, skip=n_pretrain)
    model = gpt_lm.tiny_gpt2(context=context, width=width, layers=layers, heads=heads, seed=seed,
                             dtype=dtype, device=device)
    if n_pretrain:
        pretrain(model, gpt_lm.tokenize(pre_docs, context, device), steps=pretrain_steps,
                 batch_size=min(batch_size, n_pretrain), lr=3e-3, seed=seed)
    model = add_lora(model, seed=seed, dtype=dtype)
    run = gpt_lm.lm_run(model, gpt_lm.tokenize(train_docs, context, device), steps=steps, batch_size=batch_size,
                        micro_batch=micro_batch, lr=lr, seed=seed)
    val = gpt_lm.tokenize(val_docs, context, device)
    task = gpt_lm.lm_task(run, val, eval_batch=max(1, min(n_val, 4 * micro_batch)))
    task.documents = train_docs
    return task


def main(argv: Sequence[str] | None = None) -> dict:
    args = gpt_lm.parse_args(
        argv, "Exact metagradients through LoRA fine-tuning of a tiny GPT-2 (frozen base).",
        steps=100, train=128, val=64, lr=1e-2,
        extra=[("--pretrain", dict(type=int, default=96, help="pretraining documents")),
               ("--pretrain-steps", dict(type=int, default=100, help="plain-torch pretraining steps"))],
    )
    task = build(args.seed, args.steps, args.dtype, args.device, n_pretrain=args.pretrain,
                 pretrain_steps=args.pretrain_steps, n_train=args.train, n_val=args.val, context=args.context,
                 width=args.width, layers=args.layers, heads=args.heads, batch_size=args.batch_size,
                 micro_batch=args.micro_batch, lr=args.lr)
    run = task.run
    adapter = adapter_parameters(run.model)
    n_adapter = sum(p.numel() for p in adapter.values())
    n_base = sum(p.numel() for p in run.model.parameters() if not p.requires_grad)
    state = run.init_state()
    print(f"LoRA on c_attn: {n_adapter} adapter parameters ({len(adapter)} tensors) trained, "
          f"{n_base} base parameters frozen ({args.dtype})")
    assert run.num_params == n_adapter, (run.num_params, n_adapter)
    assert set(run.stateless.names) == set(adapter)
    assert state.buffers.numel() == 0 and state.nbytes() == state_bytes_expected(run), state.nbytes()
    full = (1 + len(state.opt_state)) * (n_base + n_adapter) * state.params.element_size()
    print(f"training state: {state.nbytes()} bytes = adapter + {len(state.opt_state)} AdamW moments "
          f"(fine-tuning every parameter: {full} bytes)")

    snapshot = frozen_snapshot(run.model)
    before = gpt_lm.evaluate(task, state)
    final = run.run()
    assert frozen_unchanged(run, snapshot), "training changed the frozen base"
    started = time.perf_counter()
    result = mgd.metagradient(run, task.objective)  # REPLAY with the default plan
    seconds = time.perf_counter() - started
    assert frozen_unchanged(run, snapshot), "the metagradient changed the frozen base"
    assert torch.equal(final.params, result.final_state.params)
    print("frozen base bit-for-bit unchanged after training and after the metagradient")

    after = gpt_lm.evaluate(task, result.final_state)
    plan = result.plan
    print(f"val loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}, next-token accuracy "
          f"{before['val_next_token_accuracy']:.3f} -> {after['val_next_token_accuracy']:.3f} "
          f"after {args.steps} adapter steps")
    print(f"metagradient (training + REPLAY) in {seconds:.1f}s: k={plan.k}, {plan.max_live_checkpoints} "
          f"checkpoints of {state.nbytes()} bytes, {plan.extra_passes:.2f} extra passes, vjp={result.vjp}")
    for line in gpt_lm.describe_documents(result.grads["data_weights"], task.documents, args.top):
        print(line)
    print(gpt_lm.describe_lr(result.grads["lr"]))
    summary = {"result": result, "task": task, **after}
    if args.check:
        errors = mgd.check.errors_against_full_unroll(task.run, task.objective, result)
        assert frozen_unchanged(run, snapshot), "the full unroll changed the frozen base"
        print("relative error vs full unroll (float64): "
              + ", ".join(f"{name} {error:.2e}" for name, error in errors.items()))
        summary["errors"] = errors
    return summary


if __name__ == "__main__":
    main()
