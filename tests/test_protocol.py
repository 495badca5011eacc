"""The shared evaluation protocol: fresh seeds, paired differences, attack direction."""

from __future__ import annotations

import numpy as np
import pytest

from mgd.apps.protocol import Candidate, check_seeds, evaluate, report_markdown, with_training_set
from mgd.config import RunConfig
from mgd.errors import UserError


def test_reference_baseline_is_chosen_on_validation_in_the_right_direction(digits):
    config = RunConfig(steps=30, width=16, batch_size=50)
    rng = np.random.default_rng(0)
    scrambled = rng.integers(0, 10, size=len(digits.y_train))  # a useless training set
    candidates = [
        Candidate("clean"),
        Candidate("scrambled", y_train=scrambled),
        Candidate("mine", kind="mgd"),
    ]
    defend = evaluate(config, digits, candidates, [100, 101])
    attack = evaluate(config, digits, candidates, [100, 101], attack=True)
    assert defend["best_baseline_by_val"] == "clean"
    assert attack["best_baseline_by_val"] == "scrambled"
    clean = defend["methods"]["clean"]
    assert [r["seed"] for r in clean["per_seed"]] == [100, 101]
    assert clean["test_accuracy"]["mean"] > defend["methods"]["scrambled"]["test_accuracy"]["mean"] + 0.3
    # "mine" trains exactly like "clean": the paired difference is exactly zero
    assert defend["methods"]["mine"]["vs_best_baseline"]["test_accuracy_diff"]["mean"] == 0.0
    assert "lowest, for an attack" in report_markdown(attack, "t")


def test_protocol_refuses_bad_input(digits):
    with pytest.raises(UserError, match="must be fresh"):
        check_seeds([0, 1, 100], [100, 101])
    with pytest.raises(UserError, match="empty training set"):
        with_training_set(digits, digits.x_train[:0], digits.y_train[:0])
    with pytest.raises(UserError, match="distinct"):
        evaluate(RunConfig(steps=2), digits, [Candidate("a"), Candidate("a")], [100])


def test_candidates_round_trip_through_a_run_directory(tmp_path):
    from mgd.apps.protocol import Cost, load_candidate, save_candidate
    from mgd.runs import RunDirectory

    run_dir = RunDirectory.create(tmp_path / "run", command="test", config={})
    candidate = Candidate(
        "mgd-selection", x_train=np.ones((3, 2)), y_train=np.array([0, 1, 0]),
        meta={"data_weights": np.array([0.5, 1.0, 2.0])}, cost=Cost(1.5, 3.0), kind="mgd",
        info={"precision": 0.8, "order": np.array([2, 0, 1])},
    )
    assert load_candidate(run_dir, "mgd-selection") is None
    save_candidate(run_dir, candidate)
    back = load_candidate(run_dir, "mgd-selection")
    assert back.kind == "mgd" and back.cost == candidate.cost and back.info["precision"] == 0.8
    np.testing.assert_array_equal(back.info["order"], [2, 0, 1])
    np.testing.assert_array_equal(back.x_train, candidate.x_train)
    np.testing.assert_array_equal(back.meta["data_weights"], candidate.meta["data_weights"])
    (run_dir.path / "candidates" / "mgd-selection.json").write_text("{broken")
    with pytest.raises(UserError, match="corrupt"):
        load_candidate(run_dir, "mgd-selection")


def test_evaluation_in_worker_processes_gives_identical_numbers(digits):
    config = RunConfig(steps=20, width=16, batch_size=50)
    weights = {"data_weights": np.linspace(0.5, 1.5, len(digits.y_train))}
    candidates = [Candidate("clean"), Candidate("weighted", meta=weights, kind="mgd")]
    sequential = evaluate(config, digits, candidates, [100, 101, 102])
    parallel = evaluate(config, digits, candidates, [100, 101, 102], workers=2)
    for name in ("clean", "weighted"):
        assert parallel["methods"][name]["per_seed"] == sequential["methods"][name]["per_seed"]
    assert parallel["methods"]["weighted"]["per_seed"] != sequential["methods"]["clean"]["per_seed"]
