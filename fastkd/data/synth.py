"""Write a small synthetic dataset in a real on-disk layout: real JPEG files, or the real CIFAR pickle format.

    python -m fastkd.data.synth DIR --layout tiny-imagenet|cifar100|imagefolder --classes N --per-class M

Each class is a fixed random colour pattern plus noise, so that a model can learn it in a few steps.
"""
import argparse
import pickle
import sys
from pathlib import Path

import numpy as np
from PIL import Image

LAYOUTS = ("tiny-imagenet", "cifar100", "imagefolder")
DEFAULT_SIZE = {"tiny-imagenet": 64, "cifar100": 32, "imagefolder": 64}


def _images(rng, num_classes: int, per_class: int, size: int):
    templates = rng.integers(0, 256, size=(num_classes, size, size, 3)).astype(np.float32)
    labels = np.repeat(np.arange(num_classes), per_class)
    noise = rng.normal(0, 40, size=(len(labels), size, size, 3))
    return np.clip(templates[labels] + noise, 0, 255).astype(np.uint8), labels


def _save_jpeg(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="JPEG", quality=90)


def write_tiny_imagenet(root: Path, num_classes, per_class, val_per_class, size, rng) -> None:
    wnids = [f"n{10000000 + i:08d}" for i in range(num_classes)]
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    images, labels = _images(rng, num_classes, per_class, size)
    for i, (img, label) in enumerate(zip(images, labels)):
        _save_jpeg(img, root / "train" / wnids[label] / "images" / f"{wnids[label]}_{i % per_class}.JPEG")
    images, labels = _images(rng, num_classes, val_per_class, size)
    lines = []
    for i, (img, label) in enumerate(zip(images, labels)):
        name = f"val_{i}.JPEG"
        _save_jpeg(img, root / "val" / "images" / name)
        lines.append(f"{name}\t{wnids[label]}\t0\t0\t{size - 1}\t{size - 1}\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))


def write_imagefolder(root: Path, num_classes, per_class, val_per_class, size, rng) -> None:
    for split, count in (("train", per_class), ("val", val_per_class)):
        images, labels = _images(rng, num_classes, count, size)
        for i, (img, label) in enumerate(zip(images, labels)):
            _save_jpeg(img, root / split / f"class_{label:03d}" / f"{i}.jpg")


def write_cifar100(root: Path, num_classes, per_class, val_per_class, size, rng) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", per_class), ("test", val_per_class)):
        images, labels = _images(rng, num_classes, count, size)
        record = {b"filenames": [f"{split}_{i}.png".encode() for i in range(len(labels))],
                  b"batch_label": f"synthetic {split}".encode(),
                  b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(),
                  b"data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1)}  # rows of R, G, B planes
        with open(folder / split, "wb") as f:
            pickle.dump(record, f)
    meta = {b"fine_label_names": [f"class_{i}".encode() for i in range(num_classes)],
            b"coarse_label_names": [f"super_{i}".encode() for i in range((num_classes + 4) // 5)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f)


WRITERS = {"tiny-imagenet": write_tiny_imagenet, "cifar100": write_cifar100, "imagefolder": write_imagefolder}


def write(root, layout: str, num_classes: int, per_class: int, val_per_class: int = None, size: int = None,
          seed: int = 0) -> Path:
    root = Path(root)
    if layout == "cifar100" and size not in (None, 32):
        raise ValueError("--size: CIFAR-100 pickles hold 32×32 images")
    WRITERS[layout](root, num_classes, per_class, val_per_class or max(1, per_class // 5),
                    size or DEFAULT_SIZE[layout], np.random.default_rng(seed))
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastkd.data.synth", description=__doc__.splitlines()[0])
    p.add_argument("dir", help="output folder")
    p.add_argument("--layout", choices=LAYOUTS, required=True)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=50, help="training images per class")
    p.add_argument("--val-per-class", type=int, default=None, help="test images per class (default per-class/5)")
    p.add_argument("--size", type=int, default=None, help="image side (default: the layout's real size)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.classes < 1 or args.per_class < 1:
        p.error("--classes and --per-class must be >= 1")
    root = write(args.dir, args.layout, args.classes, args.per_class, args.val_per_class, args.size, args.seed)
    print(f"wrote a synthetic {args.layout} dataset to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
