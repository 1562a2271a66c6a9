"""Which runs a study makes: every method of --methods under every seed, the points of an interval curve, and the
optional controls, each a Config with the study's shared budget."""
import math
from dataclasses import dataclass
from typing import Optional

from ..config import Config, preset_settings, validate
from ..schedule import METHODS, TEACHER_METHODS

UNSPACED = {"spaced": "online", "spaced-self": "self"}  # the counterpart a spaced method is compared with
EQUAL_STEPS = "self-equal-steps"  # self KD with twice the epochs: spaced-self's optimizer steps
OFFICIAL = "+official"  # a label's suffix: the run has the official preset's loss and lr schedule


@dataclass(frozen=True)
class StudyRun:
    label: str  # what the study compares: the method, "method@s" on an interval curve, or the control
    cfg: Config

    @property
    def name(self) -> str:
        return f"{self.label.replace('@', '-s')}-seed{self.cfg.seed}"


def run_configs(args) -> list["StudyRun"]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods {args.methods!r}: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(METHODS)}")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    for flag in ("analysis_samples", "hessian_probes", "sharpness_draws"):
        if getattr(args, flag) < 2:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 2, got {getattr(args, flag)}")
    for flag in ("sharpness_radius", "profile_radius"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    shared = dict(dataset=args.dataset, data_dir=args.data_dir, loader=args.loader, epochs=args.epochs,
                  batch_size=args.batch_size, train_subset=args.train_subset, lr=args.lr,
                  lr_schedule=args.lr_schedule, teacher=args.teacher, student=args.student,
                  temperature=args.temperature, alpha=args.alpha, beta=args.beta, device=args.device,
                  compile=args.compile)
    intervals = parse_intervals(args.intervals, methods)
    # A curve pairs each spaced method with its unspaced counterpart: that one runs too.
    methods += [m for m in intervals if m not in methods]
    methods += [UNSPACED[m] for m in intervals if UNSPACED[m] not in methods]
    runs = [(m if s is None else f"{m}@{s:g}", m, s) for m in methods for s in intervals.get(m, [None])]
    if args.equal_steps_control:
        runs.append((EQUAL_STEPS, "self", None))
    if args.official_point:  # each spaced method and its counterpart at the default s, under the preset
        runs += [(f"{m}{OFFICIAL}", m, None) for spaced in methods if spaced in UNSPACED
                 for m in (spaced, UNSPACED[spaced])]

    def config(label, method, interval, seed):
        settings = dict(shared)
        if label == EQUAL_STEPS:
            settings["epochs"] *= 2
        # An explicit feature term is the two-network methods'; the others run without one (their own "none").
        settings["feature_loss"] = args.feature_loss if method in TEACHER_METHODS else None
        if label.endswith(OFFICIAL):  # the official loss and lr schedule; the study's budget (epochs) stays
            settings.update({k: v for k, v in preset_settings("official", method).items() if k != "epochs"},
                            preset="official")
        return Config(method=method, seed=seed, interval=interval, **settings).resolve_defaults()

    study = [StudyRun(label, config(label, method, s, args.first_seed + k))
             for k in range(args.seeds) for label, method, s in runs]
    for run in study:
        validate(run.cfg)
    return study


def parse_intervals(items: Optional[list[str]], methods: list[str]) -> dict[str, list[float]]:
    """--intervals → {spaced method: [s, ...]}; a bare list applies to every spaced method of --methods."""
    if not items:
        return {}
    spaced = [m for m in methods if m in UNSPACED]
    curve = {}
    for item in items:
        method, _, values = item.rpartition("=")
        targets = [method] if method else spaced
        if method and method not in UNSPACED:
            raise ValueError(f"--intervals {item!r}: only spaced methods have an interval ({', '.join(UNSPACED)})")
        if not targets:
            raise ValueError(f"--intervals {item!r}: --methods {','.join(methods)} has no spaced method")
        try:
            points = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--intervals {item!r}: intervals must be numbers of epochs, e.g. 0.5,1.5") from None
        if not points or not all(math.isfinite(s) and s > 0 for s in points) or len(set(points)) != len(points):
            raise ValueError(f"--intervals {item!r}: give distinct intervals > 0 (in epochs)")
        for target in targets:
            curve[target] = points
    return curve
