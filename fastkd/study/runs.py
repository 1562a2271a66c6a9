"""Running a study's runs: each trained (or its training finished) in its own run folder, then measured; a run
trained and measured earlier with the same settings is skipped, one trained with other settings refused."""
import json
import shutil
import time
from pathlib import Path

from ..api import fit, named_feature_term
from ..checkpoint import CHECKPOINT, load_checkpoint
from ..config import Config, differing_settings, with_legacy_settings
from ..data import DatasetInfo
from .aggregate import run_fields
from .measure import RESULT, RESULT_VERSION, analyse_run, analysis_settings
from .plan import StudyRun


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



def run_study(study: list[StudyRun], out: Path, args) -> list[dict]:
    """Every run's result (its result.json, with what identifies the run and the feature term it ran), in order;
    one progress line per run."""
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
        result = {**result, **run_fields(run), "feature_term": feature_term_run(run_dir)}
        results.append(result)
        elapsed = time.perf_counter() - start
        left = f", about {sum(durations) / len(durations) * (len(study) - i) / 60:.0f} min left" \
            if durations and i < len(study) else ""
        print(f"[{i}/{len(study)}] {run.name}: {what}; student top-1 {result['student_top1']:.2f}%, "
              f"Hessian trace {result['hessian_trace']['mean']:.1f} ± {result['hessian_trace']['stderr']:.1f}, "
              f"sharpness {result['sharpness']['mean']:.4f} | {elapsed / 60:.1f} min{left}", flush=True)
    return results


def feature_term_run(run_dir: Path) -> str:
    """The two-network feature term the run trained with, from its config.json: what `auto` resolved to (runs
    saved before config.json recorded it ran their feature_loss as saved)."""
    saved = with_legacy_settings(json.loads((run_dir / "config.json").read_text()))
    return saved.get("feature_term", saved["feature_loss"])
