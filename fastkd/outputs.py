"""What a run leaves behind and shows: the run folder (config.json, metrics.jsonl, state dicts), the --trace log,
the epoch records and the progress bar. Rank 0 alone writes (`writer`)."""
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from torch import Tensor, nn
from tqdm import tqdm

from .checkpoint import CHECKPOINT, save_atomic, temporaries
from .schedule import Step

RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINT, "student.pt", "teacher.pt")
BOARD = "tensorboard"  # --tensorboard's default folder inside --out


def run_files(path: Path) -> list[Path]:
    """What a run leaves in its folder: the files fastkd writes, the default TensorBoard folder and stray checkpoint
    temporaries. Anything else there is the user's."""
    if not path.is_dir():
        return []
    found = [path / name for name in RUN_FILES if (path / name).exists()]
    found += [path / BOARD] if (path / BOARD).is_dir() else []
    return found + temporaries(path)


def check_out_is_free(path: Path, overwrite: bool) -> None:
    """A fresh run never mixes with (or overwrites) a run already in `path`, unless told to with --overwrite.
    Checked on every rank of a torchrun (the folder is shared) before any collective work."""
    found = run_files(path)
    if found and not overwrite:
        raise ValueError(f"--out {path} already holds a run ({', '.join(p.name for p in found)}): continue it with "
                         f"--resume {path}, or pass --overwrite to remove these and start afresh")


def clear_run(path: Path) -> None:
    """--overwrite: remove the previous run's files (run_files); the user's other files stay."""
    for found in run_files(path):
        shutil.rmtree(found) if found.is_dir() else found.unlink()


class RunDirectory:
    """--out: config.json, metrics.jsonl and the final state dicts."""

    def __init__(self, path: Path, truncate_metrics_to: Optional[int] = None, writer: bool = True,
                 tensorboard: Optional[Path] = None):
        self.path, self.writer, self.metrics, self.board = path, writer, None, None
        if not writer:
            return
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"--out {path} is not writable: {e.strerror or e}") from None
        for stray in temporaries(path):  # left by a save that was killed: never part of the run
            stray.unlink()
        self.metrics = open(path / "metrics.jsonl", "a")
        if truncate_metrics_to is not None:  # resuming: drop records written after the checkpoint
            self.metrics.truncate(truncate_metrics_to)
            self.metrics.seek(0, os.SEEK_END)
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter  # checked importable by fit (check_tensorboard)

            if truncate_metrics_to is not None:
                # Resuming: events written after the checkpoint must go, but their steps are each role's epoch,
                # which no single purge step can cut. So the board is rebuilt from the truncated metrics.jsonl.
                for events in tensorboard.glob("events.out.tfevents.*"):
                    events.unlink()
            self.board = SummaryWriter(str(tensorboard))
            if truncate_metrics_to is not None:
                for line in (path / "metrics.jsonl").read_text().splitlines():
                    _board_scalars(self.board, json.loads(line), flush=False)
                self.board.flush()

    def write_config(self, config: dict, info, feature_term: str) -> None:
        """The settings as asked, then what they resolved to: the dataset and the feature term that runs."""
        if self.writer:
            record = {**config, "dataset_info": info.to_dict(), "feature_term": feature_term}
            (self.path / "config.json").write_text(json.dumps(record, indent=2) + "\n")

    def log(self, record: dict) -> None:
        if self.writer:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.board is not None:
            _board_scalars(self.board, record)

    def save_model(self, name: str, model: nn.Module) -> None:
        if self.writer:
            save_atomic(model.state_dict(), self.path / f"{name}.pt")

    def position(self) -> Optional[int]:
        """Bytes of metrics.jsonl written so far: a checkpoint records it, a resume truncates back to it."""
        return self.metrics.tell() if self.metrics else None

    def close(self) -> None:
        if self.writer:
            self.metrics.close()
        if self.board is not None:
            self.board.close()


