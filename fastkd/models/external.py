"""Models named by library: `torchvision:<builder>` (any torchvision classification builder) and `timm:<name>`
(when timm is installed), built untrained with the dataset's class and channel counts.

The builder's own stem is kept: ImageNet stems downsample by 4 (ResNets) to 16 or 32 (ViT patches) before the first
block, which on 32–64 px images leaves small feature maps and costs accuracy against fastkd's CIFAR-stem zoo models,
but it is the architecture the name promises (and the one pretrained weights fit).
"""
from torch import nn

from ..data import DatasetInfo

PREFIXES = ("torchvision:", "timm:")


def is_external(name: str) -> bool:
    return name.startswith(PREFIXES)


def check_external(flag: str, name: str) -> None:
    """Raise ValueError naming `flag` for a name that cannot be built (unknown, not a classifier, timm missing)."""
    library, _, builder = name.partition(":")
    if library == "torchvision":
        import torchvision

        if builder not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"{flag} {name!r}: not a torchvision classification builder (see "
                             f"torchvision.models.list_models(module=torchvision.models))")
    else:
        timm = _timm(flag)
        if not timm.is_model(builder):
            raise ValueError(f"{flag} {name!r}: timm has no such model (see timm.list_models())")


def build_external(name: str, info: DatasetInfo) -> nn.Module:
    library, _, builder = name.partition(":")
    try:
        if library == "torchvision":
            import torchvision

            kwargs = {"image_size": info.size} if builder.startswith("vit_") else {}
            model = torchvision.models.get_model(builder, weights=None, num_classes=info.num_classes, **kwargs)
            if info.channels != 3:
                _first_conv_takes(model, info.channels)
        else:
            model = _timm("--teacher/--student").create_model(builder, pretrained=False,
                                                              num_classes=info.num_classes, in_chans=info.channels)
    except (ValueError, TypeError, AssertionError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{name} cannot be built for {info.channels}×{info.size}×{info.size} images with "
                         f"{info.num_classes} classes: {reason}") from None
    return model


def _first_conv_takes(model: nn.Module, channels: int) -> None:
    """Replace the first convolution (the stem's) by one that takes `channels` input channels."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                # groups=1: a depthwise stem's grouping cannot carry over to another input channel count.
                setattr(parent, child_name, nn.Conv2d(
                    channels, child.out_channels, child.kernel_size, child.stride, child.padding, child.dilation,
                    1, child.bias is not None, child.padding_mode))
                return
    raise ValueError("it has no convolution to take a channel count other than 3")


def _timm(flag: str):
    try:
        import timm
    except ImportError:
        raise ValueError(f"{flag}: timm: models need timm installed: pip install -e \".[timm]\"") from None
    return timm
