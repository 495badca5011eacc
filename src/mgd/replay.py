r"""Exact metagradients through whole training runs: the REPLAY reverse pass.

Training is ``s_{t+1} = h_t(s_t, z)``, ``t = 0..T-1``, and the objective is ``f(z) = φ(θ_T)``.
The metagradient follows the reverse recursion (``method.md`` §1)

.. math::
    \bar a_T = \partial\phi/\partial s_T,\qquad
    \bar z \mathrel{+}= (\partial h_t/\partial z)^\top \bar a_{t+1},\qquad
    \bar a_t = (\partial h_t/\partial s_t)^\top \bar a_{t+1},\quad t = T-1, \dots, 0,

which needs the states in exact reverse order. REPLAY regenerates them by re-running the
(bit-deterministic) training from checkpoints on a lazy k-ary tree instead of storing all T:

``visit(a, b, s_a)``: if ``b - a = 1``, run the VJP of step ``a``; otherwise split ``[a, b)``
into ``m = min(k, b-a)`` contiguous children (the first ``(b-a) mod m`` one step longer),
replay from ``s_a`` to the last child's start storing only the children's starts, then visit
the children last to first, freeing each child's start when its subtree is done.

The initial forward pass (needed anyway for ``s_T``) stores the root's children, which saves
one tree level. With depth ``d = ⌈log_k T⌉`` at most ``(k-1)·d + 1`` checkpoints are alive
and the reverse pass replays about ``(1 - 1/k)(d - 1)·T`` steps; ``k ≈ √T`` (the default) gives
two levels: about ``2√T`` states and one extra training run. ``k ≥ T`` stores every state
(step-wise AD, :func:`metagradient` with ``mode="unrolled"``), the reference the tests compare
with bit for bit.

The checkpoint *schedule* (:func:`schedule`, :class:`ReplayPlan`) is separate from the
*mechanism* (:func:`metagradient`), so ``mgd estimate`` can count states and replays without
training. The per-step VJP is a swappable function (:class:`StepVJP`); the default is
double-backward (``create_graph=True``), ``method.md`` §3.1.

.. danger::
   REPLAY is exact only if every replayed step is bit-identical to the original. ``mgd``
   fingerprints every state of the forward pass and the per-example losses of every step,
   and compares every recomputation with them: each replayed state, and the losses of every
   step a VJP recomputes (store-everything included, every VJP mode). Any difference raises
   :class:`~mgd.errors.ReplayDivergedError`. Changing the thread count, device or dtype
   between the forward pass and the replay, or a model that draws from an RNG of its own,
   breaks this; dropout is fine (NOTE [randomness] in :mod:`mgd.step`).

NOTE [fused fallback]: the fused path computes ``s_{t+1}`` from the gradient taken with
``create_graph=True``. For most operations that is the same arithmetic as the forward pass's
plain backward, but not for all (GroupNorm's CPU kernel records a different formula). The
first fused step is therefore compared with the forward pass at once; if it differs, the run
falls back to recomputing each step at its VJP (``"double-backward"``), which is exact.

References:
    Engstrom et al., *Optimizing ML Training with Metagradient Descent*, arXiv 2503.13751
    (REPLAY); Griewank & Walther, *Evaluating Derivatives* (checkpointing).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator, Mapping, Sequence, Union

import torch
from torch import Tensor

from mgd.checkpoints import CheckpointStore
from mgd.resumable import PassProgress
from mgd.distributed import check_replicated
from mgd.errors import ReplayDivergedError, UserError
from mgd.memory import default_memory_budget, format_bytes, step_graph_bytes
from mgd.step import GradGraph, TrainingRun, TrainState, math_attention, restored_rng
from mgd.step_vjp import StepVJP, VJPResult, double_backward_vjp, mixed_mode_vjp, pull_back

__all__ = [
    "ReplayPlan",
    "make_plan",
    "Forward",
    "Replay",
    "VJP",
    "Free",
    "schedule",
    "default_k",
    "StepVJP",
    "double_backward_vjp",
    "mixed_mode_vjp",
    "VJP_MODES",
    "MetaGradient",
    "ReplayTrace",
    "metagradient",
    "FusedFallback",
]

MODES = ("replay", "unrolled")
#: Named per-step VJPs (``metagradient(vjp=...)``; a :class:`StepVJP` callable also works).
VJP_MODES = ("fused", "double-backward", "mixed")

# --------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Forward:
    """Train from ``s_0`` to ``s_T``, keeping checkpoints at ``store``."""

    stop: int
    store: tuple[int, ...]


@dataclass(frozen=True)
class Replay:
    """Regenerate states from checkpoint ``start`` up to ``stop``, keeping those at ``store``.

    ``leaf``: the stored states are those of consecutive steps whose VJPs come next (the
    bottom of the tree), so the replay may keep each step's graph for its VJP.

    NOTE [leaf replays]: a fused leaf replay also runs step ``stop`` itself, whose state
    ``s_{stop+1}`` is not needed (it is checked against the forward pass and dropped), so
    that every VJP of the segment finds its graph and none recomputes its step: one step
    more per segment instead of a recomputation at the VJP. :class:`ReplayPlan` counts it.
    """

    start: int
    stop: int
    store: tuple[int, ...]
    leaf: bool = False


@dataclass(frozen=True)
class VJP:
    """Pull the adjoint back through step ``step`` (reads checkpoint ``s_step``)."""

    step: int


@dataclass(frozen=True)
class Free:
    """Drop checkpoint ``s_step``."""

    step: int


Op = Union[Forward, Replay, VJP, Free]


def default_k(steps: int) -> int:
    """``⌈√T⌉`` (at least 2): a two-level tree, about ``2√T`` states, one extra training run."""
    return max(2, math.isqrt(steps - 1) + 1) if steps > 1 else 2


def _split(a: int, b: int, k: int) -> list[int]:
    """Boundaries ``a = c_0 < ... < c_m = b`` of ``m = min(k, b-a)`` near-equal children.

    The first ``(b - a) mod m`` children get one extra step, so the rule is deterministic and
    tests can assert the exact order of replays.
    """
    m = min(k, b - a)
    base, extra = divmod(b - a, m)
    bounds = [a]
    for j in range(m):
        bounds.append(bounds[-1] + base + (1 if j < extra else 0))
    return bounds


def tapered_root(steps: int, state_bytes: int, graph_bytes: int = 0) -> tuple[int, ...]:
    """Root boundaries of a two-level tree whose segments shrink towards the end of training.

    The reverse pass visits the root's segments last to first, freeing each segment's start
    when done: while segment ``i`` (0-based, in training order) is replayed, ``i + 1`` root
    checkpoints are alive next to its ``L_i`` states and kept graphs. Lengths
    ``L_i = L_last + (m-1-i)·S/(S+G)`` make that peak the same for every segment,
    ``m·S + L_last·(S+G)``, and the best ``m ≈ √(2T(S+G)/S)`` gives about
    ``√(2·T·S·(S+G))``: ``1/√2`` of the equal-segment tree's ``2√(T·S·(S+G))``, for the same
    single replay. (Equal segments are what the ``k``-ary rule gives.)
    """
    ratio = state_bytes / max(state_bytes + graph_bytes, 1)  # shorter by this per segment
    m = max(2, min(steps, int(math.sqrt(2 * steps / ratio))))
    while m > 2 and steps / m - ratio * (m - 1) / 2 < 1:  # the last segment needs a step
        m -= 1
    last = steps / m - ratio * (m - 1) / 2
    lengths = [last + ratio * (m - 1 - i) for i in range(m)]
    whole = [max(1, int(x)) for x in lengths]
    # Largest remainders get the missing steps, so the lengths add up to T exactly.
    for i in sorted(range(m), key=lambda i: whole[i] - lengths[i])[: steps - sum(whole)]:
        whole[i] += 1
    while sum(whole) > steps:  # the max(1, ...) floor overshot: trim the longest
        whole[whole.index(max(whole))] -= 1
    bounds = [0]
    for length in whole:
        bounds.append(bounds[-1] + length)
    return tuple(bounds)


def schedule(steps: int, k: int, root: Sequence[int] | None = None) -> Iterator[Op]:
    """The REPLAY traversal as a sequence of operations (no tensors involved).

    For ``T = 8, k = 2`` it is: ``Forward(8, store=(4,))``; ``Replay(4, 6, (6,))``;
    ``Replay(6, 7, (7,))``; VJP 7; VJP 6; ... ; VJP 0, i.e. VJPs in order ``T-1 .. 0``.

    ``root``: explicit root boundaries ``0 = c_0 < ... < c_m = T`` (e.g. :func:`tapered_root`);
    each root segment is then a leaf, replayed once with all of its states stored.
    """
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    if k < 2:
        raise UserError(f"the replay tree's branching factor k must be >= 2, got {k}")
    if root is not None and (root[0] != 0 or root[-1] != steps or any(b <= a for a, b in zip(root, root[1:]))):
        raise UserError(f"root boundaries must rise strictly from 0 to {steps}")
    leaf_below_root = root is not None

    def visit(a: int, b: int, width: int = k) -> Iterator[Op]:
        if b - a == 1:
            yield VJP(a)
            return
        bounds = _split(a, b, width)
        yield Replay(a, bounds[-2], tuple(bounds[1:-1]), leaf=len(bounds) - 1 == b - a)
        yield from children(bounds)

    def children(bounds: list[int], width: int = k) -> Iterator[Op]:
        for j in reversed(range(len(bounds) - 1)):
            yield from visit(bounds[j], bounds[j + 1], width)
            if j > 0:
                yield Free(bounds[j])

    bounds = list(root) if leaf_below_root else _split(0, steps, k)
    yield Forward(steps, tuple(bounds[1:-1]))
    # With explicit root segments, every segment is a leaf: one replay storing all its states.
    yield from children(bounds, steps if leaf_below_root else k)
    yield Free(0)


def _pareto(pairs: set[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """The Pareto-maximal ``(checkpoints, graphs)`` pairs (the peak for any sizes is among them)."""
    frontier, most_graphs = [], -1
    for c, g in sorted(pairs, reverse=True):  # by checkpoints, descending
        if g > most_graphs:  # not dominated by a pair with at least as many checkpoints
            frontier.append((c, g))
            most_graphs = g
    return tuple(sorted(frontier))


@dataclass(frozen=True)
class ReplayPlan:
    """What a REPLAY reverse pass will do, counted by walking :func:`schedule`.

    Attributes:
        steps: T.
        k: branching factor (``k >= T`` stores every state).
        depth: tree levels ``⌈log_k T⌉``.
        max_live_checkpoints: peak number of stored states (``s_0`` included).
        forward_steps: steps of the initial forward pass (T).
        replayed_steps: steps re-run during the reverse pass.
        extra_passes: ``replayed_steps / T``.
        fused: leaf replays keep each step's graph for its VJP (``vjp="fused"``).
        root: explicit root boundaries (a tapered two-level tree, :func:`tapered_root`), or
            ``None`` for the ``k``-ary rule; ``k`` is then the number of root segments.
        max_live_graphs: peak number of kept step graphs (0 unless ``fused``).
        frontier: the Pareto-maximal ``(checkpoints, graphs)`` pairs alive at once, from which
            :meth:`peak_bytes` takes the peak for any state and graph size.
    """

    steps: int
    k: int
    depth: int
    max_live_checkpoints: int
    forward_steps: int
    replayed_steps: int
    extra_passes: float
    fused: bool = False
    max_live_graphs: int = 0
    frontier: tuple[tuple[int, int], ...] = ((1, 0),)
    root: tuple[int, ...] | None = None
    #: like ``frontier``, counting only the checkpoints that replays store (the forward pass's
    #: are the ones an offloading plan keeps off the device)
    replay_frontier: tuple[tuple[int, int], ...] = ((0, 0),)
    #: the checkpoints the forward pass stores, ``s_0`` included (what tiers may offload)
    forward_store: tuple[int, ...] = (0,)
    #: ``(step, "host" | "disk")`` for the checkpoints this plan keeps off the device
    #: (:meth:`choose` with ``host_budget`` / ``disk_budget``); empty: all on the device
    placement: tuple[tuple[int, str], ...] = ()

    @classmethod
    def build(
        cls, steps: int, k: int | None = None, *, fused: bool = False, root: tuple[int, ...] | None = None
    ) -> "ReplayPlan":
        if root is not None:
            return cls._build(steps, max(2, len(root) - 1), fused, tuple(root))
        k = default_k(steps) if k is None else int(k)
        # k >= T stores every state (T = 1 included); a smaller k below 2 is refused by schedule()
        return cls._build(steps, max(steps, 2) if k >= steps else k, fused and k < steps, None)

    @classmethod
    @functools.lru_cache(maxsize=64)
    def _build(cls, steps: int, k: int, fused: bool, root: tuple[int, ...] | None) -> "ReplayPlan":
        live, graphs, replayed, replayed_live = 0, 0, 0, 0
        with_graph: set[int] = set()
        pairs: set[tuple[int, int]] = set()
        replay_pairs: set[tuple[int, int]] = set()
        forward_store: set[int] = {0}
        for op in schedule(steps, k, root):
            if isinstance(op, Forward):
                live = 1 + len(op.store)
                forward_store.update(op.store)
            elif isinstance(op, Replay):
                # A fused leaf replay also linearizes its last step (NOTE [leaf replays]).
                stop = op.stop + 1 if fused and op.leaf else op.stop
                replayed += stop - op.start
                store = set(op.store)
                for t in range(op.start, stop):
                    if fused and op.leaf:
                        with_graph.add(t)
                        graphs += 1
                    if t + 1 in store:
                        live += 1
                        replayed_live += 1
                    pairs.add((live, graphs))
                    replay_pairs.add((replayed_live, graphs))
            elif isinstance(op, VJP):
                if op.step in with_graph:
                    with_graph.discard(op.step)
                    graphs -= 1
            elif isinstance(op, Free):
                live -= 1
                replayed_live -= op.step not in forward_store
            pairs.add((live, graphs))
            replay_pairs.add((replayed_live, graphs))
        frontier = _pareto(pairs)
        depth = 0 if steps == 1 else 2 if root is not None else 0
        while root is None and k**depth < steps:
            depth += 1
        return cls(
            steps, k, depth, max(c for c, _ in pairs), steps, replayed, replayed / steps,
            fused, max(g for _, g in pairs), frontier, root, _pareto(replay_pairs), tuple(sorted(forward_store)),
        )

    def peak_bytes(self, state_bytes: int, graph_bytes: int = 0) -> int:
        """Peak *device* bytes of stored states and kept graphs, plus the adjoint and the final
        state.

        With a :attr:`placement` the forward pass's checkpoints live off the device, and the
        device holds the replays' states and graphs, the segment's start and the next one
        being prefetched. The working set of the step being computed (activations, one
        transient graph) comes on top.
        """
        return self._device_peak(state_bytes, graph_bytes, offloaded=bool(self.placement))

    def _device_peak(self, state_bytes: int, graph_bytes: int, *, offloaded: bool) -> int:
        if offloaded:  # replays' states and graphs, the segment's start, the next one prefetched
            held = max(c * state_bytes + g * graph_bytes for c, g in self.replay_frontier) + 2 * state_bytes
        else:
            held = max(c * state_bytes + g * graph_bytes for c, g in self.frontier)
        return held + 2 * state_bytes  # the adjoint and the final state

    def tier_bytes(self, state_bytes: int, graph_bytes: int = 0) -> dict[str, int]:
        """Peak bytes per tier: ``device`` (:meth:`peak_bytes`), ``host`` and ``disk`` (the
        offloaded checkpoints; every disk byte is written once and read once)."""
        counts = {"host": 0, "disk": 0}
        for _, tier in self.placement:
            counts[tier] += 1
        return {"device": self.peak_bytes(state_bytes, graph_bytes),
                **{tier: n * state_bytes for tier, n in counts.items()}}

    def offloaded(self, state_bytes: int, host_budget: int | None, disk_budget: int | None) -> "ReplayPlan | None":
        """This plan with the forward pass's checkpoints moved off the device: host memory
        first (the ones the reverse pass reads first, i.e. the latest), then disk; ``None``
        if they do not fit in the two budgets."""
        host = 0 if host_budget is None else host_budget // max(state_bytes, 1)
        disk = 0 if disk_budget is None else disk_budget // max(state_bytes, 1)
        steps = sorted(self.forward_store, reverse=True)
        if len(steps) > host + disk:
            return None
        placement = tuple((t, "host" if i < host else "disk") for i, t in enumerate(steps))
        return replace(self, placement=placement)

    @classmethod
    def choose(
        cls,
        steps: int,
        state_bytes: int,
        graph_bytes: int = 0,
        budget: int | None = None,
        *,
        fused: bool = True,
        cap: int | None = None,
        host_budget: int | None = None,
        disk_budget: int | None = None,
    ) -> "ReplayPlan":
        """The plan for a device memory budget (``--memory-budget``) and, optionally, budgets for
        checkpoints in host memory and on disk (``--host-budget``, ``--disk-budget``).

        * ``budget`` given: the fastest plan whose :meth:`peak_bytes` fits in it: every state
          stored if that fits; else a two-level tree (one extra training run), the one with
          the least memory; else the shallowest deeper tree that fits.
        * ``budget=None``: the lean default, a two-level tree with the least memory (states
          ``~ 2√(T·S·G)`` with fused graphs, ``~ 2√T·S`` without): one extra run for
          ``O(√T)`` memory; deeper only if that does not fit in ``cap`` (default: half the
          available RAM).
        * With host or disk budgets, when the lean two-level tree does not fit on the device,
          the forward pass's checkpoints move off it (:meth:`offloaded`) before the tree gets
          deeper, in this order: every state offloaded (no replay), then a two-level tree with
          the fewest root segments whose replays fit on the device, first in host memory alone,
          then with disk; deeper trees (in memory, then offloaded) only after that.

        Raises:
            UserError: not even the deepest tree (``k = 2``) fits.
        """
        tiers = host_budget is not None or disk_budget is not None
        if steps <= 2:  # every state stored; off the device only if it must be and can be
            plan = cls.build(steps, steps)
            if not tiers or budget is None or plan.peak_bytes(state_bytes) <= budget:
                return plan
            moved = plan.offloaded(state_bytes, host_budget, disk_budget)
            if moved is not None and moved.peak_bytes(state_bytes) <= budget:
                return moved
            raise UserError(
                f"the memory budget {format_bytes(budget)} is too small for {steps} steps of "
                f"{format_bytes(state_bytes)} states; raise --memory-budget"
            )
        root = default_k(steps)
        # Two levels hold about k·S + (T/k)·(S + G) at the peak: least near k* = √(T(S+G)/S).
        best = math.sqrt(steps * (state_bytes + (graph_bytes if fused else 0)) / max(state_bytes, 1))
        grid = sorted({min(steps - 1, max(root, int(round(best * f)))) for f in (0.8, 0.9, 1.0, 1.12, 1.25)})
        two_level = [cls.build(steps, k, fused=fused) for k in grid]
        tapered = tapered_root(steps, state_bytes, graph_bytes if fused else 0)
        two_level.append(cls.build(steps, fused=fused, root=tapered))
        lean = min(two_level, key=lambda plan: (plan.peak_bytes(state_bytes, graph_bytes), -plan.k))
        if budget is None:
            if cap is None or lean.peak_bytes(state_bytes, graph_bytes) <= cap:
                return lean
            budget = cap
        if (steps + 3) * state_bytes <= budget:  # every state, the adjoint and the final state
            return cls.build(steps, steps)
        if lean.peak_bytes(state_bytes, graph_bytes) <= budget:
            return lean
        if tiers:
            for host_only in (True, False):
                plan = cls._offloaded_two_level(steps, state_bytes, graph_bytes, budget, fused,
                                                host_budget, None if host_only else disk_budget)
                if plan is not None:
                    return plan
        deeper = []
        k = root - 1
        while k >= 2:  # deeper trees: less memory, one more replay per level
            deeper.append(cls.build(steps, k, fused=fused))
            k = min(k - 1, int(k / 1.25))
        for plan in deeper:
            if plan.peak_bytes(state_bytes, graph_bytes) <= budget:
                return plan
        if tiers:
            for plan in deeper:
                moved = plan.offloaded(state_bytes, host_budget, disk_budget)
                if moved is not None and moved.peak_bytes(state_bytes, graph_bytes) <= budget:
                    return moved
        if fused and graph_bytes:
            return cls.choose(steps, state_bytes, 0, budget, fused=False, host_budget=host_budget,
                              disk_budget=disk_budget)
        smallest = cls.build(steps, 2)
        raise UserError(
            f"the memory budget {format_bytes(budget)} is too small for {steps} steps: even the "
            f"deepest replay tree (k=2, {smallest.depth} levels) keeps "
            f"{format_bytes(smallest.peak_bytes(state_bytes))} of states ({format_bytes(state_bytes)} "
            "each); raise --memory-budget, give checkpoints room with --host-budget or --disk-budget, "
            "or shorten the run"
        )

    @classmethod
    def _offloaded_two_level(cls, steps, state_bytes, graph_bytes, budget, fused, host_budget, disk_budget):
        """The offloaded plan with no replay if it fits, else the two-level tree with the fewest
        root segments (fewest offloaded bytes) whose replays fit in ``budget``; ``None`` if none."""
        everything = cls.build(steps, steps).offloaded(state_bytes, host_budget, disk_budget)
        if everything is not None and everything.peak_bytes(state_bytes, graph_bytes) <= budget:
            return everything

        def with_segments(m: int) -> "ReplayPlan":
            return cls.build(steps, fused=fused, root=tuple(_split(0, steps, m)))

        def fits(m: int) -> bool:
            return with_segments(m)._device_peak(state_bytes, graph_bytes, offloaded=True) <= budget

        if not fits(steps):
            return None
        low, high = 2, steps  # the device peak falls as segments get shorter: bisect
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if fits(mid) else (mid + 1, high)
        return with_segments(low).offloaded(state_bytes, host_budget, disk_budget)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["frontier"] = [list(pair) for pair in self.frontier]
        data["replay_frontier"] = [list(pair) for pair in self.replay_frontier]
        del data["forward_store"]
        data["placement"] = {tier: sum(1 for _, where in self.placement if where == tier) for tier in ("host", "disk")}
        data["tapered"] = self.root is not None
        if self.root is not None:  # the segment lengths, first and last, not every boundary
            data["root"] = {"segments": len(self.root) - 1, "first": self.root[1], "last": self.root[-1] - self.root[-2]}
        return data


def make_plan(steps: int, state_bytes: int, graph_bytes: int = 0, *, k: int | None = None, fused: bool = True,
              memory_budget: int | None = None, host_budget: int | None = None,
              disk_budget: int | None = None) -> ReplayPlan:
    """The plan :func:`metagradient` runs (and ``mgd estimate`` prints) for these settings.

    ``k`` given (``k >= T``: store every state): that tree, its forward checkpoints moved off
    the device when a host or disk budget is given. Otherwise :meth:`ReplayPlan.choose`.
    """
    if k is None:
        return ReplayPlan.choose(steps, state_bytes, graph_bytes, memory_budget, fused=fused,
                                 cap=default_memory_budget(), host_budget=host_budget, disk_budget=disk_budget)
    plan = ReplayPlan.build(steps, k, fused=fused)
    if host_budget is None and disk_budget is None:
        return plan
    offloaded = plan.offloaded(state_bytes, host_budget, disk_budget)
    if offloaded is None:
        raise UserError(
            f"the {len(plan.forward_store)} checkpoints of the forward pass "
            f"({format_bytes(len(plan.forward_store) * state_bytes)}) do not fit in the host and disk "
            "budgets; raise --host-budget / --disk-budget or choose a larger --replay-k"
        )
    return offloaded


# --------------------------------------------------------------------------------- engine


@dataclass
class ReplayTrace:
    """Instrumentation for tests and diagnostics (costs nothing when not passed).

    Attributes:
        events: ``("forward"|"replay"|"vjp", step)`` in execution order; for forward and
            replay, ``step`` is the index of the state just produced.
        live_checkpoints: number of stored states after each change.
        live_graphs: number of step graphs kept by fused leaf replays, after each change.
        keep_states: also keep a copy of every state produced by a replay, keyed by step
            (a list per step, one entry per regeneration).
    """

    keep_states: bool = False
    events: list[tuple[str, int]] = field(default_factory=list)
    live_checkpoints: list[int] = field(default_factory=list)
    live_graphs: list[int] = field(default_factory=list)
    replayed_states: dict[int, list[TrainState]] = field(default_factory=dict)
    forward_states: dict[int, TrainState] = field(default_factory=dict)

    @property
    def max_live_checkpoints(self) -> int:
        return max(self.live_checkpoints, default=0)


@dataclass
class MetaGradient:
    """Result of :func:`metagradient`.

    Attributes:
        value: ``f(z) = φ(θ_T)``.
        grads: ``∂f/∂z`` for each requested metaparameter, shaped like its value.
        final_state: ``s_T``.
        plan: the replay plan that was executed.
        timings: seconds spent in the forward pass and the reverse pass.
        memory: ``state_bytes``, ``graph_bytes`` (one kept step graph), ``budget_bytes`` and
            the plan's ``planned_peak_bytes`` (:meth:`ReplayPlan.peak_bytes`).
        vjp: the per-step VJP that ran: ``"double-backward"`` after a fused fallback or when
            mixed mode fell back on every step, ``"mixed+double-backward"`` when on some.
    """

    value: float
    grads: dict[str, Tensor]
    final_state: TrainState
    plan: ReplayPlan
    timings: dict[str, float]
    memory: dict[str, int | None] = field(default_factory=dict)
    vjp: str = "fused"


def _bits(tensor: Tensor) -> Tensor:
    """An exact checksum of a tensor's bits: the integer sum of its raw 32-bit words."""
    return tensor.detach().reshape(-1).view(torch.int32).sum(dtype=torch.int64)


