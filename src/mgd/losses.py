r"""Per-example training losses, and objectives and metrics evaluated in batches.

A **training loss** is ``loss(outputs, batch) -> Tensor`` of shape ``(B,)``: one loss per
example of the minibatch, from the model's output and the batch it was computed on. The step
averages it as ``L_t = (1/B) Σ_i w_i ℓ_i`` (``w`` the data weights, if any). The library never
guesses what the model returns: :func:`cross_entropy` reads class labels, :func:`causal_lm`
reduces next-token cross-entropies with a mask to one value per sequence.

An **objective** ``φ`` maps the final trained tensors (a name → tensor dict, as in
``torch.func``) to a differentiable scalar. :class:`Objective` evaluates a per-example loss
over a whole validation set in eval mode, in batches, and can return its gradient one batch
at a time (:meth:`Objective.value_and_grad`) so a large validation set never needs one giant
graph. :class:`Metric` does the same without gradients (accuracy, next-token accuracy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mgd.batches import Batch, TensorData, as_data, get_field
from mgd.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from mgd.stateless import StatelessModel

__all__ = [
    "Loss", "logits_of", "labels_of", "cross_entropy", "clipped_margin", "causal_lm", "accuracy_of", "next_token_accuracy",
    "Objective", "Metric", "model_inputs", "objective_value",
]

Loss = Callable[[Any, Batch], Tensor]
LABEL_KEYS = ("labels", "label", "y", "targets", "target")


def logits_of(outputs: Any) -> Tensor:
    """The logits in a model's output: the tensor itself, ``.logits`` (transformers) or ``[0]``."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise UserError(
        f"cannot find logits in the model's output ({type(outputs).__name__}); pass a loss "
        "function that reads it"
    )


def labels_of(batch: Batch) -> Tensor:
    """Class labels of a batch: ``batch[1]`` of a tuple, or a dict's ``labels``/``label``/``y``."""
    if isinstance(batch, dict):
        for key in LABEL_KEYS:
            if key in batch:
                return batch[key]
        raise UserError(f"the batch has no labels: none of the keys {', '.join(LABEL_KEYS)}")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return get_field(batch, 1)
    raise UserError("the default loss needs (inputs, labels) batches or a dict with 'labels'")


def model_inputs(batch: Batch) -> tuple[tuple, dict]:
    """The default call convention: how a batch becomes ``model(*args, **kwargs)``.

    * a tensor: ``model(batch)``;
    * a tuple or list ``(x, y, ...)``: ``model(x)``;
    * a dict: ``model(**batch)`` without the label keys (``labels``, ``label``, ``y``,
      ``targets``, ``target``), so a transformers model returns logits and the loss stays ours.
    """
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        return (), {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],), {}
    raise UserError(f"cannot pass a batch of type {type(batch).__name__} to the model; give inputs=")


def cross_entropy(outputs: Any, batch: Batch) -> Tensor:
    """Per-example cross-entropy of class logits ``(B, C)`` against the batch's labels."""
    return F.cross_entropy(logits_of(outputs), labels_of(batch), reduction="none")


def clipped_margin(kappa: float = 1.0) -> Loss:
    r"""A per-example misclassification margin for attacks, ``min(max_{j≠y} s_j − s_y, κ)``.

    Maximising its mean over a validation set pushes correctly classified examples across the
    decision boundary, and stops rewarding an example once it is misclassified by ``κ``
    (Carlini & Wagner 2017's clipped margin). Cross-entropy instead keeps rewarding ever more
    confident mistakes, which raises the loss without lowering accuracy.
    """

    def margin(outputs: Any, batch: Batch) -> Tensor:
        logits, labels = logits_of(outputs), labels_of(batch)
        own = logits.gather(1, labels[:, None])[:, 0]
        others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
        return torch.clamp(others.max(dim=1).values - own, max=kappa)

    return margin


