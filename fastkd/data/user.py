"""Training batches by identity over a user's own map-style `Dataset`, with exact replay.

The contract: a dataset's `__getitem__(i)` returns `(image tensor, int label)` and draws any randomness (its
augmentation) from torch's, Python's `random` and numpy's global generators only, carrying no state from one call to
the next. Before fetching sample i for batch (epoch, position), in whichever DataLoader worker or rank, fastkd seeds
all three generators from the run seed, the epoch, the position and the sample's place in the *global* batch (and
puts the caller's generator states back afterwards). So a replay, a resumed run and every data-parallel rank see
exactly the pixels the teacher saw, and nothing is buffered. `check_replay=True` catches a dataset that breaks this.
"""
import random
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from .base import Batch, BatchIdentities, DatasetInfo, identity_seed, prefetch


def sample_seed(seed: int, epoch: int, position: int, place: int) -> int:
    """The seed of the sample at `place` in the global batch (epoch, position)."""
    return (identity_seed(seed, epoch, position) * 0x9E3779B97F4A7C15 + place + 1) % (1 << 63)


def seeded_item(dataset, index: int, seed: int):
    """dataset[index] with torch's CPU generator, `random` and numpy seeded from `seed`; their states restored (torch's
    by torch.random.fork_rng; Python's and numpy's have no such context manager)."""
    saved = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # the CPU generator only, as the datasets draw from
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        try:
            return dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])


def checked_sample(item, dataset, index: int) -> tuple[Tensor, int]:
    """(image, label) from what `dataset[index]` returned, or one ValueError saying what came and what is expected."""
    name = type(dataset).__name__
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(f"{name}[{index}] returned {type(item).__name__}"
                         f"{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}; "
                         f"expected a pair (image tensor, int label)")
    x, y = item
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{name}[{index}] returned an image of type {type(x).__name__}"
                         f"{f' ({x.dtype})' if isinstance(x, Tensor) else ''}; expected a float tensor")
    if isinstance(y, Tensor) and y.numel() == 1 and not y.is_floating_point() and y.dtype != torch.bool:
        y = int(y)
    if isinstance(y, (bool, np.bool_)) or not isinstance(y, (int, np.integer)):
        raise ValueError(f"{name}[{index}] returned a label of type {type(y).__name__}; expected an int")
    return x, int(y)


def describe_dataset(dataset, arg: str) -> DatasetInfo:
    """The DatasetInfo of a user dataset, from its first sample (and `classes`, if it has one, for the class count).

    num_classes is 0 when the dataset does not say; the models then tell it (see fastkd.api)."""
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise ValueError(f"{arg} must be a map-style torch Dataset (with __getitem__ and __len__), "
                         f"got {type(dataset).__name__}")
    if len(dataset) < 1:
        raise ValueError(f"{arg} ({type(dataset).__name__}) is empty")
    x, _ = checked_sample(seeded_item(dataset, 0, 0), dataset, 0)
    classes = getattr(dataset, "classes", None)
    num_classes = len(classes) if classes is not None else 0
    channels = x.shape[0] if x.dim() == 3 else 1
    return DatasetInfo(type(dataset).__name__, num_classes, channels, x.shape[-1], len(dataset), 0, crop_padding=0,
                       flip=False)


class _IdentityBatches(torch.utils.data.Dataset):
    """Item i is the whole batch of identity i, fetched sample by sample (seeded) in a DataLoader worker."""

    def __init__(self, source: "DatasetBatches", identities: list[tuple[int, int]]):
        self.source, self.identities = source, identities

    def __len__(self):
        return len(self.identities)

    def __getitem__(self, i):
        epoch, position = self.identities[i]
        return self.source.fetch(epoch, position)


class DatasetBatches(BatchIdentities):
    """Batches of a user Dataset by identity; DataLoader workers fetch them along the schedule (prefetching)."""

    def __init__(self, train_data, test_data, info: DatasetInfo, batch_size: int, seed: int, device: torch.device,
                 train_subset: Optional[int] = None, shard_id: int = 0, num_shards: int = 1, num_workers: int = 2):
        super().__init__(len(train_data), batch_size, seed, info.name, train_subset, shard_id, num_shards)
        self.train_data, self.test_data, self.info, self.device = train_data, test_data, info, device
        self.num_workers = num_workers

    def fetch(self, epoch: int, position: int) -> tuple[Tensor, Tensor, Tensor, int, int]:
        """This shard's samples of batch (epoch, position), each fetched under its own seed; on the host."""
        idx = self.indices(epoch, position)
        first_place = self.shard_id * (self.batch_size // self.num_shards)
        images, labels = [], []
        for place, i in enumerate(idx.tolist(), first_place):
            item = seeded_item(self.train_data, i, sample_seed(self.seed, epoch, position, place))
            x, y = checked_sample(item, self.train_data, i)
            images.append(x)
            labels.append(y)
        try:
            x = torch.stack(images)
        except RuntimeError:
            shapes = sorted({tuple(image.shape) for image in images})
            raise ValueError(f"{self.info.name} returned images of different shapes {shapes[:3]} in one batch; "
                             f"every training image must have the same shape") from None
        return x, torch.tensor(labels, dtype=torch.int64), idx, epoch, position

    def stream(self, identities: Iterable[tuple[int, int]]) -> Iterator[Batch]:
        items = _IdentityBatches(self, list(identities))
        for x, y, idx, epoch, position in prefetch(items, self.num_workers, pin_memory=self.device.type == "cuda"):
            yield Batch(self.on_device(x), y.to(self.device, non_blocking=True), idx, epoch, position)

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Every test sample, in order, in batches fetched by the workers (unseeded: test data is not augmented)."""
        for x, y in prefetch(_TestBatches(self.test_data, batch_size), self.num_workers,
                             pin_memory=self.device.type == "cuda"):
            yield self.on_device(x), y.to(self.device, non_blocking=True)


class _TestBatches(torch.utils.data.Dataset):
    def __init__(self, data, batch_size: int):
        self.data, self.batch_size = data, batch_size

    def __len__(self):
        return -(-len(self.data) // self.batch_size)

    def __getitem__(self, j):
        indices = range(j * self.batch_size, min((j + 1) * self.batch_size, len(self.data)))
        pairs = [checked_sample(self.data[i], self.data, i) for i in indices]
        return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs], dtype=torch.int64)
