"""Smoke test of ``benchmarks/bench_runs.py``: T = 4, tiny CNN, LoRA LM, in one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_runs.py"


@pytest.mark.slow
def test_bench_runs_smoke(tmp_path):
    out = tmp_path / "runs.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--problems", "cnn", "lm-lora",
               "--optimizers", "sgd-nesterov", "adamw", "--methods", "mgd", "--markdown",
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("| problem | opt | T | method |"), done.stdout[:500]

    report = json.loads(out.read_text())
    assert report["settings"]["steps"] == [4]
    check = report["checks"]["adamw"]  # our LM objective equals the torch reference's
    assert check["ok"] and check["rel_diff_torch"] <= 1e-5 and check["w_rel_err_f64"] <= 1e-9

    rows = {(r["problem"], r["optimizer"]): r for r in report["rows"]}
    assert set(rows) == {("cnn", "sgd-nesterov"), ("lm-lora", "adamw")}
    for row in rows.values():
        assert row["status"] == "ok" and row["method"] == "mgd", row
        assert row["metagrad_s"] > 0 and row["ratio"] > 0 and row["plan"]["steps"] == 4
        assert row["grad_norms"]["data_weights"] > 0 and row["vjp"]
    lora = rows["lm-lora", "adamw"]["problem_info"]
    # A checkpoint holds the adapter and its two AdamW moments, nothing of the frozen base.
    assert lora["state_bytes"] == lora["adapter_plus_moments_bytes"] < lora["full_model_state_bytes"]
