"""Tests for mgd.data: fixed splits of the built-in datasets and strict .npz validation."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

import mgd.data as data
from mgd.data import DATASETS, Dataset, load_dataset
from mgd.errors import UserError
from mgd.io import load_npz, write_npz

# ----------------------------------------------------------------------------------- spec


def test_datasets_constant():
    assert DATASETS == ("digits", "mnist1d")


@pytest.mark.parametrize("spec", ["foo", "Digits", "mnist", ""])
def test_unknown_spec_lists_choices(spec):
    pattern = r"unknown dataset .*choose one of digits, mnist1d, or a path"
    with pytest.raises(UserError, match=pattern):
        load_dataset(spec)


def test_unknown_spec_message_exact():
    with pytest.raises(UserError) as info:
        load_dataset("foo")
    assert str(info.value) == (
        "unknown dataset 'foo'; choose one of digits, mnist1d, or a path to an .npz file "
        "with x_train, y_train, x_val, y_val, x_test, y_test"
    )


def test_missing_npz_path(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_dataset(str(tmp_path / "nope.npz"))


# --------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shapes_dtypes_ranges(digits):
    assert digits.name == "digits"
    assert digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    for x, y, n in [
        (digits.x_train, digits.y_train, 1000),
        (digits.x_val, digits.y_val, 300),
        (digits.x_test, digits.y_test, 497),
    ]:
        assert x.shape == (n, 1, 8, 8) and x.dtype == np.float64
        assert y.shape == (n,) and y.dtype == np.int64
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert set(np.unique(y)) <= set(range(10))
    # Scaled by 16, not min-max normalised: the largest raw pixel (16) maps to exactly 1.
    assert digits.x_train.max() == 1.0
    assert np.all(np.isin(digits.x_train * 16, np.arange(17)))


def test_digits_summary_is_json(digits):
    summary = digits.summary()
    assert json.loads(json.dumps(summary)) == {
        "name": "digits",
        "num_train": 1000,
        "num_val": 300,
        "num_test": 497,
        "num_classes": 10,
        "input_shape": [1, 8, 8],
    }


def test_digits_deterministic(digits):
    again = load_dataset("digits")
    for key in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(digits, key), getattr(again, key))


def test_digits_matches_reference_split(digits):
    # Independent reference for the documented split (seed 0, two stratified splits), so a
    # changed seed or split order, which would silently change every result, fails here.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x, y = bunch.data / 16.0, bunch.target
    x_tr, x_rest, y_tr, y_rest = train_test_split(
        x, y, train_size=1000, stratify=y, random_state=0
    )
    x_va, x_te, y_va, y_te = train_test_split(
        x_rest, y_rest, train_size=300, stratify=y_rest, random_state=0
    )
    for ours, ref in [(digits.x_train, x_tr), (digits.x_val, x_va), (digits.x_test, x_te)]:
        np.testing.assert_array_equal(ours.reshape(len(ours), 64), ref)
    for ours, ref in [(digits.y_train, y_tr), (digits.y_val, y_va), (digits.y_test, y_te)]:
        np.testing.assert_array_equal(ours, ref)


def test_digits_stratified(digits):
    from sklearn.datasets import load_digits

    total = np.bincount(load_digits().target, minlength=10)
    for y, n in [(digits.y_train, 1000), (digits.y_val, 300), (digits.y_test, 497)]:
        counts = np.bincount(y, minlength=10)
        assert np.all(counts > 0)
        expected = total * n / total.sum()
        # Stratified splitting rounds each class to within one point of proportional; a
        # random split of 300 would typically be off by ~5.
        assert np.all(np.abs(counts - expected) <= 1.5), (counts, expected)


def test_digits_splits_partition_the_data(digits):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Rows as (64 pixels, label): the three splits together must be exactly load_digits'
    # rows, as a multiset (the data has a few duplicate images, so compare with counts).
    ours = np.concatenate(
        [
            np.column_stack([x.reshape(len(x), -1) * 16, y])
            for x, y in [
                (digits.x_train, digits.y_train),
                (digits.x_val, digits.y_val),
                (digits.x_test, digits.y_test),
            ]
        ]
    )
    theirs = np.column_stack([bunch.data, bunch.target])
    assert len(ours) == len(theirs) == 1797
    rows_a, counts_a = np.unique(ours, axis=0, return_counts=True)
    rows_b, counts_b = np.unique(theirs.astype(np.float64), axis=0, return_counts=True)
    np.testing.assert_array_equal(rows_a, rows_b)
    np.testing.assert_array_equal(counts_a, counts_b)


# -------------------------------------------------------------------------------- mnist1d

_CACHE_NAME = "mnist1d-v1-10000-0.5-42.npz"


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory):
    """One real generation, shared: (cache dir, dataset)."""
    cache = tmp_path_factory.mktemp("mnist1d-cache")
    return cache, load_dataset("mnist1d", cache_dir=cache)


def _fake_generator(ds: Dataset, calls: list):
    """A stand-in for the ~3 s generation that returns the real arrays and counts calls."""

    def generate():
        calls.append(1)
        return {k: getattr(ds, k).copy() for k in data._SPLIT_KEYS}

    return generate


def _assert_same(a: Dataset, b: Dataset):
    for key in data._SPLIT_KEYS:
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))


def test_mnist1d_shapes(mnist1d_cache):
    _, ds = mnist1d_cache
    assert ds.name == "mnist1d"
    assert ds.num_classes == 10
    assert ds.input_shape == (40,)
    assert ds.summary() == {
        "name": "mnist1d",
        "num_train": 4000,
        "num_val": 1000,
        "num_test": 5000,
        "num_classes": 10,
        "input_shape": [40],
    }
    for x, y, n in [(ds.x_train, ds.y_train, 4000), (ds.x_val, ds.y_val, 1000),
                    (ds.x_test, ds.y_test, 5000)]:
        assert x.shape == (n, 40) and x.dtype == np.float64
        assert y.shape == (n,) and y.dtype == np.int64
        assert np.all(np.isfinite(x))
        assert set(np.unique(y).tolist()) == set(range(10))


def test_mnist1d_matches_generator_and_split(mnist1d_cache):
    # Independent reference: generate with the documented arguments and split by hand.
    from mnist1d.data import get_dataset_args, make_dataset
    from sklearn.model_selection import train_test_split

    _, ds = mnist1d_cache
    args = get_dataset_args()
    args.num_samples, args.train_split = 10000, 0.5
    state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(state[0])
        random.setstate(state[1])
    np.testing.assert_array_equal(ds.x_test, raw["x_test"])
    np.testing.assert_array_equal(ds.y_test, raw["y_test"])
    x_tr, x_va, y_tr, y_va = train_test_split(
        raw["x"], raw["y"], train_size=4000, test_size=1000, stratify=raw["y"], random_state=0
    )
    np.testing.assert_array_equal(ds.x_train, x_tr)
    np.testing.assert_array_equal(ds.y_train, y_tr)
    np.testing.assert_array_equal(ds.x_val, x_va)
    np.testing.assert_array_equal(ds.y_val, y_va)


def test_mnist1d_second_load_reads_cache(mnist1d_cache, monkeypatch):
    cache, ds = mnist1d_cache
    assert (cache / _CACHE_NAME).is_file()

    def boom():
        raise AssertionError("regenerated although a valid cache exists")

    monkeypatch.setattr(data, "_generate_mnist1d", boom)
    _assert_same(ds, load_dataset("mnist1d", cache_dir=cache))


def _corrupt_garbage(path: Path):
    path.write_bytes(b"this is not a zip file at all")


def _corrupt_truncated(path: Path):
    path.write_bytes(path.read_bytes()[:1000])


def _corrupt_shapes(path: Path):
    arrays = load_npz(path, what="test")
    arrays["x_train"] = arrays["x_train"][:, :39]
    write_npz(path, arrays)


def _corrupt_dtype(path: Path):
    arrays = load_npz(path, what="test")
    arrays["y_val"] = arrays["y_val"].astype(np.float64)
    write_npz(path, arrays)


def _corrupt_missing(path: Path):
    arrays = load_npz(path, what="test")
    del arrays["y_test"]
    write_npz(path, arrays)


def _corrupt_pickle(path: Path):
    with open(path, "wb") as handle:
        np.savez(handle, x_train=np.array([{"a": 1}], dtype=object))


@pytest.mark.parametrize(
    "corrupt",
    [_corrupt_garbage, _corrupt_truncated, _corrupt_shapes, _corrupt_dtype, _corrupt_missing,
     _corrupt_pickle],
)
def test_mnist1d_bad_cache_is_regenerated(mnist1d_cache, tmp_path, monkeypatch, corrupt):
    cache, ds = mnist1d_cache
    path = tmp_path / _CACHE_NAME
    path.write_bytes((cache / _CACHE_NAME).read_bytes())
    corrupt(path)
    calls: list = []
    monkeypatch.setattr(data, "_generate_mnist1d", _fake_generator(ds, calls))
    _assert_same(ds, load_dataset("mnist1d", cache_dir=tmp_path))
    assert len(calls) == 1
    # ... and the cache was overwritten with a good copy, so the next load reads it.
    _assert_same(ds, load_dataset("mnist1d", cache_dir=tmp_path))
    assert len(calls) == 1


def test_mnist1d_unwritable_cache_dir_is_skipped(mnist1d_cache, tmp_path, monkeypatch):
    _, ds = mnist1d_cache
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    calls: list = []
    monkeypatch.setattr(data, "_generate_mnist1d", _fake_generator(ds, calls))
    _assert_same(ds, load_dataset("mnist1d", cache_dir=blocker / "sub"))
    assert len(calls) == 1
    assert blocker.read_text() == "not a directory"


def test_mnist1d_cache_dir_from_env(mnist1d_cache, tmp_path, monkeypatch):
    _, ds = mnist1d_cache
    monkeypatch.setenv("MGD_CACHE_DIR", str(tmp_path / "env-cache"))
    calls: list = []
    monkeypatch.setattr(data, "_generate_mnist1d", _fake_generator(ds, calls))
    load_dataset("mnist1d")
    assert (tmp_path / "env-cache" / _CACHE_NAME).is_file()


def test_mnist1d_generation_keeps_global_rng_state(mnist1d_cache, tmp_path):
    _, ds = mnist1d_cache
    np.random.seed(123)
    random.seed(7)
    np_before = np.random.get_state()
    py_before = random.getstate()
    fresh = load_dataset("mnist1d", cache_dir=tmp_path)  # empty dir: a real generation
    np_after = np.random.get_state()
    assert py_before == random.getstate()
    assert np_before[0] == np_after[0]
    np.testing.assert_array_equal(np_before[1], np_after[1])
    assert np_before[2:] == np_after[2:]
    # Generation is deterministic across calls.
    _assert_same(ds, fresh)


# ----------------------------------------------------------------------------------- .npz


def _valid_arrays(rng=None):
    rng = np.random.default_rng(0) if rng is None else rng
    return {
        "x_train": rng.normal(size=(12, 3, 2)).astype(np.float32),
        "y_train": np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2], dtype=np.int32),
        "x_val": rng.normal(size=(4, 3, 2)).astype(np.float32),
        "y_val": np.array([0, 1, 2, 2], dtype=np.int64),
        "x_test": rng.normal(size=(5, 3, 2)),
        "y_test": np.array([2, 1, 0, 3, 1], dtype=np.uint8),
    }


def _save(tmp_path, arrays, name="mydata.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_npz_round_trip(tmp_path):
    arrays = _valid_arrays()
    arrays["extra"] = np.arange(3)  # extra arrays are ignored
    path = _save(tmp_path, arrays)
    ds = load_dataset(str(path))
    assert ds.name == "mydata"
    assert ds.num_classes == 4  # max label (3, in test only) + 1
    assert ds.input_shape == (3, 2)
    for split in ("train", "val", "test"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        assert x.dtype == np.float64 and y.dtype == np.int64
        np.testing.assert_array_equal(x, arrays[f"x_{split}"].astype(np.float64))
        np.testing.assert_array_equal(y, arrays[f"y_{split}"])
    assert ds.summary() == {
        "name": "mydata",
        "num_train": 12,
        "num_val": 4,
        "num_test": 5,
        "num_classes": 4,
        "input_shape": [3, 2],
    }
    # A Path works as well as a str.
    _assert_same(ds, load_dataset(path))


def test_npz_integer_and_bool_features_are_cast(tmp_path):
    arrays = _valid_arrays()
    arrays["x_train"] = np.arange(12 * 6, dtype=np.int16).reshape(12, 3, 2)
    arrays["x_val"] = np.ones((4, 3, 2), dtype=bool)
    ds = load_dataset(str(_save(tmp_path, arrays)))
    assert ds.x_train.dtype == np.float64 and ds.x_val.dtype == np.float64
    np.testing.assert_array_equal(ds.x_train, arrays["x_train"])
    assert np.all(ds.x_val == 1.0)


def _bad(**changes):
    arrays = _valid_arrays()
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    return arrays


_BAD_CASES = {
    "missing": (_bad(x_val=None, y_test=None), r"missing arrays x_val, y_test"),
    "complex features": (
        _bad(x_train=np.ones((12, 3, 2), dtype=np.complex128)),
        r"x_train has dtype complex128; features must be real numbers",
    ),
    "string features": (
        _bad(x_test=np.full((5, 3, 2), "a")),
        r"x_test has dtype <U1; features must be real numbers",
    ),
    "nan features": (
        _bad(x_val=np.where(np.eye(4, 6, dtype=bool).reshape(4, 3, 2), np.nan, 0.0)),
        r"x_val contains NaN or infinite values",
    ),
    "inf features": (
        _bad(x_test=np.full((5, 3, 2), np.inf)),
        r"x_test contains NaN or infinite values",
    ),
    "1-D features": (
        _bad(x_train=np.zeros(12), x_val=np.zeros(4), x_test=np.zeros(5)),
        r"x_train has shape \(12,\); features need shape \(N, \.\.\.\)",
    ),
    "float labels": (
        _bad(y_train=np.zeros(12, dtype=np.float64)),
        r"y_train has dtype float64; labels must be an integer array",
    ),
    "bool labels": (
        _bad(y_val=np.array([True, False, True, False])),
        r"y_val has dtype bool; labels must be an integer array",
    ),
    "2-D labels": (
        _bad(y_val=np.eye(4, 3, dtype=np.int64)),
        r"y_val has shape \(4, 3\); labels must be 1-D",
    ),
    "length mismatch": (
        _bad(y_test=np.array([0, 1, 2], dtype=np.int64)),
        r"y_test has 3 labels but x_test has 5 examples",
    ),
    "negative label": (
        _bad(y_val=np.array([0, -1, 2, 1], dtype=np.int64)),
        r"y_val has negative label -1",
    ),
    "one class": (
        _bad(
            y_train=np.zeros(12, dtype=np.int64),
            y_val=np.zeros(4, dtype=np.int64),
            y_test=np.zeros(5, dtype=np.int64),
        ),
        r"only one class \(0\) occurs .* at least 2 classes",
    ),
    "gap in classes (1-based labels)": (
        _bad(
            y_train=np.tile([1, 2, 3], 4).astype(np.int64),
            y_val=np.array([1, 2, 3, 3], dtype=np.int64),
            y_test=np.array([3, 2, 1, 1, 2], dtype=np.int64),
        ),
        r"classes must be 0\.\.3, but class 0 never occurs",
    ),
    "shape disagreement": (
        _bad(x_test=np.zeros((5, 2, 3))),
        r"x_test examples have shape \(2, 3\) but x_train examples have shape \(3, 2\)",
    ),
    "empty split": (
        _bad(x_val=np.zeros((0, 3, 2)), y_val=np.zeros(0, dtype=np.int64)),
        r"x_val is empty",
    ),
}


@pytest.mark.parametrize("case", list(_BAD_CASES))
def test_npz_bad_inputs(tmp_path, case):
    arrays, message = _BAD_CASES[case]
    path = _save(tmp_path, arrays)
    with pytest.raises(UserError, match=message) as info:
        load_dataset(str(path))
    text = str(info.value)
    assert str(path) in text  # the message names the file
    assert "\n" not in text  # one line


def test_npz_pickled_object_array_refused(tmp_path):
    arrays = _valid_arrays()
    arrays["x_train"] = np.empty(12, dtype=object)
    arrays["x_train"][:] = [np.zeros((3, 2))] * 12
    path = _save(tmp_path, arrays)
    with pytest.raises(UserError, match=r"pickled data.*never loads"):
        load_dataset(str(path))


def test_npz_not_an_npz_file(tmp_path):
    path = tmp_path / "fake.npz"
    path.write_text("x_train,y_train\n1,2\n")
    with pytest.raises(UserError, match=r"is not an \.npz archive") as info:
        load_dataset(str(path))
    assert "pickle" not in str(info.value)  # numpy alone would call any text a pickle


def test_existing_non_npz_file_is_not_unknown(tmp_path):
    # An existing file with another suffix is tried as a dataset file, not called "unknown".
    path = tmp_path / "data.csv"
    path.write_text("1,2,3\n")
    with pytest.raises(UserError, match=r"is not an \.npz archive"):
        load_dataset(str(path))


def test_single_npy_refused(tmp_path):
    path = tmp_path / "one.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(UserError, match=r"is a single \.npy array, not an \.npz archive"):
        load_dataset(str(path))


# -------------------------------------------------------------------------------- Dataset


def test_dataset_rejects_broken_invariants():
    x = np.zeros((3, 2))
    y = np.array([0, 1, 1])
    good = dict(name="t", x_train=x, y_train=y, x_val=x, y_val=y, x_test=x, y_test=y,
                num_classes=2, input_shape=(2,))
    Dataset(**good)
    with pytest.raises(ValueError, match="float64"):
        Dataset(**{**good, "x_val": x.astype(np.float32)})
    with pytest.raises(ValueError, match="int64"):
        Dataset(**{**good, "y_test": y.astype(np.int32)})
    with pytest.raises(ValueError, match="outside"):
        Dataset(**{**good, "num_classes": 1})
    with pytest.raises(ValueError, match="input_shape"):
        Dataset(**{**good, "input_shape": (3,)})


def test_npz_truncated_file(tmp_path):
    path = _save(tmp_path, _valid_arrays())
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=r"not a readable \.npz file"):
        load_dataset(str(path))


def test_outputs_get_ordinary_file_permissions(tmp_path):
    from mgd.io import write_json

    write_json(tmp_path / "r.json", {"a": 1})
    mode = (tmp_path / "r.json").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