def _fingerprint(state: TrainState) -> Tensor:
    """An exact checksum of a state's bits, one per tensor.

    Any single-bit change alters it; it stays on the device (no synchronisation per step).
    """
    return torch.stack([_bits(t) for t in state.tensors()])


class FusedFallback(UserWarning):
    """The fused per-step VJP was not bit-identical to the forward pass; double-backward ran instead."""


def _objective_gradient(run: TrainingRun, objective, final: TrainState) -> tuple[Tensor, Tensor, Tensor]:
    """``(φ(θ_T), ∂φ/∂θ_T, ∂φ/∂b_T)``; batch by batch when the objective offers it."""
    with torch.enable_grad():
        theta = final.params.detach().requires_grad_(True)
        buffers = final.buffers.detach().requires_grad_(True)
        named = run.named_tensors(theta, buffers)
        if hasattr(objective, "value_and_grad"):
            names = list(named)
            value, parts = objective.value_and_grad(named, names)
            grads = dict(zip(names, parts))

            def flat(keys) -> Tensor:
                pieces = [(grads[n] if grads[n] is not None else torch.zeros_like(named[n])).reshape(-1) for n in keys]
                return torch.cat(pieces) if pieces else torch.zeros(0, dtype=run.dtype, device=run.device)

            return value.detach(), flat(run.stateless.names), flat(run.stateless.buffer_names)
        value = objective(named)
        theta_bar, buffers_bar = torch.autograd.grad(value, (theta, buffers), allow_unused=True)
    if theta_bar is None:
        theta_bar = torch.zeros_like(theta)
    return value.detach(), theta_bar, torch.zeros_like(buffers) if buffers_bar is None else buffers_bar


