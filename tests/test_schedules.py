"""``mgd.schedules``: parity with torch / transformers schedulers, exact formulas, parsing, errors."""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import math
import pathlib
import pickle

import pytest
import torch

from mgd.errors import UserError
from mgd.schedules import (
    SCHEDULES, Constant, OneCycle, Schedule, WarmupCosine, constant, linear_warmup, one_cycle,
    parse_schedule, warmup_cosine, warmup_linear,
)

BASE_LR = 0.1


def _optimizer(lr: float = BASE_LR) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def _torch_multipliers(make_scheduler, steps: int, lr: float = BASE_LR) -> list[float]:
    """The lr each optimizer step t uses, over a whole run, divided by the base lr."""
    opt = _optimizer(lr)
    scheduler = make_scheduler(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"] / lr)
        opt.step()
        scheduler.step()
    return out


def _ours(schedule: Schedule, steps: int) -> list[float]:
    return [schedule(t, steps) for t in range(steps)]


def _close(a: list[float], b: list[float], rel: float = 1e-12) -> None:
    assert len(a) == len(b)
    for t, (x, y) in enumerate(zip(a, b)):
        assert math.isclose(x, y, rel_tol=rel, abs_tol=0.0), (t, x, y)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("steps", [97, 100, 7])
@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("pct_start", [0.3, 0.25, 0.5])
def test_one_cycle_matches_torch_one_cycle_lr_over_a_whole_run(steps, anneal, pct_start):
    peak, div, final_div = 2.0, 10.0, 100.0
    torch_lr = _torch_multipliers(
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=BASE_LR * peak, total_steps=steps, pct_start=pct_start, anneal_strategy=anneal,
            div_factor=div, final_div_factor=final_div, cycle_momentum=False),
        steps)
    ours = _ours(one_cycle(peak, pct_start, div, final_div, anneal), steps)
    _close(ours, torch_lr)


def test_one_cycle_defaults_match_torch_defaults():
    steps = 97
    torch_lr = _torch_multipliers(
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=BASE_LR, total_steps=steps,
                                                        cycle_momentum=False), steps)
    ours = _ours(one_cycle(), steps)
    _close(ours, torch_lr)
    assert ours[0] == pytest.approx(1 / 25) and ours[-1] == pytest.approx(1 / 25 / 1e4, rel=1e-12)
    assert max(ours) == pytest.approx(1.0, rel=1e-4) and ours.index(max(ours)) == 28  # peak at 28.1


@pytest.mark.parametrize("warmup,final", [(10, 0.0), (0, 0.0), (10, 0.1), (96, 0.5)])
def test_warmup_cosine_matches_lambda_lr_and_the_formula(warmup, final):
    steps = 97

    def reference(t: int) -> float:
        if t < warmup:
            return min(1.0, (t + 1) / warmup)
        progress = (t - warmup) / max(1, steps - warmup)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))

    torch_lr = _torch_multipliers(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, reference), steps)
    _close(_ours(warmup_cosine(warmup, final), steps), torch_lr)


def test_pure_cosine_matches_cosine_annealing_lr():
    # No warm-up, final=0: s_t = (1 + cos(pi t / T)) / 2, which is CosineAnnealingLR with T_max=T.
    steps = 97
    torch_lr = _torch_multipliers(
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0), steps)
    _close(_ours(warmup_cosine(0), steps), torch_lr, rel=1e-9)  # torch's recursive form drifts


def _hf_lr_lambdas() -> dict:
    """transformers' own warm-up lambdas, run from its source without importing the package.

    ``import transformers.optimization`` alone takes seconds; ``get_cosine_schedule_with_warmup``
    and friends are ``LambdaLR(opt, partial(<these>, ...))``, so running them is the same test.
    """
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        pytest.skip("transformers is not installed")
    path = pathlib.Path(spec.origin).with_name("optimization.py")
    names = {"_get_cosine_schedule_with_warmup_lr_lambda", "_get_linear_schedule_with_warmup_lr_lambda"}
    defs = [n for n in ast.parse(path.read_text()).body if getattr(n, "name", None) in names]
    if {n.name for n in defs} != names:  # (a name defined twice: the later one wins, as on import)
        pytest.skip("this transformers version has no such helpers")
    namespace = {"math": math}
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(path), "exec"), namespace)
    return {name: namespace[name] for name in names}


@pytest.mark.parametrize("final", [0.0, 0.1])
def test_decays_match_transformers_with_warmup_shifted_by_one_step(final):
    hf = _hf_lr_lambdas()
    steps, warmup = 97, 10
    cosine = functools.partial(hf["_get_cosine_schedule_with_warmup_lr_lambda"], num_warmup_steps=warmup,
                               num_training_steps=steps, num_cycles=0.5, min_lr_rate=final)
    linear = functools.partial(hf["_get_linear_schedule_with_warmup_lr_lambda"], num_warmup_steps=warmup,
                               num_training_steps=steps)
    cases = [(warmup_cosine(warmup, final), cosine)] + ([(warmup_linear(warmup), linear)] if final == 0 else [])
    for schedule, lr_lambda in cases:
        theirs = _torch_multipliers(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda), steps + 1)
        ours = _ours(schedule, steps)
        # Decay (t >= warmup): identical. Warm-up: ours(t) = HF(t + 1), so our step 0 is not 0.
        _close(ours[warmup:], theirs[warmup:steps])
        _close(ours[:warmup], theirs[1:warmup + 1])
        assert theirs[0] == 0.0 and ours[0] == 1 / warmup


