"""Atomic, code-free checkpoints: write to a temporary file, fsync, rename; load with weights_only=True."""
import os
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"


def save_atomic(obj, path: Path) -> None:
    """A crash or a full disk during the write leaves the previous file at `path` intact."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"could not save {path}: {e.strerror or e}; the previous checkpoint is kept") from None
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def load_checkpoint(run_dir: Path) -> dict:
    path = run_dir / CHECKPOINT
    if not run_dir.is_dir():
        raise ValueError(f"--resume {run_dir} is not a folder")
    if not path.is_file():
        raise ValueError(f"--resume {run_dir} holds no {CHECKPOINT}")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"--resume {path} is not a readable fastkd checkpoint ({type(e).__name__})") from None
