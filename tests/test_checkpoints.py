"""Checkpoint tiers: host memory and disk give the in-memory plan's metagradient bit for bit,
the planner moves checkpoints off the device before it deepens the tree, and failures are
one clear error that leaves nothing behind."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import mgd
import mgd.checkpoints
from mgd.checkpoints import CheckpointStore
from mgd.cli.main import main
from mgd.replay import VJP_MODES, ReplayPlan, ReplayTrace, make_plan

from conftest import tiny_problem


def _equal(a, b) -> bool:
    return all(torch.equal(a.grads[name], b.grads[name]) for name in a.grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_tier_gives_the_in_memory_metagradient_bit_for_bit(digits, tmp_path, dtype):
    run, objective = tiny_problem(digits, mgd.Adam(), steps=13, dtype=dtype)
    for vjp in VJP_MODES:
        reference = mgd.metagradient(run, objective, k=3, vjp=vjp)
        S = reference.memory["state_bytes"]
        for host, disk in ((10**9, None), (None, 10**9), (2 * S, 10**9)):
            result = mgd.metagradient(run, objective, k=3, vjp=vjp, host_budget=host, disk_budget=disk,
                                      checkpoint_dir=tmp_path)
            assert _equal(result, reference), (vjp, host, disk)
            io = result.memory["checkpoint_io"]
            placed = result.plan.to_dict()["placement"]
            assert placed["host"] + placed["disk"] == len(result.plan.forward_store)
            assert io["disk_read_bytes"] <= io["disk_written_bytes"] == placed["disk"] * S
            assert io["prefetched"] == len(result.plan.forward_store) - 1  # each read starts the next
            assert list(tmp_path.iterdir()) == []  # the disk tier's folder is gone
    # every state on disk: no replay at all, the same bits as storing everything in memory
    stored = mgd.metagradient(run, objective, mode="unrolled")
    on_disk = mgd.metagradient(run, objective, mode="unrolled", disk_budget=10**9, checkpoint_dir=tmp_path)
    assert _equal(on_disk, stored) and on_disk.plan.replayed_steps == 0


def test_kept_files_are_raw_tensors_equal_to_the_forward_states(digits, tmp_path):
    run, objective = tiny_problem(digits, mgd.SGD(momentum=0.9), steps=9)
    trace = ReplayTrace(keep_states=True)
    mgd.metagradient(run, objective, k=3, disk_budget=10**9, checkpoint_dir=tmp_path, keep_checkpoints=True,
                     trace=trace)
    (folder,) = tmp_path.iterdir()
    layout = json.loads((folder / "layout.json").read_text())["tensors"]
    files = sorted(folder.glob("state-*.bin"))
    assert [int(f.stem.split("-")[1]) for f in files] == [0, 3, 6]
    assert not list(folder.glob("*.tmp"))
    for path in files:
        step = int(path.stem.split("-")[1])
        raw = np.fromfile(path, dtype=np.uint8)  # raw bytes: nothing to unpickle
        expected = run.init_state() if step == 0 else trace.forward_states[step]
        for entry, tensor in zip(layout, expected.tensors()):
            assert entry["offset"] % 64 == 0 and entry["shape"] == list(tensor.shape)
            if entry["nbytes"]:
                piece = torch.from_numpy(raw[entry["offset"]: entry["offset"] + entry["nbytes"]].copy())
                assert torch.equal(piece.view(getattr(torch, entry["dtype"])).reshape(entry["shape"]), tensor)


def test_planner_offloads_before_deepening_and_keeps_the_device_budget(digits, tmp_path):
    run, objective = tiny_problem(digits, mgd.SGD(momentum=0.9), steps=40)
    reference = mgd.metagradient(run, objective, mode="unrolled")
    S = reference.memory["state_bytes"]
    budget = 9 * S  # below the lean two-level tree of 40 steps
    lean = ReplayPlan.choose(40, S, 0, fused=False)
    assert lean.peak_bytes(S) > budget
    everything = make_plan(40, S, 0, fused=False, memory_budget=budget, host_budget=10**9)
    assert everything.replayed_steps == 0 and everything.tier_bytes(S)["host"] == 40 * S
    host_only = make_plan(40, S, 0, fused=False, memory_budget=budget, host_budget=12 * S)
    # the fewest root segments whose replays fit: 7 segments of at most 6 steps, whose replays
    # store 5 states next to the segment's start, the prefetched next one, the adjoint and s_T
    assert host_only.depth == 2 and len(host_only.root) - 1 == 7
    assert host_only.tier_bytes(S) == {"device": 9 * S, "host": 7 * S, "disk": 0}
    with_disk = make_plan(40, S, 0, fused=False, memory_budget=budget, host_budget=3 * S, disk_budget=10**9)
    assert with_disk.replayed_steps == 0  # every state fits off the device: no replay
    assert with_disk.tier_bytes(S) == {"device": with_disk.peak_bytes(S), "host": 3 * S, "disk": 37 * S}
    for host, disk in ((10**9, None), (3 * S, 10**9), (3 * S, 12 * S)):
        result = mgd.metagradient(run, objective, memory_budget=budget, host_budget=host, disk_budget=disk,
                                  vjp="double-backward", checkpoint_dir=tmp_path)
        assert _equal(result, reference)
        measured = result.memory["checkpoint_io"]["peak_bytes"]
        planned = result.plan.tier_bytes(S)
        # the store's own count of what each tier held, not the plan's model
        assert measured["device"] <= planned["device"] - 2 * S  # the adjoint and final state are not checkpoints
        assert measured["host"] <= planned["host"] and measured["disk"] <= planned["disk"]
    with pytest.raises(mgd.UserError, match="--host-budget or --disk-budget"):
        make_plan(40, S, 0, fused=False, memory_budget=2 * S)


def test_a_failed_write_is_one_error_and_leaves_nothing(digits, tmp_path, monkeypatch):
    run, objective = tiny_problem(digits, mgd.SGD(momentum=0.9), steps=9)

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mgd.checkpoints.os, "replace", full_disk)
    with pytest.raises(mgd.UserError, match="No space left on device.*--checkpoint-dir"):
        mgd.metagradient(run, objective, k=3, disk_budget=10**9, checkpoint_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unusable_directories_and_too_little_space_are_refused(digits, tmp_path, monkeypatch):
    run, objective = tiny_problem(digits, mgd.SGD(momentum=0.9), steps=9)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(mgd.UserError, match="cannot create a checkpoint directory"):
        mgd.metagradient(run, objective, k=3, disk_budget=10**9, checkpoint_dir=blocker / "sub")

    class Usage:
        free = 10

    monkeypatch.setattr(mgd.checkpoints.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(mgd.UserError, match="need .* which has 10 B free"):
        mgd.metagradient(run, objective, k=3, disk_budget=10**9, checkpoint_dir=tmp_path / "ok")
    assert list((tmp_path / "ok").iterdir()) == []
    with pytest.raises(mgd.UserError, match="need .* which has 10 B free"):  # a resumable pass's files too
        mgd.metagradient(run, objective, k=3, state_dir=tmp_path / "pass")
    with pytest.raises(mgd.UserError, match="do not fit in the host and disk budgets"):
        mgd.metagradient(run, objective, k=3, host_budget=10)


def test_store_reads_back_what_it_holds_and_counts_it(tmp_path):
    state = mgd.step.TrainState(torch.arange(5.0), (torch.ones(5, dtype=torch.float64),), torch.zeros(0), 4)
    with CheckpointStore({4: "disk", 8: "host"}, directory=tmp_path) as store:
        store[4] = state
        store[8] = mgd.step.TrainState(state.params + 1, state.opt_state, state.buffers, 8)
        store[9] = state
        assert sorted(store) == [4, 8, 9] and store.tier(4) == "disk" and store.tier(9) == "device"
        back = store[8]  # read: it stays on the device from now on, and step 4 is prefetched
        assert torch.equal(back.params, state.params + 1) and store.tier(8) == "device"
        assert store.stats["prefetched"] == 1
        assert all(torch.equal(a, b) for a, b in zip(store[4].tensors(), state.tensors()))
        del store[4], store[8], store[9]
        assert len(store) == 0 and store.bytes_now() == {"device": 0, "host": 0, "disk": 0}
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(mgd.UserError, match="unknown checkpoint tier"):
        CheckpointStore({1: "tape"})


def test_cli_grad_with_tiers_matches_the_in_memory_run_and_estimate_prints_them(tmp_path, capsys):
    base = ["grad", "--dataset", "digits", "--steps", "30", "--width", "16", "--quiet", "--threads", "1"]
    assert main([*base, "--out", str(tmp_path / "memory")]) == 0
    assert main([*base, "--memory-budget", "200KB", "--host-budget", "100KB", "--disk-budget", "10MB",
                 "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "tiers")]) == 0
    with np.load(tmp_path / "memory" / "metagrad.npz", allow_pickle=False) as a, \
            np.load(tmp_path / "tiers" / "metagrad.npz", allow_pickle=False) as b:
        assert sorted(a.files) == sorted(b.files) and a.files
        for name in a.files:
            assert np.array_equal(a[name], b[name]), name
    plan = json.loads((tmp_path / "tiers" / "result.json").read_text())["plan"]
    assert plan["placement"]["disk"] > 0 and plan["planned_tier_bytes"]["disk"] > 0
    assert list((tmp_path / "ckpt").iterdir()) == []
    capsys.readouterr()
    assert main(["estimate", "--dataset", "digits", "--steps", "30", "--width", "16", "--memory-budget", "200KB",
                 "--host-budget", "100KB", "--disk-budget", "10MB"]) == 0
    assert "plan's checkpoints by tier" in capsys.readouterr().out
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([*base, "--disk-budget", "10MB", "--replay-k", "3", "--checkpoint-dir", str(blocker / "d"),
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot create a checkpoint directory" in err[0]


def test_a_device_budget_is_kept_as_measured_by_peak_rss(digits, tmp_path):
    """On a CPU run the disk tier is what takes checkpoints out of the process: its peak extra
    RSS stays within the budget above the working set of a two-step pass (measured the same
    way), while storing every state in memory does not."""
    from torch import nn

    from mgd._resources import peak_memory

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1400), nn.Tanh(), nn.Linear(1400, 1400), nn.Tanh(),
                          nn.Linear(1400, 10))  # a 16 MB state with momentum
    data = (torch.as_tensor(digits.x_train[:200], dtype=torch.float32), torch.as_tensor(digits.y_train[:200]))
    run = mgd.make_run(model, optimizer=mgd.SGD(momentum=0.9), data=data, steps=16, batch_size=20, lr=0.05,
                       metaparams=["data_weights"])
    val = (torch.as_tensor(digits.x_val[:100], dtype=torch.float32), torch.as_tensor(digits.y_val[:100]))
    objective = mgd.Objective(run.stateless, val)
    budget = 6 * run.init_state().nbytes()

    def extra(fn):
        with peak_memory() as memory:
            result = fn()
        if memory.extra_bytes is None:
            pytest.skip("peak RSS cannot be measured on this system")
        return result, memory.extra_bytes

    _, working_set = extra(lambda: mgd.metagradient(run.replaced(steps=2), objective, mode="unrolled",
                                                    vjp="double-backward"))
    tiered, on_disk = extra(lambda: mgd.metagradient(run, objective, memory_budget=budget, disk_budget=10**10,
                                                     vjp="double-backward", checkpoint_dir=tmp_path))
    stored, in_memory = extra(lambda: mgd.metagradient(run, objective, mode="unrolled", vjp="double-backward"))
    assert torch.equal(tiered.grads["data_weights"], stored.grads["data_weights"])
    assert on_disk <= working_set + budget < in_memory


def test_cli_a_full_disk_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    replace = os.replace  # full only for checkpoint files: run.json is written before them
    monkeypatch.setattr(mgd.checkpoints.os, "replace",
                        lambda src, dst: full_disk(src, dst) if str(dst).endswith(".bin") else replace(src, dst))
    code = main(["grad", "--dataset", "digits", "--steps", "20", "--width", "16", "--quiet", "--threads", "1",
                 "--replay-k", "3", "--disk-budget", "10MB", "--checkpoint-dir", str(tmp_path / "ckpt"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert not list((tmp_path / "ckpt").glob("**/*.bin")) and not list((tmp_path / "ckpt").glob("**/*.tmp"))
    assert not (tmp_path / "out").exists()  # refused before any progress: nothing left behind
    # a full disk for every file, run.json included: the same one line
    monkeypatch.setattr(mgd.checkpoints.os, "replace", full_disk)
    assert main(["train", "--dataset", "digits", "--steps", "5", "--quiet", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and "No space left on device" in err[0], err
