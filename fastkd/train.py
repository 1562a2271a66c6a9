"""python -m fastkd.train: train with baseline, online, spaced, offline, self or spaced-self KD.

Bad input ends with one line on stderr naming the problem and exit code 2; nothing is written before the
configuration has been checked.
"""
import argparse
import sys
import time
from pathlib import Path

from .config import PRESETS, Config, validate
from .data import DATASETS
from .models import MODELS
from .schedule import METHODS

DEFAULTS = Config()


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"fastkd.train: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fastkd.train", description=__doc__.splitlines()[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--method", choices=METHODS, default=DEFAULTS.method, help="distillation method")
    a("--interval", type=float, default=None,
      help="spacing s in epochs (the teacher runs s epochs ahead); default 1.5 for spaced, 4.0 for spaced-self")
    a("--teacher", default=None,
      help=f"teacher model: {', '.join(MODELS)} (default: resnet20 on digits, tiny on synthetic, else resnet18)")
    a("--student", default=None,
      help=f"student model (the multi-exit network for self methods); same choices and defaults as --teacher")
    a("--dataset", default=DEFAULTS.dataset, help=f"dataset: {', '.join(DATASETS)}")
    a("--data-dir", default=None,
      help="dataset folder: Tiny-ImageNet (wnids.txt, train/, val/), CIFAR-100 python pickles, or ImageFolder "
           "(train/<class>/*, val/<class>/*)")
    a("--loader", choices=("auto", "dali", "torch"), default=DEFAULTS.loader,
      help="loader for image folders: DALI pipelines (GPU, or CPU without one) or a torchvision DataLoader; "
           "auto = dali where installed")
    a("--epochs", type=int, default=None, help=f"training epochs (default {DEFAULTS.epochs}, or the preset's)")
    a("--batch-size", type=int, default=DEFAULTS.batch_size, help="training batch size (last partial batch dropped)")
    a("--lr", type=float, default=None, help=f"peak learning rate (default {DEFAULTS.lr}, or the preset's)")
    a("--lr-schedule", choices=("cosine", "constant"), default=None,
      help="per-step cosine decay to 0, or constant (default cosine, or the preset's)")
    a("--temperature", type=float, default=DEFAULTS.temperature, help="distillation temperature T")
    a("--alpha", type=float, default=DEFAULTS.alpha, help="soft-loss weight α (1−α weighs the label CE)")
    a("--beta", type=float, default=DEFAULTS.beta, help="self-distillation feature-loss weight β")
    a("--seed", type=int, default=DEFAULTS.seed, help="seed of initialisation, sampling and augmentation")
    a("--device", default=DEFAULTS.device, help="auto, cpu, cuda or cuda:N")
    a("--compile", action="store_true", help="compile the step functions with torch.compile")
    a("--preset", choices=tuple(PRESETS), default=None,
      help="official: the official code's settings and quirks (lr 0.01 constant, 80 epochs, all three quirks)")
    a("--out", default=None, help="run directory (default runs/<time>-<method>)")
    a("--trace", default=None, help="write one JSON line per optimizer step to this file")
    a("--train-subset", type=int, default=None, metavar="N", help="train on a seeded subset of N training samples")
    a("--kl-on-probabilities", action="store_true", default=None,
      help="official quirk: soft loss KLDivLoss(softmax(s/T), softmax(t/T)), no T²")
    a("--teacher-train-mode-replay", action="store_true", default=None,
      help="official quirk: teacher BatchNorm in train mode while producing replay soft targets")
    a("--no-final-replay", action="store_true", default=None,
      help="official quirk: never replay the last partial interval")
    a("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then the preset, then every flag given explicitly."""
    values = DEFAULTS.to_dict()
    if args.preset:
        values.update(PRESETS[args.preset], preset=args.preset)
    explicit = {k: v for k, v in vars(args).items() if v is not None and k in values}
    for key in ("kl_on_probabilities", "teacher_train_mode_replay", "no_final_replay"):
        if getattr(args, key) is None:
            explicit.pop(key, None)
    values.update(explicit)
    values["preset"] = args.preset
    return Config(**values).resolve_defaults()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        validate(cfg)
        from .engine import train

        out = Path(args.out) if args.out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}"
        summary = train(cfg, out, trace_path=args.trace, quiet=args.quiet)
    except ValueError as e:
        print(f"fastkd.train: error: {e}", file=sys.stderr)
        return 2
    teacher = "n/a" if summary["teacher_top1"] is None else f"{summary['teacher_top1']:.2f}%"
    print(f"fastkd {cfg.method}: teacher top-1 {teacher} | student top-1 {summary['student_top1']:.2f}% | "
          f"wall {summary['wall_s']:.1f} s | {summary['images_per_s']:.0f} images/s | {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
