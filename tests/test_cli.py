"""The command line: round trips, cross-process finite differences, and clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mgd.cli.main import main

from conftest import assert_cli_finite_differences

TINY = ["--steps", "12", "--width", "16", "--batch-size", "50", "--quiet"]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """Run ``python -m mgd`` in a fresh process (what a user does)."""
    return subprocess.run(
        [sys.executable, "-m", "mgd", *argv], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_train_writes_result(tmp_path):
    assert main(["train", *TINY, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    for key in ("val_loss", "val_accuracy", "test_accuracy", "test_loss", "config"):
        assert key in result
    assert result["config"]["steps"] == 12 and result["config"]["lr"] == 0.05
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["val_loss"] > 0


def test_grad_writes_one_array_per_metaparameter(tmp_path):
    argv = ["grad", *TINY, "--meta", "lr,data_weights,lr_knots,weight_decay", "--num-knots", "4"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    plan = result["plan"]
    assert plan["depth"] == 2 and plan["steps"] == 12 and plan["vjp"] == "fused"
    assert plan["graph_bytes"] > 0 and plan["planned_memory_mb"] > 0
    # an explicit k and VJP are obeyed
    assert main([*argv, "--replay-k", "3", "--vjp", "mixed", "--out", str(tmp_path / "k3"), "--quiet"]) == 0
    plan = json.loads((tmp_path / "k3" / "result.json").read_text())["plan"]
    assert plan["k"] == 3 and plan["vjp"] == "mixed" and plan["max_live_graphs"] == 0
    assert result["timing"]["total_s"] > 0 and "peak_memory_mb" in result
    with np.load(tmp_path / "metagrad.npz", allow_pickle=False) as grads:
        assert sorted(grads.files) == ["data_weights", "lr", "lr_knots", "weight_decay"]
        assert grads["lr"].shape == (12,) and grads["data_weights"].shape == (1000,)
        assert grads["lr_knots"].shape == (4,) and grads["weight_decay"].shape == ()
        assert np.abs(grads["data_weights"]).max() > 0
    # unrolled mode and another k give the same metagradient (float32, same process)
    for extra in (["--mode", "unrolled"], ["--replay-k", "2"]):
        other = tmp_path / extra[-1]
        assert main([*argv, *extra, "--out", str(other)]) == 0
        with np.load(tmp_path / "metagrad.npz") as a, np.load(other / "metagrad.npz") as b:
            for name in a.files:
                np.testing.assert_array_equal(a[name], b[name])


def test_train_in_new_processes_checks_grad_by_finite_differences(tmp_path):
    """`mgd train` at z ± h·d, each in a fresh process, against `mgd grad` at z (float64)."""
    common = ["--steps", "15", "--width", "16", "--batch-size", "50", "--dtype", "float64",
              "--optimizer", "adam", "--lr", "0.01", "--quiet"]
    grad = run_cli("grad", *common, "--meta", "data_weights,lr", "--out", str(tmp_path / "g"))
    assert grad.returncode == 0, grad.stderr
    with np.load(tmp_path / "g" / "metagrad.npz") as arrays:
        grads = {name: arrays[name] for name in arrays.files}
    def train(flag, path, out):
        done = run_cli("train", *common, flag, str(path), "--out", str(out))
        assert done.returncode == 0, done.stderr
        return out

    sizes = {("data_weights", "--data-weights"): 1000, ("lr", "--lr-multipliers"): 15}
    assert_cli_finite_differences(tmp_path, grads, train, sizes, "val_loss")


def test_module_entry_point_and_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("mgd ")


def test_estimate_prints_plan(capsys):
    assert main(["estimate", "--steps", "3000", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plan"] == report["lean"] and report["plan"]["depth"] == 2
    assert report["graph_bytes"] > 0 and report["plan"]["max_live_graphs"] > 0
    assert report["store all"]["max_live_checkpoints"] == 3000
    assert report["plan"]["memory_mb"] < report["store all"]["memory_mb"] / 10
    # a budget that holds every state buys the fastest plan; a small one a deeper tree
    assert main(["estimate", "--steps", "3000", "--memory-budget", "2GB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["k"] == 3000
    assert main(["estimate", "--steps", "3000", "--memory-budget", "5MB", "--json"]) == 0
    small = json.loads(capsys.readouterr().out)["plan"]
    assert small["depth"] > 2 and small["memory_mb"] <= 5
    assert main(["estimate", "--steps", "100", "--replay-k", "2"]) == 0
    assert "plan" in capsys.readouterr().out


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


# ------------------------------------------------------------------------------- bad input


def _npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.normal(size=(40, 5)), "y_train": np.arange(40) % 3,
        "x_val": rng.normal(size=(10, 5)), "y_val": np.arange(10) % 3,
        "x_test": rng.normal(size=(10, 5)), "y_test": np.arange(10) % 3,
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


def bad_inputs(tmp: "os.PathLike") -> dict[str, tuple[list[str], str]]:
    tmp = str(tmp)
    np.save(f"{tmp}/short.npy", np.ones(11))
    np.save(f"{tmp}/nan.npy", np.full(12, np.nan))
    np.save(f"{tmp}/objects.npy", np.array([{"a": 1}] * 12, dtype=object), allow_pickle=True)
    with open(f"{tmp}/text.npz", "w") as handle:
        handle.write("x_train,y_train\n1,2\n")
    return {
        "unknown dataset": (["train", "--dataset", "cifar100"], "unknown dataset"),
        "malformed npz": (["train", "--dataset", f"{tmp}/text.npz"], "not an .npz archive"),
        "mismatched npz": (
            ["train", "--dataset", _npz(f"{tmp}/mismatch.npz", x_val=np.zeros((10, 6)))],
            "same per-example shape",
        ),
        "missing array": (["train", "--dataset", _npz(f"{tmp}/missing.npz", y_test=None)], "missing"),
        "labels out of range": (
            ["train", "--dataset", _npz(f"{tmp}/neg.npz", y_val=np.full(10, -1))], "negative",
        ),
        "wrong length": (["grad", "--lr-multipliers", f"{tmp}/short.npy"], "one multiplier per training step"),
        "NaN weights": (["train", "--lr-multipliers", f"{tmp}/nan.npy"], "NaN"),
        "pickled file": (["grad", "--lr-multipliers", f"{tmp}/objects.npy"], "never loads"),
        "missing file": (["train", "--data-weights", f"{tmp}/nope.npy"], "not found"),
        "negative steps": (["train", "--steps", "-5"], "positive integer"),
        "k < 2": (["grad", "--replay-k", "1"], "--replay-k: expected an integer >= 2"),
        "unknown meta": (["grad", "--meta", "lr,momentum"], "--meta: unknown momentum"),
        "empty meta": (["grad", "--meta", ","], "--meta is empty"),
        "batch too large": (["train", "--batch-size", "5000"], "batch size"),
        "unreadable budget": (["grad", "--memory-budget", "lots"], "cannot read memory size 'lots'"),
        "budget too small": (["grad", "--memory-budget", "100KB"], "raise --memory-budget"),
        "unknown vjp": (["grad", "--vjp", "forward"], "--vjp: invalid choice"),
    }


CASES = [
    "unknown dataset", "malformed npz", "mismatched npz", "missing array", "labels out of range",
    "wrong length", "NaN weights", "pickled file", "missing file", "negative steps", "k < 2",
    "unknown meta", "empty meta", "batch too large", "unreadable budget", "budget too small", "unknown vjp",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    argv, expected = bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    code = main([*argv, "--quiet", "--out", str(out)] + (["--steps", "12"] if "--steps" not in argv else []))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([object()] * 3, dtype=object), allow_pickle=True)
    result = run_cli("grad", "--data-weights", str(tmp_path / "objects.npy"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_grad_on_mnist1d_with_the_cnn_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("MGD_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["grad", "--dataset", "mnist1d", "--model", "cnn", "--width", "4", "--steps", "6",
            "--batch-size", "64", "--optimizer", "adamw", "--weight-decay", "0.01",
            "--meta", "weight_decay,lr_knots", "--quiet", "--out", str(tmp_path / "g")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "g" / "result.json").read_text())
    assert result["dataset"]["num_train"] == 4000 and result["config"]["model"] == "cnn"
    with np.load(tmp_path / "g" / "metagrad.npz") as grads:
        assert grads["weight_decay"].shape == () and np.isfinite(grads["lr_knots"]).all()


def test_npz_dataset_round_trip(tmp_path):
    path = _npz(tmp_path / "mine.npz")
    assert main(["train", "--dataset", path, "--steps", "5", "--batch-size", "10", "--quiet",
                 "--out", str(tmp_path / "t")]) == 0
    result = json.loads((tmp_path / "t" / "result.json").read_text())
    assert result["dataset"]["num_classes"] == 3 and result["config"]["dataset"] == path
