"""Datasets with fixed train / val / test splits (``protocols.md`` §1–2).

Every method in ``mgd`` is compared on exactly the same arrays, so each built-in dataset is
a pure function of constants in this module: the same call gives the same arrays in every
process. Three kinds of ``spec`` are understood by :func:`load_dataset`:

* ``"digits"``: scikit-learn's bundled 8×8 digits (offline), pixels scaled to ``[0, 1]``,
  split 1000 / 300 / 497, stratified with split seed 0.
* ``"mnist1d"``: MNIST-1D generated locally (10000 samples, ``train_split`` 0.5, seed 42);
  the first half is split 4000 train / 1000 val (stratified, split seed 0) and the second
  half is the 5000-point test set. The result is cached as an ``.npz``.
* a path to an ``.npz`` file holding ``x_train, y_train, x_val, y_val, x_test, y_test``,
  which is validated strictly: every problem is a :class:`~mgd.errors.UserError` naming the
  file, the array and the fix.

Example:
    >>> ds = load_dataset("digits")
    >>> ds.x_train.shape, ds.num_classes
    ((1000, 1, 8, 8), 10)
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from mgd.errors import UserError
from mgd.io import load_npz, write_npz

__all__ = ["DATASETS", "Dataset", "load_dataset", "small_validation"]

#: Names of the built-in datasets accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("digits", "mnist1d")

#: The arrays an ``.npz`` dataset file must hold, in split order.
_SPLIT_KEYS: tuple[str, ...] = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
_SPLITS: tuple[str, ...] = ("train", "val", "test")

# One split seed for every dataset (protocols.md §2): splits must never depend on the seeds
# used for training or evaluation.
_SPLIT_SEED = 0

_DIGITS_SIZES = (1000, 300, 497)  # train, val, test: 1797 in all

# Generation arguments that differ from mnist1d's defaults or that pin its output. Everything
# else keeps mnist1d's default so the data matches the published generator.
_MNIST1D_NUM_SAMPLES = 10000
_MNIST1D_TRAIN_SPLIT = 0.5
_MNIST1D_SEED = 42
_MNIST1D_TRAIN_VAL = (4000, 1000)  # taken from the generator's first half (5000 points)
_MNIST1D_TEST = 5000  # the generator's second half
_MNIST1D_LENGTH = 40
_MNIST1D_CLASSES = 10
# Bump whenever anything that changes the cached arrays changes (generation arguments, the
# split, dtypes), so that stale caches are never read.
_MNIST1D_CACHE_VERSION = 1


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == has no single truth value
class Dataset:
    """A classification dataset with fixed train, val and test splits.

    Attributes:
        name: short name (``"digits"``, ``"mnist1d"`` or an ``.npz`` file's stem).
        x_train: float64 features, shape ``(N_train, *input_shape)``.
        y_train: int64 labels in ``[0, num_classes)``, shape ``(N_train,)``.
        x_val: float64 validation features.
        y_val: int64 validation labels.
        x_test: float64 test features.
        y_test: int64 test labels.
        num_classes: number of classes ``C``; labels are ``0..C-1``.
        input_shape: the shape of one example, e.g. ``(1, 8, 8)``.

    Raises:
        ValueError: on construction, if the arrays break these invariants (a bug in the
            caller; user files are checked by :func:`load_dataset` with clearer messages).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        # Cheap invariant checks: every consumer (training, poisoning, selection) relies on
        # them, and a silent float32 or shape mismatch would surface far from its cause.
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        for split in _SPLITS:
            x = getattr(self, f"x_{split}")
            y = getattr(self, f"y_{split}")
            if not isinstance(x, np.ndarray) or x.dtype != np.float64:
                raise ValueError(f"Dataset.x_{split} must be a float64 numpy array")
            if not isinstance(y, np.ndarray) or y.dtype != np.int64:
                raise ValueError(f"Dataset.y_{split} must be an int64 numpy array")
            if x.shape[1:] != self.input_shape or y.shape != (x.shape[0],):
                raise ValueError(
                    f"Dataset {split} split: x shape {x.shape} and y shape {y.shape} do not "
                    f"match input_shape {self.input_shape}"
                )
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(f"Dataset.y_{split} has labels outside [0, {self.num_classes})")

    def summary(self) -> dict[str, Any]:
        """Return a JSON-serialisable description (no arrays).

        Returns:
            ``{"name", "num_train", "num_val", "num_test", "num_classes", "input_shape"}``,
            with ``input_shape`` as a list of ints.
        """
        return {
            "name": self.name,
            "num_train": int(self.x_train.shape[0]),
            "num_val": int(self.x_val.shape[0]),
            "num_test": int(self.x_test.shape[0]),
            "num_classes": int(self.num_classes),
            "input_shape": [int(d) for d in self.input_shape],
        }


def small_validation(dataset: Dataset, per_class: int, *, seed: int = 0) -> Dataset:
    """``dataset`` with its validation split cut to ``per_class`` examples of each class.

    The regime of a target known from a handful of examples (e.g. 5-10 per class), where
    training on the validation split alone is no option. The kept examples are a seeded
    random choice within each class; the training and test splits are untouched.

    Raises:
        UserError: ``per_class < 1`` or a class with fewer validation examples than that.
    """
    if per_class < 1:
        raise UserError(f"validation examples per class must be >= 1, got {per_class}")
    rng = np.random.default_rng([seed, 0x5A11])
    kept = []
    for label in range(dataset.num_classes):
        members = np.flatnonzero(dataset.y_val == label)
        if len(members) < per_class:
            raise UserError(
                f"class {label} has {len(members)} validation examples, fewer than the {per_class} per class asked for"
            )
        kept.append(np.sort(rng.choice(members, size=per_class, replace=False)))
    kept = np.sort(np.concatenate(kept))
    return replace(dataset, x_val=np.ascontiguousarray(dataset.x_val[kept]), y_val=np.ascontiguousarray(dataset.y_val[kept]))


def load_dataset(
    spec: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
) -> Dataset:
    """Load a built-in dataset by name, or a user dataset from an ``.npz`` file.

    Args:
        spec: ``"digits"``, ``"mnist1d"``, or a path to an ``.npz`` file with arrays
            ``x_train, y_train, x_val, y_val, x_test, y_test`` (extra arrays are ignored).
        cache_dir: where the generated ``mnist1d`` arrays are cached. Defaults to the
            ``MGD_CACHE_DIR`` environment variable if set, else ``~/.cache/mgd``. Unused by
            the other datasets.

    Returns:
        The dataset, with float64 features and int64 labels.

    Raises:
        UserError: ``spec`` is none of the above, or the ``.npz`` file is missing,
            unreadable, pickled or invalid (the message names the array and the fix).
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise UserError(_unknown_message(repr(spec)))
    if spec == "digits":
        return _load_digits()
    if spec == "mnist1d":
        return _load_mnist1d(_resolve_cache_dir(cache_dir))
    # Anything ending in .npz is treated as a path (so a typo gets "file not found"); an
    # existing file with another suffix is tried too, and fails with "not an .npz" if it is
    # not one.
    if spec.lower().endswith(".npz") or Path(spec).is_file():
        return _load_npz_dataset(Path(spec))
    raise UserError(_unknown_message(repr(spec)))


def _unknown_message(shown: str) -> str:
    names = ", ".join(DATASETS)
    keys = ", ".join(_SPLIT_KEYS)
    return f"unknown dataset {shown}; choose one of {names}, or a path to an .npz file with {keys}"


def _stratified_split(
    x: np.ndarray, y: np.ndarray, first: int, second: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split ``(x, y)`` into ``first`` and ``second`` points, stratified by ``y``."""
    from sklearn.model_selection import train_test_split

    x_a, x_b, y_a, y_b = train_test_split(
        x, y, train_size=first, test_size=second, stratify=y, random_state=_SPLIT_SEED
    )
    return x_a, y_a, x_b, y_b


# ---------------------------------------------------------------------------------- digits


def _load_digits() -> Dataset:
    """scikit-learn digits: 1797 images, 1000 / 300 / 497, pixels in ``[0, 1]``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixels are 0..16; dividing by 16 gives the [0, 1] box that poisoning projects onto.
    x = np.asarray(bunch.data, dtype=np.float64) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    n_train, n_val, n_test = _DIGITS_SIZES
    # Two stratified splits: train vs the rest, then the rest into val vs test.
    x_train, y_train, x_rest, y_rest = _stratified_split(x, y, n_train, n_val + n_test)
    x_val, y_val, x_test, y_test = _stratified_split(x_rest, y_rest, n_val, n_test)
    shape = (1, 8, 8)  # channel-first images, so a CNN and an MLP (after flatten) both fit

    def images(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.reshape((-1, *shape)))

    return Dataset(
        name="digits",
        x_train=images(x_train),
        y_train=y_train,
        x_val=images(x_val),
        y_val=y_val,
        x_test=images(x_test),
        y_test=y_test,
        num_classes=10,
        input_shape=shape,
    )


# --------------------------------------------------------------------------------- mnist1d


def _resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MGD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mgd"


def _mnist1d_cache_name() -> str:
    return (
        f"mnist1d-v{_MNIST1D_CACHE_VERSION}-{_MNIST1D_NUM_SAMPLES}-"
        f"{_MNIST1D_TRAIN_SPLIT}-{_MNIST1D_SEED}.npz"
    )


def _mnist1d_expected_shapes() -> dict[str, tuple[int, ...]]:
    n_train, n_val = _MNIST1D_TRAIN_VAL
    sizes = {"train": n_train, "val": n_val, "test": _MNIST1D_TEST}
    shapes: dict[str, tuple[int, ...]] = {}
    for split, n in sizes.items():
        shapes[f"x_{split}"] = (n, _MNIST1D_LENGTH)
        shapes[f"y_{split}"] = (n,)
    return shapes


def _load_mnist1d(cache_dir: Path) -> Dataset:
    """MNIST-1D: read the cache if it is valid, else generate and (try to) cache."""
    path = cache_dir / _mnist1d_cache_name()
    arrays = _read_mnist1d_cache(path)
    if arrays is None:
        arrays = _generate_mnist1d()
        try:
            write_npz(path, arrays)
        except (OSError, UserError):  # write_npz reports a failed write as a UserError
            # A read-only or invalid cache dir only costs a few seconds per load; the data
            # itself is fine, so caching is best effort.
            pass
    return Dataset(
        name="mnist1d",
        num_classes=_MNIST1D_CLASSES,
        input_shape=(_MNIST1D_LENGTH,),
        **arrays,
    )


def _read_mnist1d_cache(path: Path) -> dict[str, np.ndarray] | None:
    """Return the cached arrays, or ``None`` if the cache is missing or not trustworthy.

    A bad cache (truncated, corrupt, pickled, wrong keys, shapes, dtypes or values) is never
    an error: the caller regenerates the data and overwrites it.
    """
    if not path.is_file():
        return None
    try:
        loaded = load_npz(path, what="mnist1d cache")
    except UserError:
        return None
    arrays: dict[str, np.ndarray] = {}
    for key, shape in _mnist1d_expected_shapes().items():
        a = loaded.get(key)
        if a is None or a.shape != shape:
            return None
        if key.startswith("x_"):
            if a.dtype != np.float64 or not np.all(np.isfinite(a)):
                return None
        elif a.dtype != np.int64 or a.min() < 0 or a.max() >= _MNIST1D_CLASSES:
            return None
        arrays[key] = a
    return arrays


def _generate_mnist1d() -> dict[str, np.ndarray]:
    """Generate MNIST-1D offline and split it; the global RNGs are left untouched."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # pragma: no cover - mnist1d is a declared dependency
        raise UserError(
            "the mnist1d dataset needs the 'mnist1d' package; install it with "
            "'pip install mnist1d'"
        ) from exc

    args = get_dataset_args()
    args.num_samples = _MNIST1D_NUM_SAMPLES
    args.train_split = _MNIST1D_TRAIN_SPLIT
    args.seed = _MNIST1D_SEED
    # make_dataset re-seeds the global `random` and `numpy.random` (protocols.md §1), which
    # would silently change every later random draw of the caller. Never call get_dataset:
    # it downloads a pickle by default.
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        raw = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    x = np.asarray(raw["x"], dtype=np.float64)
    y = np.asarray(raw["y"], dtype=np.int64)
    n_train, n_val = _MNIST1D_TRAIN_VAL
    x_train, y_train, x_val, y_val = _stratified_split(x, y, n_train, n_val)
    return {
        "x_train": np.ascontiguousarray(x_train),
        "y_train": np.ascontiguousarray(y_train),
        "x_val": np.ascontiguousarray(x_val),
        "y_val": np.ascontiguousarray(y_val),
        "x_test": np.ascontiguousarray(raw["x_test"], dtype=np.float64),
        "y_test": np.ascontiguousarray(raw["y_test"], dtype=np.int64),
    }


# ------------------------------------------------------------------------------ .npz files


def _load_npz_dataset(path: Path) -> Dataset:
    """Load and strictly validate a user ``.npz`` dataset (see :func:`load_dataset`)."""
    def fail(problem: str) -> UserError:
        return UserError(f"dataset {path}: {problem}")

    loaded = load_npz(path, what=f"dataset {path.name}")  # refuses pickles and non-archives

    missing = [key for key in _SPLIT_KEYS if key not in loaded]
    if missing:
        raise fail(
            f"missing arrays {', '.join(missing)}; save all of {', '.join(_SPLIT_KEYS)} "
            "with numpy.savez"
        )

    xs: dict[str, np.ndarray] = {}
    ys: dict[str, np.ndarray] = {}
    for split in _SPLITS:
        xs[split] = _check_features(loaded[f"x_{split}"], f"x_{split}", fail)
        ys[split] = _check_labels(loaded[f"y_{split}"], f"y_{split}", xs[split].shape[0], fail)

    input_shape = xs["train"].shape[1:]
    for split in ("val", "test"):
        if xs[split].shape[1:] != input_shape:
            raise fail(
                f"x_{split} examples have shape {xs[split].shape[1:]} but x_train examples "
                f"have shape {input_shape}; every split needs the same per-example shape"
            )

    num_classes = _check_label_range(ys, fail)
    return Dataset(
        name=path.stem,
        x_train=xs["train"],
        y_train=ys["train"].astype(np.int64),
        x_val=xs["val"],
        y_val=ys["val"].astype(np.int64),
        x_test=xs["test"],
        y_test=ys["test"].astype(np.int64),
        num_classes=num_classes,
        input_shape=input_shape,
    )


def _check_features(
    x: np.ndarray, key: str, fail: Callable[[str], UserError]
) -> np.ndarray:
    # Integer and bool features are exact in float64 for any realistic range, so they are
    # accepted; complex, strings, dates or structured records have no meaning as features.
    if not (
        np.issubdtype(x.dtype, np.floating)
        or np.issubdtype(x.dtype, np.integer)
        or x.dtype == np.bool_
    ):
        raise fail(
            f"{key} has dtype {x.dtype}; features must be real numbers (float, int or bool), "
            "e.g. save x.astype(np.float64)"
        )
    if x.ndim < 2:
        raise fail(
            f"{key} has shape {x.shape}; features need shape (N, ...) with one row per "
            "example, e.g. reshape to (N, 1)"
        )
    if x.shape[0] == 0:
        raise fail(f"{key} is empty (0 examples); every split needs at least one example")
    x = x.astype(np.float64, copy=False)
    if not np.all(np.isfinite(x)):
        raise fail(f"{key} contains NaN or infinite values; remove or impute them")
    return x


def _check_labels(
    y: np.ndarray, key: str, n: int, fail: Callable[[str], UserError]
) -> np.ndarray:
    # Strict: float labels are refused even when whole, because a float label array usually
    # means a regression target or one-hot mix-up rather than class indices.
    if not np.issubdtype(y.dtype, np.integer):
        raise fail(
            f"{key} has dtype {y.dtype}; labels must be an integer array of class indices "
            "0..C-1, e.g. save y.astype(np.int64)"
        )
    if y.ndim != 1:
        raise fail(
            f"{key} has shape {y.shape}; labels must be 1-D class indices (not one-hot), "
            "e.g. y.argmax(axis=1)"
        )
    if y.shape[0] != n:
        raise fail(
            f"{key} has {y.shape[0]} labels but x_{key[2:]} has {n} examples; "
            "give one label per example"
        )
    return y


def _check_label_range(
    ys: Mapping[str, np.ndarray], fail: Callable[[str], UserError]
) -> int:
    """Check labels are ``0..C-1`` with every class present; return ``C``."""
    for split, y in ys.items():
        if y.min() < 0:
            raise fail(
                f"y_{split} has negative label {int(y.min())}; labels must be class "
                "indices 0..C-1"
            )
    # Python ints: exact even for uint64 labels, which could not be mixed with int64 safely.
    present = sorted(set().union(*(np.unique(y).tolist() for y in ys.values())))
    if len(present) < 2:
        raise fail(
            f"only one class ({present[0]}) occurs in all splits together; a classifier "
            "needs at least 2 classes"
        )
    num_classes = present[-1] + 1
    absent = sorted(set(range(num_classes)) - set(present))
    if absent:
        shown = ", ".join(str(c) for c in absent[:5]) + (", ..." if len(absent) > 5 else "")
        raise fail(
            f"labels go up to {present[-1]}, so classes must be 0..{present[-1]}, but class "
            f"{shown} never occurs in any split; renumber the classes 0..C-1 without gaps "
            "(1-based labels: subtract 1)"
        )
    return num_classes
