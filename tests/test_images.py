"""Image loaders (CIFAR-10 binary, class folders) and the seeded crop/flip augmentation."""

from __future__ import annotations

import pickle
import sys
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mgd.errors import UserError
from mgd.images import RandomCropFlip, load_cifar10_binary, load_image_folder

RECORDS = 7


# ------------------------------------------------------------------------------- CIFAR-10


def _records(seed: int, n: int = RECORDS) -> np.ndarray:
    """``n`` CIFAR-10 records (label byte + 3072 pixel bytes) with known random contents."""
    rng = np.random.default_rng(seed)
    rec = rng.integers(0, 256, size=(n, 3073), dtype=np.uint8)
    rec[:, 0] = rng.integers(0, 10, size=n)
    return rec


def _write_cifar(folder, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    written = {}
    for k, name in enumerate(names):
        rec = _records(k)
        rec.tofile(folder / name)
        written[name] = rec
    return written


def _expected(rec: np.ndarray):
    # Independent decoding of the documented layout: R plane, G plane, B plane, row-major.
    n = rec.shape[0]
    x = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    for i in range(n):
        for c in range(3):
            for r in (0, 1, 17, 31):
                for col in (0, 5, 31):
                    x[i, c, r, col] = rec[i, 1 + c * 1024 + r * 32 + col]
    return x, rec[:, 0].astype(np.int64)


def test_cifar_round_trip_and_layout(tmp_path):
    written = _write_cifar(tmp_path)
    x, y = load_cifar10_binary(tmp_path)
    assert x.shape == (5 * RECORDS, 3, 32, 32) and x.dtype == np.float32
    assert y.shape == (5 * RECORDS,) and y.dtype == np.int64
    raw = np.concatenate([written[f"data_batch_{i}.bin"] for i in range(1, 6)])
    # exact: the float pixels are value / 255 in float32, and scale back to the bytes
    pixels = raw[:, 1:].reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(x, pixels.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(np.rint(x * 255).astype(np.uint8).reshape(-1, 3072), raw[:, 1:])
    np.testing.assert_array_equal(y, raw[:, 0])
    want, labels = _expected(raw)
    sel = np.ix_(range(len(raw)), range(3), (0, 1, 17, 31), (0, 5, 31))
    np.testing.assert_array_equal(np.rint(x[sel] * 255).astype(np.uint8), want[sel])
    np.testing.assert_array_equal(y, labels)
    assert x.min() >= 0.0 and x.max() <= 1.0

    xt, yt = load_cifar10_binary(tmp_path, split="test", dtype=np.float64)
    assert xt.dtype == np.float64 and xt.shape == (RECORDS, 3, 32, 32)
    rec = written["test_batch.bin"]
    np.testing.assert_array_equal(xt, rec[:, 1:].reshape(-1, 3, 32, 32) / 255.0)
    np.testing.assert_array_equal(yt, rec[:, 0])


def test_cifar_subdirectory_and_batches(tmp_path):
    names = ["data_batch_2.bin", "data_batch_1.bin"]
    written = _write_cifar(tmp_path / "cifar-10-batches-bin", names)
    with pytest.raises(UserError, match=r"data_batch_3\.bin.*batches=\(1,\)"):
        load_cifar10_binary(tmp_path)
    x, y = load_cifar10_binary(tmp_path, batches=(2, 1))
    both = np.concatenate([written["data_batch_2.bin"], written["data_batch_1.bin"]])
    np.testing.assert_array_equal(y, both[:, 0])
    x1, _ = load_cifar10_binary(tmp_path / "cifar-10-batches-bin", batches=(1,))
    np.testing.assert_array_equal(x1, x[RECORDS:])
    with pytest.raises(UserError, match="test_batch.bin"):
        load_cifar10_binary(tmp_path, split="test")
    with pytest.raises(UserError, match="batches"):
        load_cifar10_binary(tmp_path, batches=(6,))
    with pytest.raises(UserError, match="split"):
        load_cifar10_binary(tmp_path, split="val")
    with pytest.raises(UserError, match="floating"):
        load_cifar10_binary(tmp_path, batches=(1,), dtype=np.int64)


class _Boom:
    def __reduce__(self):  # unpickling this would raise: proves nothing is unpickled
        return (exec, ("raise RuntimeError('unpickled!')",))


def test_cifar_refuses_pickled_format(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(_Boom()))
    for where in (tmp_path, folder):
        with pytest.raises(UserError, match=r"pickled.*cifar-10-binary\.tar\.gz") as info:
            load_cifar10_binary(where)
        assert "\n" not in str(info.value)


def test_cifar_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_cifar10_binary(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no CIFAR-10 binary files.*cifar-10-binary\.tar\.gz"):
        load_cifar10_binary(tmp_path / "empty")

    _write_cifar(tmp_path / "trunc", ["test_batch.bin"])
    path = tmp_path / "trunc" / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UserError, match=r"test_batch\.bin has 21506 bytes.*3073") as info:
        load_cifar10_binary(tmp_path / "trunc", split="test")
    assert "\n" not in str(info.value)

    rec = _records(3)
    rec[4, 0] = 42
    (tmp_path / "labels").mkdir()
    rec.tofile(tmp_path / "labels" / "test_batch.bin")
    with pytest.raises(UserError, match=r"test_batch\.bin record 4 has label 42"):
        load_cifar10_binary(tmp_path / "labels", split="test")


# --------------------------------------------------------------------------- image folder


def _png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_labels_order_values(tmp_path):
    rng = np.random.default_rng(0)
    pics = {}
    # written out of order: classes and files must come back sorted
    for cls, names in (("dog", ["b.png", "a.png"]), ("cat", ["z.png", "c.PNG", "m.png"])):
        for name in names:
            a = rng.integers(0, 256, size=(3, 5, 3), dtype=np.uint8)
            _png(tmp_path / cls / name, a)
            pics[(cls, name)] = a
    gray = rng.integers(0, 256, size=(3, 5), dtype=np.uint8)
    _png(tmp_path / "dog" / "sub" / "g.png", gray)  # nested files are found
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    _png(tmp_path / "dog" / ".hidden.png", gray)
    _png(tmp_path / ".ipynb_checkpoints" / "x.png", gray)

    x, y, names = load_image_folder(tmp_path)
    assert names == ["cat", "dog"]
    assert x.shape == (6, 3, 3, 5) and x.dtype == np.float32
    np.testing.assert_array_equal(y, [0, 0, 0, 1, 1, 1])
    order = [
        ("cat", "c.PNG"), ("cat", "m.png"), ("cat", "z.png"), ("dog", "a.png"), ("dog", "b.png")
    ]
    for i, key in enumerate(order):
        want = pics[key].transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        np.testing.assert_array_equal(x[i], want)
    np.testing.assert_array_equal(x[5], np.broadcast_to(gray / np.float32(255), (3, 3, 5)))

    xr, yr, _ = load_image_folder(tmp_path, size=(4, 2), dtype=np.float64)
    assert xr.shape == (6, 3, 4, 2) and xr.dtype == np.float64
    np.testing.assert_array_equal(yr, y)


def test_image_folder_errors(tmp_path, monkeypatch):
    _png(tmp_path / "a" / "1.png", np.zeros((4, 4, 3), np.uint8))
    _png(tmp_path / "a" / "2.png", np.zeros((4, 6, 3), np.uint8))
    with pytest.raises(UserError, match=r"2\.png is 4x6.*size=") as info:
        load_image_folder(tmp_path)
    assert "\n" not in str(info.value)
    x, _, _ = load_image_folder(tmp_path, size=(4, 4))
    assert x.shape == (2, 3, 4, 4)
    with pytest.raises(UserError, match="size="):
        load_image_folder(tmp_path, size=4)

    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match=r"class folder .*b has no images"):
        load_image_folder(tmp_path, size=(4, 4))
    (tmp_path / "b" / "bad.png").write_bytes(b"certainly not a png")
    with pytest.raises(UserError, match=r"cannot read image .*bad\.png"):
        load_image_folder(tmp_path, size=(4, 4))

    with pytest.raises(UserError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "1.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UserError, match="no class subdirectories"):
        load_image_folder(tmp_path / "flat")

    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(UserError, match=r"pip install pillow.*mgd\[images\]"):
        load_image_folder(tmp_path)


# ---------------------------------------------------------------------------- augmentation


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(x, seed, padding, flip, pad_mode):
    """Naive per-example crop/flip with the documented draw order."""
    g = _gen(seed)
    b = x.shape[0]
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    coin = torch.randint(0, 2, (b,), generator=g)
    h, w = x.shape[2:]
    out = []
    for i in range(b):
        mode = "reflect" if pad_mode == "reflect" else "constant"
        padded = F.pad(x[i : i + 1], (padding,) * 4, mode=mode)[0]
        crop = padded[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        if flip and coin[i]:
            crop = torch.flip(crop, dims=(2,))
        out.append(crop)
    return torch.stack(out)


@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
@pytest.mark.parametrize("flip", [True, False])
def test_crop_flip_matches_reference(pad_mode, flip):
    x = torch.randn(16, 3, 9, 7, generator=_gen(123))
    x_before = x.clone()
    augment = RandomCropFlip(padding=3, flip=flip, pad_mode=pad_mode)
    for seed in range(3):
        out = augment(x, _gen(seed))
        assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
        assert torch.equal(out, _reference(x, seed, 3, flip, pad_mode))
    assert torch.equal(x, x_before)


def test_crop_flip_determinism_and_seeds():
    x = torch.rand(32, 3, 8, 8, generator=_gen(0))
    augment = RandomCropFlip(padding=2)
    a = augment(x, _gen(5))
    b = augment(x, _gen(5))
    c = augment(x, _gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the global RNG is neither used nor advanced
    state = torch.get_rng_state()
    augment(x, _gen(5))
    assert torch.equal(torch.get_rng_state(), state)
    # float64 and half-precision inputs keep their dtype and values
    assert torch.equal(augment(x.double(), _gen(5)), a.double())
    assert augment(x.half(), _gen(5)).dtype == torch.float16


def test_flip_probability_and_identity():
    w = 6
    x = torch.arange(w, dtype=torch.float32).expand(4000, 1, 2, w)
    out = RandomCropFlip(padding=0)(x, _gen(1))
    flipped = (out == x.flip(3)).all(dim=(1, 2, 3))
    same = (out == x).all(dim=(1, 2, 3))
    assert bool((flipped ^ same).all())
    assert 0.45 < flipped.float().mean().item() < 0.55
    ident = RandomCropFlip(padding=0, flip=False)(x, _gen(1))
    assert torch.equal(ident, x) and ident.data_ptr() != x.data_ptr()


def test_crop_flip_gradcheck():
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    for pad_mode in ("reflect", "zeros"):
        augment = RandomCropFlip(padding=2, pad_mode=pad_mode)
        assert torch.autograd.gradcheck(lambda t: augment(t, _gen(3)), (x,))


def test_crop_flip_batch_structures():
    x = torch.rand(4, 3, 8, 8)
    y = torch.arange(4)
    want = RandomCropFlip()(x, _gen(9))

    out = RandomCropFlip()((x, y), _gen(9))
    assert type(out) is tuple and out[1] is y and torch.equal(out[0], want)
    out = RandomCropFlip(field=1)([y, x], _gen(9))
    assert type(out) is list and out[0] is y and torch.equal(out[1], want)
    Batch = namedtuple("Batch", "x y")
    out = RandomCropFlip()(Batch(x, y), _gen(9))
    assert isinstance(out, Batch) and out.y is y and torch.equal(out.x, want)

    batch = {"x": x, "y": y}
    out = RandomCropFlip(field="x")(batch, _gen(9))
    assert type(out) is dict and out is not batch and out["y"] is y and torch.equal(out["x"], want)
    assert batch["x"] is x

    with pytest.raises(UserError, match="field"):
        RandomCropFlip(field="images")(batch, _gen(9))
    with pytest.raises(UserError, match="Generator"):
        RandomCropFlip()(x, None)
    with pytest.raises(UserError, match="pad_mode"):
        RandomCropFlip(pad_mode="edge")
    with pytest.raises(UserError, match="reflect"):
        RandomCropFlip(padding=8)(x, _gen(0))
    assert RandomCropFlip(padding=8, pad_mode="zeros")(x, _gen(0)).shape == x.shape
