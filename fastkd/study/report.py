"""A study's results.md (the tables) and its figures (curves.png, flatness.png, interval_curve.png)."""
import math
from pathlib import Path

from ..analysis import mean_std
from ..analysis.plot import BarChart, Line, LineChart, save_figure
from ..config import Config
from ..schedule import TEACHER_METHODS


def _fmt(mean: float, std: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_markdown(path: Path, agg: dict, command: str, configs: list[Config],
                   results: list[dict]) -> None:
    """`results`: every run's, with the feature term it ran (fastkd.study.runs.run_study)."""
    cfg = configs[0]
    lines = [
        "# fastkd study", "",
        f"Command: `{command}`", "",
        f"Dataset {cfg.dataset}" + (f" ({cfg.train_subset} training samples per seed)" if cfg.train_subset else "")
        + f", {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr} {cfg.lr_schedule}, teacher {cfg.teacher}, "
          f"student {cfg.student}, T={cfg.temperature}, α={cfg.alpha}, β={cfg.beta}{_feature_text(results)}.", "",
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


def _feature_text(results: list[dict]) -> str:
    """The feature term each two-network run trained with (what `auto` resolved to), by label where they differ."""
    labels_by_term = {}
    for r in results:
        if r["method"] in TEACHER_METHODS:
            labels_by_term.setdefault(r["feature_term"], []).append(r["label"])
    if len(labels_by_term) == 1:
        return f", feature term {next(iter(labels_by_term))} (two-network methods)"
    return "".join(f"{', feature term' if i == 0 else ';'} {term} ({', '.join(dict.fromkeys(labels))})"
                   for i, (term, labels) in enumerate(sorted(labels_by_term.items())))


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
