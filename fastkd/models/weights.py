"""--teacher-weights: a teacher's starting weights, from a state-dict file or, for a `torchvision:` or `timm:` model,
the name of its pretrained weights when they are in the local cache (torch's hub cache, or Hugging Face's for timm).
Never a download at run time."""
import os
from pathlib import Path

import torch
from torch import nn


def load_teacher_weights(model: nn.Module, source: str, model_name: str) -> None:
    """Load `source` into `model` in place; ValueError naming --teacher-weights for a missing file or a mismatch."""
    path = Path(source)
    by_name = not path.is_file() and not any(c in source for c in "/\\")
    if by_name and model_name.startswith("torchvision:"):
        path = _torchvision_cache_file(model_name.partition(":")[2], source)
    elif by_name and model_name.startswith("timm:"):
        path = _timm_cache_file(model_name.partition(":")[2], source)
    if not path.is_file():
        raise ValueError(f"--teacher-weights {source}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file that is not a state dict: pickle, zip, safetensors or format errors
        raise ValueError(f"--teacher-weights {path}: not a readable state dict ({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--teacher-weights {path}: holds no state dict of tensors")
    own = model.state_dict()
    for key in [*own, *(k for k in state if k not in own)]:  # in the model's order, then the file's extras
        if key not in state or key not in own or state[key].shape != own[key].shape:
            have = tuple(own[key].shape) if key in own else "absent"
            given = tuple(state[key].shape) if key in state else "absent"
            raise ValueError(f"--teacher-weights {path} does not fit {model_name}: first mismatch at {key!r} "
                             f"(the model: {have}, the file: {given})")
    model.load_state_dict(state)


def _torchvision_cache_file(builder: str, weights_name: str) -> Path:
    """Where torch.hub keeps the file of torchvision weights `weights_name` of `builder`; ValueError if none such."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(builder)[weights_name]
    except KeyError:
        names = ", ".join(w.name for w in torchvision.models.get_model_weights(builder))
        raise ValueError(f"--teacher-weights {weights_name}: neither a file nor weights of torchvision:{builder} "
                         f"(those are: {names})") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not path.is_file():
        raise ValueError(f"--teacher-weights {weights_name}: not in the local cache (looked for {path}); fastkd never "
                         f"downloads: fetch {weights.url} there, or give a state-dict file")
    return path


def _timm_cache_file(builder: str, tag: str) -> Path:
    """The cached file of timm's pretrained weights `builder`.`tag` (e.g. resnet18 and a1_in1k); ValueError if the
    tag is unknown or the file is not in the Hugging Face cache ($HF_HUB_CACHE)."""
    import huggingface_hub
    import timm

    config = timm.models.get_pretrained_cfg(f"{builder}.{tag}")
    if config is None or not config.hf_hub_id:
        raise ValueError(f"--teacher-weights {tag}: neither a file nor pretrained weights of timm:{builder} "
                         f"(see timm.list_pretrained('{builder}*'))")
    cache = os.environ.get("HF_HUB_CACHE") or huggingface_hub.constants.HF_HUB_CACHE
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = huggingface_hub.try_to_load_from_cache(config.hf_hub_id, filename, cache_dir=cache)
        if isinstance(found, str):
            return Path(found)
    raise ValueError(f"--teacher-weights {tag}: not in the local cache (looked for {config.hf_hub_id} in {cache}); "
                     f"fastkd never downloads: fetch it there, or give a state-dict file")
