"""Datasets and batch sources.

A dataset is described by `DatasetInfo`; a batch source yields training batches *by identity*: (epoch, position)
determines the sample indices (the epoch's seeded permutation) and the augmentation (a generator seeded from the
identity). Replaying a batch therefore regenerates it bit for bit, and nothing is ever buffered.
"""
from .base import Batch, BatchIdentities, DatasetInfo, TensorBatches, TensorDataset
from .registry import DATASETS, LOADERS, load_dataset, make_batches

__all__ = ["Batch", "BatchIdentities", "DatasetInfo", "TensorDataset", "TensorBatches", "DATASETS", "LOADERS",
           "load_dataset", "make_batches"]