# --------------------------------------------------------------------------- formulas


def test_linear_warmup_is_exactly_the_formula():
    for w in (1, 3, 10):
        for t in range(30):
            assert linear_warmup(w)(t, 30) == min(1, (t + 1) / w)
    assert _ours(linear_warmup(0), 5) == [1.0] * 5 == _ours(constant(), 5)


def test_warmup_linear_shape_and_final_values():
    steps, warmup, final = 100, 10, 0.2
    s = warmup_linear(warmup, final)
    values = _ours(s, steps)
    assert values[:warmup] == [(t + 1) / warmup for t in range(warmup)]
    assert values[warmup] == 1.0
    assert all(a > b for a, b in zip(values[warmup:], values[warmup + 1:]))
    # Reaches `final` at t = steps (one past the run), like transformers.
    assert values[-1] == pytest.approx(final + (1 - final) / (steps - warmup), rel=1e-12)
    assert s._value(steps, steps) == pytest.approx(final, abs=1e-15)
    assert WarmupCosine(warmup, final)._value(steps, steps) == pytest.approx(final, abs=1e-15)


def test_calls_return_python_floats_and_are_pure():
    s = warmup_cosine(5, 0.1)
    assert type(s(3, 20)) is float and type(constant()(0, 1)) is float
    assert s(7, 20) == s(7, 20) == warmup_cosine(5, 0.1)(7, 20)
    assert type(one_cycle()(0, 1)) is float and one_cycle()(0, 1) == pytest.approx(1 / 25 / 1e4)


def test_step_outside_the_run_raises_index_error():
    for s in (constant(), linear_warmup(3), warmup_cosine(3), warmup_linear(3), one_cycle()):
        for step, steps in [(-1, 10), (10, 10), (0, 0)]:
            with pytest.raises(IndexError):
                s(step, steps)


# --------------------------------------------------------------------------- objects, parsing


ALL = [constant(), linear_warmup(10), warmup_cosine(50, 0.1), warmup_linear(5, 0.25),
       one_cycle(pct_start=0.25), one_cycle(3.0, 0.4, 10.0, 1e3, "linear")]


@pytest.mark.parametrize("s", ALL, ids=str)
def test_schedules_are_hashable_picklable_and_round_trip(s):
    assert hash(s) == hash(pickle.loads(pickle.dumps(s)))
    assert pickle.loads(pickle.dumps(s)) == s
    assert parse_schedule(str(s)) == s
    d = json.loads(json.dumps(s.to_dict()))
    assert d["kind"] == s.kind and SCHEDULES[d.pop("kind")](**d) == s
    assert type(s).__name__ in repr(s)


def test_parse_examples_from_the_cli():
    assert parse_schedule("constant") == Constant()
    assert parse_schedule("warmup_cosine:warmup=50,final=0.1") == WarmupCosine(50, 0.1)
    assert parse_schedule(" warmup_cosine: warmup_steps = 50 ") == WarmupCosine(50, 0.0)
    assert parse_schedule("one_cycle:pct_start=0.25") == OneCycle(pct_start=0.25)
    assert parse_schedule("linear_warmup:warmup=10") == linear_warmup(10)
    assert parse_schedule("one_cycle:anneal=linear").anneal == "linear"
    assert {s.kind for s in ALL} == set(SCHEDULES)


@pytest.mark.parametrize("text,needle", [
    ("sawtooth", "choose from constant, linear_warmup, warmup_cosine, warmup_linear, one_cycle"),
    ("warmup_cosine:warmup=5,gamma=2", "KEY in: warmup_steps, final"),
    ("constant:warmup=3", "KEY in: none"),
    ("warmup_cosine:warmup", "KEY=VALUE"),
    ("warmup_cosine:warmup=5.5", "warmup_steps must be a int"),
    ("warmup_cosine:final=0.1", "missing warmup_steps"),
    ("one_cycle:pct_start=abc", "pct_start must be a float"),
    ("one_cycle:anneal=exp", "anneal must be 'cos' or 'linear'"),
])
def test_parse_rejects_bad_text_with_one_line_messages(text, needle):
    with pytest.raises(UserError) as info:
        parse_schedule(text)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("make,field", [
    (lambda: linear_warmup(-1), "warmup_steps"),
    (lambda: warmup_cosine(2.5), "warmup_steps"),
    (lambda: warmup_cosine(5, final=1.5), "final"),
    (lambda: warmup_linear(5, final=-0.1), "final"),
    (lambda: warmup_linear(5, final=float("nan")), "final"),
    (lambda: one_cycle(pct_start=0.0), "pct_start"),
    (lambda: one_cycle(pct_start=1.0), "pct_start"),
    (lambda: one_cycle(div_factor=0), "div_factor"),
    (lambda: one_cycle(final_div_factor=-1.0), "final_div_factor"),
    (lambda: one_cycle(max_multiplier=0.0), "max_multiplier"),
])
def test_bad_fields_raise_user_error_naming_the_field(make, field):
    with pytest.raises(UserError, match=field):
        make()