def causal_lm(
    *, labels: str = "labels", mask: str | None = "attention_mask", ignore_index: int = -100,
    token_weights: str | None = None, shift: bool = True,
) -> Loss:
    r"""A per-sequence next-token loss for language models.

    Token ``j`` of sequence ``i`` predicts label ``j + 1`` (``shift=True``, the transformers
    convention for causal LMs whose ``labels`` equal ``input_ids``). With valid positions
    ``m_{ij}`` (label ``!= ignore_index`` and, if ``mask`` names a field, the mask of the
    predicted token) and optional per-token weights ``u_{ij}``:

    .. math::
        \ell_i = \frac{\sum_j m_{ij} u_{ij}\,\mathrm{CE}_{ij}}{\max(1, \sum_j m_{ij})}.

    Args:
        labels: the batch key of the target token ids (``input_ids`` works too).
        mask: the batch key of the padding mask, or ``None``.
        ignore_index: label value that marks a position without a target.
        token_weights: the batch key of per-token weights, or ``None``.
        shift: predict the next token (``True``) or the same position (``False``).
    """

    def loss(outputs: Any, batch: Batch) -> Tensor:
        logits = logits_of(outputs)
        target = get_field(batch, labels)
        if logits.dim() != 3 or target.shape != logits.shape[:2]:
            raise UserError(
                f"causal_lm expects logits (B, L, V) and labels (B, L); got {tuple(logits.shape)} "
                f"and {tuple(target.shape)}"
            )
        valid = target != ignore_index
        weights = get_field(batch, token_weights) if token_weights is not None else None
        if mask is not None and isinstance(batch, dict) and mask in batch:
            valid = valid & get_field(batch, mask).bool()
        if shift:
            logits, target, valid = logits[:, :-1], target[:, 1:], valid[:, 1:]
            weights = None if weights is None else weights[:, 1:]
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.clamp_min(0).reshape(-1), reduction="none"
        ).view(target.shape)
        ce = ce * valid.to(ce.dtype)
        if weights is not None:
            ce = ce * weights.to(ce.dtype)
        return ce.sum(dim=1) / valid.sum(dim=1).clamp_min(1).to(ce.dtype)

    loss.__qualname__ = "causal_lm"
    return loss


def accuracy_of(outputs: Any, batch: Batch) -> Tensor:
    """Per-example 0/1 correctness of the arg-max class."""
    return (logits_of(outputs).argmax(dim=-1) == labels_of(batch)).to(torch.float64)


def next_token_accuracy(*, labels: str = "labels", mask: str | None = "attention_mask", ignore_index: int = -100) -> Loss:
    """Per-sequence fraction of valid next tokens predicted correctly (a metric)."""

    def metric(outputs: Any, batch: Batch) -> Tensor:
        logits = logits_of(outputs)[:, :-1]
        target = get_field(batch, labels)
        valid = target != ignore_index
        if mask is not None and isinstance(batch, dict) and mask in batch:
            valid = valid & get_field(batch, mask).bool()
        target, valid = target[:, 1:], valid[:, 1:]
        hits = ((logits.argmax(dim=-1) == target) & valid).sum(dim=1).to(torch.float64)
        return hits / valid.sum(dim=1).clamp_min(1).to(torch.float64)

    return metric


