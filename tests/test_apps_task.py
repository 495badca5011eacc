"""The applications on a user's own run (``--task FILE.py:FUNCTION``): ``mgd select`` here,
end to end on a classifier and on a regression, against runs the task function builds itself."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from mgd.apps.protocol import Candidate
from mgd.apps.select import TASK_METHODS
from mgd.apps.tasks import TaskRuns
from mgd.cli.main import main
from mgd.task import TaskFunction

# A noisy-label classifier with a held-out test split; subset= builds the run on a subset
# itself, the independent reference for TaskRuns.evaluate on a selected subset.
CLASSIFIER = """
import torch
import mgd


def data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(160, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 0.7).long()
    noisy = y.clone()
    noisy[:20] = (noisy[:20] + 1) % 3  # the first 20 training labels are wrong
    return (x[:80], noisy[:80]), (x[80:120], y[80:120]), (x[120:], y[120:])


def build(seed=0, steps=12, dtype=torch.float32, device="cpu", subset=None, width=8):
    train, val, test = data()
    if subset is not None:
        train = (train[0][subset], train[1][subset])
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, width), torch.nn.Tanh(), torch.nn.Linear(width, 3)).to(dtype)
    run = mgd.make_run(model, optimizer=mgd.SGD(momentum=0.9), data=(train[0].to(dtype), train[1]), steps=steps,
                       batch_size=min(16, len(train[1])), lr=0.2, seed=seed, metaparams=["data_weights", "lr"])
    cast = lambda split: (split[0].to(dtype), split[1])
    return mgd.Task(run, mgd.Objective(run.stateless, cast(val)),
                    metrics={"val_accuracy": mgd.Metric(run.stateless, cast(val))},
                    test={"test_loss": mgd.Objective(run.stateless, cast(test)),
                          "test_accuracy": mgd.Metric(run.stateless, cast(test))})


def build_wide(seed=0, steps=12, dtype=torch.float32, device="cpu"):
    return build(seed, steps, dtype, device, width=24)  # another victim, for transfer
"""

# A regression on dict batches with two keyword inputs: no labels, so no class-aware methods.
REGRESSION = """
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
    features = torch.randn(60, 4, generator=g)
    target = features @ torch.tensor([1.0, -2.0, 0.5, 0.0])
    target[:10] += 5.0  # outliers
    data = {"features": features, "scale": torch.full((60,), 0.5), "target": target}
    part = lambda a, b: {k: v[a:b] for k, v in data.items()}
    torch.manual_seed(seed)
    run = mgd.make_run(Net(), optimizer=mgd.Adam(), data=part(0, 40), loss=squared_error,
                       inputs=("features", "scale"), steps=steps, batch_size=8, lr=0.05, seed=seed,
                       metaparams=["data_weights"])
    return mgd.Task(run, mgd.Objective(run.stateless, part(40, 50), loss=squared_error),
                    test={"test_mse": mgd.Objective(run.stateless, part(50, 60), loss=squared_error)})
