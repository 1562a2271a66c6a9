"""A study's numbers over seeds: mean ± std per label, differences paired by seed with their t-intervals, and the
interval curves of the spaced methods against their unspaced counterparts."""
from ..analysis import mean_std, paired_difference
from .plan import EQUAL_STEPS, OFFICIAL, UNSPACED, StudyRun

# (a, b): report a − b paired by seed, when both methods are in the study.
PAIRS = (("spaced", "online"), ("spaced-self", "self"), ("spaced", "baseline"), ("online", "baseline"))


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
