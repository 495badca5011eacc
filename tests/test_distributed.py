"""Data parallelism over torch.distributed (gloo on loopback): equal to one process, fails fast."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mgd
from mgd.check import relative_error
from mgd.distributed import SINGLE_PROCESS, Collective
from mgd.errors import UserError

from conftest import OPTIMIZERS, tiny_problem

HERE = Path(__file__).parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], world: int, **env_extra: str) -> list[subprocess.Popen]:
    """Start ``world`` ranks of ``argv`` by hand, the way torchrun's environment describes them."""
    port = str(free_port())
    processes = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1", **env_extra}
        processes.append(subprocess.Popen(argv, env=env, cwd=HERE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    return processes


def wait_all(processes: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    results = []
    for p in processes:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    return results


@pytest.mark.parametrize("optimizer,vjp", [("sgd-momentum", "fused"), ("adam", "double-backward"), ("adamw", "mixed")])
def test_two_ranks_equal_one_process(digits, tmp_path, optimizer, vjp):
    out = tmp_path / "two.npz"
    results = wait_all(launch([sys.executable, "_dist_worker.py", str(out), optimizer, vjp], world=2))
    for code, _, err in results:
        assert code == 0, err[-2000:]
    make, lr = OPTIMIZERS[optimizer]
    trainer, objective = tiny_problem(digits, make(), steps=11, lr=lr, weight_decay=1e-2)
    meta = {"data_weights": 1 + 0.2 * torch.rand(120, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
    single = mgd.metagradient(trainer, objective, meta, k=3, vjp=vjp)
    with np.load(out, allow_pickle=False) as two:
        assert float(two["value"]) == pytest.approx(single.value, rel=1e-12)
        for name, grad in single.grads.items():
            assert grad.abs().max() > 0
            assert relative_error(torch.from_numpy(two[name]), grad) <= 1e-10, name


def run_once_and_under_torchrun(flags: list[str], tmp_path: Path) -> None:
    """``mgd FLAGS`` in one process (``tmp_path/one``) and in two under torchrun (``.../two``)."""
    single = subprocess.run([sys.executable, "-m", "mgd", *flags, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "mgd", *flags, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]


def test_cli_under_torchrun_matches_one_process(tmp_path):
    """The issue's bar: `torchrun --nproc-per-node 2 -m mgd grad` gives the same metagrad.npz."""
    flags = ["grad", "--dataset", "digits", "--steps", "30", "--dtype", "float64", "--meta", "lr,data_weights",
             "--quiet", "--dist-timeout", "60"]
    run_once_and_under_torchrun(flags, tmp_path)
    result = json.loads((tmp_path / "two" / "result.json").read_text())
    assert result["distributed"] == {"world_size": 2, "backend": "gloo"}
    with np.load(tmp_path / "one" / "metagrad.npz") as a, np.load(tmp_path / "two" / "metagrad.npz") as b:
        for name in ("lr", "data_weights"):
            err = np.linalg.norm(a[name] - b[name]) / np.linalg.norm(a[name])
            assert err <= 1e-10, (name, err)


def test_a_killed_rank_stops_the_other_with_a_clear_error(tmp_path):
    argv = [sys.executable, "-m", "mgd", "grad", "--dataset", "digits", "--steps", "3000", "--quiet",
            "--dist-timeout", "20", "--out", str(tmp_path / "out")]
    first, second = launch(argv, world=2)
    time.sleep(6)  # both ranks are inside training (a few seconds of work remain)
    assert first.poll() is None, first.communicate()[1]
    second.send_signal(signal.SIGKILL)
    started = time.perf_counter()
    _, err = first.communicate(timeout=60)
    assert time.perf_counter() - started < 30
    assert first.returncode == 4, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "another rank probably stopped" in lines[0]
    second.communicate()
    assert not (tmp_path / "out").exists()


def test_commands_that_are_not_data_parallel_refuse_torchrun(tmp_path, monkeypatch, capsys):
    from mgd.cli.main import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["select", "--out", str(tmp_path / "o")]) == 2
    assert "does not run data-parallel" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_optimize_under_torchrun_matches_one_process(tmp_path):
    """MGD itself data-parallel: same iterates, same retrained evaluation, one run directory."""
    flags = ["optimize", "--dataset", "digits", "--steps", "20", "--dtype", "float64", "--label-noise", "0.3",
             "--meta-steps", "2", "--crafting-seeds", "0,1", "--eval-seeds", "100,101,102", "--quiet",
             "--dist-timeout", "60"]
    run_once_and_under_torchrun(flags, tmp_path)
    one_result = json.loads((tmp_path / "one" / "result.json").read_text())
    two_result = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two_result["config"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert two_result["best_step"] == one_result["best_step"]
    np.testing.assert_allclose(two_result["val_objective_by_step"], one_result["val_objective_by_step"], rtol=1e-10)
    with np.load(tmp_path / "one" / "meta.npz") as a, np.load(tmp_path / "two" / "meta.npz") as b:
        for name in a.files:
            err = np.linalg.norm(a[name] - b[name]) / np.linalg.norm(a[name])
            assert err <= 1e-10, (name, err)
    # the final retraining was spread over the ranks and gives the same numbers
    seeds = [r["seed"] for r in two_result["evaluation"]["per_seed"]["best"]]
    assert seeds == [100, 101, 102]
    start_one = [r["test_accuracy"] for r in one_result["evaluation"]["per_seed"]["start"]]
    start_two = [r["test_accuracy"] for r in two_result["evaluation"]["per_seed"]["start"]]
    assert start_one == start_two
    # a resume with another world size is refused, naming what differs
    resumed = subprocess.run([sys.executable, "-m", "mgd", *flags, "--resume", str(tmp_path / "two")],
                             capture_output=True, text=True)
    assert resumed.returncode == 2 and "distributed" in resumed.stderr, resumed.stderr


def test_sharding_is_a_partition_of_every_batch(digits):
    trainer, _ = tiny_problem(digits, mgd.SGD(), steps=12)
    shards = []
    for rank in range(3):
        trainer.collective = Collective(rank=rank, world_size=3, backend="test")
        shards.append([trainer.shard_indices(t) for t in range(12)])
    trainer.collective = SINGLE_PROCESS
    for t in range(12):
        union = torch.cat([shards[r][t] for r in range(3)])
        assert sorted(union.tolist()) == sorted(trainer.batch_indices(t).tolist())


def test_batchnorm_and_tiny_batches_are_refused_data_parallel(digits):
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10)).double()
    x, y = torch.as_tensor(digits.x_train[:40]).double(), torch.as_tensor(digits.y_train[:40])
    two = Collective(rank=0, world_size=2, backend="test")
    with pytest.raises(UserError, match="BatchNorm is not supported with more than one process"):
        mgd.Trainer(model, mgd.SGD(), x, y, steps=3, batch_size=10, lr=0.1, collective=two)
    with pytest.raises(UserError, match="smaller than the 4 processes"):
        mgd.Trainer(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double(), mgd.SGD(), x, y, steps=3,
                    batch_size=2, lr=0.1, collective=Collective(rank=0, world_size=4, backend="test"))