def check_tensorboard() -> None:
    """Raise ValueError naming --tensorboard where its package is missing."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (imports the tensorboard package)
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install -e \".[tensorboard]\"") from None


def _board_scalars(board, record: dict, flush: bool = True) -> None:
    """A metrics.jsonl record as TensorBoard scalars: `<role>/<key>` at the role's epoch; the summary's numbers as
    `summary/<key>`."""
    if "summary" in record:
        scalars, step = {f"summary/{k}": v for k, v in record["summary"].items()}, 0
    else:
        scalars, step = {f"{record['role']}/{k}": v for k, v in record.items() if k not in ("role", "epoch")}, \
            record["epoch"]
    for tag, value in scalars.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            board.add_scalar(tag, value, step)
    if flush:
        board.flush()


def check_trace(path: Optional[str]) -> None:
    """Raise ValueError naming --trace where its file could not be written; creates nothing (Trace creates the
    missing folders, as RunDirectory does --out's, when the run starts)."""
    if not path:
        return
    file = Path(path)
    existing = file.parent
    while not existing.exists():  # the nearest folder that exists: the missing ones below it will be created
        existing = existing.parent
    if file.is_dir():
        raise ValueError(f"--trace {path} is a folder; give a file name")
    if not existing.is_dir():
        raise ValueError(f"--trace {path} is not writable: {existing} is not a folder")
    if not os.access(file if file.exists() else existing, os.W_OK):
        raise ValueError(f"--trace {path} is not writable: {file if file.exists() else existing} is read-only")


class Trace:
    """--trace: one JSON line per optimizer step, exactly as the schedule ran it."""

    def __init__(self, path: Optional[str], truncate_to: Optional[int] = None):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)  # checked writable by fit (check_trace)
        if path and truncate_to is not None and Path(path).exists():  # resuming: continue after the checkpoint
            self.file = open(path, "a")
            self.file.truncate(truncate_to)
            self.file.seek(0, os.SEEK_END)
        else:
            self.file = open(path, "w") if path else None

    def write(self, step: Step, batches_per_epoch: int, samples: Tensor) -> None:
        epoch, position = divmod(step.batch, batches_per_epoch)
        self.file.write(json.dumps({"role": step.role, "epoch": epoch, "position": position,
                                    "samples": samples.tolist(), "teacher_version": step.teacher_version}) + "\n")

    def position(self) -> Optional[int]:
        return self.file.tell() if self.file else None

    def close(self) -> None:
        if self.file:
            self.file.close()


def epoch_record(step: Step, epoch: int, train_loss: float, lr: float, images_per_s: float,
                 accuracy: dict) -> dict:
    """One metrics.jsonl record: a role finished an epoch; the latest accuracies of every network."""
    record = {"role": step.role, "epoch": epoch, "train_loss": round(train_loss, 5), "lr": lr,
              "images_per_s": round(images_per_s, 1)}
    for name in ("teacher", "student", "self"):
        if name in accuracy:
            record[f"{name}_top1"] = round(accuracy[name]["top1"], 2)
            record[f"{name}_top5"] = round(accuracy[name]["top5"], 2)
            if "heads_top1" in accuracy[name]:
                record["heads_top1"] = accuracy[name]["heads_top1"]
    return record


def describe(record: dict) -> str:
    parts = [f"{record['role']} epoch {record['epoch']}: loss {record['train_loss']:.4f}"]
    for name in ("teacher", "student", "self"):
        if f"{name}_top1" in record:
            parts.append(f"{name} top-1 {record[f'{name}_top1']:.2f}%")
    parts.append(f"{record['images_per_s']:.0f} img/s")
    return ", ".join(parts)


class Progress:
    """tqdm's progress bar on stderr (steps, rate, time left), redrawn in place on a terminal; the epoch records are
    lines that stay, and the only output where stderr is not a terminal."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.bar = tqdm(total=total, file=stream, unit="step", dynamic_ncols=True, mininterval=0.25,
                        disable=not stream.isatty())

    def update(self, done: int, text: str = "") -> None:
        self.bar.set_description_str(text, refresh=False)
        self.bar.update(done - self.bar.n)

    def note(self, done: int, text: str) -> None:
        """A line that stays (an epoch record)."""
        tqdm.write(f"step {done}/{self.total} {text}", file=self.stream)

    def close(self) -> None:
        self.bar.close()

