"""The examples under ``examples/``, each at a tiny size, in float64.

For ``cifar_resnet.py`` (BatchNorm, augmentation, SGD+Nesterov), ``gpt_lm.py`` (transformers
GPT-2 with dropout, padding masks, AdamW, warm-up + cosine, clipping, micro-batches) and
``gpt_lora.py`` (a peft LoRA adapter over a frozen base):

* REPLAY (k=2) equals store-everything (``mode="unrolled"``) bit for bit, for every VJP mode;
* REPLAY (k=3) agrees with the plain full unroll to 1e-8 for ``data_weights`` and ``lr``;
* the LoRA run trains the adapter only and never touches the frozen base;
* each ``build`` loads like ``mgd grad --task FILE:build`` does, and each ``main()`` runs end
  to end (with ``--check``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import mgd
import mgd.check
from mgd.task import load_task

torch.set_num_threads(1)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ("cifar_resnet", "gpt_lm", "gpt_lora")
VJPS = ("fused", "double-backward", "mixed")

#: Tiny sizes: a few steps that cross an epoch boundary, a handful of examples.
TINY = {
    "cifar_resnet": dict(steps=4, n_train=24, n_val=8, n_test=8, width=4, batch_size=8),
    "gpt_lm": dict(steps=4, n_train=16, n_val=8, context=16, width=16, layers=2, heads=2,
                   batch_size=8, micro_batch=4),
    "gpt_lora": dict(steps=4, n_pretrain=16, pretrain_steps=3, n_train=16, n_val=8, context=16, width=16,
                     layers=2, heads=2, batch_size=8, micro_batch=4),
}
TINY_FLAGS = {
    "cifar_resnet": ["--train", "24", "--val", "8", "--test", "8", "--width", "4", "--steps", "3",
                     "--batch-size", "8"],
    "gpt_lm": ["--train", "16", "--val", "8", "--context", "16", "--width", "16", "--steps", "3",
               "--batch-size", "8", "--micro-batch", "4"],
    "gpt_lora": ["--pretrain", "16", "--pretrain-steps", "2", "--train", "16", "--val", "8", "--context", "16",
                 "--width", "16", "--steps", "3", "--batch-size", "8", "--micro-batch", "4"],
}


def example(name: str):
    """Import ``examples/NAME.py`` once, under a private module name."""
    key = f"_mgd_test_example_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


_TASKS: dict[str, mgd.Task] = {}


def tiny_task(name: str) -> mgd.Task:
    """The example's tiny float64 task, built once per session (runs are pure)."""
    if name not in _TASKS:
        _TASKS[name] = example(name).build(seed=0, dtype=torch.float64, **TINY[name])
    return _TASKS[name]


@pytest.mark.filterwarnings("ignore::mgd.step_vjp.MixedModeFallback")  # BatchNorm: mixed mode's own fallback
@pytest.mark.parametrize("vjp", VJPS)
@pytest.mark.parametrize("name", NAMES)
def test_replay_equals_unrolled_bit_for_bit(name, vjp):
    task = tiny_task(name)
    replay = mgd.metagradient(task.run, task.objective, k=2, vjp=vjp)
    unrolled = mgd.metagradient(task.run, task.objective, mode="unrolled", vjp=vjp)
    # BatchNorm (the CNN): mixed mode runs reverse-over-reverse and says so
    expected = "double-backward" if (name, vjp) == ("cifar_resnet", "mixed") else vjp
    assert replay.vjp == expected and replay.plan.replayed_steps > 0
    assert set(replay.grads) == {"data_weights", "lr"}
    for kind in replay.grads:
        assert torch.equal(replay.grads[kind], unrolled.grads[kind]), kind
        assert bool(torch.isfinite(replay.grads[kind]).all()) and replay.grads[kind].abs().sum() > 0, kind
    assert replay.value == unrolled.value
    assert torch.equal(replay.final_state.params, unrolled.final_state.params)


@pytest.mark.parametrize("name", NAMES)
def test_matches_full_unroll(name):
    task = tiny_task(name)
    assert task.run.dtype == torch.float64
    result = mgd.metagradient(task.run, task.objective, k=3)
    value, reference = mgd.check.full_unroll_metagradient(task.run, task.objective)
    assert value == pytest.approx(result.value, rel=1e-12)
    for kind in ("data_weights", "lr"):
        assert reference[kind].norm() > 0, kind
        assert mgd.check.relative_error(result.grads[kind], reference[kind]) < 1e-8, kind


