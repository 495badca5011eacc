"""A development dataset for choosing methods' settings without touching the protocol's data.

``python experiments/dev_pool.py [OUT.npz]`` writes MNIST-1D generated with another seed (7,
not the library's 42) and split like the ``mnist1d`` preset (4000 train / 1000 val from the
first half, the generator's own 5000 test points): ``runs/dev/mnist1d_dev.npz`` by default.
Method settings are chosen on its *test* split (it is a development set: none of its numbers
is a result), so that the validation split, which MGD optimises, is not also the judge, and
the protocol's datasets (digits, mnist1d) stay untouched until the settings are fixed.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mgd.data import _MNIST1D_NUM_SAMPLES, _MNIST1D_TRAIN_SPLIT, _MNIST1D_TRAIN_VAL, _stratified_split  # noqa: E402
from mgd.io import write_npz  # noqa: E402

DEV_SEED = 7


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:] or [ROOT / "runs" / "dev" / "mnist1d_dev.npz"])[0])
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = _MNIST1D_NUM_SAMPLES, _MNIST1D_TRAIN_SPLIT, DEV_SEED
    state = random.getstate(), np.random.get_state()
    try:
        raw = make_dataset(args)  # never get_dataset: it downloads
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
    x, y = np.asarray(raw["x"], dtype=np.float64), np.asarray(raw["y"], dtype=np.int64)
    x_train, y_train, x_val, y_val = _stratified_split(x, y, *_MNIST1D_TRAIN_VAL)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_npz(out, {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val,
                    "x_test": np.asarray(raw["x_test"], dtype=np.float64),
                    "y_test": np.asarray(raw["y_test"], dtype=np.int64)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
