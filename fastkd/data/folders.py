"""The user's dataset folders: Tiny-ImageNet, CIFAR-100 (python pickles) and ImageFolder.

Each reader checks the layout before any training starts and reports a problem in one line that names the path.
"""
import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import DatasetInfo, TensorDataset

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class ImageFiles:
    """A dataset of encoded image files: paths and class labels for train and test, plus normalisation."""
    info: DatasetInfo
    train_paths: list[str]
    train_labels: np.ndarray
    test_paths: list[str]
    test_labels: np.ndarray
    mean: tuple[float, float, float]  # of pixel values scaled to [0, 1]
    std: tuple[float, float, float]


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise ValueError(f"{what} not found: {path} is not a folder")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def scan_tiny_imagenet(root: Path) -> ImageFiles:
    _require_dir(root, "--data-dir")
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise ValueError(f"Tiny-ImageNet layout: {wnids_file} is missing")
    wnids = [w.strip() for w in wnids_file.read_text().splitlines() if w.strip()]
    if not wnids:
        raise ValueError(f"Tiny-ImageNet layout: {wnids_file} lists no classes")
    _require_dir(root / "train", "Tiny-ImageNet train folder")
    present = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if sorted(wnids) != present:
        raise ValueError(f"Tiny-ImageNet layout: {wnids_file} lists {len(wnids)} classes but {root / 'train'} "
                         f"holds {len(present)} class folders")
    train_paths, train_labels = [], []
    for label, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        images = _images_in(folder) if folder.is_dir() else []
        if not images:
            raise ValueError(f"Tiny-ImageNet layout: class {wnid} has no images in {folder}")
        train_paths += [str(p) for p in images]
        train_labels += [label] * len(images)
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise ValueError(f"Tiny-ImageNet layout: {annotations} is missing")
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    val_label = {}
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise ValueError(f"Tiny-ImageNet layout: {annotations} line {n} has no known wnid: {line[:80]!r}")
        val_label[fields[0]] = label_of[fields[1]]
    _require_dir(root / "val" / "images", "Tiny-ImageNet val folder")
    test_paths, test_labels = [], []
    for path in _images_in(root / "val" / "images"):
        if path.name not in val_label:
            raise ValueError(f"Tiny-ImageNet layout: {path} is missing from {annotations}")
        test_paths.append(str(path))
        test_labels.append(val_label[path.name])
    info = DatasetInfo("tiny-imagenet", len(wnids), 3, 64, len(train_paths), len(test_paths), crop_padding=4,
                       flip=True)
    return ImageFiles(info, train_paths, np.array(train_labels), test_paths, np.array(test_labels),
                      IMAGENET_MEAN, IMAGENET_STD)


def scan_imagefolder(root: Path, size: int = 64) -> ImageFiles:
    _require_dir(root, "--data-dir")
    splits = {}
    for split in ("train", "val"):
        _require_dir(root / split, f"ImageFolder {split} folder")
        splits[split] = sorted(p for p in (root / split).iterdir() if p.is_dir())
    classes = [p.name for p in splits["train"]]
    if not classes:
        raise ValueError(f"ImageFolder layout: {root / 'train'} holds no class folders")
    if [p.name for p in splits["val"]] != classes:
        raise ValueError(f"ImageFolder layout: the class folders of {root / 'val'} differ from those of "
                         f"{root / 'train'} ({len(splits['val'])} vs {len(classes)})")
    files = {}
    for split, folders in splits.items():
        paths, labels = [], []
        for label, folder in enumerate(folders):
            images = _images_in(folder)
            if not images:
                raise ValueError(f"ImageFolder layout: class folder {folder} has no images")
            paths += [str(p) for p in images]
            labels += [label] * len(images)
        files[split] = (paths, np.array(labels))
    info = DatasetInfo("imagefolder", len(classes), 3, size, len(files["train"][0]), len(files["val"][0]),
                       crop_padding=size // 8, flip=True)
    return ImageFiles(info, *files["train"], *files["val"], IMAGENET_MEAN, IMAGENET_STD)


def _numpy_globals() -> dict:
    """What numpy (1.x as numpy.core, 2.x as numpy._core) names in a pickled array, mapped to the objects themselves:
    taken from numpy's own reductions, so that no other module is ever imported by the unpickler."""
    reconstruct = np.zeros(1).__reduce__()[0]  # protocols 0-4: _reconstruct(ndarray, shape, dtype) + state
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5: _frombuffer(buffer, dtype, shape, order)
    scalar = np.float64(0).__reduce__()[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed |= {(f"{core}.multiarray", "_reconstruct"): reconstruct, (f"{core}.multiarray", "scalar"): scalar,
                    (f"{core}.numeric", "_frombuffer"): frombuffer}
    return allowed


# Everything a CIFAR pickle refers to by name: numpy arrays, and the two ways protocol 2 spells bytes (dicts, lists,
# str, bytes and numbers have opcodes of their own). Anything else, os.system say, would run when loaded.
CIFAR_PICKLE_GLOBALS = {("_codecs", "encode"): codecs.encode, ("__builtin__", "bytes"): bytes,
                        ("builtins", "bytes"): bytes, **_numpy_globals()}


class _RefusedGlobal(Exception):
    pass


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return CIFAR_PICKLE_GLOBALS[module, name]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"CIFAR-100 layout: {path} is missing")
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as e:
        raise ValueError(f"CIFAR-100 layout: {path} is refused: it names {e}, which no CIFAR pickle holds (loading "
                         f"it could run code)") from None
    except Exception as e:  # truncated or not a pickle: name the file, not the unpickler's internals
        raise ValueError(f"CIFAR-100 layout: {path} is not a readable CIFAR pickle ({type(e).__name__})") from None


def load_cifar100(root: Path) -> TensorDataset:
    """The python-version pickles, from `root/cifar-100-python/` or `root` itself, decoded into memory."""
    _require_dir(root, "--data-dir")
    folder = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    arrays = {}
    for split in ("train", "test"):
        record = _unpickle(folder / split)
        if b"data" not in record or b"fine_labels" not in record:
            raise ValueError(f"CIFAR-100 layout: {folder / split} lacks the data or fine_labels entry")
        data = np.asarray(record[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(record[b"fine_labels"]) != len(data):
            raise ValueError(f"CIFAR-100 layout: {folder / split} holds data of shape {data.shape}, "
                             f"expected (N, 3072) with one label per row")
        arrays[split] = (torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()),
                         torch.tensor(record[b"fine_labels"], dtype=torch.int64))
    names = _unpickle(folder / "meta").get(b"fine_label_names", [])
    num_classes = len(names)
    for split, (_, labels) in arrays.items():
        if num_classes == 0 or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"CIFAR-100 layout: {folder / 'meta'} names {num_classes} classes, but the labels of "
                             f"{folder / split} span [{int(labels.min())}, {int(labels.max())}]")
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
    info = DatasetInfo("cifar100", num_classes, 3, 32, len(train_y), len(test_y), crop_padding=4, flip=True)
    return TensorDataset(info, (train_x / 255.0 - mean) / std, train_y, (test_x / 255.0 - mean) / std, test_y)
