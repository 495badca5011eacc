"""Image data as users have it: CIFAR-10 binaries, class folders, and seeded augmentation.

Loaders return plain numpy arrays, ``x`` of shape ``(N, 3, H, W)`` scaled to ``[0, 1]`` and
``y`` int64 labels, so they plug into the rest of ``mgd`` like any other features.

**CIFAR-10 binary format.** :func:`load_cifar10_binary` reads the *binary* distribution
(``cifar-10-binary.tar.gz``, which unpacks to ``cifar-10-batches-bin/``): five training files
``data_batch_1.bin`` .. ``data_batch_5.bin`` and one ``test_batch.bin``, each a bare sequence
of 3073-byte records with no header. A record is one label byte (0-9) followed by 3072 pixel
bytes: the 1024 red values of the 32×32 image in row-major order, then the 1024 green, then
the 1024 blue. The bytes are read with :func:`numpy.fromfile`, so the loader never executes
anything stored in the file.

**Why pickle is never read.** The better-known "python" distribution
(``cifar-10-python.tar.gz``, files ``data_batch_1`` without ``.bin``) is a set of pickles,
and unpickling a file can run arbitrary code chosen by whoever wrote it. ``mgd`` therefore
refuses those files with a message pointing to the binary version instead of loading them.

**Determinism contract of the augmentation.** :class:`RandomCropFlip` is called as
``augment(batch, generator)`` with a :class:`torch.Generator` that the caller seeds for each
training step (e.g. from the run seed and the step index). Every random choice is drawn from
that generator alone, in a fixed, documented order, and never from torch's global RNG, so the
augmented batch is a bit-exact function of the input batch and the generator's state: replaying
a step with the same seed reproduces the same pixels, which exact metagradients through a
training run (REPLAY) require. The transform only moves pixel values (crop, reflection padding
and flips are gathers; zero padding selects exact zeros), so it is also differentiable with
respect to the input images, e.g. for data poisoning through augmented training.

Example:
    >>> import torch
    >>> augment = RandomCropFlip(padding=4)
    >>> x = torch.rand(8, 3, 32, 32)
    >>> a = augment(x, torch.Generator().manual_seed(1))
    >>> b = augment(x, torch.Generator().manual_seed(1))
    >>> bool(torch.equal(a, b)), a.shape
    (True, torch.Size([8, 3, 32, 32]))
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Sequence

import numpy as np
import torch
from torch import Tensor

from mgd.errors import UserError

__all__ = [
    "CIFAR10_CLASSES",
    "IMAGE_EXTENSIONS",
    "RandomCropFlip",
    "load_cifar10_binary",
    "load_image_folder",
]

#: CIFAR-10's class names, indexed by label.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

#: File name endings that :func:`load_image_folder` decodes by default (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".gif")

_CIFAR_SIDE = 32
_CIFAR_PIXELS = 3 * _CIFAR_SIDE * _CIFAR_SIDE  # 3072
_CIFAR_RECORD = 1 + _CIFAR_PIXELS  # 3073 bytes: label, then R, G, B planes
_CIFAR_TRAIN_BATCHES = (1, 2, 3, 4, 5)
_CIFAR_SUBDIR = "cifar-10-batches-bin"
_CIFAR_PICKLED_SUBDIR = "cifar-10-batches-py"
_CIFAR_BINARY_HINT = (
    "download the binary version cifar-10-binary.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and extract it"
)


def _float_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise UserError(
            f"dtype={dtype!r} is not a numpy dtype; use np.float32 or np.float64"
        ) from exc
    if dt.kind != "f":
        raise UserError(f"dtype={dt} is not a floating type; use np.float32 or np.float64")
    return dt


# ------------------------------------------------------------------------------- CIFAR-10


def _cifar_file_names(split: str, batches: Sequence[int] | None) -> list[str]:
    if split not in ("train", "test"):
        raise UserError(f"split={split!r} is not valid; use split='train' or split='test'")
    if split == "test":
        if batches is not None:
            raise UserError("batches= selects training files only; drop it for split='test'")
        return ["test_batch.bin"]
    if batches is None:
        return [f"data_batch_{i}.bin" for i in _CIFAR_TRAIN_BATCHES]
    usage = "must be a non-empty tuple of ints from 1..5, e.g. batches=(1,)"
    if isinstance(batches, (int, str)) or not all(
        isinstance(b, (int, np.integer)) for b in batches
    ):
        raise UserError(f"batches={batches!r} {usage}")
    chosen = [int(b) for b in batches]
    if not chosen or any(b not in _CIFAR_TRAIN_BATCHES for b in chosen):
        raise UserError(f"batches={batches!r} {usage}")
    if len(set(chosen)) != len(chosen):
        raise UserError(f"batches={batches!r} lists a batch more than once")
    return [f"data_batch_{i}.bin" for i in chosen]


def _refuse_pickled(folder: Path, names: list[str]) -> None:
    """Raise if ``folder`` holds the pickled "python" CIFAR-10 files instead of the binary ones."""
    for name in names:
        pickled = folder / name[: -len(".bin")]
        if pickled.is_file():
            raise UserError(
                f"{pickled} is CIFAR-10's pickled 'python' format, which mgd never unpickles "
                f"(unpickling can run arbitrary code); {_CIFAR_BINARY_HINT}"
            )
    if (folder / _CIFAR_PICKLED_SUBDIR).is_dir() and not (folder / _CIFAR_SUBDIR).is_dir():
        raise UserError(
            f"{folder / _CIFAR_PICKLED_SUBDIR} holds CIFAR-10's pickled 'python' format, which mgd "
            f"never unpickles (unpickling can run arbitrary code); {_CIFAR_BINARY_HINT}"
        )


def _cifar_folder(directory: Path, names: list[str]) -> Path:
    """The folder holding the batch files: ``directory`` itself or its ``cifar-10-batches-bin``."""
    if not directory.exists():
        raise UserError(
            f"CIFAR-10 directory {directory} does not exist; {_CIFAR_BINARY_HINT} there"
        )
    if not directory.is_dir():
        if directory.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise UserError(
                f"{directory} is an archive; extract it (tar xzf) and pass the extracted directory"
            )
        raise UserError(
            f"{directory} is a file; pass the directory holding data_batch_1.bin .. test_batch.bin"
        )
    candidates = [directory, directory / _CIFAR_SUBDIR]
    all_names = [f"data_batch_{i}.bin" for i in _CIFAR_TRAIN_BATCHES] + ["test_batch.bin"]
    for folder in candidates:
        if folder.is_dir() and any((folder / n).is_file() for n in all_names):
            return folder
    for folder in candidates:
        if folder.is_dir():
            _refuse_pickled(folder, names)
    raise UserError(
        f"no CIFAR-10 binary files (data_batch_1.bin .. test_batch.bin) in {directory} or "
        f"{directory / _CIFAR_SUBDIR}; {_CIFAR_BINARY_HINT}"
    )


def load_cifar10_binary(
    directory: str | os.PathLike,
    *,
    split: str = "train",
    dtype: Any = np.float32,
    batches: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10 from its binary distribution (never from the pickled one).

    Args:
        directory: the folder holding ``data_batch_1.bin`` .. ``data_batch_5.bin`` and
            ``test_batch.bin``, or a folder containing the extracted ``cifar-10-batches-bin``.
        split: ``"train"`` (the five ``data_batch_*.bin`` files, 50000 images) or ``"test"``
            (``test_batch.bin``, 10000 images).
        dtype: floating dtype of the returned pixels.
        batches: for ``split="train"``, which training files to read, e.g. ``(1,)`` for
            ``data_batch_1.bin`` only, concatenated in the order given. The default reads
            all five and requires them all to be present.

    Returns:
        ``(x, y)``: pixels of shape ``(N, 3, 32, 32)`` (channels R, G, B) scaled to
        ``[0, 1]`` as ``value / 255``, and int64 labels of shape ``(N,)`` in ``0..9``
        (names in :data:`CIFAR10_CLASSES`), in file order.

    Raises:
        UserError: the directory or a needed file is missing, the files are the pickled
            "python" format, a file's size is not a multiple of 3073 bytes or it is empty,
            a label exceeds 9, or an argument is invalid. The one-line message names the
            file and the fix.
    """
    dt = _float_dtype(dtype)
    names = _cifar_file_names(split, batches)
    folder = _cifar_folder(Path(directory), names)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        _refuse_pickled(folder, missing)
        hint = (
            "; to read only some training files pass e.g. batches=(1,)"
            if split == "train" and batches is None
            else ""
        )
        raise UserError(f"missing CIFAR-10 file {folder / missing[0]}; {_CIFAR_BINARY_HINT}{hint}")

    counts = []
    for name in names:
        path = folder / name
        size = path.stat().st_size
        if size == 0 or size % _CIFAR_RECORD:
            raise UserError(
                f"{path} has {size} bytes, not a positive multiple of the {_CIFAR_RECORD}-byte "
                f"CIFAR-10 record; the file is truncated or not CIFAR-10 binary, re-extract "
                f"cifar-10-binary.tar.gz"
            )
        counts.append(size // _CIFAR_RECORD)

    # Preallocated output, filled file by file: no concatenation copy of the 600 MB array.
    x = np.empty((sum(counts), 3, _CIFAR_SIDE, _CIFAR_SIDE), dtype=dt)
    y = np.empty(sum(counts), dtype=np.int64)
    scale = dt.type(255)
    start = 0
    for name, n in zip(names, counts):
        path = folder / name
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size != n * _CIFAR_RECORD:  # the file changed between stat and read
            raise UserError(f"{path} changed size while being read; read it again")
        records = raw.reshape(n, _CIFAR_RECORD)
        labels = records[:, 0]
        bad = np.flatnonzero(labels > 9)
        if bad.size:
            i = int(bad[0])
            raise UserError(
                f"{path} record {i} has label {int(labels[i])}, but CIFAR-10 labels are 0..9; "
                f"the file is not CIFAR-10 binary (CIFAR-100 has another layout), re-extract "
                f"cifar-10-binary.tar.gz"
            )
        pixels = records[:, 1:].reshape(n, 3, _CIFAR_SIDE, _CIFAR_SIDE)
        np.divide(pixels, scale, out=x[start : start + n], dtype=dt)
        y[start : start + n] = labels
        start += n
    return x, y


# --------------------------------------------------------------------------- image folder


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _image_files(class_dir: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Image files under ``class_dir`` (recursively), sorted by their relative POSIX path."""
    found = []
    for root, dirs, files in os.walk(class_dir):
        dirs[:] = [d for d in dirs if _visible(d)]
        for f in files:
            if _visible(f) and f.lower().endswith(extensions):
                found.append(Path(root) / f)
    # Plain string order of the relative path: the same on every platform and filesystem.
    return sorted(found, key=lambda p: p.relative_to(class_dir).as_posix())


def _check_size(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    ok = (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size
        )
    )
    if not ok:
        raise UserError(f"size={size!r} must be None or a pair of positive ints (height, width)")
    return int(size[0]), int(size[1])


def load_image_folder(
    directory: str | os.PathLike,
    *,
    size: tuple[int, int] | None = None,
    dtype: Any = np.float32,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a labelled image collection laid out as one subdirectory per class.

    The layout is the common "ImageFolder" convention::

        directory/cat/001.png
        directory/cat/002.png
        directory/dog/xyz.jpg

    Class names are the subdirectory names in sorted (string) order and get labels
    ``0..C-1``; within a class, image files (searched recursively) are read in sorted order
    of their path relative to the class folder, so the arrays are the same on every machine.
    Names starting with ``.`` (hidden files, ``.ipynb_checkpoints``) and files with other
    endings are ignored. Images are decoded with Pillow, converted to RGB (grayscale is
    repeated over three channels, alpha is dropped, a GIF gives its first frame) and, if
    ``size`` is given, resized with Pillow's bilinear filter (always the same filter).

    Args:
        directory: the root folder holding one subdirectory per class.
        size: ``(height, width)`` to resize every image to; ``None`` keeps the stored size,
            which must then be the same for all images.
        dtype: floating dtype of the returned pixels.
        extensions: file name endings to read, case-insensitive.

    Returns:
        ``(x, y, class_names)``: pixels of shape ``(N, 3, H, W)`` scaled to ``[0, 1]`` as
        ``value / 255``, int64 labels of shape ``(N,)``, and the list of class names
        (``class_names[label]``).

    Raises:
        UserError: Pillow is not installed; the directory is missing or has no class
            subdirectories; a class has no images; an image cannot be decoded; images
            differ in size while ``size`` is None; or an argument is invalid. The one-line
            message names the file or folder and the fix.
    """
    try:
        from PIL import Image
    except ImportError as exc:
        raise UserError(
            'load_image_folder needs Pillow: pip install pillow (or pip install "mgd[images]")'
        ) from exc

    dt = _float_dtype(dtype)
    target = _check_size(size)
    if isinstance(extensions, str):
        extensions = (extensions,)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if not exts:
        raise UserError("extensions= is empty; give file endings such as ('.png', '.jpg')")

    root = Path(directory)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise UserError(
            f"image folder {root} {what}; pass a folder with one subdirectory per class"
        )
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p.name))
    if not class_names:
        raise UserError(
            f"image folder {root} has no class subdirectories; put each class's images in "
            f"its own subdirectory, e.g. {root / 'cat'}"
        )

    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        found = _image_files(root / name, exts)
        if not found:
            raise UserError(
                f"class folder {root / name} has no images ending in {', '.join(exts)}; "
                f"add images or remove the folder"
            )
        files.extend(found)
        labels.extend([label] * len(found))

    resample = getattr(Image, "Resampling", Image).BILINEAR
    scale = dt.type(255)
    x: np.ndarray | None = None
    first: Path | None = None
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if target is not None and image.size != (target[1], target[0]):
                    image = image.resize((target[1], target[0]), resample=resample)
                pixels = np.asarray(image, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"cannot read image {path} ({reason}); replace or delete the file"
            ) from exc
        h, w = pixels.shape[:2]
        if x is None:
            x = np.empty((len(files), 3, h, w), dtype=dt)
            first = path
        elif (h, w) != x.shape[2:]:
            fh, fw = x.shape[2:]
            raise UserError(
                f"image {path} is {h}x{w} (height x width) but {first} is {fh}x{fw}; pass "
                f"size=(height, width) to resize all images, e.g. size=({fh}, {fw})"
            )
        np.divide(pixels.transpose(2, 0, 1), scale, out=x[i], dtype=dt)
    assert x is not None  # every class has at least one file
    return x, np.asarray(labels, dtype=np.int64), class_names


