"""A ResNet-9-style CNN on CIFAR-10: exact metagradients for data weights and learning rates.

What it shows: an exact metagradient through training a convolutional network with
BatchNorm (its running statistics are part of the training state, and the validation
objective reads them in eval mode), SGD with Nesterov momentum and weight decay, and
random-crop + flip augmentation (:class:`mgd.images.RandomCropFlip`, drawn from a generator
seeded per step, so every replayed step sees the same pixels). The metaparameters are one
weight per training image (``data_weights``) and one multiplier per step of the learning rate
(``lr``); the objective is the cross-entropy on a validation split carved from the training
records, and the validation accuracy is reported.

The model (:class:`ResNet9`) is written here in plain PyTorch: conv-BatchNorm-ReLU blocks
(BatchNorm before the activation), two residual blocks, average pooling (never max pooling,
whose derivative is a selection) and a linear head whose logits are scaled by 0.1.

Data: CIFAR-10's *binary* distribution, read by :func:`mgd.images.load_cifar10_binary` from
``--data DIR`` (the folder with ``data_batch_1.bin`` .. ``test_batch.bin``). Without ``--data``
the example writes a small synthetic directory in the same format into a temporary folder
(random class-dependent images: 200 training records across the five batch files and 100
test records) and says so. Nothing is ever downloaded.

Run::

    python examples/cifar_resnet.py                   # synthetic data, about 10 s on 2 idle CPU cores
    python examples/cifar_resnet.py --check           # + the full-unroll reference in float64 (~1.5 min, 2.5 GB)
    python examples/cifar_resnet.py --data ~/data/cifar-10-batches-bin --train 2000 --val 500 \\
        --width 16 --steps 300

or ``mgd grad --task examples/cifar_resnet.py:build`` (``seed``, ``steps``, ``dtype``, ``device``).

It prints the data and model sizes, the validation loss and accuracy after training (and the
test accuracy), the REPLAY plan, the training images whose up-weighting helps/hurts the
validation loss most (with their labels), the learning-rate metagradient, and with
``--check`` the relative error against :func:`mgd.check.full_unroll_metagradient`.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

import mgd
import mgd.check
import mgd.images

#: Per-channel mean and standard deviation of the CIFAR-10 training images.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
RECORD = 1 + 3 * 32 * 32


# ----------------------------------------------------------------------------- data


def write_synthetic_cifar(directory: str | Path, *, train: int = 200, test: int = 100, seed: int = 0) -> Path:
    """Write a CIFAR-10 *binary* directory of random class-dependent images.

    Each class has a smooth random colour pattern (a 4×4×3 grid upsampled to 32×32); an image
    is its class's pattern plus pixel noise, as bytes. ``train`` records are split over
    ``data_batch_1.bin`` .. ``data_batch_5.bin``, ``test`` go to ``test_batch.bin``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(40, 215, size=(10, 3, 4, 4)).repeat(8, axis=2).repeat(8, axis=3)

    def records(n: int) -> bytes:
        labels = rng.integers(0, 10, size=n)
        pixels = patterns[labels] + rng.normal(0, 40, size=(n, 3, 32, 32))
        out = np.empty((n, RECORD), dtype=np.uint8)
        out[:, 0] = labels
        out[:, 1:] = np.clip(np.rint(pixels), 0, 255).reshape(n, -1)
        return out.tobytes()

    for i, part in enumerate(np.array_split(np.arange(train), 5), start=1):
        (directory / f"data_batch_{i}.bin").write_bytes(records(len(part)))
    (directory / "test_batch.bin").write_bytes(records(test))
    return directory


@functools.lru_cache(maxsize=None)
def _written_synthetic(seed: int) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="mgd-synthetic-cifar10-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    write_synthetic_cifar(directory, seed=seed)
    return directory


def synthetic_directory(seed: int = 0) -> Path:
    """A temporary synthetic CIFAR-10 directory (removed when the process exits), written once
    per process (the applications build the task once per seed); says so."""
    directory = _written_synthetic(seed)
    print(f"no CIFAR-10 directory given: wrote synthetic CIFAR-10 binary files (200 training, 100 test "
          f"records) to {directory}")
    return directory


