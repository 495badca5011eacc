r"""Training data as the step reads it: index-addressed examples, a pure batch order, seeds.

A training run reads its minibatch of step ``t`` by index, so a replayed step reads exactly
the same examples (``method.md`` §4). Three pieces:

* a **source** of examples addressed by index: :class:`TensorData` (a nested structure of
  in-memory tensors sharing a leading dimension ``N``: a tensor, a tuple such as ``(x, y)``
  or a dict such as ``{"input_ids", "attention_mask", "labels"}``) or :class:`DatasetData`
  (a map-style :class:`torch.utils.data.Dataset` read item by item and collated);
* the **batch order** :class:`BatchOrder`: epoch ``e`` is a permutation drawn from
  ``numpy.random.default_rng([seed, e])`` and step ``t`` takes slice ``t mod (N // B)`` of
  epoch ``t // (N // B)`` (the last incomplete batch of an epoch is dropped), a pure function
  of ``(seed, t)``;
* **step seeds** (:func:`step_seed`): augmentation and the model's own randomness (dropout)
  draw from seeds derived from ``(seed, step, rank, stream)``, never from a global stream.

A batch is any nested structure of tensors (tuples, lists, dicts); :func:`tree_map` walks it
and :func:`get_field` / :func:`set_field` address one leaf by a key or a path of keys, which is
how per-example metaparameters (poisons) reach "any float field of an example".
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from mgd.errors import UserError

__all__ = [
    "Batch", "Field", "TensorData", "DatasetData", "as_data", "BatchOrder", "step_seed",
    "tree_map", "tree_leaves", "get_field", "set_field", "concat_batches", "default_collate",
]

Batch = Any  # a tensor or a (nested) tuple / list / dict of tensors
#: A leaf of a batch: a dict key or tuple position, or a path of them (``("inputs", 0)``).
Field = Union[int, str, tuple]


def tree_map(fn: Callable[[Tensor], Any], batch: Batch) -> Batch:
    """Apply ``fn`` to every tensor of a nested structure, keeping the structure."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return type(batch)((k, tree_map(fn, v)) for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        mapped = [tree_map(fn, v) for v in batch]
        if hasattr(batch, "_fields"):  # a namedtuple
            return type(batch)(*mapped)
        return type(batch)(mapped)
    return batch  # strings, numbers: carried as they are


def tree_leaves(batch: Batch) -> list[Tensor]:
    """The tensors of a nested structure, in a fixed order."""
    leaves: list[Tensor] = []
    tree_map(lambda t: leaves.append(t), batch)
    return leaves


def concat_batches(first: Batch, second: Batch) -> Batch:
    """The examples of ``first`` followed by those of ``second`` (same structure), leaf by leaf."""
    rest = iter(tree_leaves(second))
    return tree_map(lambda t: torch.cat([t, next(rest).to(t.device)]), first)


def _path(field: Field) -> tuple:
    return field if isinstance(field, tuple) else (field,)


def get_field(batch: Batch, field: Field) -> Tensor:
    """The leaf of ``batch`` at ``field`` (a key, a position or a path of them)."""
    node = batch
    for key in _path(field):
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            raise UserError(
                f"the batch has no field {field!r}; name a dict key or tuple position of one example"
            ) from None
    if not isinstance(node, Tensor):
        raise UserError(f"batch field {field!r} is a {type(node).__name__}, not a tensor")
    return node


def set_field(batch: Batch, field: Field, value: Tensor) -> Batch:
    """A copy of ``batch`` with the leaf at ``field`` replaced (the rest is shared)."""
    path = _path(field)
    head, rest = path[0], path[1:]
    child = value if not rest else set_field(batch[head], rest, value)
    if isinstance(batch, dict):
        out = type(batch)(batch)
        out[head] = child
        return out
    if isinstance(batch, (tuple, list)):
        items = list(batch)
        items[head] = child
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    raise UserError(f"cannot set field {field!r} of a {type(batch).__name__}")


def default_collate(items: Sequence[Batch]) -> Batch:
    """Stack a list of examples (tensors, numbers or nested structures of them) into a batch."""
    first = items[0]
    if isinstance(first, Tensor):
        return torch.stack(list(items))
    if isinstance(first, dict):
        return type(first)((k, default_collate([item[k] for item in items])) for k in first)
    if isinstance(first, (tuple, list)):
        columns = [default_collate([item[j] for item in items]) for j in range(len(first))]
        return type(first)(*columns) if hasattr(first, "_fields") else type(first)(columns)
    if isinstance(first, bool):
        return torch.tensor(items, dtype=torch.bool)
    if isinstance(first, int):
        return torch.tensor(items, dtype=torch.long)
    if isinstance(first, float):
        return torch.tensor(items, dtype=torch.get_default_dtype())
    if isinstance(first, np.ndarray):
        return torch.as_tensor(np.stack(items))
    raise UserError(
        f"cannot collate dataset items of type {type(first).__name__}; return tensors, numbers "
        "or tuples/dicts of them from __getitem__, or pass collate_fn"
    )


def _same(a: Batch, b: Batch) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(la, lb)
    )


