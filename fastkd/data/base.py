"""The dataset description and the in-memory batch source (data resident on the training device)."""
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    size: int  # square images, size × size
    train_len: int
    test_len: int
    crop_padding: int  # random-crop padding for training augmentation (0: none)
    flip: bool  # random horizontal flips for training augmentation

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TensorDataset:
    """Normalised float images (N, C, H, W) and int64 labels, for train and test."""
    info: DatasetInfo
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


@dataclass
class Batch:
    x: Tensor
    y: Tensor
    indices: Tensor  # dataset indices of the samples, in batch order (CPU int64)
    epoch: int
    position: int


@dataclass(frozen=True)
class Augmentation:
    """Per-sample random crop with zero padding (on normalised images, i.e. mean-valued) and horizontal flip."""
    padding: int
    offsets: Optional[Tensor]  # (2, B) row and column offsets into the padded image, in [0, 2·padding]; or None
    flips: Optional[Tensor]  # (B,) bool; or None

    def apply(self, x: Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
        """The augmented batch, on x's device; x is (B, C, H, W) with B the shard's batch. The crop's gather writes
        channels-last order, so that memory format costs no copy here."""
        b, _, h, w = x.shape
        if self.offsets is not None:
            pad = self.padding
            offsets = self.offsets.to(x.device)
            padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
            rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
            cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
            batch = torch.arange(b, device=x.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
            x = x.contiguous(memory_format=memory_format)
        if self.flips is not None:
            x = torch.where(self.flips.to(x.device)[:, None, None, None], x.flip(3), x)
        return x


def identity_seed(seed: int, epoch: int, position: int) -> int:
    # A fixed mixing of the identity into a 63-bit seed; independent of any global RNG state.
    h = seed & 0xFFFFFFFF
    for part in (epoch, position):
        h = (h * 0x9E3779B97F4A7C15 + part + 1) % (1 << 63)
    return h


class BatchIdentities:
    """Which samples form batch (epoch, position): the epoch's seeded permutation of the training pool, cut into
    batches of `batch_size` (the last partial batch dropped, so shapes stay static). Every loader shares this, so a
    batch is named by its identity alone and can be regenerated at any time.

    `train_subset` keeps a seeded subset of that many samples (the low-data regime). `shard_id` / `num_shards` give
    each rank its contiguous slice of every global batch (for data-parallel training).
    """

    memory_format = torch.contiguous_format  # of the batches' x; fit sets torch.channels_last for --channels-last

    def on_device(self, x: Tensor) -> Tensor:
        """x on the training device in the run's memory format: one copy at most (none where it already is)."""
        return x.to(self.device, non_blocking=True, memory_format=self.memory_format)

    def __init__(self, train_len: int, batch_size: int, seed: int, dataset_name: str,
                 train_subset: Optional[int] = None, shard_id: int = 0, num_shards: int = 1):
        if train_subset is not None:
            if not 1 <= train_subset <= train_len:
                raise ValueError(f"--train-subset must be in [1, {train_len}] for {dataset_name}, got {train_subset}")
            g = torch.Generator().manual_seed(identity_seed(seed, -1, -1))
            self.pool = torch.randperm(train_len, generator=g)[:train_subset].sort().values
        else:
            self.pool = torch.arange(train_len)
        if batch_size > len(self.pool):
            raise ValueError(f"--batch-size {batch_size} is larger than the {len(self.pool)} training samples")
        if batch_size % num_shards:
            raise ValueError(f"--batch-size {batch_size} does not split evenly across {num_shards} data-parallel ranks")
        self.batch_size, self.seed = batch_size, seed
        self.shard_id, self.num_shards = shard_id, num_shards
        self.batches_per_epoch = len(self.pool) // batch_size
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch: int) -> Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(identity_seed(self.seed, epoch, -1))
            self._perm = self.pool[torch.randperm(len(self.pool), generator=g)]
            self._perm_epoch = epoch
        return self._perm

    def indices(self, epoch: int, position: int) -> Tensor:
        """This shard's dataset indices of batch (epoch, position), in batch order."""
        if not 0 <= position < self.batches_per_epoch:
            raise IndexError(f"batch position {position} outside [0, {self.batches_per_epoch})")
        per_shard = self.batch_size // self.num_shards
        start = position * self.batch_size + self.shard_id * per_shard
        return self._permutation(epoch)[start:start + per_shard]

    def epoch_indices(self, epoch: int) -> Tensor:
        """This shard's indices of every batch of the epoch, concatenated in order."""
        return torch.cat([self.indices(epoch, p) for p in range(self.batches_per_epoch)])

    def augmentation(self, info: DatasetInfo, epoch: int, position: int) -> Augmentation:
        """This shard's random crops and flips for batch (epoch, position).

        They are drawn for the whole global batch from a generator seeded by the batch identity, and this shard
        takes its samples' slice: a sample's augmentation depends on the seed, the epoch and its place in the global
        batch alone, never on the rank or the number of ranks. So a data-parallel run sees the pixels of the
        1-process run, and every sample of a global batch has its own draws.
        """
        g = torch.Generator().manual_seed(identity_seed(self.seed, epoch, position))
        n, pad = self.batch_size, info.crop_padding
        # Draw order (all offsets, then all flips) is part of the identity: changing it changes every run's pixels.
        offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=g) if pad > 0 else None
        flips = torch.rand(n, generator=g) < 0.5 if info.flip else None
        mine = slice(self.shard_id * (n // self.num_shards), (self.shard_id + 1) * (n // self.num_shards))
        return Augmentation(pad, offsets[:, mine] if offsets is not None else None,
                            flips[mine] if flips is not None else None)


class TensorBatches(BatchIdentities):
    """Training batches by identity over an in-memory dataset, resident on the training device."""

    def __init__(self, data: TensorDataset, batch_size: int, seed: int, device: torch.device,
                 train_subset: Optional[int] = None, shard_id: int = 0, num_shards: int = 1):
        super().__init__(data.train_x.shape[0], batch_size, seed, data.info.name, train_subset, shard_id, num_shards)
        self.data, self.info, self.device = data, data.info, device
        self._train_x = data.train_x.to(device)
        self._train_y = data.train_y.to(device)

    def batch(self, epoch: int, position: int) -> Batch:
        idx = self.indices(epoch, position)
        dev_idx = idx.to(self.device)
        x = self.augmentation(self.info, epoch, position).apply(self._train_x.index_select(0, dev_idx),
                                                                 self.memory_format)
        return Batch(self.on_device(x), self._train_y.index_select(0, dev_idx), idx, epoch, position)

    def stream(self, identities: Iterable[tuple[int, int]]) -> Iterator[Batch]:
        """The batches of `identities`, in that order (the engine passes its whole plan)."""
        return (self.batch(e, p) for e, p in identities)

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Every test sample, in order; the last batch may be smaller."""
        for start in range(0, self.data.test_x.shape[0], batch_size):
            yield (self.on_device(self.data.test_x[start:start + batch_size]),
                   self.data.test_y[start:start + batch_size].to(self.device))


def prefetch(items: torch.utils.data.Dataset, num_workers: int, pin_memory: bool) -> Iterator:
    """items[0], items[1], ... in order, fetched ahead in DataLoader workers (in this process if num_workers is 0).
    A ValueError raised in a worker arrives as that one line, not wrapped in the worker's traceback. The loader's
    own seed comes from a private generator: a DataLoader would otherwise draw it from the global one, which a
    resumed run must find exactly as the uninterrupted run had it."""
    if num_workers == 0:
        yield from (items[i] for i in range(len(items)))
        return
    loader = torch.utils.data.DataLoader(items, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                         generator=torch.Generator().manual_seed(0))
    iterator = iter(loader)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as e:
            raise ValueError(str(e).strip().splitlines()[-1].removeprefix("ValueError: ")) from None
        yield item