# ---------------------------------------------------------------------------- augmentation


def _reflect(index: Tensor, n: int) -> Tensor:
    """Map indices in ``[-(n-1), 2(n-1)]`` into ``[0, n)`` by reflection without edge repeat."""
    index = index.abs()
    return torch.where(index > n - 1, 2 * (n - 1) - index, index)


@dataclass(frozen=True)
class RandomCropFlip:
    """Random padded crop and horizontal flip, drawn from an explicit generator.

    Each image is padded by ``padding`` pixels on every side, cropped back to its original
    size at a per-example offset, and (if ``flip``) mirrored left-right with probability 1/2
    per example: the standard CIFAR augmentation. The transform is vectorised over the batch
    (two :func:`torch.gather` calls), out of place, keeps dtype and device, and is
    differentiable with respect to the input images.

    Determinism: a call draws, from ``generator`` only and in this order, ``B`` vertical
    offsets, then ``B`` horizontal offsets, each ``torch.randint(0, 2 * padding + 1, (B,))``,
    then ``B`` flip coins ``torch.randint(0, 2, (B,))`` (drawn even when ``flip`` is False,
    so the crops do not depend on ``flip``). The draws are made on the generator's device
    and then moved to the images' device, so the same seed gives the same offsets whatever
    device the images are on. Example ``b``'s output pixel ``(i, j)`` is the padded image's
    pixel ``(i + dy[b], j' + dx[b])``, with ``j' = W - 1 - j`` if example ``b`` is flipped
    and ``j' = j`` otherwise.

    Attributes:
        padding: pixels of padding on each side (the crop offset is uniform in
            ``0..2*padding``); 0 gives flips only.
        flip: whether to flip horizontally with probability 1/2.
        field: where the images are in a tuple/list batch (an index) or a dict batch (a
            key); ignored when the batch is the image tensor itself.
        pad_mode: ``"reflect"`` (mirror without repeating the edge, as
            ``torch.nn.functional.pad(mode="reflect")``; needs ``padding`` smaller than the
            image's height and width) or ``"zeros"``.

    Example:
        >>> augment = RandomCropFlip(padding=4, field="x")
        >>> batch = {"x": torch.rand(2, 3, 32, 32), "y": torch.tensor([3, 5])}
        >>> out = augment(batch, torch.Generator().manual_seed(7))
        >>> out["x"].shape, out["y"] is batch["y"]
        (torch.Size([2, 3, 32, 32]), True)
    """

    padding: int = 4
    flip: bool = True
    field: Hashable = 0
    pad_mode: str = "reflect"

    def __post_init__(self) -> None:
        p = self.padding
        if not isinstance(p, (int, np.integer)) or isinstance(p, bool) or p < 0:
            raise UserError(f"RandomCropFlip padding={self.padding!r} must be a non-negative int")
        object.__setattr__(self, "padding", int(self.padding))
        if not isinstance(self.flip, (bool, np.bool_)):
            raise UserError(f"RandomCropFlip flip={self.flip!r} must be True or False")
        object.__setattr__(self, "flip", bool(self.flip))
        if self.pad_mode not in ("reflect", "zeros"):
            raise UserError(
                f"RandomCropFlip pad_mode={self.pad_mode!r} is not valid; use 'reflect' or 'zeros'"
            )

    def __call__(self, batch: Any, generator: torch.Generator) -> Any:
        """Augment the images of ``batch`` with draws from ``generator``.

        Args:
            batch: the image tensor ``(B, C, H, W)``, or a tuple/list whose element
                ``field`` is, or a dict whose key ``field`` is, that tensor.
            generator: a :class:`torch.Generator` seeded by the caller for this step.

        Returns:
            The same structure (same container type) with only the image entry replaced
            by a new tensor; the input is never modified.

        Raises:
            UserError: ``generator`` is not a ``torch.Generator``, the images are missing or
                not a 4-D tensor, or reflection padding is too large for the images.
        """
        if not isinstance(generator, torch.Generator):
            raise UserError(
                f"RandomCropFlip needs a torch.Generator seeded per step, got "
                f"{type(generator).__name__}; e.g. torch.Generator().manual_seed(seed)"
            )
        if isinstance(batch, Tensor):
            return self._augment(batch, generator)
        if isinstance(batch, Mapping):
            if self.field not in batch:
                raise UserError(
                    f"RandomCropFlip field={self.field!r} is not a key of the batch "
                    f"(keys {list(batch)}); set field= to the images' key"
                )
            images = self._augment(batch[self.field], generator)
            if isinstance(batch, MutableMapping):
                out = copy.copy(batch)  # shallow: keeps dict subclass, shares other entries
                out[self.field] = images
                return out
            return {**batch, self.field: images}
        if isinstance(batch, (tuple, list)):
            index = self.field
            if not isinstance(index, (int, np.integer)) or not -len(batch) <= index < len(batch):
                raise UserError(
                    f"RandomCropFlip field={self.field!r} is not an index of a batch with "
                    f"{len(batch)} entries; set field= to the images' position"
                )
            items = list(batch)
            items[int(index)] = self._augment(items[int(index)], generator)
            if isinstance(batch, list):
                return items
            if hasattr(batch, "_fields"):  # namedtuple
                return type(batch)(*items)
            return tuple(items) if type(batch) is tuple else type(batch)(items)
        raise UserError(
            f"RandomCropFlip cannot find images in a batch of type {type(batch).__name__}; "
            f"pass a tensor, a tuple/list or a dict"
        )

    def _augment(self, x: Any, generator: torch.Generator) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise UserError(
                f"RandomCropFlip expects images as a (B, C, H, W) tensor, got {shape}"
            )
        b, c, h, w = x.shape
        p = self.padding
        if self.pad_mode == "reflect" and p > 0 and (p >= h or p >= w):
            raise UserError(
                f"RandomCropFlip padding={p} with pad_mode='reflect' needs images larger than "
                f"{p}x{p}, got {h}x{w}; lower padding or use pad_mode='zeros'"
            )
        gdev = generator.device
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=gdev)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=gdev)
        coin = torch.randint(0, 2, (b,), generator=generator, device=gdev)
        dev = x.device
        dy, dx, coin = dy.to(dev), dx.to(dev), coin.to(dev)
        flipped = coin.bool() if self.flip else torch.zeros_like(coin, dtype=torch.bool)

        # Source coordinates in the unpadded image, possibly outside [0, n) before padding.
        rows = torch.arange(h, device=dev).unsqueeze(0) + (dy - p).unsqueeze(1)  # (B, H)
        cols = torch.arange(w, device=dev).unsqueeze(0).expand(b, w)
        cols = torch.where(flipped.unsqueeze(1), w - 1 - cols, cols) + (dx - p).unsqueeze(1)
        if self.pad_mode == "reflect":
            rows, cols = _reflect(rows, h), _reflect(cols, w)
            valid = None
        else:
            row_ok = (rows >= 0) & (rows < h)
            col_ok = (cols >= 0) & (cols < w)
            valid = row_ok.unsqueeze(2) & col_ok.unsqueeze(1)  # (B, H, W)
            rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)

        out = x.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w))
        out = out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))
        if valid is not None:
            # where (not a multiply) so that padding is exactly 0 even next to inf/nan pixels
            out = torch.where(valid.unsqueeze(1), out, torch.zeros((), dtype=x.dtype, device=dev))
        return out
