"""CIFAR-stem ResNets (18/34/50 and the thin 20/32/56; all with multi-exit versions), MobileNetV2, a DeiT-Tiny-shaped
ViT and a tiny CNN.

Every convolutional net here is a sequence of *stages* followed by global pooling and a linear classifier. The
multi-exit version (self-distillation) puts a classifier after every stage and an adapter that maps each shallow
stage's pooled features to the deepest stage's width, for the feature loss.
"""
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v2
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vision_transformer import VisionTransformer
from torchvision.ops.misc import Conv2dNormActivation

from ..data import DatasetInfo


def _resnet_stages(block, layers: list[int], widths: tuple[int, ...], in_channels: int):
    """CIFAR-style ResNet from torchvision blocks: 3×3 stem without max-pool, then one stage per width, each
    halving the resolution after the first."""
    inplanes = widths[0]
    stem = Conv2dNormActivation(in_channels, inplanes, kernel_size=3, stride=1)
    stages, out_widths = [], []
    for i, (planes, count) in enumerate(zip(widths, layers)):
        stride = 1 if i == 0 else 2
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        blocks = [block(inplanes, planes, stride, downsample)]
        inplanes = planes * block.expansion
        blocks += [block(inplanes, planes) for _ in range(count - 1)]
        stage = nn.Sequential(*blocks)
        stages.append(nn.Sequential(stem, stage) if i == 0 else stage)
        out_widths.append(inplanes)
    return stages, out_widths


IMAGENET_WIDTHS = (64, 128, 256, 512)
THIN_WIDTHS = (16, 32, 64)  # the thin CIFAR ResNets of He et al. (2016, §4.2), depth 6n+2


def _tiny_stages(in_channels: int, norm=nn.BatchNorm2d) -> tuple[list[nn.Module], list[int]]:
    """Three small conv stages: for tests, smoke runs and CPU benchmarks."""
    widths = [16, 32, 64]
    stages, prev = [], in_channels
    for i, w in enumerate(widths):
        stages.append(nn.Sequential(Conv2dNormActivation(prev, w, 3, stride=1 if i == 0 else 2, norm_layer=norm),
                                    Conv2dNormActivation(w, w, 3, norm_layer=norm)))
        prev = w
    return stages, widths


STAGE_BUILDERS: dict[str, Callable[[int], tuple[list[nn.Module], list[int]]]] = {
    "resnet18": lambda c: _resnet_stages(BasicBlock, [2, 2, 2, 2], IMAGENET_WIDTHS, c),
    "resnet34": lambda c: _resnet_stages(BasicBlock, [3, 4, 6, 3], IMAGENET_WIDTHS, c),
    "resnet50": lambda c: _resnet_stages(Bottleneck, [3, 4, 6, 3], IMAGENET_WIDTHS, c),
    "resnet20": lambda c: _resnet_stages(BasicBlock, [3, 3, 3], THIN_WIDTHS, c),
    "resnet32": lambda c: _resnet_stages(BasicBlock, [5, 5, 5], THIN_WIDTHS, c),
    "resnet56": lambda c: _resnet_stages(BasicBlock, [9, 9, 9], THIN_WIDTHS, c),
    "tiny": _tiny_stages,
    # BatchNorm-free (GroupNorm): its result does not depend on how a batch is split, so data-parallel runs can be
    # compared with 1-process runs to float tolerance.
    "tiny-gn": lambda c: _tiny_stages(c, norm=lambda width: nn.GroupNorm(4, width)),
}


class StagedNet(nn.Module):
    """stages → global average pool → linear classifier."""

    def __init__(self, stages: list[nn.Module], widths: list[int], num_classes: int):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class MultiExitNet(nn.Module):
    """A classifier after every stage (deepest last) and adapters from shallow pooled features to the deepest."""

    def __init__(self, stages: list[nn.Module], widths: list[int], num_classes: int):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(nn.Linear(w, num_classes) for w in widths)
        self.adapters = nn.ModuleList(nn.Linear(w, widths[-1]) for w in widths[:-1])

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Every head's logits, and the features the feature loss compares: each shallow stage's pooled features
        through its adapter (at the deepest width), then the deepest stage's own. The adapters run here, inside
        forward, so that DistributedDataParallel sees every parameter the loss uses."""
        logits, features = [], []
        for i, (stage, head) in enumerate(zip(self.stages, self.heads)):
            x = stage(x)
            pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
            features.append(self.adapters[i](pooled) if i < len(self.adapters) else pooled)
            logits.append(head(pooled))
        return logits, features


def _mobilenet_v2(info: DatasetInfo) -> nn.Module:
    net = mobilenet_v2(num_classes=info.num_classes)
    # Stride-1 stem for small images, and the dataset's channel count.
    net.features[0] = Conv2dNormActivation(info.channels, 32, kernel_size=3, stride=1, activation_layer=nn.ReLU6)
    return net


def _deit_tiny(info: DatasetInfo) -> nn.Module:
    patch = max(1, info.size // 8)  # 8×8 = 64 tokens whatever the image size
    if info.size % patch:
        raise ValueError(f"--model vit-tiny needs an image size divisible by its patch size {patch}, got {info.size}")
    net = VisionTransformer(image_size=info.size, patch_size=patch, num_layers=12, num_heads=3, hidden_dim=192,
                            mlp_dim=768, num_classes=info.num_classes)
    net.conv_proj = nn.Conv2d(info.channels, 192, kernel_size=patch, stride=patch)
    return net


OTHER_BUILDERS = {"mobilenetv2": _mobilenet_v2, "vit-tiny": _deit_tiny}
MODELS = tuple(STAGE_BUILDERS) + tuple(OTHER_BUILDERS)
MULTI_EXIT_MODELS = tuple(STAGE_BUILDERS)


def build_model(name: str, info: DatasetInfo, multi_exit: bool = False) -> nn.Module:
    """A zoo model by name, or `torchvision:<builder>` / `timm:<name>` (fastkd.models.external)."""
    from .external import build_external, is_external

    if is_external(name):
        if multi_exit:
            raise ValueError(f"model {name!r} has no multi-exit version; choose from {', '.join(MULTI_EXIT_MODELS)}")
        return build_external(name, info)
    if multi_exit:
        if name not in STAGE_BUILDERS:
            raise ValueError(f"model {name!r} has no multi-exit version; choose from {', '.join(MULTI_EXIT_MODELS)}")
        return MultiExitNet(*STAGE_BUILDERS[name](info.channels), info.num_classes)
    if name in STAGE_BUILDERS:
        return StagedNet(*STAGE_BUILDERS[name](info.channels), info.num_classes)
    if name in OTHER_BUILDERS:
        return OTHER_BUILDERS[name](info)
    raise ValueError(f"model {name!r} is unknown; choose from {', '.join(MODELS)}")
