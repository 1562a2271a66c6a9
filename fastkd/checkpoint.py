"""Checkpoints: the atomic, code-free save (temporary file, fsync, rename; loaded with weights_only=True), when a run
saves one (the policy), and what it holds (snapshot and restore)."""
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .schedule import Step
from .step_terms import DISTILL_LIVE

CHECKPOINT = "checkpoint.pt"
TEMPORARY_SUFFIX = ".tmp"
_UMASK = os.umask(0o22)  # read once (os.umask can only read it by setting it) and put back at once
os.umask(_UMASK)


def save_atomic(obj, path: Path) -> None:
    """A crash or a full disk during the write leaves the previous file at `path` intact: the object goes to a
    temporary of its own in the same folder (so two saves never share one), is made durable, then renamed over
    `path`. A failed save removes its temporary."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes it 0600; a saved file gets the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        sync_folder(path.parent)  # the temporary's entry is durable before it replaces anything
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ValueError(f"could not save {path}: {e.strerror or e}; the previous file is kept") from None
        raise
    sync_folder(path.parent)  # make the rename itself durable


def sync_folder(folder: Path) -> None:
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def temporaries(folder: Path) -> list[Path]:
    """Temporaries that a killed save_atomic left in `folder` (never renamed: not part of any run state)."""
    return sorted(p for p in folder.glob(f".*.pt*{TEMPORARY_SUFFIX}") if p.is_file())


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


def checkpoint_due(plan: list[Step], done: int, per_epoch: int, save_every: Optional[int], forced: bool) -> bool:
    """After step `done` (1-based): at every epoch end and replay boundary (the role changes), every `save_every`
    steps, when `forced` (a stop signal), and at the end; never between an online teacher step and the student step
    that uses its logits."""
    if done == len(plan):
        return True
    step, following = plan[done - 1], plan[done]
    if following.kind == DISTILL_LIVE:
        return False
    return (forced or (step.batch + 1) % per_epoch == 0 or following.role != step.role
            or bool(save_every and done % save_every == 0))


def snapshot(config: dict, done: int, networks: dict, losses: dict, accuracy: dict, images: int,
             metrics_bytes: Optional[int], trace_bytes: Optional[int]) -> dict:
    """Everything needed to continue exactly: tensors, numbers and strings only (loadable with weights_only).

    `networks`: name → (model, optimizer, steps done); `losses`: name → [running total, count], already averaged
    over the data-parallel ranks (rank 0's snapshot stands for every rank, whose weights are identical).
    """
    return {"config": config, "done": done, "images": images, "accuracy": accuracy,
            "roles": {name: {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "steps_done": steps_done} for name, (model, optimizer, steps_done) in networks.items()},
            "losses": losses,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "metrics_bytes": metrics_bytes, "trace_bytes": trace_bytes}


def restore_network(saved: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load a snapshot's network and optimizer in place (the lr stays in its device tensor); its steps done."""
    model.load_state_dict(saved["model"])
    device_lrs = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(saved["optimizer"])
    for group, lr in zip(optimizer.param_groups, device_lrs):
        group["lr"] = lr.fill_(float(group["lr"]))
    return saved["steps_done"]


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
