"""Resumable metagradient passes: killed anywhere, continued from the saved progress, and equal
to an uninterrupted pass bit for bit (in process and as a SIGKILLed ``mgd grad``)."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mgd
import mgd.resumable
from mgd.cli.main import main
from mgd.replay import ReplayTrace

from conftest import tiny_problem


class Killed(Exception):
    pass


def _killer(at: int):
    """A progress callback that stops the pass at its ``at``-th forward, replay or VJP step."""
    count = itertools.count(1)

    def progress(phase, n):
        if next(count) == at:
            raise Killed

    return progress


def _equal(a, b) -> bool:
    return a.value == b.value and all(torch.equal(a.grads[name], b.grads[name]) for name in a.grads)


CASES = {
    "adam-fused-float64": (lambda: mgd.Adam(), "fused", torch.float64, {}),
    "sgd-double-backward-k3": (lambda: mgd.SGD(momentum=0.9), "double-backward", torch.float32, {"k": 3}),
    "sgd-mixed-disk-tier": (lambda: mgd.SGD(momentum=0.9), "mixed", torch.float32, {"disk": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_a_pass_killed_anywhere_resumes_to_the_same_bits(digits, tmp_path, monkeypatch, case):
    monkeypatch.setattr(mgd.resumable, "REVERSE_EVERY_S", 0.0)  # a record after every root segment
    optimizer, vjp, dtype, options = CASES[case]
    run, objective = tiny_problem(digits, optimizer(), steps=13, dtype=dtype)
    if options.pop("disk", False):
        options = {"memory_budget": 7 * run.init_state().nbytes(), "disk_budget": 10**9, "checkpoint_dir": tmp_path}
    reference = mgd.metagradient(run, objective, vjp=vjp, **options)
    assert _equal(mgd.metagradient(run, objective, vjp=vjp, state_dir=tmp_path / "whole", **options), reference)
    # 13 forward steps, then replays and VJPs: stop in the forward pass, at its end, and all
    # through the reverse pass (a stop right after a root segment, too)
    for at in (1, 6, 13, 14, 17, 22, 30):
        where = tmp_path / f"killed-{at}"
        with pytest.raises(Killed):
            mgd.metagradient(run, objective, vjp=vjp, state_dir=where, progress=_killer(at), **options)
        trace = ReplayTrace()
        resumed = mgd.metagradient(run, objective, vjp=vjp, state_dir=where, trace=trace, **options)
        assert _equal(resumed, reference), at
        forward = [t for phase, t in trace.events if phase == "forward"]
        assert len(forward) < 13 or at <= 1  # it continued: the forward pass was not run again whole
        if at > 13 and (where / "reverse.npz").is_file():
            assert forward == []  # killed in the reverse pass after a root segment: no forward at all


def test_a_directory_of_another_pass_is_refused(digits, tmp_path):
    run, objective = tiny_problem(digits, mgd.SGD(momentum=0.9), steps=13)
    with pytest.raises(Killed):
        mgd.metagradient(run, objective, state_dir=tmp_path, progress=_killer(20))
    other, _ = tiny_problem(digits, mgd.SGD(momentum=0.9), steps=12)
    with pytest.raises(mgd.UserError, match="progress of another pass .*steps"):
        mgd.metagradient(other, objective, state_dir=tmp_path)
    reseeded, _ = tiny_problem(digits, mgd.SGD(momentum=0.9), steps=13, seed=1)
    with pytest.raises(mgd.UserError, match="initial_state"):
        mgd.metagradient(reseeded, objective, state_dir=tmp_path)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the pass ended before it could be killed"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_mgd_grad_killed_by_sigkill_resumes_to_the_same_arrays(tmp_path, capsys):
    base = ["grad", "--dataset", "digits", "--steps", "400", "--width", "32", "--quiet", "--threads", "1"]
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    command = [sys.executable, "-m", "mgd", *base]
    env = {**os.environ, "PYTHONPATH": str(Path(mgd.__file__).parents[1])}
    for name, marker in (("in-forward", "pass/forward.npz"), ("in-reverse", "pass/reverse.npz")):
        out = tmp_path / name
        process = subprocess.Popen([*command, "--out", str(out)], env=env)
        _wait_for(out / marker, process)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL and not (out / "result.json").exists()
        assert main([*base, "--resume", str(out)]) == 0
        assert not (out / "pass").exists()  # the progress goes once the result is saved
        with np.load(tmp_path / "whole" / "metagrad.npz") as a, np.load(out / "metagrad.npz") as b:
            assert a.files and all(np.array_equal(a[key], b[key]) for key in a.files), name
    capsys.readouterr()
    # a finished run has nothing to resume; an unfinished one is not overwritten; flags must match
    assert main([*base, "--resume", str(tmp_path / "in-reverse")]) == 0
    out = tmp_path / "again"
    process = subprocess.Popen([*command, "--out", str(out)], env=env)
    _wait_for(out / "pass/reverse.npz", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    capsys.readouterr()
    assert main([*base, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*base[:4], "300", *base[5:], "--resume", str(out)]) == 2
    assert "config differs" in capsys.readouterr().err
