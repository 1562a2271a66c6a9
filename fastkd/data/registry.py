"""The built-in datasets: scikit-learn's bundled `digits` (real, offline) and a synthetic one for tests."""
from typing import Optional

import numpy as np
import torch

from .base import DatasetInfo, TensorDataset

DIGITS_TEST_FRACTION = 1 / 6
DIGITS_SPLIT_SEED = 0  # the train/test split is fixed, so every run evaluates on the same 300 images


def _normalise(train: torch.Tensor, test: torch.Tensor):
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)
    return (train - mean) / std, (test - mean) / std


def load_digits(data_dir: Optional[str] = None) -> TensorDataset:
    """1,797 real 8×8 grey images of handwritten digits, 10 classes, shipped inside scikit-learn."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32))[:, None]  # (N, 1, 8, 8), values 0..16
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_test = int(round(len(labels) * DIGITS_TEST_FRACTION))
    test_idx, train_idx = order[:n_test].sort().values, order[n_test:].sort().values
    train_x, test_x = _normalise(images[train_idx], images[test_idx])
    # Padding 1 on 8-pixel images is the proportion of the usual 4 on 32; flips would turn digits into non-digits.
    info = DatasetInfo("digits", 10, 1, 8, len(train_idx), n_test, crop_padding=1, flip=False)
    return TensorDataset(info, train_x, labels[train_idx], test_x, labels[test_idx])


def load_synthetic(data_dir: Optional[str] = None, num_classes: int = 4, channels: int = 3, size: int = 8,
                   train_per_class: int = 64, test_per_class: int = 16, seed: int = 1234) -> TensorDataset:
    """Class templates plus noise: learnable in a few steps, for tests and smoke runs."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, channels, size, size, generator=g)

    def draw(per_class):
        y = torch.arange(num_classes).repeat_interleave(per_class)
        x = templates[y] + 0.8 * torch.randn(len(y), channels, size, size, generator=g)
        return x, y

    (train_x, train_y), (test_x, test_y) = draw(train_per_class), draw(test_per_class)
    train_x, test_x = _normalise(train_x, test_x)
    info = DatasetInfo("synthetic", num_classes, channels, size, len(train_y), len(test_y), crop_padding=1,
                       flip=True)
    return TensorDataset(info, train_x, train_y, test_x, test_y)


DATASETS = {"digits": load_digits, "synthetic": load_synthetic}


def load_dataset(name: str, data_dir: Optional[str] = None) -> TensorDataset:
    if name not in DATASETS:
        raise ValueError(f"--dataset {name!r} is unknown; choose from {', '.join(DATASETS)}")
    return DATASETS[name](data_dir)