def test_lora_trains_only_the_adapter_and_keeps_the_base_bit_for_bit():
    lora = example("gpt_lora")
    task = lora.build(seed=1, dtype=torch.float64, **TINY["gpt_lora"])
    run = task.run
    adapter = lora.adapter_parameters(run.model)
    assert adapter and all(".lora_" in n for n in adapter)
    assert run.num_params == sum(p.numel() for p in adapter.values())
    assert set(run.stateless.names) == set(adapter)
    state = run.init_state()
    assert state.buffers.numel() == 0 and len(state.opt_state) == 2
    assert state.nbytes() == 3 * run.num_params * 8  # adapter + two AdamW moments, float64
    # The frozen base is a constant of the run that shares storage with the user's module.
    frozen = {n: p for n, p in run.model.named_parameters() if not p.requires_grad}
    constants = run.stateless.frozen_tensors()
    assert constants.keys() == frozen.keys()
    assert all(constants[n].data_ptr() == frozen[n].data_ptr() for n in frozen)

    snapshot = lora.frozen_snapshot(run.model)
    final = run.run()
    assert lora.frozen_unchanged(run, snapshot)
    assert not torch.equal(final.params, state.params)  # the adapter did train
    result = mgd.metagradient(run, task.objective, k=2)
    assert lora.frozen_unchanged(run, snapshot)
    assert torch.equal(result.final_state.params, final.params)
    assert all(torch.equal(p, snapshot[n]) for n, p in run.model.named_parameters() if not p.requires_grad)


def test_cifar_example_reads_the_binary_format_it_writes(tmp_path):
    cifar = example("cifar_resnet")
    folder = cifar.write_synthetic_cifar(tmp_path / "cifar-10-batches-bin", train=50, test=7, seed=3)
    assert sorted(p.name for p in folder.iterdir()) == [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    assert cifar._batches_needed(tmp_path, 25) == (1, 2, 3)  # 10 records per file, found in the subfolder
    train, val, test = cifar.load_splits(tmp_path, 30, 10, 5, torch.float64, "cpu")
    assert [len(y) for _, y in (train, val, test)] == [30, 10, 5]
    assert train[0].shape == (30, 3, 32, 32) and train[0].dtype == torch.float64
    raw = (folder / "data_batch_1.bin").read_bytes()
    assert int(train[1][0]) == raw[0] and int(train[1][10]) == (folder / "data_batch_2.bin").read_bytes()[0]
    red = torch.tensor(raw[1] / 255.0, dtype=torch.float64)
    assert torch.allclose(train[0][0, 0, 0, 0], (red - cifar.CIFAR_MEAN[0]) / cifar.CIFAR_STD[0])
    # Class-dependent: per-class mean images differ far more than the noise of a class mean.
    means = torch.stack([train[0][train[1] == c].mean(0) for c in train[1].unique()])
    assert (means - means.mean(0)).abs().mean() > 0.2


@pytest.mark.parametrize("name", NAMES)
def test_build_loads_like_the_cli(name):
    path = EXAMPLES / f"{name}.py"
    task = load_task(f"{path}:build", seed=1, steps=2, dtype="float64")
    assert isinstance(task, mgd.Task)
    assert task.run.steps == 2 and task.run.seed == 1 and task.run.dtype == torch.float64
    assert set(task.run.metaparams) == {"data_weights", "lr"}


@pytest.mark.parametrize("name", NAMES)
def test_main_runs_end_to_end(name, capsys):
    summary = example(name).main(TINY_FLAGS[name] + ["--check"])
    out = capsys.readouterr().out
    assert "relative error vs full unroll (float64)" in out
    assert "helps" in out and "hurts" in out
    if name == "cifar_resnet":
        assert "wrote synthetic CIFAR-10 binary files" in out
    assert set(summary["errors"]) == {"data_weights", "lr"}
    assert all(error < 1e-8 for error in summary["errors"].values()), summary["errors"]
