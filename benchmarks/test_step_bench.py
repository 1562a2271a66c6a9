"""Training-step throughput of spaced KD: one teacher-advance step plus one student replay step per round.

Eager vs whole-step torch.compile, plus CUDA graphs on a GPU. On a GPU the shape is Tiny-ImageNet's (ResNet-18,
3×64×64, 200 classes, batch 128); on CPU a small model and batch so that the file finishes in minutes (batch 8 with
FASTKD_BENCH_REHEARSE=1, the GPU check's rehearsal).
"""
import os

import pytest
import torch

from fastkd.data import DatasetInfo
from fastkd.models import build_model
from fastkd.optim import init_momentum, make_sgd
from fastkd.step_functions import LossSettings, StepFunctions

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
INFO = DatasetInfo("tiny-imagenet-shape", 200, 3, 64, 100_000, 10_000, crop_padding=4, flip=True)
REHEARSE = os.environ.get("FASTKD_BENCH_REHEARSE") == "1"
MODEL, BATCH = ("resnet18", 128) if CUDA else ("tiny", 8 if REHEARSE else 32)
# (how the step runs, precision, memory format). On a GPU: the ladder from the float32 eager step to bf16
# channels-last compiled with CUDA graphs, one change at a time (two compiles, inside gpu_check.sh's budget).
if CUDA:
    VARIANTS = [("eager", "fp32", "nchw"), ("eager", "bf16", "nchw"), ("eager", "bf16", "channels-last"),
                ("compiled", "bf16", "channels-last"), ("compiled+cudagraphs", "bf16", "channels-last")]
else:
    VARIANTS = [("eager", "fp32", "nchw"), ("compiled", "fp32", "nchw"), ("eager", "bf16", "nchw")]


def _role(memory_format):
    model = build_model(MODEL, INFO).to(DEVICE, memory_format=memory_format)
    optimizer = make_sgd(model, 0.05, 0.9, 5e-4)
    init_momentum(optimizer)
    return model, optimizer


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
def test_spaced_kd_step_throughput(benchmark, variant):
    how, precision, layout = variant
    memory_format = torch.channels_last if layout == "channels-last" else torch.contiguous_format
    torch.manual_seed(0)
    (teacher, t_opt), (student, s_opt) = _role(memory_format), _role(memory_format)
    fns = StepFunctions(LossSettings(3.0, 0.3, 0.03), compile=how != "eager", device=DEVICE,
                        cuda_graphs=how == "compiled+cudagraphs", precision=precision)
    x = torch.randn(BATCH, 3, 64, 64, device=DEVICE).contiguous(memory_format=memory_format)
    y = torch.randint(0, 200, (BATCH,), device=DEVICE)

    def spaced_round():
        fns("ce", teacher, t_opt, x, y)
        teacher.eval()
        loss, _ = fns("replay", student, teacher, s_opt, x, y)
        teacher.train()
        if CUDA:
            torch.cuda.synchronize()
        return loss

    for _ in range(3):  # compile, capture, warm up
        spaced_round()
    benchmark.extra_info.update(images_per_round=2 * BATCH, model=MODEL, batch=BATCH, variant="-".join(variant),
                                device=torch.cuda.get_device_name() if CUDA else f"CPU ({os.cpu_count()} cores)")
    benchmark.pedantic(spaced_round, rounds=10 if CUDA else 5, warmup_rounds=1)
