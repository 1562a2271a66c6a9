"""The dataset description and the in-memory batch source (data resident on the training device)."""
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

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


def _identity_seed(seed: int, epoch: int, position: int) -> int:
    # A fixed mixing of the identity into a 63-bit seed; independent of any global RNG state.
    h = seed & 0xFFFFFFFF
    for part in (epoch, position):
        h = (h * 0x9E3779B97F4A7C15 + part + 1) % (1 << 63)
    return h


class TensorBatches:
    """Training batches by identity over an in-memory dataset; the last partial batch is dropped (static shapes).

    `train_subset` keeps a seeded subset of that many training samples (the low-data regime).
    """

    def __init__(self, data: TensorDataset, batch_size: int, seed: int, device: torch.device,
                 train_subset: Optional[int] = None):
        n = data.train_x.shape[0]
        if train_subset is not None:
            if not 1 <= train_subset <= n:
                raise ValueError(f"--train-subset must be in [1, {n}] for {data.info.name}, got {train_subset}")
            g = torch.Generator().manual_seed(_identity_seed(seed, -1, -1))
            self.pool = torch.randperm(n, generator=g)[:train_subset].sort().values
        else:
            self.pool = torch.arange(n)
        if batch_size > len(self.pool):
            raise ValueError(f"--batch-size {batch_size} is larger than the {len(self.pool)} training samples")
        self.data, self.batch_size, self.seed, self.device = data, batch_size, seed, device
        self.batches_per_epoch = len(self.pool) // batch_size
        self._train_x = data.train_x.to(device)
        self._train_y = data.train_y.to(device)
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch: int) -> Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(_identity_seed(self.seed, epoch, -1))
            self._perm = self.pool[torch.randperm(len(self.pool), generator=g)]
            self._perm_epoch = epoch
        return self._perm

    def indices(self, epoch: int, position: int) -> Tensor:
        if not 0 <= position < self.batches_per_epoch:
            raise IndexError(f"batch position {position} outside [0, {self.batches_per_epoch})")
        start = position * self.batch_size
        return self._permutation(epoch)[start:start + self.batch_size]

    def batch(self, epoch: int, position: int) -> Batch:
        idx = self.indices(epoch, position)
        dev_idx = idx.to(self.device)
        x = augment(self._train_x.index_select(0, dev_idx), self.data.info,
                    torch.Generator().manual_seed(_identity_seed(self.seed, epoch, position)))
        return Batch(x, self._train_y.index_select(0, dev_idx), idx, epoch, position)

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Every test sample, in order; the last batch may be smaller."""
        for start in range(0, self.data.test_x.shape[0], batch_size):
            yield (self.data.test_x[start:start + batch_size].to(self.device),
                   self.data.test_y[start:start + batch_size].to(self.device))


def augment(x: Tensor, info: DatasetInfo, generator: torch.Generator) -> Tensor:
    """Random crop with zero padding (on normalised images, i.e. mean-valued) and random horizontal flip."""
    b, _, h, w = x.shape
    pad = info.crop_padding
    if pad > 0:
        offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
        batch = torch.arange(b, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()
    if info.flip:
        flips = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(flips[:, None, None, None], x.flip(3), x)
    return x
