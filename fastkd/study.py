"""python -m fastkd.study: every method under every seed with one budget, then accuracy and flatness compared.

Runs go to <out>/runs/<method>-seed<k>/ (ordinary fastkd run folders). Started again with the same --out, the study
skips finished runs, continues interrupted ones from their checkpoints, and refuses a folder whose runs were made
with other settings. It writes results.md, results.json, curves.png and flatness.png into --out, and
interval_curve.png when --intervals asks for a curve.
"""
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .analysis import (hutchinson_trace, loss_profile, mean_std, paired_difference, random_direction, save_profile,
                       sharpness, training_loss)
from .cli import OneLineErrorParser
from .analysis.plot import BarChart, Line, LineChart, save_figure
from .checkpoint import CHECKPOINT, load_checkpoint
from .config import DEFAULTS, Config, differing_settings, preset_settings, validate, with_legacy_settings
from .data import DatasetInfo, make_batches
from .api import fit, named_feature_term
from .distributed import SINGLE_PROCESS
from .engine import Interrupted
from .models import build_model
from .schedule import METHODS, SELF_METHODS, TEACHER_METHODS
from .step_functions import FEATURE_LOSSES

# (a, b): report a − b paired by seed, when both methods are in the study.
PAIRS = (("spaced", "online"), ("spaced-self", "self"), ("spaced", "baseline"), ("online", "baseline"))
PROFILE_POINTS = 21
RESULT = "result.json"
RESULT_VERSION = 2  # a run's result.json of another version is analysed again (its training is kept)
ANALYSIS_CHUNK = 256


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser("fastkd.study", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--methods", default="baseline,online,spaced,self,spaced-self", help="comma-separated methods to compare")
    a("--seeds", type=int, default=5, help="seeds per method (seed k sets initialisation, data subset, order)")
    a("--first-seed", type=int, default=0, help="seeds run from this one upwards")
    a("--out", required=True, help="study folder; run the same command again to resume")
    a("--intervals", nargs="+", default=None, metavar="S[,S...] | METHOD=S[,S...]",
      help="the interval curve: every spaced method of --methods at each interval s (in epochs), or per method "
           "(spaced=0.5,1.5 spaced-self=2,4); each paired by seed with its unspaced counterpart (online, self), "
           "which is added to the study when missing")
    a("--official-point", action="store_true",
      help="add every spaced method of the study and its counterpart at the default interval with the official "
           "preset's loss and lr schedule (quirks, feature term, constant lr 0.01), at the study's epochs")
    a("--equal-steps-control", action="store_true",
      help="add self KD with spaced-self's number of optimizer steps (twice the epochs): the control of its "
           "second step per batch")
    train_flags = p.add_argument_group("training (identical for every method)")
    t = train_flags.add_argument
    t("--dataset", default=DEFAULTS.dataset)
    t("--data-dir", default=None)
    t("--loader", default=DEFAULTS.loader)
    t("--epochs", type=int, default=DEFAULTS.epochs)
    t("--batch-size", type=int, default=DEFAULTS.batch_size)
    t("--train-subset", type=int, default=None, metavar="N", help="seeded subset of N training samples per seed")
    t("--lr", type=float, default=DEFAULTS.lr)
    t("--lr-schedule", default=DEFAULTS.lr_schedule)
    t("--teacher", default=None, help="default: the dataset's model")
    t("--student", default=None, help="default: the dataset's model (multi-exit for self methods)")
    t("--temperature", type=float, default=DEFAULTS.temperature)
    t("--alpha", type=float, default=DEFAULTS.alpha)
    t("--beta", type=float, default=DEFAULTS.beta)
    t("--feature-loss", choices=("auto", "none", *FEATURE_LOSSES), default=None,
      help="the two-network methods' feature term (default: auto for online, spaced and offline: dist where the "
           "teacher's and the student's feature widths are equal, else none)")
    t("--device", default=DEFAULTS.device)
    t("--compile", action="store_true")
    flat = p.add_argument_group("flatness of each final student (training loss, eval mode)")
    f = flat.add_argument
    f("--analysis-samples", type=int, default=512, help="training samples in the loss (first batches of epoch 0)")
    f("--hessian-probes", type=int, default=32, help="Rademacher probes of the Hutchinson trace")
    f("--sharpness-radius", type=float, default=0.1, help="perturbation size relative to each weight tensor")
    f("--sharpness-draws", type=int, default=10, help="random perturbations averaged")
    f("--profile-radius", type=float, default=0.5, help="the 1-D profile spans t in [-r, r] along a random direction")
    return p


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


UNSPACED = {"spaced": "online", "spaced-self": "self"}  # the counterpart a spaced method is compared with
EQUAL_STEPS = "self-equal-steps"  # self KD with twice the epochs: spaced-self's optimizer steps
OFFICIAL = "+official"  # a label's suffix: the run has the official preset's loss and lr schedule


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


@dataclass(frozen=True)
class StudyRun:
    label: str  # what the study compares: the method, "method@s" on an interval curve, or the control
    cfg: Config

    @property
    def name(self) -> str:
        return f"{self.label.replace('@', '-s')}-seed{self.cfg.seed}"


def _trained(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return False
    lines = metrics.read_text().strip().splitlines()
    return bool(lines) and "summary" in json.loads(lines[-1])


def _check_same(run_dir: Path, saved: dict, cfg: Config) -> None:
    """`saved`: a run's config.json, or its checkpoint's settings (resumed by fit, which checks the feature term)."""
    differing = differing_settings(cfg, saved)
    saved_term = with_legacy_settings(saved)["feature_loss"]  # runs saved before auto was the default: dist, none
    if cfg.feature_loss == "auto" and saved_term != "auto" and "dataset_info" in saved \
            and named_feature_term(cfg, DatasetInfo(**saved["dataset_info"])) != saved_term:
        differing = sorted([*differing, "feature_loss"])
    if differing:
        raise ValueError(f"--out: {run_dir} was trained with other settings ({', '.join(differing)}); "
                         f"use a new --out for a different study")


def train_run(cfg: Config, run_dir: Path) -> str:
    """Train (or finish training) one run; returns what was done."""
    if _trained(run_dir):
        _check_same(run_dir, json.loads((run_dir / "config.json").read_text()), cfg)
        return "trained earlier"
    if (run_dir / CHECKPOINT).is_file():
        state = load_checkpoint(run_dir)
        _check_same(run_dir, state["config"], cfg)
        fit(**cfg.to_dict(), out=run_dir, quiet=True, resume=True)
        return f"resumed after step {state['done']}"
    if run_dir.exists():  # started but killed before its first checkpoint: nothing to keep
        shutil.rmtree(run_dir)
    fit(**cfg.to_dict(), out=run_dir, quiet=True)
    return "trained"


def _curve(run_dir: Path) -> list[list[float]]:
    """[epoch, student top-1] at every student epoch end (for self methods, the network's deepest head)."""
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        role = record.get("role")
        if role in ("student", "self"):
            curve.append([record["epoch"] + 1, record[f"{role}_top1"]])
    return curve


def analysis_batches(cfg: Config, device: torch.device, samples: int) -> tuple[list, object]:
    """The first training batches of epoch 0, as the run drew them, up to `samples` samples: a fixed loss."""
    source = make_batches(cfg.dataset, cfg.data_dir, cfg.loader, cfg.batch_size, cfg.seed, device,
                          cfg.train_subset)
    count = max(1, min(source.batches_per_epoch, samples // cfg.batch_size))
    drawn = list(source.stream([(0, p) for p in range(count)]))
    # Regrouped into chunks of up to ANALYSIS_CHUNK samples: fewer, larger Hessian-vector products.
    per_chunk = max(1, ANALYSIS_CHUNK // cfg.batch_size)
    return [(torch.cat([b.x for b in drawn[i:i + per_chunk]]), torch.cat([b.y for b in drawn[i:i + per_chunk]]))
            for i in range(0, len(drawn), per_chunk)], source.info


def analyse_run(run: StudyRun, run_dir: Path, args) -> dict:
    cfg = run.cfg
    device = SINGLE_PROCESS.device(cfg.device)
    batches, info = analysis_batches(cfg, device, args.analysis_samples)
    student = build_model(cfg.student, info, multi_exit=cfg.method in SELF_METHODS).to(device)
    student.load_state_dict(torch.load(run_dir / "student.pt", map_location=device, weights_only=True))
    trace = hutchinson_trace(student, batches, probes=args.hessian_probes, seed=cfg.seed)
    sharp = sharpness(student, batches, radius=args.sharpness_radius, draws=args.sharpness_draws, seed=cfg.seed)
    steps = [args.profile_radius * (2 * i / (PROFILE_POINTS - 1) - 1) for i in range(PROFILE_POINTS)]
    direction = random_direction(student, torch.Generator().manual_seed(cfg.seed))
    profile = loss_profile(student, batches, steps, direction=direction)
    save_profile(run_dir / "profile", steps, {run.name: profile}, "Training loss along a random direction")
    summary = json.loads((run_dir / "metrics.jsonl").read_text().strip().splitlines()[-1])["summary"]
    return {"version": RESULT_VERSION, "method": cfg.method, "seed": cfg.seed,
            "student_top1": summary["student_top1"], "train_loss": training_loss(student, batches),
            "teacher_top1": summary["teacher_top1"], "wall_s": summary["wall_s"], "curve": _curve(run_dir),
            "hessian_trace": trace.to_dict(), "sharpness": sharp.to_dict(),
            "profile": {"steps": steps, "losses": profile}, "analysis": analysis_settings(args)}


def analysis_settings(args) -> dict:
    return {k: getattr(args, k) for k in ("analysis_samples", "hessian_probes", "sharpness_radius",
                                          "sharpness_draws", "profile_radius")}


def _fmt(mean: float, std: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def run_fields(run: StudyRun) -> dict:
    """What identifies a run in results.json, from its settings (so results written before these fields have them)."""
    cfg = run.cfg
    return {"label": run.label, "method": cfg.method, "seed": cfg.seed, "dataset": cfg.dataset,
            "train_subset": cfg.train_subset, "epochs": cfg.epochs,
            "interval": cfg.resolved_interval() if cfg.method in UNSPACED else None}


METRICS = (("student_top1", lambda r: r["student_top1"]), ("teacher_top1", lambda r: r["teacher_top1"]),
           ("train_loss", lambda r: r["train_loss"]), ("hessian_trace", lambda r: r["hessian_trace"]["mean"]),
           ("sharpness", lambda r: r["sharpness"]["mean"]))


def study_pairs(labels: list[str]) -> list[tuple[str, str]]:
    """(a, b) to report as a − b paired by seed: the fixed comparisons, and every point of an interval curve
    against its unspaced counterpart (spaced-self also against the equal-steps control)."""
    pairs = [(a, b) for a, b in PAIRS if a in labels and b in labels]
    for a in labels:
        method = a.split("@")[0]
        if method in UNSPACED and (a, UNSPACED[method]) not in pairs and UNSPACED[method] in labels:
            pairs.append((a, UNSPACED[method]))
        if method == "spaced-self" and EQUAL_STEPS in labels:
            pairs.append((a, EQUAL_STEPS))
        base = a.removesuffix(OFFICIAL)
        if a.endswith(OFFICIAL) and base in UNSPACED and UNSPACED[base] + OFFICIAL in labels:
            pairs.append((a, UNSPACED[base] + OFFICIAL))
    return pairs


def aggregate(results: list[dict], labels: list[str]) -> dict:
    by_label = {m: sorted((r for r in results if r["label"] == m), key=lambda r: r["seed"]) for m in labels}
    summary = {}
    for m, runs in by_label.items():
        entry = {"seeds": [r["seed"] for r in runs]}
        for key, get in METRICS:
            values = [get(r) for r in runs]
            if values and None not in values:
                entry[key] = dict(zip(("mean", "std"), mean_std(values)), values=values)
        summary[m] = entry
    pairs = {}
    for a, b in study_pairs(labels):
        pick = _paired_runs(by_label, a, b)
        if pick is not None:
            pairs[f"{a} − {b}"] = {key: paired_difference([get(r) for r in pick[0]],
                                                          [get(r) for r in pick[1]]).to_dict()
                                   for key, get in METRICS if key in ("student_top1", "hessian_trace")}
    return {"methods": summary, "paired": pairs, "curves": interval_curves(by_label, labels)}


def interval_curves(by_label: dict, labels: list[str]) -> dict:
    """Per spaced method run at more than one interval: each interval's paired difference of top-1 and of the
    Hessian trace against its unspaced counterpart, in order of s, and the top-1 difference at the family-wise
    (Bonferroni) level: with K intervals tried, one of them can look good by chance."""
    curves = {}
    for method, counterpart in UNSPACED.items():
        points = sorted(float(m.split("@")[1]) for m in labels if m.startswith(method + "@"))
        if len(points) < 2 or counterpart not in by_label:
            continue
        rows = []
        for s in points:
            pick = _paired_runs(by_label, f"{method}@{s:g}", counterpart)
            if pick is None:
                continue
            a, b = ([value(r) for r in runs] for runs in pick)
            trace_a, trace_b = ([r["hessian_trace"]["mean"] for r in runs] for runs in pick)
            rows.append({"interval": s, "student_top1": paired_difference(a, b).to_dict(),
                         "student_top1_family": paired_difference(a, b, 1 - 0.05 / len(points)).to_dict(),
                         "hessian_trace": paired_difference(trace_a, trace_b).to_dict()})
        if rows:
            curves[method] = {"against": counterpart, "intervals_tried": len(points), "points": rows}
    return curves


def value(run: dict) -> float:
    return run["student_top1"]


def _paired_runs(by_label: dict, a: str, b: str):
    """The runs of a and b under the seeds both have, in seed order; None when fewer than 2."""
    common = sorted({r["seed"] for r in by_label.get(a, [])} & {r["seed"] for r in by_label.get(b, [])})
    if len(common) < 2:
        return None
    return tuple([next(r for r in by_label[m] if r["seed"] == s) for s in common] for m in (a, b))


def write_markdown(path: Path, agg: dict, command: str, configs: list[Config]) -> None:
    cfg = configs[0]
    lines = [
        "# fastkd study", "",
        f"Command: `{command}`", "",
        f"Dataset {cfg.dataset}" + (f" ({cfg.train_subset} training samples per seed)" if cfg.train_subset else "")
        + f", {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr} {cfg.lr_schedule}, teacher {cfg.teacher}, "
          f"student {cfg.student}, T={cfg.temperature}, α={cfg.alpha}, β={cfg.beta}{_feature_text(configs)}.", "",
        "| method | seeds | student top-1 (%) | teacher top-1 (%) | train loss | Hessian trace | sharpness |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, e in agg["methods"].items():
        cell = {k: _fmt(e[k]["mean"], e[k]["std"], 3 if k in ("sharpness", "train_loss") else 2) if k in e else "–"
                for k in ("student_top1", "teacher_top1", "train_loss", "hessian_trace", "sharpness")}
        lines.append(f"| {m} | {len(e['seeds'])} | {cell['student_top1']} | {cell['teacher_top1']} | "
                     f"{cell['train_loss']} | {cell['hessian_trace']} | {cell['sharpness']} |")
    lines += ["", ("Mean ± std over seeds. Train loss: the final student's cross-entropy on the analysis samples "
                   "(eval mode); Hessian trace: Hutchinson estimate of tr(∇²L) of that loss; sharpness: its mean "
                   "increase under random relative weight perturbations."), ""]
    if agg["paired"]:
        lines += ["Paired by seed (same initialisation, data subset and batch order), 95% t-interval:", "",
                  "| difference | student top-1 (points) | 95% CI | a better / worse | Hessian trace | 95% CI |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, d in agg["paired"].items():
            acc, tr = d["student_top1"], d["hessian_trace"]
            lines.append(f"| {name} | {acc['mean']:+.2f} | [{acc['low']:+.2f}, {acc['high']:+.2f}] | "
                         f"{acc['wins']} / {acc['losses']} of {acc['n']} | {tr['mean']:+.2f} | "
                         f"[{tr['low']:+.2f}, {tr['high']:+.2f}] |")
    for method, curve in agg.get("curves", {}).items():
        lines += curve_markdown(method, curve)
    path.write_text("\n".join(lines) + "\n")


def curve_markdown(method: str, curve: dict) -> list[str]:
    k = curve["intervals_tried"]
    lines = ["", f"Interval curve of {method}, paired by seed against {curve['against']} (95% t-intervals; the "
                 f"family-wise column is the Bonferroni interval for {k} intervals tried):", "",
             "| s (epochs) | top-1 difference | 95% CI | family-wise CI | better / worse | Hessian trace "
             "difference | 95% CI |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in curve["points"]:
        acc, fam, tr = p["student_top1"], p["student_top1_family"], p["hessian_trace"]
        lines.append(f"| {p['interval']:g} | {acc['mean']:+.2f} | [{acc['low']:+.2f}, {acc['high']:+.2f}] | "
                     f"[{fam['low']:+.2f}, {fam['high']:+.2f}] | {acc['wins']} / {acc['losses']} of {acc['n']} | "
                     f"{tr['mean']:+.2f} | [{tr['low']:+.2f}, {tr['high']:+.2f}] |")
    best = max(curve["points"], key=lambda p: p["student_top1"]["mean"])
    acc, fam = best["student_top1"], best["student_top1_family"]
    verdict = ("excludes 0" if acc["low"] > 0 or acc["high"] < 0 else "includes 0") + ", and the family-wise " + \
        ("one excludes 0" if fam["low"] > 0 or fam["high"] < 0 else "one includes 0")
    lines += ["", f"Best interval: s = {best['interval']:g} ({acc['mean']:+.2f} points); its 95% interval "
                  f"{verdict}. {k} intervals were tried."]
    return lines


def _feature_text(configs: list[Config]) -> str:
    two_network = {cfg.feature_loss for cfg in configs if cfg.method in TEACHER_METHODS}
    return f", feature term {'/'.join(sorted(two_network))} (two-network methods)" if two_network else ""


def write_plots(out: Path, results: list[dict], methods: list[str], agg: dict) -> None:
    curves, profiles, bars = [], [], {"hessian_trace": ([], []), "sharpness": ([], [])}
    for m in methods:
        runs = [r for r in results if r["label"] == m]
        if not runs:
            continue
        epochs = [e for e, _ in runs[0]["curve"]]
        stats = [mean_std([r["curve"][i][1] for r in runs]) for i in range(len(epochs))]
        curves.append(Line(m, epochs, [s[0] for s in stats], [0.0 if math.isnan(s[1]) else s[1] for s in stats]))
        steps = runs[0]["profile"]["steps"]
        profiles.append(Line(m, steps, [mean_std([r["profile"]["losses"][i] for r in runs])[0]
                                        for i in range(len(steps))]))
        for key, (values, errors) in bars.items():
            mean, std = mean_std([r[key]["mean"] for r in runs])
            values.append(mean)
            errors.append(0.0 if math.isnan(std) else std)
    labels = [m for m in methods if any(r["label"] == m for r in results)]
    seeds = sorted({len([r for r in results if r["label"] == m]) for m in labels})
    over = f"{'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''}"
    save_figure(out / "curves.png", [LineChart(f"Student test top-1 (mean ± std over {over})", "student epoch",
                                               "top-1 (%)", curves)])
    save_figure(out / "flatness.png", [
        BarChart(f"Hessian trace of the training loss (mean ± std, {over})", "tr(H) (loss units)", labels,
                 *bars["hessian_trace"]),
        BarChart(f"Sharpness (mean ± std, {over})", "loss increase (loss units)", labels, *bars["sharpness"]),
        LineChart(f"Loss along a random direction (mean, {over})", "t (step along the direction, relative)",
                  "training loss (cross-entropy)", profiles)])
    if agg["curves"]:
        save_figure(out / "interval_curve.png", [
            LineChart(f"{method} − {curve['against']}: student top-1 (mean, 95% CI, paired by seed)",
                      "interval s (epochs)", "top-1 difference (points)",
                      [Line(method, [p["interval"] for p in curve["points"]],
                            [p["student_top1"]["mean"] for p in curve["points"]],
                            [p["student_top1"]["high"] - p["student_top1"]["mean"] for p in curve["points"]]),
                       Line("0", [curve["points"][0]["interval"], curve["points"][-1]["interval"]], [0.0, 0.0])])
            for method, curve in agg["curves"].items()])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = "python -m fastkd.study " + " ".join(argv)
    try:
        study = run_configs(args)
        out = Path(args.out)
        (out / "runs").mkdir(parents=True, exist_ok=True)
        start, results, durations = time.perf_counter(), [], []
        for i, run in enumerate(study, 1):
            run_start, cfg = time.perf_counter(), run.cfg
            run_dir = out / "runs" / run.name
            result_path = run_dir / RESULT
            result = json.loads(result_path.read_text()) if result_path.is_file() else None
            if result is not None and result.get("version") == RESULT_VERSION \
                    and result["analysis"] == analysis_settings(args):
                _check_same(run_dir, json.loads((run_dir / "config.json").read_text()), cfg)
                what = "done earlier, skipped"
            else:
                what = train_run(cfg, run_dir)
                result = analyse_run(run, run_dir, args)
                result_path.write_text(json.dumps(result) + "\n")
                durations.append(time.perf_counter() - run_start)
            result = {**result, **run_fields(run)}
            results.append(result)
            elapsed = time.perf_counter() - start
            left = f", about {sum(durations) / len(durations) * (len(study) - i) / 60:.0f} min left" \
                if durations and i < len(study) else ""
            print(f"[{i}/{len(study)}] {run.name}: {what}; student top-1 {result['student_top1']:.2f}%, "
                  f"Hessian trace {result['hessian_trace']['mean']:.1f} ± {result['hessian_trace']['stderr']:.1f}, "
                  f"sharpness {result['sharpness']['mean']:.4f} | {elapsed / 60:.1f} min{left}", flush=True)
        labels = list(dict.fromkeys(run.label for run in study))
        agg = aggregate(results, labels)
        (out / "results.json").write_text(json.dumps({"command": command, "aggregate": agg, "runs": results},
                                                     indent=1) + "\n")
        configs = [run.cfg for run in study]
        write_markdown(out / "results.md", agg, command, configs)
        write_plots(out, results, labels, agg)
    except ValueError as e:
        print(f"fastkd.study: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"fastkd.study: {e}; or run the same study command again", file=sys.stderr)
        return 128 + e.signum
    print(f"fastkd.study: {len(study)} runs; results in {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