class TensorData:
    """Examples held in memory: a nested structure of tensors with a common first dimension.

    Args:
        tensors: e.g. ``(x, y)``, ``{"input_ids": ids, "attention_mask": mask}`` or one tensor.
        device: move every tensor there once (default: where they are).
    """

    def __init__(self, tensors: Batch, *, device: torch.device | str | None = None):
        leaves = tree_leaves(tensors)
        if not leaves:
            raise UserError("training data holds no tensors")
        if device is not None:
            tensors = tree_map(lambda t: t.to(device), tensors)
            leaves = tree_leaves(tensors)
        sizes = {len(t) if t.dim() else -1 for t in leaves}
        if len(sizes) != 1 or -1 in sizes:
            raise UserError(
                "every tensor of the training data must have the same first dimension (one row "
                f"per example); got sizes {sorted(len(t) if t.dim() else 0 for t in leaves)}"
            )
        self.tensors = tensors
        self._size = sizes.pop()

    def __len__(self) -> int:
        return self._size

    @property
    def device(self) -> torch.device:
        return tree_leaves(self.tensors)[0].device

    def batch(self, index: Tensor) -> Batch:
        """The examples at ``index``, as one batch of the same structure."""
        return tree_map(lambda t: t[index.to(t.device)], self.tensors)

    def field(self, field: Field) -> Tensor:
        """The whole column at ``field`` (all ``N`` examples)."""
        return get_field(self.tensors, field)

    def check_stable(self, index: Tensor) -> None:
        """In-memory tensors cannot change between reads; nothing to check."""

    def take(self, index: Tensor) -> "TensorData":
        """The examples at ``index`` (in that order) as data of their own, e.g. a selected subset."""
        return TensorData(self.batch(torch.as_tensor(index, dtype=torch.long)))


class DatasetData:
    """A map-style :class:`torch.utils.data.Dataset` read by index, collated into batches.

    Args:
        dataset: anything with ``__len__`` and ``__getitem__(i)`` returning one example (a
            tensor, a number, or a tuple/dict of them). Read in the training process, by index:
            a ``DataLoader`` is not accepted (its order and workers are not ours to replay).
        collate_fn: turns a list of examples into a batch (default :func:`default_collate`).
        device: move each batch there.
    """

    def __init__(self, dataset, *, collate_fn: Callable | None = None, device: torch.device | str | None = None):
        if isinstance(dataset, torch.utils.data.DataLoader):
            raise UserError(
                "pass the DataLoader's dataset (a map-style Dataset), not the DataLoader: mgd "
                "reads examples by index in its own replayable order"
            )
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
            raise UserError(
                "training data must be a map-style Dataset (with __len__ and __getitem__), so "
                "that a replayed step reads the same examples; iterable datasets cannot be replayed"
            )
        try:
            size = len(dataset)
        except TypeError:
            raise UserError("the training Dataset must define __len__") from None
        if size < 1:
            raise UserError("the training Dataset is empty")
        self.dataset = dataset
        self.collate_fn = collate_fn or default_collate
        self.device = None if device is None else torch.device(device)
        self._size = size

    def __len__(self) -> int:
        return self._size

    def _read(self, index: Tensor) -> Batch:
        batch = self.collate_fn([self.dataset[i] for i in index.tolist()])
        return batch if self.device is None else tree_map(lambda t: t.to(self.device), batch)

    def batch(self, index: Tensor) -> Batch:
        return self._read(index)

    def field(self, field: Field) -> Tensor:
        return get_field(self._read(torch.arange(self._size)), field)

    def take(self, index: Tensor) -> "DatasetData":
        """The examples at ``index`` (in that order), read from the same dataset by index."""
        subset = torch.utils.data.Subset(self.dataset, torch.as_tensor(index, dtype=torch.long).tolist())
        return DatasetData(subset, collate_fn=self.collate_fn, device=self.device)

    def check_stable(self, index: Tensor) -> None:
        """Read the examples at ``index`` twice and refuse a dataset whose items change."""
        if not _same(self._read(index), self._read(index)):
            raise UserError(
                "the training Dataset returned different values for the same index on two reads "
                "(random augmentation inside __getitem__?); REPLAY needs deterministic items: move "
                "the randomness into augment=, which receives a seeded generator"
            )


def as_data(data, *, device: torch.device | str | None = None, collate_fn: Callable | None = None):
    """A :class:`TensorData` or :class:`DatasetData` for what a user passes as training data."""
    if isinstance(data, (TensorData, DatasetData)):
        return data
    if isinstance(data, torch.utils.data.DataLoader) or (
        hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (Tensor, tuple, list, dict))
    ) or isinstance(data, torch.utils.data.IterableDataset):
        return DatasetData(data, collate_fn=collate_fn, device=device)
    return TensorData(data, device=device)


class BatchOrder:
    """Indices of the minibatch of each step: a pure function of ``(seed, step)``."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, device: torch.device | str = "cpu"):
        if not 1 <= batch_size <= num_examples:
            raise UserError(
                f"batch size must be between 1 and the training-set size {num_examples}, got {batch_size}"
            )
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.device = torch.device(device)
        self._cache: dict[int, Tensor] = {}

    def indices(self, step: int) -> Tensor:
        """Indices (int64, on ``device``) of the minibatch of ``step``."""
        per_epoch = self.num_examples // self.batch_size
        epoch, position = divmod(step, per_epoch)
        perm = self._cache.get(epoch)
        if perm is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            perm = torch.as_tensor(order, dtype=torch.long, device=self.device)
            self._cache.clear()  # one epoch at a time is enough for replays
            self._cache[epoch] = perm
        return perm[position * self.batch_size : (position + 1) * self.batch_size]


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


#: Streams of :func:`step_seed`: the model's RNG (dropout) and the augmentation's generator.
MODEL_STREAM, AUGMENT_STREAM = 1, 2


@functools.lru_cache(maxsize=1 << 16)  # a pure function, asked for at every step and replay
def step_seed(seed: int, step: int, rank: int, stream: int, chunk: int = 0) -> int:
    """A 63-bit seed for ``(run seed, step, rank, stream, micro-batch)``: splitmix64 over them.

    Distinct inputs give unrelated seeds, and nothing depends on how often it was called.
    """
    x = 0
    for part in (seed, step, rank, stream, chunk):
        x = _splitmix64(x ^ (part & _MASK64))
    return x >> 1
