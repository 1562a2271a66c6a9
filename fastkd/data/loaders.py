"""Batch sources over image files: a DALI pipeline (GPU or CPU) and a torch DataLoader, same semantics.

Both serve `stream(identities)`: the batches of a list of (epoch, position) identities, in that order, which the
engine derives from its schedule. A replayed batch is regenerated, never stored. In both, the identity fixes the
samples (the epoch permutation) and the random crop and flip of each sample (drawn for the whole global batch,
see `BatchIdentities.augmentation`); they differ in how the files are read and decoded:
- torch: PIL decoding in DataLoader workers, prefetching along the schedule;
- DALI: one pipeline per epoch reads that epoch's files in permutation order and decodes them (nvJPEG on a GPU); a
  replay that starts mid-epoch restores a pipeline from the `checkpoint()` taken when the teacher's pipeline was
  about to produce that batch. Memory is O(1) in the spacing: a few pipelines and serialized checkpoints.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .base import Batch, BatchIdentities, prefetch
from .folders import ImageFiles


def decode_image(path: str, size: int) -> Tensor:
    """uint8 (3, size, size) RGB; a corrupt or unreadable file is one clear error naming it."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.BILINEAR)
            array = np.asarray(image)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot decode image {path}: {reason}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def check_images_decode(paths: list[str]) -> None:
    """Every file decodes completely (structure and entropy-coded data), else one error naming the first bad one.

    Decoding runs in threads (Pillow releases the GIL): about 0.3 ms of CPU per 64×64 JPEG.
    """
    def check(path):
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            return f"cannot decode image {path}: {reason}"
        return None

    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        problem = next((p for p in pool.map(check, paths) if p), None)
    if problem:
        raise ValueError(problem)


