"""python -m fastkd.train: train with baseline, online, spaced, offline, self or spaced-self KD.

A thin layer over `fastkd.fit`: the flags given are passed to it as settings. Bad input ends with one line on stderr
naming the problem and exit code 2; nothing is written before the configuration has been checked.
"""
import json
import sys
from pathlib import Path

from fastkd.kernels._kd_common import DIVERGENCES  # what --divergence takes: kd_loss's divergences

from .api import SETTINGS, default_out, fit
from .checkpoint import load_checkpoint
from .cli import OneLineErrorParser
from .config import DEFAULTS, PRESETS, check_types, numbers_from_strings, with_legacy_settings
from .data import DATASETS
from .distributed import rank_from_env
from .engine import Interrupted
from .models import MODELS
from .schedule import METHODS
from .step_functions import FEATURE_LOSSES


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser("fastkd.train", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--method", choices=METHODS, default=DEFAULTS.method, help="distillation method")
    a("--interval", type=float, default=None,
      help="spacing s in epochs (the teacher runs s epochs ahead); default 1.5 for spaced, 4.0 for spaced-self")
    a("--teacher", default=None,
      help=f"teacher model: {', '.join(MODELS)}, torchvision:<builder> or timm:<name> (default: resnet20 on digits, "
           "tiny on synthetic, else resnet18)")
    a("--teacher-weights", default=None, metavar="PATH|NAME",
      help="the teacher's starting weights: a state-dict file, or for a torchvision: teacher the name of its "
           "pretrained weights in torch's local hub cache (never downloaded); with --method offline the teacher is "
           "then not trained")
    a("--student", default=None,
      help="student model (the multi-exit network for self methods); same choices and defaults as --teacher")
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
    a("--divergence", choices=DIVERGENCES, default=DEFAULTS.divergence,
      help="the soft term's divergence D (α·T²·D): forward_kl KL(p_t ‖ p_s), reverse_kl KL(p_s ‖ p_t), jsd "
           "β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m) with m = β·p_t + (1−β)·p_s")
    a("--jsd-beta", type=float, default=None, metavar="B",
      help="β of --divergence jsd, in [0, 1] (0 is forward KL, 1 reverse KL); default 0.5; jsd only")
    a("--beta", type=float, default=DEFAULTS.beta,
      help="feature-loss weight β: of --feature-loss for online, spaced and offline; of the heads' feature loss for "
           "self and spaced-self")
    a("--feature-loss", choices=("auto", "none", *FEATURE_LOSSES), default=None,
      help="online, spaced, offline: the student's loss gains β·feature between the two networks' pooled "
           "penultimate features (equal widths): dist = torch.dist (2-norm of the whole batch's difference, the "
           "official default), l2/l1/smoothl1 = their means; default auto for these methods: dist (the paper's "
           "objective) where the two feature widths are equal, else none, said in one line; none for the others")
    a("--seed", type=int, default=DEFAULTS.seed, help="seed of initialisation, sampling and augmentation")
    a("--device", default=DEFAULTS.device,
      help="auto, cpu, cuda or cuda:N (under torchrun, cuda gives rank k the GPU cuda:LOCAL_RANK)")
    a("--compile", action="store_true", help="compile the step functions with torch.compile")
    a("--precision", default=None,
      help="fp32 or bf16: the forward passes under autocast to bf16, weights and SGD state float32 (default: bf16 on "
           "a CUDA GPU that has it, else fp32; fp16 is refused: it would need loss scaling)")
    a("--channels-last", action="store_true", default=None,
      help="models and batches in channels-last memory format (faster convolutions on tensor-core GPUs)")
    a("--config", default=None, metavar="FILE",
      help="a JSON (or, with PyYAML, YAML) file of settings, keyed as a run's config.json (which reproduces that "
           "run); flags given on the command line override it")
    a("--preset", choices=tuple(PRESETS), default=None,
      help="official: the official code's settings and quirks (lr 0.01 constant, 80 epochs, feature loss dist with "
           "β 0.03, all three quirks)")
    a("--out", default=None,
      help="run directory (default runs/<time>-<method>, a new folder); one that already holds a run is refused "
           "unless --resume or --overwrite")
    a("--overwrite", action="store_true",
      help="start afresh in an --out that holds a run: its run files (config.json, metrics.jsonl, *.pt, "
           "tensorboard/) are removed first, other files kept")
    a("--trace", default=None, help="write one JSON line per optimizer step to this file (its folder is created)")
    a("--tensorboard", nargs="?", const=True, default=None, metavar="DIR",
      help="also write every epoch record as TensorBoard scalars, into DIR (default: OUT/tensorboard)")
    a("--train-subset", type=int, default=None, metavar="N", help="train on a seeded subset of N training samples")
    a("--kl-on-probabilities", action="store_true", default=None,
      help="official quirk: soft loss KLDivLoss(softmax(s/T), softmax(t/T)), no T²")
    a("--teacher-train-mode-replay", action="store_true", default=None,
      help="official quirk: teacher BatchNorm in train mode while producing replay soft targets")
    a("--no-final-replay", action="store_true", default=None,
      help="official quirk: never replay the last partial interval")
    a("--resume", default=None, metavar="DIR",
      help="continue the run in DIR from its last checkpoint, with its saved configuration (flags given "
           "explicitly must agree with it, except --epochs)")
    a("--save-every", type=int, default=None, metavar="N",
      help="also checkpoint every N steps (checkpoints are always written at epoch ends and replay boundaries)")
    a("--quiet", action="store_true", help="no progress bar")
    return p


def explicit_settings(argv) -> dict:
    """The configuration keys set on the command line."""
    return {k: v for k, v in build_parser().given(argv).items() if k in SETTINGS}


def resumed_settings(saved: dict, given: dict) -> dict:
    """The saved configuration with the settings given (`given`: a --config file's, then the flags) on top;
    `fit(resume=True)` refuses any that differ from it, except the few that may change on resume."""
    saved = with_legacy_settings(saved)
    return {**{k: saved[k] for k in SETTINGS if k in saved}, **given}


NOT_SETTINGS = {"dataset_info", "feature_term"}  # what fastkd writes into config.json besides the settings


def file_settings(path: str) -> dict:
    """The settings of a --config file; ValueError naming the file for anything it cannot use."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = file.read_text()
    if file.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {path}: a YAML file needs PyYAML (pip install pyyaml); "
                             "or give it as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: must hold a mapping of setting names to values")
    unknown = sorted(set(data) - set(SETTINGS) - NOT_SETTINGS)
    if unknown:
        raise ValueError(f"--config {path}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    settings = {k: v for k, v in data.items() if k in SETTINGS}
    try:
        settings = numbers_from_strings(settings)
        check_types(settings)
    except ValueError as e:
        raise ValueError(f"--config {path}: {e}") from None
    return settings


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    main_rank = rank_from_env() == 0
    made = None  # the default --out made here, removed again if the run does not start
    try:
        given = {**(file_settings(args.config) if args.config else {}), **explicit_settings(argv)}
        if args.resume:
            if args.overwrite:
                raise ValueError("--overwrite starts a new run and --resume continues one: give only one of them")
            settings = resumed_settings(load_checkpoint(Path(args.resume))["config"], given)
            out = args.resume
        else:
            settings = given
            out = args.out
            if out is None:
                out = made = default_out(settings.get("method", DEFAULTS.method), create=main_rank)
        summary = fit(**settings, out=out, trace=args.trace, quiet=args.quiet, resume=bool(args.resume),
                      overwrite=args.overwrite, tensorboard=args.tensorboard,
                      save_every=args.save_every)
    except ValueError as e:
        if main_rank:  # under torchrun every rank meets the same error: rank 0 says it once
            print(f"fastkd.train: error: {e}", file=sys.stderr)
            if made is not None:
                _remove_if_empty(made)
        return 2
    except Interrupted as e:
        if main_rank:
            print(f"fastkd.train: {e}", file=sys.stderr)
        return 128 + e.signum
    if not main_rank:
        return 0
    teacher = "n/a" if summary["teacher_top1"] is None else f"{summary['teacher_top1']:.2f}%"
    print(f"fastkd {settings.get('method', DEFAULTS.method)}: teacher top-1 {teacher} | student top-1 "
          f"{summary['student_top1']:.2f}% | wall {summary['wall_s']:.1f} s | {summary['images_per_s']:.0f} images/s"
          f" | {out}")
    return 0


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only an empty folder: whatever a run wrote there stays
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