def _batches_needed(directory: Path, n: int) -> tuple[int, ...] | None:
    """The fewest training files (from ``data_batch_1.bin`` on) holding ``n`` records, or
    ``None`` (read all of them; the loader reports what is missing)."""
    for folder in (directory, directory / "cifar-10-batches-bin"):
        total = 0
        for i in range(1, 6):
            path = folder / f"data_batch_{i}.bin"
            if not path.is_file():
                break
            total += path.stat().st_size // RECORD
            if total >= n:
                return tuple(range(1, i + 1))
    return None


def normalize(x: np.ndarray, dtype: torch.dtype, device) -> torch.Tensor:
    mean = torch.tensor(CIFAR_MEAN, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, dtype=dtype).view(1, 3, 1, 1)
    return ((torch.as_tensor(x, dtype=dtype) - mean) / std).to(device)


def load_splits(directory: str | Path, n_train: int, n_val: int, n_test: int, dtype: torch.dtype, device):
    """``(train, val, test)`` as ``(x, y)`` pairs: the first ``n_train`` training records, the
    next ``n_val`` (the validation split), and the first ``n_test`` test records."""
    directory = Path(directory).expanduser()
    need = n_train + n_val
    x, y = mgd.images.load_cifar10_binary(directory, batches=_batches_needed(directory, need))
    if len(x) < need:
        raise mgd.UserError(f"{directory} has {len(x)} training records; --train + --val asks for {need}")
    xt, yt = mgd.images.load_cifar10_binary(directory, split="test")
    xt, yt = xt[:n_test], yt[:n_test]
    pairs = [(x[:n_train], y[:n_train]), (x[n_train:need], y[n_train:need]), (xt, yt)]
    return [(normalize(a, dtype, device), torch.as_tensor(b, device=device)) for a, b in pairs]


