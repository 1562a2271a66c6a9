"""What the study measures of each finished run: its final student's accuracy curve, and the flatness of its
training loss (Hessian trace, sharpness, a 1-D loss profile) on a fixed set of training samples."""
import json
from pathlib import Path

import torch

from ..analysis import hutchinson_trace, loss_profile, random_direction, save_profile, sharpness, training_loss
from ..config import Config
from ..data import make_batches
from ..distributed import SINGLE_PROCESS
from ..models import build_model
from ..schedule import SELF_METHODS
from .plan import StudyRun

PROFILE_POINTS = 21
RESULT = "result.json"  # what a run's measurement writes into its folder
RESULT_VERSION = 2  # a run's result.json of another version is analysed again (its training is kept)

ANALYSIS_CHUNK = 256


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