class FileBatches(BatchIdentities):
    """What both file loaders share: identities, labels, normalisation and the decoded test set."""

    def __init__(self, files: ImageFiles, batch_size: int, seed: int, device: torch.device,
                 train_subset: Optional[int] = None, shard_id: int = 0, num_shards: int = 1):
        super().__init__(len(files.train_paths), batch_size, seed, files.info.name, train_subset, shard_id,
                         num_shards)
        self.files, self.info, self.device = files, files.info, device
        self.labels = torch.from_numpy(files.train_labels).to(torch.int64)
        self.mean = torch.tensor(files.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(files.std).view(1, 3, 1, 1)
        self._test = None

    def normalise(self, images_uint8: Tensor) -> Tensor:
        return (images_uint8.float() / 255.0 - self.mean.to(images_uint8.device)) / self.std.to(images_uint8.device)

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Every test image, in order, decoded once and kept (normalised) for all later evaluations."""
        if self._test is None:
            images = torch.stack([decode_image(p, self.info.size) for p in self.files.test_paths])
            self._test = (self.normalise(images), torch.from_numpy(self.files.test_labels).to(torch.int64))
        x, y = self._test
        for start in range(0, len(y), batch_size):
            yield self.on_device(x[start:start + batch_size]), y[start:start + batch_size].to(self.device)


class _IdentityBatchesDataset(torch.utils.data.Dataset):
    """Item i is the whole batch of identity i: decoded, normalised and augmented in a DataLoader worker."""

    def __init__(self, source: "TorchFileBatches", identities: list[tuple[int, int]]):
        self.source, self.identities = source, identities

    def __len__(self):
        return len(self.identities)

    def __getitem__(self, i):
        epoch, position = self.identities[i]
        src = self.source
        idx = src.indices(epoch, position)
        images = torch.stack([decode_image(src.files.train_paths[j], src.info.size) for j in idx.tolist()])
        x = src.augmentation(src.info, epoch, position).apply(src.normalise(images), src.memory_format)
        return x, idx, epoch, position


class TorchFileBatches(FileBatches):
    """--loader torch: PIL decoding in torch DataLoader workers, prefetching along the schedule."""

    num_workers = 2

    def stream(self, identities: Iterable[tuple[int, int]]) -> Iterator[Batch]:
        items = _IdentityBatchesDataset(self, list(identities))
        for x, idx, epoch, position in prefetch(items, self.num_workers, pin_memory=self.device.type == "cuda"):
            yield Batch(self.on_device(x), self.labels[idx].to(self.device), idx, epoch, position)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _dali_train_pipeline(files: list[str], sample_ids: list[int], info, mean255, std255, on_gpu: bool, **kwargs):
    """reader → decode → (resize) → normalise → NCHW float; the random crop and flip follow in torch.

    The GPU and CPU variants differ only in where decoding runs ("mixed" nvJPEG, or "cpu"); every later operator
    follows its input's device. The pipeline holds no random operator: DALI's draw from one stream per pipeline,
    so a sample's draws would depend on which rank's pipeline decodes it. The crop and flip are drawn from the
    batch identity instead (`BatchIdentities.augmentation`), as in the torch loader, and applied on the device.
    """
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_checkpointing=True)
    def pipeline():
        jpegs, ids = fn.readers.file(files=files, labels=sample_ids, random_shuffle=False, name="reader")
        images = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
        images = fn.resize(images, size=(info.size, info.size))
        images = fn.crop_mirror_normalize(images, mean=mean255, std=std255, dtype=types.FLOAT, output_layout="CHW")
        return images, ids

    return pipeline(**kwargs)


class DaliFileBatches(FileBatches):
    """--loader dali: DALI pipelines, on the GPU when training there, else on the CPU (device_id=None)."""

    num_threads = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # DALI's CPU decoder turns a JPEG with garbage entropy-coded data into garbage pixels with a warning, and a
        # malformed file can take the process down in a GPU decoder: decode every training file once on the host
        # first, so that a bad one is one clear error before training starts.
        check_images_decode(self.files.train_paths)
        self.on_gpu = self.device.type == "cuda"
        self.mean255 = [255.0 * m for m in self.files.mean]
        self.std255 = [255.0 * s for s in self.files.std]

    def _pipeline(self, epoch: int, checkpoint: Optional[bytes] = None):
        ids = self.epoch_indices(epoch).tolist()
        pipe = _dali_train_pipeline(
            [self.files.train_paths[i] for i in ids], ids, self.info, self.mean255, self.std255, self.on_gpu,
            batch_size=self.batch_size // self.num_shards, num_threads=self.num_threads,
            device_id=(self.device.index or 0) if self.on_gpu else None,
            checkpoint=checkpoint)
        pipe.build()
        return pipe

    def stream(self, identities: Iterable[tuple[int, int]]) -> Iterator[Batch]:
        identities = list(identities)
        # A replay starts where the sequence jumps back; the batch it starts at needs a checkpoint of the pipeline
        # that first produced it. A jump to an epoch's first batch needs none: a fresh pipeline of that epoch is
        # the same.
        restart_at = {cur for prev, cur in zip(identities, identities[1:])
                      if cur != self._next(prev) and cur[1] != 0}
        checkpoints: dict[tuple[int, int], bytes] = {}
        produced = set()  # restart batches already checkpointed
        cursors: list[list] = []  # [next identity, pipeline] of the live pipelines, most recent last
        for identity in identities:
            cursor = next((c for c in cursors if c[0] == identity), None)
            if cursor is None:
                checkpoint = checkpoints.pop(identity, None)
                pipe = self._pipeline(identity[0], checkpoint)
                if checkpoint is None:  # not planned for (a stream that starts mid-epoch): replay the epoch's start
                    for _ in range(identity[1]):
                        pipe.run()
                cursor = [identity, pipe]
                cursors.append(cursor)
            if identity in restart_at and identity not in produced:
                checkpoints[identity] = cursor[1].checkpoint()  # the state just before this batch
                produced.add(identity)
            yield self._run(cursor[1], identity)
            cursor[0] = self._next(identity)
            # Drop pipelines at the end of their epoch, and keep at most a few (memory stays O(1) in s).
            cursors = [c for c in cursors if c[0][1] != 0][-3:]

    def _next(self, identity):
        epoch, position = identity
        return (epoch, position + 1) if position + 1 < self.batches_per_epoch else (epoch + 1, 0)

    def _run(self, pipe, identity) -> Batch:
        try:
            images, ids = pipe.run()
        except RuntimeError as e:
            # DALI's message does not name the file: find it by decoding the batch's files on the host.
            for i in self.indices(*identity).tolist():
                decode_image(self.files.train_paths[i], self.info.size)  # raises, naming the file
            raise ValueError(f"DALI could not read batch {identity}: {str(e).strip().splitlines()[0]}") from None
        augmentation = self.augmentation(self.info, *identity)
        x = augmentation.apply(_to_torch(images.as_tensor(), self.device), self.memory_format)
        idx = torch.from_numpy(np.array(ids.as_tensor()).reshape(-1).astype(np.int64))
        return Batch(self.on_device(x), self.labels[idx].to(self.device), idx, *identity)


def _to_torch(tensor, device: torch.device) -> Tensor:
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(tensor.shape(), dtype=torch.float32, device=device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(tensor))