def metagradient(
    trainer: TrainingRun,
    objective: Callable[[Mapping[str, Tensor]], Tensor],
    meta: Mapping[str, Tensor] | None = None,
    *,
    wrt: Sequence[str] | None = None,
    mode: str = "replay",
    k: int | None = None,
    vjp: str | StepVJP = "fused",
    horizon: int | None = None,
    memory_budget: int | None = None,
    host_budget: int | None = None,
    disk_budget: int | None = None,
    checkpoint_dir: str | None = None,
    keep_checkpoints: bool = False,
    state_dir: str | None = None,
    trace: ReplayTrace | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> MetaGradient:
    """The exact gradient of ``objective(θ_T)`` with respect to metaparameters.

    Args:
        trainer: the training run (a :class:`~mgd.step.TrainingRun`, e.g. a
            :class:`~mgd.training.Trainer`).
        objective: ``φ``, a differentiable scalar function of the final trainable parameters
            and BatchNorm statistics, given as a name → tensor dict (e.g.
            :class:`mgd.losses.Objective`, evaluated batch by batch).
        meta: metaparameter values (missing kinds take their neutral default).
        wrt: which metaparameters to differentiate (default: all kinds of the run).
        mode: ``"replay"`` (lazy k-ary tree) or ``"unrolled"`` (store every state).
        k: branching factor for ``"replay"``; ``k >= T`` stores everything. Default: chosen
            by :meth:`ReplayPlan.choose` from ``memory_budget``.
        memory_budget: bytes the plan may keep (states and kept graphs; the working set of
            one step comes on top). ``None``: the lean two-level tree, deeper only if that
            exceeds half the available RAM. Ignored when ``k`` is given.
        vjp: the per-step VJP, one of :data:`VJP_MODES` or a :class:`StepVJP` callable:
            ``"fused"`` (default): double-backward, where the bottom-level replays keep each
            step's graph so that its VJP does not recompute the step (memory: one step's
            graph per state of a leaf segment; NOTE [fused fallback]);
            ``"double-backward"``: recompute each step with a graph at its VJP (micro-batch by
            micro-batch); ``"mixed"``: forward-over-reverse
            (:func:`~mgd.step_vjp.mixed_mode_vjp`, least memory). All are exact.
        horizon: differentiate only through the last ``horizon`` steps (truncated
            backpropagation: a cheaper, *biased* metagradient that ignores how earlier steps
            shape the end of training; the truncated-unroll baseline). Default: all steps.
        host_budget, disk_budget: bytes of checkpoints the plan may keep in host memory and
            on disk when ``memory_budget`` is too small for the lean tree
            (:meth:`ReplayPlan.choose`; :mod:`mgd.checkpoints`). ``None``: that tier is not used.
        checkpoint_dir: where the disk tier makes its private directory (default: the
            system's temporary directory); it is removed when the pass ends, unless
            ``keep_checkpoints``.
        state_dir: make the pass resumable: its progress is saved in this directory
            (:mod:`mgd.resumable`: the forward pass's checkpoints, ``s_T``, and after every
            root segment of the reverse pass its adjoint and partial sums), and a pass given a
            directory that holds progress continues from it, with the same result bit for
            bit. The directory is left in place: remove it once the result is saved, with
            :func:`mgd.resumable.remove_pass` (the checkpoint files go to ``checkpoint_dir``
            when given, else into the directory itself).
        trace: optional :class:`ReplayTrace` to record events and live checkpoints.
        progress: optional callback ``(phase, steps_done)`` for progress bars.

    Returns:
        A :class:`MetaGradient`.

    Raises:
        UserError: bad ``mode``, ``k`` or metaparameter values; a NaN or infinite training
            loss (naming the step).
        ReplayDivergedError: a recomputed state or step differs from the forward pass.
    """
    run = trainer
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if k is not None and k < 2:
        raise UserError(f"the replay tree's branching factor k must be >= 2, got {k}")
    if horizon is not None and horizon < 1:
        raise UserError(f"the truncation horizon must be >= 1 step, got {horizon}")
    if isinstance(vjp, str) and vjp not in VJP_MODES:
        raise UserError(f"unknown per-step VJP {vjp!r}; choose one of {', '.join(VJP_MODES)}")
    if not isinstance(vjp, str) and run.collective.world_size > 1:
        raise UserError("a custom per-step VJP cannot run data-parallel; use one of " + ", ".join(VJP_MODES))
    values = run.check_meta(meta or {})
    wrt = list(values) if wrt is None else list(wrt)
    missing = [name for name in wrt if name not in values]
    if missing:
        raise UserError(
            f"cannot differentiate {', '.join(missing)}: not a metaparameter of this run "
            f"(it has {', '.join(values) or 'none'})"
        )
    with math_attention():
        storage = {"host_budget": host_budget, "disk_budget": disk_budget, "directory": checkpoint_dir,
                   "keep": keep_checkpoints, "state_dir": state_dir}
        return _metagradient(run, objective, values, wrt, mode, k, vjp, horizon, memory_budget, storage, trace,
                             progress)


def _metagradient(run, objective, values, wrt, mode, k, vjp, horizon, memory_budget, storage, trace,
                  progress) -> MetaGradient:
    fused = vjp == "fused"
    mixed = vjp == "mixed"
    step_vjp: StepVJP = double_backward_vjp if isinstance(vjp, str) else vjp
    T = run.steps
    first_step = 0 if horizon is None else max(0, T - horizon)

    s0 = run.init_state()
    state_bytes = s0.nbytes()
    graph_bytes = 0
    saved = None
    if storage["state_dir"] is not None:
        if run.collective.world_size > 1:
            raise UserError("a resumable pass (a state directory) cannot run data-parallel yet; run it on one process")
        identity = {"steps": T, "state_bytes": state_bytes, "dtype": str(run.dtype), "wrt": list(wrt),
                    "vjp": vjp if isinstance(vjp, str) else "custom", "horizon": first_step,
                    "initial_state": [int(x) for x in _fingerprint(s0).cpu()]}
        saved = PassProgress(storage["state_dir"], identity, checkpoint_parent=storage["directory"])
    if saved is not None and saved.saved_plan is not None:  # the plan the pass began with
        plan = replace(ReplayPlan.build(T, saved.saved_plan["k"], fused=saved.saved_plan["fused"],
                                        root=tuple(saved.saved_plan["root"]) if saved.saved_plan["root"] else None),
                       placement=tuple((int(t), tier) for t, tier in saved.saved_plan["placement"]))
        graph_bytes = saved.saved_plan["graph_bytes"]
    else:
        if mode != "unrolled" and k is None and fused:
            graph_bytes = step_graph_bytes(run, s0, run.local_meta(values, 0), wrt)
        plan = make_plan(T, state_bytes, graph_bytes, k=T if mode == "unrolled" else k, fused=fused,
                         memory_budget=memory_budget, host_budget=storage["host_budget"],
                         disk_budget=storage["disk_budget"])
    fused = fused and plan.fused
    checkpoints = CheckpointStore(
        dict(plan.placement), device=run.device, directory=storage["directory"], keep=storage["keep"],
        durable=None if saved is None else saved.checkpoints, durable_steps=(*plan.forward_store, T),
    )
    try:
        checkpoints.check_free_space(state_bytes)
        if saved is not None:
            saved.start({"k": plan.k, "fused": plan.fused, "root": list(plan.root) if plan.root else None,
                         "placement": [list(pair) for pair in plan.placement], "graph_bytes": graph_bytes})
        return _passes(run, objective, values, wrt, plan, checkpoints, saved, s0, state_bytes, graph_bytes, fused,
                       mixed, step_vjp, vjp, first_step, memory_budget, trace, progress)
    finally:
        checkpoints.close()


def _passes(run, objective, values, wrt, plan, checkpoints, saved, s0, state_bytes, graph_bytes, fused, mixed,
            step_vjp, vjp, first_step, memory_budget, trace, progress) -> MetaGradient:
    """The forward and reverse passes of :func:`metagradient` over ``checkpoints``."""
    T = run.steps
    used_vjp = vjp if isinstance(vjp, str) else "custom"
    device = run.device
    forward_fp = torch.zeros(T + 1, len(s0.tensors()), dtype=torch.int64, device=device)
    loss_fp = torch.zeros(T, dtype=torch.int64, device=device)
    loss_sums = torch.zeros(T, dtype=run.dtype, device=device)
    state_diverged = torch.zeros(T + 1, dtype=torch.bool, device=device)
    step_diverged = torch.zeros(T, dtype=torch.bool, device=device)

    def note_live() -> None:
        if trace is not None:
            trace.live_checkpoints.append(len(checkpoints))
            trace.live_graphs.append(len(graphs))

    # Leaf replays hand their work to the VJPs that follow: the graph of each step ("fused")
    # or its minibatch gradient ("mixed"), keyed by step and dropped once used.
    graphs: dict[int, GradGraph] = {}
    cached_grads: dict[int, Tensor] = {}
    fused_checked = False
    # kinds at an exact identity (all-one weights): steps without a graph skip them, same bits
    neutral = run.neutral_kinds(values)

    def advance(state: TrainState, keep_work: bool, donate: bool) -> tuple[TrainState, Tensor]:
        nonlocal fused, fused_checked, used_vjp
        t = state.step
        if keep_work and fused and t >= first_step:
            graph = run.linearize(state, run.local_meta(values, t), wrt)
            new = run.next_state(state, graph)
            if not fused_checked:  # NOTE [fused fallback]: one synchronisation, once
                fused_checked = True
                if not (torch.equal(_fingerprint(new), forward_fp[t + 1]) and bool(_bits(graph.losses) == loss_fp[t])):
                    result = run.take_step(state, values, neutral)
                    # Only if the plain step reproduces the forward pass is the fused arithmetic
                    # to blame; otherwise the replay itself diverged (reported at the end).
                    if torch.equal(_fingerprint(result.state), forward_fp[t + 1]):
                        warnings.warn(
                            "the fused per-step VJP's gradient is not bit-identical to the forward "
                            "pass's for this model; recomputing each step at its VJP instead (exact)",
                            FusedFallback, stacklevel=4,
                        )
                        fused, used_vjp = False, "double-backward"
                        return result.state, result.losses
            graphs[t] = graph
            note_live()
            return new, graph.losses
        result = run.take_step(state, values, neutral, donate)
        if keep_work and mixed and t >= first_step:
            cached_grads[t] = result.grad
        return result.state, result.losses

    def run_forward(
        start: TrainState, stop: int, store: tuple[int, ...], phase: str, leaf: bool = False
    ) -> TrainState:
        keep = set(store)
        state = start
        # A state this loop made and did not store is seen by nothing after the next step, which
        # may overwrite it (unless a trace keeps every state).
        donate = trace is None or not trace.keep_states
        with restored_rng(device):  # nothing of the user's runs between these steps
            while state.step < stop:
                state, losses = advance(state, leaf, donate and state is not start and state.step not in keep)
                t = state.step
                fp, lf = _fingerprint(state), _bits(losses)
                if phase == "forward":
                    forward_fp[t] = fp
                    loss_fp[t - 1] = lf
                    loss_sums[t - 1] = losses.sum()
                else:
                    state_diverged[t] |= (fp != forward_fp[t]).any()
                    step_diverged[t - 1] |= lf != loss_fp[t - 1]
                if trace is not None:
                    trace.events.append((phase, t))
                    if trace.keep_states:
                        if phase == "forward":
                            trace.forward_states[t] = state.detached()
                        else:
                            trace.replayed_states.setdefault(t, []).append(state.detached())
                if t in keep:
                    # A stored state is never donated to the next step, so it is never written
                    # again and can be stored without a copy.
                    checkpoints[t] = state
                    note_live()
                    if phase == "forward":
                        record_forward(t)
                if progress is not None:
                    progress(phase, 1)
        return state

    def record_forward(t: int) -> None:
        """With a state directory: once checkpoint ``t`` is on disk, say the forward pass got there."""
        if saved is None:
            return
        snapshot = (forward_fp[: t + 1].cpu().numpy(), loss_fp[:t].cpu().numpy(), loss_sums[:t].clone())
        checkpoints.after_writes(lambda: saved.save_forward(t, *snapshot))

    # ---- forward pass: s_0 -> s_T, storing the root's children
    started = time.perf_counter()
    ops = list(schedule(T, plan.k, plan.root))
    first = ops[0]
    assert isinstance(first, Forward), "schedule must start with the forward pass (please report)"
    forward_fp[0] = _fingerprint(s0)
    resumed = saved.load_forward(loss_sums) if saved is not None else None
    if resumed is None:
        checkpoints[0] = s0
        note_live()
        record_forward(0)
        start = s0
    else:  # continue after the last checkpoint the saved pass wrote
        reached = resumed["reached"]  # the same s_0: pass.json's identity holds its fingerprint
        forward_fp[: reached + 1] = torch.as_tensor(resumed["forward_fp"], device=device)
        loss_fp[:reached] = torch.as_tensor(resumed["loss_fp"], device=device)
        loss_sums[:reached] = resumed["loss_sums"]
        for t in (0, *first.store):
            if t <= reached:
                checkpoints.adopt(t)
        start = None if reached == T else checkpoints[reached]
    if start is not None:
        final = run_forward(start, T, tuple(t for t in first.store if t > start.step), "forward")
        if saved is not None:
            checkpoints[T] = final  # s_T too, so that a resumed reverse pass needs no forward pass
            record_forward(T)
            checkpoints.wait()
    else:
        checkpoints.adopt(T)
        final = checkpoints[T]
    run.check_finite(loss_sums)
    run.stateless.check_constants()
    check_replicated(run.collective, forward_fp[[0, T]], "initial or final training states")
    value, theta_bar, buffers_bar = _objective_gradient(run, objective, final)
    adjoint = (theta_bar, *(torch.zeros_like(t) for t in final.opt_state), buffers_bar)
    forward_seconds = time.perf_counter() - started

    # ---- reverse pass
    started = time.perf_counter()
    grads = {name: torch.zeros_like(values[name]) for name in wrt}
    # With data parallelism, what reaches z through a rank's own examples is summed at the end.
    split = run.collective.world_size > 1
    partial = {name: torch.zeros_like(values[name]) for name in wrt} if split else {}
    fell_back = vjps = 0  # mixed-mode steps that ran reverse-over-reverse
    flags = {"state_diverged": state_diverged, "step_diverged": step_diverged}
    done = 0  # operations of the schedule already run (the forward pass is operation 0)
    back = saved.load_reverse(adjoint, grads, partial, flags) if saved is not None else None
    if back is not None:  # continue after the last root segment the saved pass finished
        done, adjoint, grads, partial = back["op_index"], back["adjoint"], back["grads"], back["partial"]
        state_diverged |= back["flags"]["state_diverged"]
        step_diverged |= back["flags"]["step_diverged"]
        counters = back["counters"]
        fell_back, vjps, fused, used_vjp = counters["fell_back"], counters["vjps"], counters["fused"], counters["vjp"]
        fused_checked = counters["fused_checked"]
        for op in ops[1: done + 1]:
            if isinstance(op, Free) and op.step in checkpoints:
                del checkpoints[op.step]
    for index in range(done + 1, len(ops)):
        op = ops[index]
        if isinstance(op, Replay):
            # NOTE [leaf replays]: kept work for the segment's last step too
            extend = op.leaf and fused and op.stop >= first_step
            run_forward(checkpoints[op.start], op.stop + extend, op.store, "replay", leaf=op.leaf)
        elif isinstance(op, VJP):
            if op.step < first_step:
                # VJPs come in order T-1 .. 0: everything left is before the horizon.
                break
            state = checkpoints[op.step]
            local = run.local_meta(values, op.step)
            if op.step in graphs:
                graph = graphs.pop(op.step)
                note_live()
                result = pull_back(run, state, graph, wrt, adjoint)
            elif mixed:
                result = mixed_mode_vjp(run, state, local, wrt, adjoint, cached_grads.pop(op.step, None))
            else:
                result = step_vjp(run, state, local, wrt, adjoint)
            if isinstance(result, VJPResult):
                fell_back += result.fell_back
                if result.losses is not None:
                    step_diverged[op.step] |= _bits(result.losses) != loss_fp[op.step]
                adjoint = result.adjoint
                update_bar, loss_bar = result.update_bar, result.loss_bar
            else:  # a custom StepVJP: (ā_t, z̄ slices)
                adjoint, update_bar = result[0], result[1]
                loss_bar = {}
            index = run.shard_indices(op.step)
            for name in wrt:
                kind = run.metaparams[name]
                kind.accumulate(grads[name], update_bar[name], op.step, index)
                if name in loss_bar:
                    kind.accumulate(partial[name] if split else grads[name], loss_bar[name], op.step, index)
            vjps += 1
            if trace is not None:
                trace.events.append(("vjp", op.step))
            if progress is not None:
                progress("reverse", 1)
        elif isinstance(op, Free):
            del checkpoints[op.step]
            note_live()
            if saved is not None and op.step in first.store and saved.due():  # a root segment is done
                saved.save_reverse(index, adjoint, grads, partial, flags, {
                    "fell_back": fell_back, "vjps": vjps, "fused": fused, "vjp": used_vjp,
                    "fused_checked": fused_checked})
    for name in partial:
        grads[name] += run.collective.all_reduce_sum(partial[name])
    if fell_back:
        used_vjp = "double-backward" if fell_back == vjps else "mixed+double-backward"
    reverse_seconds = time.perf_counter() - started

    if bool(state_diverged.any()) or bool(step_diverged.any()):
        bad_state = int(state_diverged.nonzero()[0, 0]) if bool(state_diverged.any()) else T + 1
        bad_step = int(step_diverged.nonzero()[0, 0]) if bool(step_diverged.any()) else T + 1
        what = f"replayed state s_{bad_state}" if bad_state <= bad_step else f"recomputed step {bad_step}"
        raise ReplayDivergedError(
            f"{what} differs from the forward pass: training is not bit-deterministic here "
            "(thread count, device, dtype, or randomness the run does not seed: draw it from "
            "augment='s generator or the model's torch RNG); the metagradient would be wrong, "
            "so none is returned"
        )
    return MetaGradient(
        value=float(value),
        grads=grads,
        final_state=final,
        plan=plan,
        timings={"forward_s": forward_seconds, "reverse_s": reverse_seconds},
        memory={
            "state_bytes": state_bytes,
            "graph_bytes": graph_bytes,
            "budget_bytes": memory_budget,
            "planned_peak_bytes": plan.peak_bytes(state_bytes, graph_bytes),
            "planned_tier_bytes": plan.tier_bytes(state_bytes, graph_bytes),
            "checkpoint_io": dict(checkpoints.stats),
        },
        vjp=used_vjp,
    )