"""

TINY = ["--meta-steps", "2", "--crafting-seeds", "0,1,2", "--eval-seeds", "100,101", "--quiet"]


def write(tmp_path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def test_select_on_a_classifier_task_end_to_end_and_resume(tmp_path):
    spec = write(tmp_path, "clf.py", CLASSIFIER) + ":build"
    out = tmp_path / "run"
    assert main(["select", "--task", spec, "--budget", "0.5", "--out", str(out), *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    methods = report["methods"]
    assert set(methods) == {"full", "random", "small-loss", "margin", "el2n", "val-agreement", "tracin", "less",
                            "mgd-selection", "mgd-reweighting"}
    for name, m in methods.items():
        assert set(m["per_seed"][0]) == {"seed", "val_objective", "val_accuracy", "test_loss", "test_accuracy"}
        assert m["train_size"] == (80 if name in ("full", "mgd-reweighting") else 40)
        assert np.isfinite(m["test_loss"]["mean"])
    assert report["keys"] == {"val": "val_objective", "test": ["test_loss", "test_accuracy"]}
    best = report["best_baseline_by_val"]
    assert methods[best]["val_objective"]["mean"] == min(
        m["val_objective"]["mean"] for m in methods.values() if m["kind"] == "baseline")
    assert "test_loss" in (out / "report.md").read_text()
    # every finished method is kept on --resume and the report is the same
    assert main(["select", "--task", spec, "--budget", "0.5", "--resume", str(out), *TINY]) == 0
    again = json.loads((out / "report.json").read_text())
    assert {n: m["per_seed"] for n, m in again["methods"].items()} == {n: m["per_seed"] for n, m in methods.items()}


def test_a_selected_subset_is_evaluated_as_the_run_the_task_builds_on_it(tmp_path):
    spec = write(tmp_path, "clf.py", CLASSIFIER) + ":build"
    runs = TaskRuns(TaskFunction(spec), {}, spec=spec)
    subset = np.array([3, 5, 8, 13, 21, 34, 40, 41, 50, 55, 60, 62, 70, 71, 72, 79])
    got = runs.evaluate(Candidate("s", subset=subset), seed=5)
    task = TaskFunction(spec).function(seed=5, subset=torch.as_tensor(subset))
    final = task.run.run()
    named = task.run.named_tensors(final.params, final.buffers)
    assert got["test_loss"] == float(task.test["test_loss"](named))
    assert got["val_objective"] == float(task.objective(named))
    assert got["test_accuracy"] == float(task.test["test_accuracy"](named))
    # and the labels the class-aware baselines read are the pool's (noisy) ones
    assert runs.labels is not None and runs.num_classes == 3 and len(runs.labels) == 80


def test_select_on_a_regression_task_and_what_it_refuses(tmp_path, capsys):
    spec = write(tmp_path, "reg.py", REGRESSION) + ":build"
    out = tmp_path / "run"
    methods = "full,random,small-loss,tracin,less,mgd"
    assert main(["select", "--task", spec, "--methods", methods, "--budget", "0.5", "--out", str(out), *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["methods"]["less"]["info"]["hyperparameters"]["balance"] == "global"  # no labels: one form
    assert all(np.isfinite(m["test_mse"]["mean"]) for m in report["methods"].values())
    capsys.readouterr()
    for extra, message in ((["--methods", "margin"], "does not classify"),
                           (["--methods", "oracle"], "not available for a user's task"),
                           (["--corruption", "mixed"], "do not apply with --task"),
                           (["--lr", "0.1"], "--lr does not apply with --task")):
        assert main(["select", "--task", spec, "--out", str(tmp_path / "x"), *TINY, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_task_methods_are_the_ones_the_task_path_runs():
    assert "mgd" in TASK_METHODS and "oracle" not in TASK_METHODS and "influence" not in TASK_METHODS


# A classifier with lr_knots for the schedule search.
SCHEDULED = CLASSIFIER.replace('metaparams=["data_weights", "lr"]', 'metaparams=["lr", mgd.LRKnots(num_knots=3)]')


def test_schedule_on_a_task_end_to_end(tmp_path):
    spec = write(tmp_path, "sched.py", SCHEDULED) + ":build"
    out = tmp_path / "run"
    assert main(["schedule", "--task", spec, "--methods", "mgd,grid,random,hd", "--start", "poor",
                 "--shapes", "constant,cosine", "--selection-seeds", "2", "--out", str(out), *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    methods = report["methods"]
    assert {"grid", "mgd-poor", "start-poor", "random", "hd"} <= set(methods)
    grid = methods["grid"]["info"]
    # peaks default to multiples of the task's base LR (0.2): 0.2 x 2^-4 ... 0.2 x 2^4, maybe widened
    assert {0.2 * 2.0**i for i in range(-4, 5)} <= set(grid["peaks"])
    assert report["schedule"]["lr_by_step"]["start-poor"][0] == pytest.approx(0.02)
    bar = report["bar"]["mgd-poor"]
    assert bar["metric"] == "test_accuracy" and set(bar) >= {"within_grid_ci", "paired_diff_vs_grid"}
    assert all(set(m["per_seed"][0]) >= {"test_loss", "test_accuracy", "val_objective"} for m in methods.values())
    assert "MGD vs the best grid schedule" in (out / "report.md").read_text()


def test_schedule_on_a_task_without_lr_knots_is_a_one_line_error(tmp_path, capsys):
    spec = write(tmp_path, "clf.py", CLASSIFIER) + ":build"
    assert main(["schedule", "--task", spec, "--out", str(tmp_path / "x"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "lr_knots" in err and "Traceback" not in err


def test_poison_on_a_classifier_task_end_to_end_and_resume(tmp_path):
    spec = write(tmp_path, "clf.py", CLASSIFIER) + ":build"
    out = tmp_path / "run"
    args = ["poison", "--task", spec, "--budget", "0.1", "--objective", "margin", "--seeds-per-step", "2", *TINY]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"no_poison", "random_noise", "label_flips", "mgd"}
    setup = report["setup"]
    assert setup["poisons"] == 8 and setup["objective"] == "margin"
    drops = report["poisoning"]["drops"]
    assert set(drops) == {"random_noise", "label_flips", "mgd"}
    # the MGD poisons are the plan's rows, in the training box, everything else untouched
    from mgd.apps.protocol import load_candidate
    from mgd.runs import RunDirectory

    mgd = load_candidate(RunDirectory(out, {}), "mgd")
    runs = TaskRuns(TaskFunction(spec), {}, spec=spec)
    x, y = runs.training_set(0)
    slots = np.asarray(setup["slots"])
    rest = np.setdiff1d(np.arange(80), slots)
    assert np.array_equal(mgd.x_train[rest], x[rest]) and np.array_equal(mgd.y_train, y)
    lo, hi = x.min(axis=0), x.max(axis=0)
    assert np.all(mgd.x_train[slots] >= lo - 1e-6) and np.all(mgd.x_train[slots] <= hi + 1e-6)
    assert not np.allclose(mgd.x_train[slots], x[slots])  # MGD moved them
    # evaluating the saved candidate again gives the numbers of the report
    got = runs.evaluate(Candidate("mgd", x_train=mgd.x_train, y_train=mgd.y_train, info={"input_field": 0}), seed=100)
    assert got == report["methods"]["mgd"]["per_seed"][0]
    assert main([*args, "--resume", str(out)]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["methods"]["mgd"]["per_seed"] == report["methods"]["mgd"]["per_seed"]


def test_poison_on_a_task_transfers_to_another_victim(tmp_path):
    spec = write(tmp_path, "clf.py", CLASSIFIER) + ":build"
    out = tmp_path / "run"
    assert main(["poison", "--task", spec, "--transfer-task", spec.replace(":build", ":build_wide"),
                 "--methods", "label_flips,mgd", "--budget", "0.1", "--out", str(out), *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    transfer = report["transfer"]
    assert transfer["task"].endswith("clf.py:build_wide") and set(transfer["poisoning"]["drops"]) == {"label_flips", "mgd"}
    # the same poisoned sets, another victim: numbers differ from the crafting victim's
    assert transfer["report"]["methods"]["mgd"]["per_seed"] != report["methods"]["mgd"]["per_seed"]
    assert "Transfer: the same poisons against another victim" in (out / "report.md").read_text()


def test_poison_on_a_task_refuses_what_does_not_apply(tmp_path, capsys):
    clf = write(tmp_path, "clf.py", CLASSIFIER) + ":build"
    reg = write(tmp_path, "reg.py", REGRESSION) + ":build"
    for spec, extra, message in ((clf, ["--mode", "add"], "does not apply with --task"),
                                 (clf, ["--methods", "gradcancel"], "a task can be poisoned by"),
                                 (reg, [], "accuracy drops")):
        assert main(["poison", "--task", spec, "--out", str(tmp_path / "x"), *TINY, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_per_example_grads_fall_back_to_a_loop_where_vmap_cannot_trace():
    import mgd
    from mgd.apps.tasks import per_example_grads

    class Branchy(torch.nn.Module):  # data-dependent control flow: vmap refuses it
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x) * (2.0 if bool(x.sum() > 0) else 1.0)

    torch.manual_seed(0)
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    run = mgd.make_run(Branchy().double(), optimizer=mgd.SGD(), data=(x, y), steps=1, batch_size=5, lr=0.1)
    state = run.init_state()
    grads = per_example_grads(run, state.params, state.buffers, chunk=4)
    for i in range(10):
        p = state.params.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(run.predict(p, state.buffers, x[i : i + 1]), y[i : i + 1])
        assert torch.allclose(grads[i], torch.autograd.grad(loss, p)[0], rtol=1e-12, atol=1e-14)
