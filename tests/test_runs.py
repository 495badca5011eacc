"""Run directories: SIGKILL and resume to a bit-identical result; clean refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mgd.cli.main import main
from mgd.runs import RunDirectory

OPTIMIZE = [
    "optimize", "--steps", "30", "--width", "16", "--batch-size", "50", "--dtype", "float64",
    "--label-noise", "0.3", "--meta-steps", "8", "--eval-seeds", "100,101", "--quiet",
]


def _spawn(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mgd", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _history_lines(run: str) -> int:
    try:
        with open(os.path.join(run, "history.jsonl")) as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_sigkill_then_resume_gives_the_uninterrupted_result(tmp_path):
    reference = tmp_path / "reference"
    assert main([*OPTIMIZE, "--out", str(reference)]) == 0

    killed = tmp_path / "killed"
    kills = 0
    for wanted in (2, 5):  # kill twice, at different meta-steps
        process = _spawn(*OPTIMIZE, *(["--resume", str(killed)] if kills else ["--out", str(killed)]))
        deadline = time.monotonic() + 120
        while _history_lines(str(killed)) < wanted and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        assert not (killed / "result.json").exists()
    assert main([*OPTIMIZE, "--resume", str(killed)]) == 0

    with np.load(reference / "meta.npz") as a, np.load(killed / "meta.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])  # bit-identical in float64
    ra = json.loads((reference / "result.json").read_text())
    rb = json.loads((killed / "result.json").read_text())
    assert ra["val_objective_by_step"] == rb["val_objective_by_step"]
    assert ra["evaluation"]["per_seed"] == rb["evaluation"]["per_seed"]
    ha = RunDirectory(reference, {}).history()
    hb = RunDirectory(killed, {}).history()
    assert len(hb) == 9 and _without_timing(ha) == _without_timing(hb)
    for step in range(9):  # every iterate was recorded, identically
        with np.load(reference / "iterates" / f"{step:05d}.npz") as a, np.load(killed / "iterates" / f"{step:05d}.npz") as b:
            np.testing.assert_array_equal(a["data_weights"], b["data_weights"])


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _snapshot(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_bad_run_directories_are_refused_without_losing_data(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["optimize", "--steps", "10", "--width", "8", "--batch-size", "50", "--meta-steps", "1",
            "--eval-seeds", "100", "--quiet"]
    assert main([*tiny, "--out", str(run)]) == 0
    before = _snapshot(run)

    # an existing run is never overwritten by a new one
    assert "already exists" in _error(capsys, [*tiny, "--out", str(run)])
    # resuming with another config names the difference
    err = _error(capsys, [*tiny, "--meta-lr", "0.3", "--resume", str(run)])
    assert "config differs" in err and "meta" in err
    assert _snapshot(run) == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "not an mgd run directory" in _error(capsys, [*tiny, "--resume", str(foreign)])
    assert (foreign / "notes.txt").read_text() == "mine"

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "run.json").write_text("{not json")
    assert "corrupt" in _error(capsys, [*tiny, "--resume", str(corrupt)])

    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"format": "something-else"}))
    assert "not an mgd run description" in _error(capsys, [*tiny, "--resume", str(other)])

    broken_state = tmp_path / "broken"
    assert main([*tiny, "--out", str(broken_state)]) == 0
    (broken_state / "state.npz").write_bytes(b"PK\x03\x04 garbage")
    assert "state.npz" in _error(capsys, [*tiny, "--resume", str(broken_state)])


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--norm", "bn_middle"], "invalid choice"),
        (["--pooling", "median"], "invalid choice"),
        (["--fixed-total", "--hi", "0.5"], "cannot be met"),
        (["--lo", "2", "--hi", "1"], "empty box"),
        (["--crafting-seeds", "1,2", "--eval-seeds", "2,3"], "overlap"),
        (["--mask-prob", "0"], "--mask-prob"),
    ],
)
def test_bad_optimize_options_exit_2(tmp_path, capsys, argv, expected):
    out = tmp_path / "out"
    err = _error(capsys, [*OPTIMIZE, *argv, "--out", str(out)])
    assert expected in err