class Objective:
    r"""``φ(θ) = (1/N) Σ_i ℓ_i(θ)``: a per-example loss averaged over a dataset, eval mode.

    Args:
        model: the run's :class:`~mgd.stateless.StatelessModel` (``run.model``), or the
            ``nn.Module`` itself (wrapped once; its ``requires_grad`` parameters are then the
            ones given by name, as for a run with the default trainable filter).
        data: in-memory tensors (``(x, y)``, a dict, ...) or a map-style ``Dataset``.
        loss: per-example loss (default :func:`cross_entropy`).
        batch_size: examples per evaluation batch (default: all at once).
        inputs: batch → ``(args, kwargs)`` for the model (default :func:`model_inputs`).

    Calling it with a name → tensor dict (trainable parameters and BatchNorm statistics, as
    the engine passes) returns a differentiable scalar. :meth:`value_and_grad` returns the
    value and its gradient, accumulated one batch at a time.
    """

    def __init__(self, model, data, *, loss: Loss | None = None, batch_size: int | None = None,
                 inputs: Callable[[Batch], tuple[tuple, dict]] | None = None):
        from mgd.stateless import StatelessModel

        if not isinstance(model, StatelessModel):
            model = StatelessModel(model)
        self.model = model
        self.data = as_data(data)
        self.loss = loss or cross_entropy
        self.inputs = inputs or model_inputs
        n = len(self.data)
        self.batch_size = n if batch_size is None else int(batch_size)
        if self.batch_size < 1:
            raise UserError(f"evaluation batch size must be >= 1, got {batch_size}")
        self._batches = [torch.arange(a, min(a + self.batch_size, n)) for a in range(0, n, self.batch_size)]

    def __len__(self) -> int:
        return len(self.data)

    def _split(self, named: Mapping[str, Tensor]) -> tuple[dict, dict | None]:
        missing = [n for n in self.model.names if n not in named]
        if missing:
            raise UserError(
                f"the objective's model trains {missing[0]!r} but the run does not; build the "
                "objective from the run's model (Objective(run.model, ...))"
            )
        params = {n: named[n] for n in self.model.names}
        buffers = {n: named[n] for n in self.model.buffer_names} if self.model.buffer_names else None
        return params, buffers

    def batch_sum(self, named: Mapping[str, Tensor], index: Tensor, loss: Loss | None = None) -> Tensor:
        """``Σ_{i ∈ index} ℓ_i`` (differentiable)."""
        batch = self.data.batch(index)
        args, kwargs = self.inputs(batch)
        params, buffers = self._split(named)
        losses = (loss or self.loss)(self.model.eval_call(params, buffers, args, kwargs), batch)
        if losses.shape != (len(index),):
            raise UserError(
                f"the objective's loss must return one value per example, shape ({len(index)},); "
                f"got {tuple(losses.shape)}"
            )
        return losses.sum()

    def __call__(self, named: Mapping[str, Tensor]) -> Tensor:
        # Σ_batches (Σ_batch ℓ_i / N): the arithmetic of value_and_grad, so both give the same bits
        total = None
        for index in self._batches:
            part = self.batch_sum(named, index) / len(self.data)
            total = part if total is None else total + part
        return total

    def value_and_grad(self, named: Mapping[str, Tensor], wrt: Sequence[str]) -> tuple[Tensor, list[Tensor | None]]:
        """``(φ, [∂φ/∂named[w] for w in wrt])``, one batch's graph at a time."""
        leaves = {n: (t.detach().requires_grad_(True) if n in wrt else t.detach()) for n, t in named.items()}
        value = None
        grads: list[Tensor | None] = [None] * len(wrt)
        for index in self._batches:
            with torch.enable_grad():
                part = self.batch_sum(leaves, index) / len(self.data)
                parts = torch.autograd.grad(part, [leaves[w] for w in wrt], allow_unused=True)
            value = part.detach() if value is None else value + part.detach()
            grads = [g if p is None else (p if g is None else g + p) for g, p in zip(grads, parts)]
        return value, grads


class Metric(Objective):
    """The mean of a per-example quantity over a dataset, without gradients (e.g. accuracy)."""

    def __init__(self, model, data, metric: Loss = accuracy_of, *, batch_size: int | None = None,
                 inputs: Callable[[Batch], tuple[tuple, dict]] | None = None):
        super().__init__(model, data, loss=metric, batch_size=batch_size, inputs=inputs)

    @torch.no_grad()
    def __call__(self, named: Mapping[str, Tensor]) -> float:  # type: ignore[override]
        return float(sum(self.batch_sum(named, index).double() for index in self._batches) / len(self.data))


def objective_value(run, objective: Callable, state) -> float:
    """``φ`` at a training state, in eval mode without gradients: the same bits as the value
    :func:`mgd.metagradient` reports (the forward arithmetic does not depend on grad mode)."""
    from mgd.step import math_attention

    with torch.no_grad(), math_attention():
        return float(objective(run.named_tensors(state.params, state.buffers)))