# ----------------------------------------------------------------------------- the model


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3×3 convolution, BatchNorm, then ReLU (BatchNorm before the activation)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Module):
    """``x + f(x)`` with ``f`` two conv-BatchNorm-ReLU blocks."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x):
        return x + self.body(x)


class ResNet9(nn.Module):
    """ResNet-9 (Page's DAWNBench layout) with average pooling and logits scaled by 0.1.

    Channels ``w, 2w, 4w, 8w`` for ``width = w`` (64 in the original).
    """

    def __init__(self, width: int = 8, num_classes: int = 10, scale: float = 0.1):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(3, w),
            conv_bn(w, 2 * w), nn.AvgPool2d(2), Residual(2 * w),
            conv_bn(2 * w, 4 * w), nn.AvgPool2d(2),
            conv_bn(4 * w, 8 * w), nn.AvgPool2d(2), Residual(8 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(8 * w, num_classes, bias=False)
        self.scale = scale

    def forward(self, x):
        return self.head(self.features(x)) * self.scale


def build(seed: int = 0, steps: int = 60, dtype="float32", device="cpu", *, data: str | None = None,
          n_train: int = 160, n_val: int = 40, n_test: int = 100, width: int = 8, batch_size: int = 16,
          lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4) -> mgd.Task:
    """The task: ResNet-9 trained on ``n_train`` CIFAR-10 images, validated on the next ``n_val``.

    ``data``: a CIFAR-10 binary directory; ``None`` writes a synthetic one to a temporary folder.
    ``mgd grad --task examples/cifar_resnet.py:build`` calls it with ``seed``/``steps``/``dtype``/``device``.
    """
    dtype = mgd.task.as_dtype(dtype)
    directory = synthetic_directory() if data is None else data
    train, val, test = load_splits(directory, n_train, n_val, n_test, dtype, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNet9(width).to(dtype=dtype, device=device)
    run = mgd.make_run(
        model, optimizer=mgd.SGD(momentum=momentum, nesterov=True), data=train, steps=steps,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
        augment=mgd.images.RandomCropFlip(padding=4, field=0),
        metaparams=["data_weights", "lr"],
    )
    eval_batch = 4 * batch_size
    objective = mgd.Objective(run.stateless, val, batch_size=eval_batch)  # validation cross-entropy
    metrics = {"val_accuracy": mgd.Metric(run.stateless, val, batch_size=eval_batch)}
    # held out: read only by the applications' final evaluation (mgd select/poison/schedule --task)
    held_out = {}
    if len(test[1]):
        held_out = {"test_loss": mgd.Objective(run.stateless, test, batch_size=eval_batch),
                    "test_accuracy": mgd.Metric(run.stateless, test, batch_size=eval_batch)}
    task = mgd.Task(run, objective, metrics, test=held_out)
    task.data_directory = str(directory)
    task.labels = train[1]
    return task


def build_wide(seed: int = 0, steps: int = 60, dtype="float32", device="cpu", **options) -> mgd.Task:
    """The same task with a twice-as-wide ResNet-9: another victim recipe on the same data, e.g.
    ``mgd poison --task examples/cifar_resnet.py:build --transfer-task examples/cifar_resnet.py:build_wide``."""
    return build(seed, steps, dtype, device, **{"width": 16, **options})


# ----------------------------------------------------------------------------- reporting


def evaluate(task: mgd.Task, state: mgd.TrainState) -> dict[str, float]:
    named = task.run.named_tensors(state.params, state.buffers)
    with torch.no_grad():
        out = {"val_loss": float(task.objective(named))}
        out.update({name: float(metric(named)) for name, metric in (*task.metrics.items(), *task.test.items())})
    return out


def describe_images(grad: torch.Tensor, labels: torch.Tensor, top: int = 5) -> list[str]:
    order = torch.argsort(grad.detach().cpu())
    names = mgd.images.CIFAR10_CLASSES

    def items(index) -> str:
        return ", ".join(f"#{int(i)} {names[int(labels[i])]} ({float(grad[i]):+.2e})" for i in index[:top])

    return [f"up-weighting lowers the validation loss most (helps) for images {items(order)}",
            f"up-weighting raises the validation loss most (hurts) for images {items(order.flip(0))}"]


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Exact metagradients of a ResNet-9's validation loss on CIFAR-10.")
    parser.add_argument("--data", default=None, help="CIFAR-10 binary directory (default: write synthetic data)")
    parser.add_argument("--train", type=int, default=160, help="training images")
    parser.add_argument("--val", type=int, default=40, help="validation images (taken after the training ones)")
    parser.add_argument("--test", type=int, default=100, help="test images (from test_batch.bin)")
    parser.add_argument("--width", type=int, default=8, help="channels of the first block (64 in ResNet-9)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--top", type=int, default=5, help="images to print each way")
    parser.add_argument("--check", action="store_true",
                        help="run in float64 and compare with mgd.check.full_unroll_metagradient")
    args = parser.parse_args(argv)
    if args.check and args.dtype != "float64":
        print("--check: running in float64")
        args.dtype = "float64"
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    task = build(args.seed, args.steps, args.dtype, args.device, data=args.data, n_train=args.train,
                 n_val=args.val, n_test=args.test, width=args.width, batch_size=args.batch_size, lr=args.lr)
    run = task.run
    print(f"ResNet-9 width {args.width}: {run.num_params} parameters, {run.flat_buffers().numel()} BatchNorm "
          f"statistics ({args.dtype}); {args.train} training / {args.val} validation images; "
          f"{args.steps} steps of SGD+Nesterov, batch {args.batch_size}, crop+flip augmentation")
    started = time.perf_counter()
    result = mgd.metagradient(run, task.objective)  # REPLAY with the default plan
    seconds = time.perf_counter() - started
    after = evaluate(task, result.final_state)
    plan = result.plan
    print(f"after training: val loss {after['val_loss']:.4f}, val accuracy {after['val_accuracy']:.3f}"
          + (f", test accuracy {after['test_accuracy']:.3f}" if "test_accuracy" in after else ""))
    print(f"metagradient (training + REPLAY) in {seconds:.1f}s: k={plan.k}, {plan.max_live_checkpoints} "
          f"checkpoints, {plan.extra_passes:.2f} extra passes, vjp={result.vjp}")
    for line in describe_images(result.grads["data_weights"], task.labels, args.top):
        print(line)
    g = result.grads["lr"]
    quarter = max(1, len(g) // 4)
    print(f"dL/d lr multiplier: first quarter {float(g[:quarter].sum()):+.3e}, last quarter "
          f"{float(g[-quarter:].sum()):+.3e} (negative: a larger LR there helps)")
    summary = {"result": result, "task": task, **after}
    if args.check:
        errors = mgd.check.errors_against_full_unroll(run, task.objective, result)
        print("relative error vs full unroll (float64): "
              + ", ".join(f"{name} {error:.2e}" for name, error in errors.items()))
        summary["errors"] = errors
    return summary


if __name__ == "__main__":
    main()
