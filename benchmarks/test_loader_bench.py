"""Training-loader throughput at Tiny-ImageNet's shape (64×64 JPEGs, 200 classes): DALI vs torchvision DataLoader.

On CPU a synthetic Tiny-ImageNet folder of a few thousand real JPEG files is written once per session; set
FASTKD_TINY_IMAGENET=/path to measure on a real one (one image a class, one batch an epoch, with
FASTKD_BENCH_REHEARSE=1: the GPU check's rehearsal). On a GPU the DALI pipeline decodes with nvJPEG (mixed).
"""
import os

import pytest
import torch

from fastkd.data import make_batches
from fastkd.data.loaders import TorchFileBatches, dali_available
from fastkd.data.synth import write

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BATCH = 128
LOADERS = (["dali"] if dali_available() else []) + ["torch"]


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    if os.environ.get("FASTKD_TINY_IMAGENET"):
        return os.environ["FASTKD_TINY_IMAGENET"]
    per_class = 1 if os.environ.get("FASTKD_BENCH_REHEARSE") == "1" else 15
    return str(write(tmp_path_factory.mktemp("bench") / "tiny", "tiny-imagenet", num_classes=200, per_class=per_class,
                     val_per_class=1))


@pytest.mark.parametrize("loader", LOADERS)
def test_training_loader_throughput(benchmark, tiny_imagenet, loader):
    assert TorchFileBatches.num_workers == 2
    batches = make_batches("tiny-imagenet", tiny_imagenet, loader, BATCH, 0, DEVICE)
    per_epoch = batches.batches_per_epoch
    epochs = iter(range(10_000))

    def one_epoch():
        epoch = next(epochs)
        for batch in batches.stream([(epoch, p) for p in range(per_epoch)]):  # noqa: B007 (the last one is returned)
            pass
        if CUDA:
            torch.cuda.synchronize()
        return batch

    benchmark.extra_info.update(loader=loader, images_per_round=per_epoch * BATCH,
                                device=torch.cuda.get_device_name() if CUDA else f"CPU ({os.cpu_count()} cores)")
    benchmark.pedantic(one_epoch, rounds=3, warmup_rounds=1)
