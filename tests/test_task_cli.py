"""``--task FILE.py:FUNCTION`` for mgd train, grad and optimize: round trips, the same run in
every command, finite differences of ``mgd train`` against ``mgd grad``, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mgd.cli.main import main

from conftest import assert_cli_finite_differences

# An MLP on synthetic data; the data do not depend on the seed, the initialisation and batch
# order do. Kinds: data_weights and lr.
MLP_TASK = """
import torch
import mgd


def build(seed=0, steps=10, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(96, 5, generator=g).to(dtype)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = model.to(dtype=dtype, device=device)
    run = mgd.make_run(model, optimizer=mgd.SGD(momentum=0.9), data=(x[:64], y[:64]), steps=steps,
                       batch_size=16, lr=0.1, seed=seed, metaparams=["data_weights", "lr"])
    val = (x[64:], y[64:])
    return mgd.Task(run, mgd.Objective(run.stateless, val),
                    metrics={"val_accuracy": mgd.Metric(run.stateless, val)})
"""

# Dict batches, a model with two keyword inputs, a per-example squared error; one kind.
DICT_TASK = """
import torch
import mgd


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, features, scale):
        return self.lin(features).squeeze(-1) * scale


def squared_error(out, batch):
    return (out - batch["target"]) ** 2


def build(seed=0, steps=8):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(40, 4, generator=g)
    data = {"features": features, "scale": torch.full((40,), 0.5),
            "target": features @ torch.tensor([1.0, -2.0, 0.5, 0.0])}
    train = {k: v[:32] for k, v in data.items()}
    val = {k: v[32:] for k, v in data.items()}
    torch.manual_seed(seed)
    run = mgd.make_run(Net(), optimizer=mgd.Adam(), data=train, loss=squared_error,
                       inputs=("features", "scale"), steps=steps, batch_size=8, lr=0.05, seed=seed,
                       metaparams=["data_weights"])
    return mgd.Task(run, mgd.Objective(run.stateless, val, loss=squared_error),
                    metrics={"val_mse": mgd.Metric(run.stateless, val, squared_error)})
