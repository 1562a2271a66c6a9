"""--teacher-weights: a teacher's starting weights, from a state-dict file or, for a `torchvision:` model, the name
of its pretrained weights when they are in torch's local hub cache. Never a download at run time."""
import os
from pathlib import Path

import torch
from torch import nn


def load_teacher_weights(model: nn.Module, source: str, model_name: str) -> None:
    """Load `source` into `model` in place; ValueError naming --teacher-weights for a missing file or a mismatch."""
    path = Path(source)
    if not path.is_file() and model_name.startswith("torchvision:") and not any(c in source for c in "/\\"):
        path = _torchvision_cache_file(model_name.partition(":")[2], source)
    if not path.is_file():
        raise ValueError(f"--teacher-weights {source}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torch.load of a file that is not a state dict: pickle, zip or format errors
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
