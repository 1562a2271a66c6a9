"""python -m fastkd.study: every method under every seed with one budget, then accuracy and flatness compared.

Runs go to <out>/runs/<method>-seed<k>/ (ordinary fastkd run folders). Started again with the same --out, the study
skips finished runs, continues interrupted ones from their checkpoints, and refuses a folder whose runs were made
with other settings. It writes results.md, results.json, curves.png and flatness.png into --out.
"""
import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from .analysis import (hutchinson_trace, loss_profile, mean_std, paired_difference, random_direction, save_profile,
                       sharpness, training_loss)
from .analysis.plot import BarChart, Line, LineChart, save_figure
from .checkpoint import CHECKPOINT, load_checkpoint
from .config import Config, validate, with_legacy_settings
from .data import make_batches
from .api import fit
from .distributed import SINGLE_PROCESS
from .engine import Interrupted
from .models import build_model
from .schedule import METHODS, SELF_METHODS, TEACHER_METHODS
from .updates import FEATURE_LOSSES

DEFAULTS = Config()
# (a, b): report a − b paired by seed, when both methods are in the study.
PAIRS = (("spaced", "online"), ("spaced-self", "self"), ("spaced", "baseline"), ("online", "baseline"))
PROFILE_POINTS = 21
RESULT = "result.json"
RESULT_VERSION = 2  # a run's result.json of another version is analysed again (its training is kept)
ANALYSIS_CHUNK = 256


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"fastkd.study: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fastkd.study", description=__doc__.splitlines()[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--methods", default="baseline,online,spaced,self,spaced-self", help="comma-separated methods to compare")
    a("--seeds", type=int, default=5, help="seeds per method (seed k sets initialisation, data subset, order)")
    a("--first-seed", type=int, default=0, help="seeds run from this one upwards")
    a("--out", required=True, help="study folder; run the same command again to resume")
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
    t("--feature-loss", choices=("none", *FEATURE_LOSSES), default=None,
      help="the two-network methods' feature term (default: dist for online, spaced and offline)")
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


def run_configs(args) -> list[Config]:
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
    # An explicit feature term is the two-network methods'; the others run without one (their own "none").
    configs = [Config(method=m, seed=args.first_seed + k, **shared,
                      feature_loss=args.feature_loss if m in TEACHER_METHODS else None).resolve_defaults()
               for k in range(args.seeds) for m in methods]
    for cfg in configs:
        validate(cfg)
    return configs


def run_name(cfg: Config) -> str:
    return f"{cfg.method}-seed{cfg.seed}"


def _trained(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return False
    lines = metrics.read_text().strip().splitlines()
    return bool(lines) and "summary" in json.loads(lines[-1])


def _check_same(run_dir: Path, saved: dict, cfg: Config) -> None:
    saved = with_legacy_settings(saved)
    differing = sorted(k for k, v in cfg.to_dict().items() if saved.get(k) != v)
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


def analyse_run(cfg: Config, run_dir: Path, args) -> dict:
    device = SINGLE_PROCESS.device(cfg.device)
    batches, info = analysis_batches(cfg, device, args.analysis_samples)
    student = build_model(cfg.student, info, multi_exit=cfg.method in SELF_METHODS).to(device)
    student.load_state_dict(torch.load(run_dir / "student.pt", map_location=device, weights_only=True))
    trace = hutchinson_trace(student, batches, probes=args.hessian_probes, seed=cfg.seed)
    sharp = sharpness(student, batches, radius=args.sharpness_radius, draws=args.sharpness_draws, seed=cfg.seed)
    steps = [args.profile_radius * (2 * i / (PROFILE_POINTS - 1) - 1) for i in range(PROFILE_POINTS)]
    direction = random_direction(student, torch.Generator().manual_seed(cfg.seed))
    profile = loss_profile(student, batches, steps, direction=direction)
    save_profile(run_dir / "profile", steps, {run_name(cfg): profile}, "Training loss along a random direction")
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


def aggregate(results: list[dict], methods: list[str]) -> dict:
    by_method = {m: sorted((r for r in results if r["method"] == m), key=lambda r: r["seed"]) for m in methods}
    summary = {}
    for m, runs in by_method.items():
        entry = {"seeds": [r["seed"] for r in runs]}
        for key, value in (("student_top1", lambda r: r["student_top1"]),
                           ("teacher_top1", lambda r: r["teacher_top1"]),
                           ("train_loss", lambda r: r["train_loss"]),
                           ("hessian_trace", lambda r: r["hessian_trace"]["mean"]),
                           ("sharpness", lambda r: r["sharpness"]["mean"])):
            values = [value(r) for r in runs]
            if values and None not in values:
                entry[key] = dict(zip(("mean", "std"), mean_std(values)), values=values)
        summary[m] = entry
    pairs = {}
    for a, b in PAIRS:
        if a in by_method and b in by_method and len(by_method[a]) >= 2:
            pairs[f"{a} − {b}"] = {
                key: paired_difference([value(r) for r in by_method[a]], [value(r) for r in by_method[b]]).to_dict()
                for key, value in (("student_top1", lambda r: r["student_top1"]),
                                   ("hessian_trace", lambda r: r["hessian_trace"]["mean"]))}
    return {"methods": summary, "paired": pairs}


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
    path.write_text("\n".join(lines) + "\n")


def _feature_text(configs: list[Config]) -> str:
    two_network = {cfg.feature_loss for cfg in configs if cfg.method in TEACHER_METHODS}
    return f", feature term {'/'.join(sorted(two_network))} (two-network methods)" if two_network else ""


def write_plots(out: Path, results: list[dict], methods: list[str]) -> None:
    curves, profiles, bars = [], [], {"hessian_trace": ([], []), "sharpness": ([], [])}
    for m in methods:
        runs = [r for r in results if r["method"] == m]
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
    labels = [m for m in methods if any(r["method"] == m for r in results)]
    seeds = sorted({len([r for r in results if r["method"] == m]) for m in labels})
    over = f"{'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''}"
    save_figure(out / "curves.png", [LineChart(f"Student test top-1 (mean ± std over {over})", "student epoch",
                                               "top-1 (%)", curves)])
    save_figure(out / "flatness.png", [
        BarChart(f"Hessian trace of the training loss (mean ± std, {over})", "tr(H) (loss units)", labels,
                 *bars["hessian_trace"]),
        BarChart(f"Sharpness (mean ± std, {over})", "loss increase (loss units)", labels, *bars["sharpness"]),
        LineChart(f"Loss along a random direction (mean, {over})", "t (step along the direction, relative)",
                  "training loss (cross-entropy)", profiles)])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = "python -m fastkd.study " + " ".join(argv)
    try:
        configs = run_configs(args)
        out = Path(args.out)
        (out / "runs").mkdir(parents=True, exist_ok=True)
        start, results, durations = time.perf_counter(), [], []
        for i, cfg in enumerate(configs, 1):
            run_start = time.perf_counter()
            run_dir = out / "runs" / run_name(cfg)
            result_path = run_dir / RESULT
            result = json.loads(result_path.read_text()) if result_path.is_file() else None
            if result is not None and result.get("version") == RESULT_VERSION \
                    and result["analysis"] == analysis_settings(args):
                _check_same(run_dir, json.loads((run_dir / "config.json").read_text()), cfg)
                what = "done earlier, skipped"
            else:
                what = train_run(cfg, run_dir)
                result = analyse_run(cfg, run_dir, args)
                result_path.write_text(json.dumps(result) + "\n")
                durations.append(time.perf_counter() - run_start)
            results.append(result)
            elapsed = time.perf_counter() - start
            left = f", about {sum(durations) / len(durations) * (len(configs) - i) / 60:.0f} min left" \
                if durations and i < len(configs) else ""
            print(f"[{i}/{len(configs)}] {run_name(cfg)}: {what}; student top-1 {result['student_top1']:.2f}%, "
                  f"Hessian trace {result['hessian_trace']['mean']:.1f} ± {result['hessian_trace']['stderr']:.1f}, "
                  f"sharpness {result['sharpness']['mean']:.4f} | {elapsed / 60:.1f} min{left}", flush=True)
        methods = list(dict.fromkeys(cfg.method for cfg in configs))
        agg = aggregate(results, methods)
        (out / "results.json").write_text(json.dumps({"command": command, "aggregate": agg, "runs": results},
                                                     indent=1) + "\n")
        write_markdown(out / "results.md", agg, command, configs)
        write_plots(out, results, methods)
    except ValueError as e:
        print(f"fastkd.study: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"fastkd.study: {e}; or run the same study command again", file=sys.stderr)
        return 128 + e.signum
    print(f"fastkd.study: {len(configs)} runs; results in {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