"""


def write(tmp_path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def result(out) -> dict:
    return json.loads((out / "result.json").read_text())


def test_train_and_grad_are_the_same_run(tmp_path):
    spec = write(tmp_path, "t.py", MLP_TASK) + ":build"
    same = ["--task", spec, "--seed", "3", "--steps", "20", "--quiet"]
    assert main(["train", *same, "--out", str(tmp_path / "t")]) == 0
    trained = result(tmp_path / "t")
    assert isinstance(trained["val_objective"], float) and isinstance(trained["val_accuracy"], float)
    assert trained["task"] == spec and trained["task_options"] == {"seed": 3, "steps": 20}
    run = trained["run"]
    assert (run["steps"], run["batch_size"], run["lr"], run["num_params"]) == (20, 16, 0.1, 5 * 8 + 8 + 8 * 3 + 3)
    assert run["metaparams"] == ["data_weights", "lr"] and run["seed"] == 3
    assert trained["train_seconds"] > 0 and "peak_memory_mb" in trained and "mgd_version" in trained

    assert main(["grad", *same, "--meta", "data_weights", "--out", str(tmp_path / "g")]) == 0
    graded = result(tmp_path / "g")
    assert graded["val_objective"] == trained["val_objective"]  # bit for bit
    assert graded["val_accuracy"] == trained["val_accuracy"]
    assert graded["meta"] == ["data_weights"] and graded["plan"]["steps"] == 20
    assert graded["timing"]["total_s"] > 0 and "peak_memory_mb" in graded
    with np.load(tmp_path / "g" / "metagrad.npz") as grads:
        assert grads.files == ["data_weights"] and grads["data_weights"].shape == (64,)

    # default --meta: every kind of the run; plan flags work as for presets
    argv = ["grad", *same, "--replay-k", "3", "--vjp", "mixed", "--out", str(tmp_path / "all")]
    assert main(argv) == 0
    plan = result(tmp_path / "all")["plan"]
    assert plan["k"] == 3 and plan["vjp"] == "mixed"
    with np.load(tmp_path / "all" / "metagrad.npz") as grads, np.load(tmp_path / "g" / "metagrad.npz") as one:
        assert sorted(grads.files) == ["data_weights", "lr"] and grads["lr"].shape == (20,)
        np.testing.assert_allclose(grads["data_weights"], one["data_weights"], rtol=1e-4, atol=1e-8)


def test_finite_differences_of_train_match_grad(tmp_path):
    """`mgd train --data-weights / --lr-multipliers` at z ± h·d against `mgd grad` at z (float64)."""
    spec = write(tmp_path, "t.py", MLP_TASK) + ":build"
    common = ["--task", spec, "--seed", "3", "--steps", "20", "--dtype", "float64", "--quiet"]
    assert main(["grad", *common, "--meta", "data_weights,lr", "--out", str(tmp_path / "g")]) == 0
    with np.load(tmp_path / "g" / "metagrad.npz") as arrays:
        grads = {name: arrays[name] for name in arrays.files}
    assert result(tmp_path / "g")["run"]["dtype"] == "float64"
    def train(flag, path, out):
        assert main(["train", *common, flag, str(path), "--out", str(out)]) == 0
        return out

    sizes = {("data_weights", "--data-weights"): 64, ("lr", "--lr-multipliers"): 20}
    assert_cli_finite_differences(tmp_path, grads, train, sizes, "val_objective")


def test_dict_batch_task_with_a_custom_loss(tmp_path):
    spec = write(tmp_path, "d.py", DICT_TASK) + ":build"
    assert main(["train", "--task", spec, "--quiet", "--out", str(tmp_path / "t")]) == 0
    trained = result(tmp_path / "t")
    assert trained["val_mse"] > 0 and trained["run"]["optimizer"] == "Adam" and trained["task_options"] == {}
    assert main(["grad", "--task", spec, "--quiet", "--out", str(tmp_path / "g")]) == 0
    graded = result(tmp_path / "g")
    assert graded["val_objective"] == trained["val_objective"] and graded["meta"] == ["data_weights"]
    with np.load(tmp_path / "g" / "metagrad.npz") as grads:
        assert grads["data_weights"].shape == (32,) and np.abs(grads["data_weights"]).max() > 0


def test_optimize_rotates_task_seeds_and_reports_the_task_metrics(tmp_path):
    spec = write(tmp_path, "t.py", MLP_TASK) + ":build"
    out = tmp_path / "o"
    argv = ["optimize", "--task", spec, "--steps", "6", "--meta-steps", "2", "--crafting-seeds", "0,1",
            "--eval-seeds", "10,11", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["seed"] for h in history] == [0, 1, 0]
    optimized = result(out)
    ev = optimized["evaluation"]
    assert sorted(ev["start"]) == ["val_accuracy", "val_objective"] and "no test split" in ev["note"]
    assert [r["seed"] for r in ev["per_seed"]["best"]] == [10, 11]
    assert optimized["config"]["mgd"]["meta"] == ["data_weights", "lr"]  # default: every kind
    with np.load(out / "meta.npz") as meta:
        assert meta["best_data_weights"].shape == (64,) and meta["best_lr"].shape == (6,)
        assert meta["best_data_weights"].min() >= 0
    # meta-step 0 is the task built with crafting seed 0; the retraining with seed 10 is
    # `mgd train --seed 10` at the start
    assert main(["train", "--task", spec, "--steps", "6", "--seed", "0", "--quiet", "--out", str(tmp_path / "s0")]) == 0
    assert history[0]["val_objective"] == result(tmp_path / "s0")["val_objective"]
    assert main(["train", "--task", spec, "--steps", "6", "--seed", "10", "--quiet", "--out", str(tmp_path / "s10")]) == 0
    assert ev["per_seed"]["start"][0]["val_objective"] == result(tmp_path / "s10")["val_objective"]


def test_only_given_options_are_passed(tmp_path, capsys):
    source = MLP_TASK + textwrap.dedent("""
        def strict(seed=None):
            if seed is None:
                raise RuntimeError("seed not passed")
            return build(seed=seed, steps=3)
    """)
    spec = write(tmp_path, "s.py", source) + ":strict"
    # a flag given with its default value is given
    assert main(["train", "--task", spec, "--seed", "0", "--quiet", "--out", str(tmp_path / "a")]) == 0
    assert main(["train", "--task", spec, "--quiet", "--out", str(tmp_path / "b")]) == 2
    assert "raised RuntimeError: seed not passed" in capsys.readouterr().err
    # an option the function does not take is not passed, and the user is told
    assert main(["train", "--task", spec, "--seed", "1", "--steps", "5", "--quiet", "--out", str(tmp_path / "c")]) == 0
    assert "takes no steps argument; --steps is ignored" in capsys.readouterr().err
    assert result(tmp_path / "c")["run"]["steps"] == 3


# ------------------------------------------------------------------------------- bad input

BROKEN = {
    "imports.py": "import mgd_no_such_module_here\n",
    "raises.py": "def build():\n    raise RuntimeError('boom')\n",
    "returns.py": "def build():\n    return 42\n",
    "notrun.py": "import mgd\n\ndef build():\n    return mgd.Task(object(), lambda named: 0.0)\n",
    "shape.py": MLP_TASK.replace("metaparams=[", "loss=lambda out, batch: out.sum(), metaparams=["),
    "unstable.py": """
        import torch
        import mgd

        class Noisy(torch.utils.data.Dataset):
            def __len__(self):
                return 32

            def __getitem__(self, i):
                return torch.randn(3), i % 2

        def build(seed=0):
            model = torch.nn.Linear(3, 2)
            run = mgd.make_run(model, optimizer=mgd.SGD(), data=Noisy(), steps=2, batch_size=8, lr=0.1)
            return mgd.Task(run, lambda named: named["weight"].sum())
    """,
    "badmetric.py": MLP_TASK.replace('"val_accuracy": mgd.Metric(run.stateless, val)',
                                     '"logits": lambda named: named["0.weight"]'),
    "reserved.py": MLP_TASK.replace('"val_accuracy":', '"task":'),
    "noseed.py": MLP_TASK.replace("def build(seed=0, steps=10,", "def build(steps=10,")
                         .replace("seed=seed", "seed=0").replace("manual_seed(seed)", "manual_seed(0)"),
}


def error_cases(tmp) -> dict[str, tuple[list[str], list[str]]]:
    for name, source in BROKEN.items():
        write(tmp, name, source)
    mlp, small = write(tmp, "t.py", MLP_TASK), write(tmp, "d.py", DICT_TASK)
    np.save(tmp / "lr.npy", np.ones(8))
    np.save(tmp / "short.npy", np.ones(5))
    t = str(tmp)
    return {
        "missing file": (["train", "--task", f"{t}/nope.py:build"], ["no such file", "give the path"]),
        "no function name": (["train", "--task", mlp], ["write FILE.py:FUNCTION"]),
        "missing function": (["train", "--task", f"{mlp}:make"], ["has no function 'make'", "it defines build"]),
        "import error": (["grad", "--task", f"{t}/imports.py:build"],
                         ["importing", "ModuleNotFoundError", "fix the file"]),
        "raises": (["train", "--task", f"{t}/raises.py:build"], ["raises.py:build raised RuntimeError: boom"]),
        "wrong return type": (["train", "--task", f"{t}/returns.py:build"], ["returned int", "return mgd.Task("]),
        "not a run": (["train", "--task", f"{t}/notrun.py:build"], ["Task.run must be an mgd.TrainingRun"]),
        "loss shape": (["grad", "--task", f"{t}/shape.py:build"],
                       ["the loss must return one value per example", "do not average over the batch"]),
        "unstable dataset": (["train", "--task", f"{t}/unstable.py:build"],
                             ["different values for the same index", "move the randomness into augment="]),
        "metric not a number": (["train", "--task", f"{t}/badmetric.py:build"],
                                ["Task.metrics['logits'] returned Tensor", "return a number"]),
        "reserved metric name": (["train", "--task", f"{t}/reserved.py:build"], ["'task' is a key", "rename"]),
        "preset flag": (["train", "--task", f"{mlp}:build", "--lr", "0.1"],
                        ["--lr does not apply with --task: set it in the task function"]),
        "preset flag at its default": (["grad", "--task", f"{mlp}:build", "--optimizer", "sgd"],
                                       ["--optimizer does not apply with --task"]),
        "two preset flags": (["optimize", "--task", f"{mlp}:build", "--model", "cnn", "--batch-size", "8"],
                             ["--model, --batch-size do not apply with --task: set them in the task function"]),
        "unknown meta": (["grad", "--task", f"{mlp}:build", "--meta", "data_weights,weight_decay"],
                         ["weight_decay is not a metaparameter of the task's run; it has data_weights, lr",
                          "metaparams="]),
        "meta file the run lacks": (["train", "--task", f"{small}:build", "--lr-multipliers", f"{t}/lr.npy"],
                                    ["--lr-multipliers: the task's run has no lr metaparameter",
                                     "add 'lr' to metaparams="]),
        "meta file of the wrong length": (["train", "--task", f"{mlp}:build", "--data-weights", f"{t}/short.npy"],
                                          ["'data_weights' must have shape (64,)"]),
        "optimize without seed": (["optimize", "--task", f"{t}/noseed.py:build"],
                                  ["takes no seed argument", "def build(seed=0, ...)"]),
    }


@pytest.mark.parametrize("case", [
    "missing file", "no function name", "missing function", "import error", "raises", "wrong return type",
    "not a run", "loss shape", "unstable dataset", "metric not a number", "reserved metric name",
    "preset flag", "preset flag at its default", "two preset flags", "unknown meta",
    "meta file the run lacks", "meta file of the wrong length", "optimize without seed",
])
def test_bad_task_is_one_line_and_exit_2(tmp_path, capsys, case):
    argv, expected = error_cases(tmp_path)[case]
    out = tmp_path / "out"
    code = main([*argv, "--quiet", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    for text in expected:
        assert text in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_bad_task_in_a_real_process_has_no_traceback(tmp_path):
    spec = write(tmp_path, "raises.py", BROKEN["raises.py"]) + ":build"
    result = subprocess.run(
        [sys.executable, "-m", "mgd", "grad", "--task", spec, "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "raised RuntimeError: boom" in result.stderr


def test_a_task_refuses_torchrun(tmp_path, monkeypatch, capsys):
    spec = write(tmp_path, "t.py", MLP_TASK) + ":build"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--task", spec, "--quiet", "--out", str(tmp_path / "o")]) == 2
    assert "launch mgd without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
