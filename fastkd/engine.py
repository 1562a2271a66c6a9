"""The training loop: schedule × batch source × step functions, with evaluation, metrics, trace and outputs.

Read one run top to bottom in `train`: build the roles, walk the schedule, regenerate each step's batch from its
identity (never from a buffer), run the step, and record.
"""
import json
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .checkpoint import CHECKPOINT, save_atomic
from .config import Config
from .data import make_batches
from .distributed import (SINGLE_PROCESS, World, all_sum, any_rank, broadcast_module, fingerprint, gather_batch,
                          gather_objects, join, leave, sync_buffers, wrap)
from .models import build_model
from .models.zoo import MultiExitNet
from .optim import init_momentum, lr_at, make_sgd, set_lr
from .progress import Progress
from .schedule import SELF_METHODS, Step, steps
from .steps import MAX_TERMS, TERM_NAMES, LossSettings, StepFunctions


@dataclass
class Role:
    """A network that trains: its model, its optimizer, and where it stands in its own lr schedule.

    `stepper` is what its steps call: the model itself, or its DistributedDataParallel wrapper.
    """
    name: str
    model: nn.Module
    optimizer: torch.optim.SGD
    total_steps: int
    stepper: nn.Module
    steps_done: int = 0


class RunningMean:
    """Losses summed on the device (no host sync per step), read once per epoch record."""

    def __init__(self, device):
        self.total, self.count = torch.zeros((), device=device), 0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss
        self.count += 1

    def read_and_reset(self, world: World) -> float:
        """The mean over this role's steps since the last read, and over the ranks."""
        mean = float(all_sum(self.total.clone(), world)) / world.size / max(1, self.count)
        self.total.zero_()
        self.count = 0
        return mean


def resolve_device(name: str) -> torch.device:
    return SINGLE_PROCESS.device(name)


def _make_role(name, model, cfg: Config, total_steps: int, device, world: World) -> Role:
    model = model.to(device)
    optimizer = make_sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    init_momentum(optimizer)
    if world.launched and cfg.compile:
        # A compiled step averages its own gradients in its graph (see fastkd.distributed); no DDP hooks.
        broadcast_module(model, world)
        optimizer.average_over_ranks = True
        stepper = model
    else:
        stepper = wrap(model, world, device, find_unused=cfg.method in SELF_METHODS)
    return Role(name, model, optimizer, total_steps, stepper)


def build_roles(cfg: Config, info, device, plan: list[Step], world: World = SINGLE_PROCESS) -> dict[str, Role]:
    """Teacher and student for two-network methods, the student alone for baseline, one net for self methods.

    Models are initialised in a fixed order from the run seed, so the same seed gives the same weights. Each lr
    schedule spans the optimizer's own number of steps in the plan.
    """
    torch.manual_seed(cfg.seed)
    if cfg.method in SELF_METHODS:
        net = build_model(cfg.student, info, multi_exit=True)
        # Both roles of a self method are the same network, with one optimizer and one schedule over all steps.
        shared = _make_role("self", net, cfg, len(plan), device, world)
        return {"self": shared, "teacher": shared}
    counts = Counter(step.role for step in plan)
    roles = {}
    if cfg.method != "baseline":
        roles["teacher"] = _make_role("teacher", build_model(cfg.teacher, info), cfg, counts["teacher"], device,
                                      world)
    roles["student"] = _make_role("student", build_model(cfg.student, info), cfg, counts["student"], device, world)
    return roles


@torch.no_grad()
def evaluate(model: nn.Module, batches, batch_size: int, world: World = SINGLE_PROCESS) -> dict:
    """Top-1 and top-5 (%) on every test sample; for a multi-exit net, the deepest head plus every head's top-1.

    Under data parallelism each rank evaluates every size-th test batch with rank 0's BatchNorm statistics, and the
    counts are summed over the ranks.
    """
    sync_buffers(model, world)
    was_training = model.training
    model.eval()
    heads = len(model.heads) if isinstance(model, MultiExitNet) else 0
    # correct top-1, correct top-5, samples, then each head's correct top-1
    counts = torch.zeros(3 + heads, dtype=torch.int64, device=next(model.parameters()).device)
    for i, (x, y) in enumerate(batches.test_batches(batch_size)):
        if i % world.size != world.rank:
            continue
        out = model(x)
        logits = out[0][-1] if heads else out
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts[0] += (top[:, 0] == y).sum()
        counts[1] += (top == y[:, None]).any(dim=1).sum()
        counts[2] += len(y)
        if heads:
            counts[3:] += torch.stack([(h.argmax(1) == y).sum() for h in out[0]])
    model.train(was_training)
    correct1, correct5, total, *heads_correct = all_sum(counts, world).tolist()
    result = {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}
    if heads:
        result["heads_top1"] = [round(100.0 * c / total, 2) for c in heads_correct]
    return result


class RunDirectory:
    """--out: config.json, metrics.jsonl and the final state dicts; written by rank 0 alone (`writer`)."""

    def __init__(self, path: Path, truncate_metrics_to: Optional[int] = None, writer: bool = True):
        self.path, self.writer, self.metrics = path, writer, None
        if not writer:
            return
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"--out {path} is not writable: {e.strerror or e}") from None
        self.metrics = open(path / "metrics.jsonl", "a")
        if truncate_metrics_to is not None:  # resuming: drop records written after the checkpoint
            self.metrics.truncate(truncate_metrics_to)
            self.metrics.seek(0, os.SEEK_END)

    def write_config(self, cfg: Config, info) -> None:
        if not self.writer:
            return
        record = {**cfg.to_dict(), "dataset_info": info.to_dict()}
        (self.path / "config.json").write_text(json.dumps(record, indent=2) + "\n")

    def log(self, record: dict) -> None:
        if not self.writer:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def save_model(self, name: str, model: nn.Module) -> None:
        if self.writer:
            save_atomic(model.state_dict(), self.path / f"{name}.pt")

    def close(self) -> None:
        if self.writer:
            self.metrics.close()


class Trace:
    """--trace: one JSON line per optimizer step, exactly as the schedule ran it."""

    def __init__(self, path: Optional[str], truncate_to: Optional[int] = None):
        if path and truncate_to is not None and Path(path).exists():  # resuming: continue after the checkpoint
            self.file = open(path, "a")
            self.file.truncate(truncate_to)
            self.file.seek(0, os.SEEK_END)
        else:
            self.file = open(path, "w") if path else None

    def write(self, step: Step, batches_per_epoch: int, samples: torch.Tensor) -> None:
        if self.file is None:
            return
        epoch, position = divmod(step.batch, batches_per_epoch)
        self.file.write(json.dumps({"role": step.role, "epoch": epoch, "position": position,
                                    "samples": samples.tolist(), "teacher_version": step.teacher_version}) + "\n")

    def close(self) -> None:
        if self.file:
            self.file.close()


def train(cfg: Config, out_dir: Path, trace_path: Optional[str] = None, quiet: bool = False,
          resume: Optional[dict] = None, save_every: Optional[int] = None) -> dict:
    """Run `cfg` into `out_dir`; under torchrun, as one data-parallel rank of the run."""
    world, device = join(cfg.device)
    try:
        return _train(cfg, world, device, out_dir, trace_path, quiet, resume, save_every)
    finally:
        leave(world)


def _train(cfg: Config, world: World, device: torch.device, out_dir: Path, trace_path: Optional[str], quiet: bool,
           resume: Optional[dict], save_every: Optional[int]) -> dict:
    # Each rank draws its contiguous share of every global batch of cfg.batch_size samples.
    batches = make_batches(cfg.dataset, cfg.data_dir, cfg.loader, cfg.batch_size, cfg.seed, device,
                           cfg.train_subset, shard_id=world.rank, num_shards=world.size)
    info = batches.info
    per_epoch = batches.batches_per_epoch
    plan = list(steps(cfg.method, cfg.epochs, per_epoch, cfg.resolved_interval(),
                      replay_leftover=not cfg.no_final_replay))
    run_dir = RunDirectory(out_dir, truncate_metrics_to=resume["metrics_bytes"] if resume else None,
                           writer=world.is_main)
    run_dir.write_config(cfg, info)
    trace = Trace(trace_path if world.is_main else None, truncate_to=resume.get("trace_bytes") if resume else None)

    roles = build_roles(cfg, info, device, plan, world)
    fns = StepFunctions(LossSettings(cfg.temperature, cfg.alpha, cfg.beta, cfg.kl_on_probabilities), cfg.compile,
                        device)
    if cfg.compile and world.is_main:
        print("fastkd: --compile: each step compiled whole with inductor; "
              + ("captured in CUDA graphs." if fns.cuda_graphs else "CUDA graphs skipped (not on a CUDA device)."))

    losses = {name: RunningMean(device) for name in {step.role for step in plan}}
    accuracy, images, first = {}, 0, 0
    if resume:
        first, images, accuracy = _restore(resume, roles, losses)
    progress = Progress(len(plan)) if not quiet and world.is_main else None
    window_images, start = 0, time.perf_counter()
    window_start = start
    # Every batch is (re)generated from its identity, in plan order; consecutive steps on one batch (online KD)
    # share it. No image is ever stored for a later replay.
    identities = [divmod(plan[i].batch, per_epoch) for i in range(first, len(plan))
                  if i == first or plan[i - 1].batch != plan[i].batch]
    stream = batches.stream(identities)
    batch, live_logits = None, None
    guard = NonFiniteGuard(device)
    with StopSignals() as stop:
        for done, step in enumerate(plan[first:], first + 1):
            epoch, position = divmod(step.batch, per_epoch)
            if batch is None or (batch.epoch, batch.position) != (epoch, position):
                batch = next(stream)
            role = roles[step.role]
            loss, terms, live_logits = _run_step(step, role, roles, fns, batch, live_logits, cfg)
            losses[step.role].add(loss)
            images += cfg.batch_size
            window_images += cfg.batch_size
            if trace_path:  # the global batch: every rank's share, gathered (a collective, so on every rank)
                trace.write(step, per_epoch, gather_batch(batch.indices, world))
            if progress:
                progress.update(done, f"{step.role} epoch {epoch}")
            if (step.batch + 1) % per_epoch == 0:  # this role finished an epoch's last batch
                now = time.perf_counter()
                record = _epoch_record(step, role, losses[step.role].read_and_reset(world), cfg, batches, accuracy,
                                       window_images / (now - window_start), world)
                run_dir.log(record)
                if progress:
                    progress.note(done, _describe(record))
                window_images, window_start = 0, time.perf_counter()  # evaluation time stays out of images/s
            guard.watch(loss, terms, done)
            # A signal stops a single process at the next step; the ranks of a data-parallel run agree on it at the
            # next regular checkpoint (epoch end, replay boundary, --save-every), where they meet anyway.
            if _checkpoint_due(plan, done, per_epoch, save_every, forced=bool(stop.signum) and not world.launched):
                stop_signum = any_rank(stop.signum, world)
                guard.check(plan, world)  # never checkpoint weights that a non-finite loss has already touched
                # Every rank takes rank 0's BatchNorm statistics here, at each epoch end and replay boundary: the
                # teacher's replay targets are then the same on all ranks, and a resumed run continues exactly.
                for role in {role.name: role for role in roles.values()}.values():  # self methods: one net
                    sync_buffers(role.model, world)
                snapshot = _snapshot(cfg, done, roles, losses, accuracy, images, run_dir, trace, world)
                if world.is_main:
                    save_atomic(snapshot, run_dir.path / CHECKPOINT)
                if stop_signum:
                    raise Interrupted(stop_signum, done, run_dir.path)
    if progress:
        progress.close()
    wall = time.perf_counter() - start
    trace.close()

    final = _final_accuracies(cfg, roles, batches, world)
    nets = {"student": roles["self"].model} if cfg.method in SELF_METHODS else {n: r.model for n, r in roles.items()}
    for name, model in nets.items():
        run_dir.save_model(name, model)
    summary = {**final, "wall_s": round(wall, 2), "images_per_s": round(images / wall, 1),
               "steps": len(plan)}
    if world.launched:
        summary["ranks"] = world.size
        summary["rank_fingerprints"] = {name: gather_objects(fingerprint(model), world) for name, model in nets.items()}
    run_dir.log({"summary": summary})
    run_dir.close()
    diverged = [name for name, prints in summary.get("rank_fingerprints", {}).items() if len(set(prints)) > 1]
    if diverged:
        raise ValueError(f"the data-parallel ranks ended with different weights for {', '.join(diverged)} "
                         f"(fingerprints in {run_dir.path / 'metrics.jsonl'}): a fastkd bug, please report it")
    return summary


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run saved a checkpoint at the next step boundary and stops."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved, continue "
                         f"with --resume {run_dir}")
        self.signum = signum


class StopSignals:
    """Turns SIGINT/SIGTERM into a request that the loop honours at the next step boundary."""

    def __enter__(self):
        self.signum = 0
        self._previous = {s: signal.signal(s, self._request) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _request(self, signum, _frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class NonFiniteGuard:
    """Remembers on the device the first step whose loss was not finite: no host sync per step."""

    def __init__(self, device):
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.terms = torch.zeros(MAX_TERMS, device=device)

    def watch(self, loss: torch.Tensor, terms: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step, self.first_bad)
        self.terms = torch.where(bad, terms, self.terms)

    def check(self, plan: list[Step], world: World = SINGLE_PROCESS) -> None:
        """Raise, on every rank, if any rank saw a non-finite loss: naming the step, the term and the rank."""
        step = int(self.first_bad)  # one host read, at checkpoint time
        problem = None
        if step >= 0:
            s = plan[step - 1]
            finite = torch.isfinite(self.terms).tolist()
            culprit = next((name for name, ok in zip(TERM_NAMES[s.kind], finite) if not ok), "the total")
            problem = (f"non-finite training loss at step {step} ({s.role} {s.kind} step on batch {s.batch}): "
                       f"{culprit} went non-finite")
        problems = [(rank, p) for rank, p in enumerate(gather_objects(problem, world)) if p]
        if problems:
            rank, problem = problems[0]
            where = f" (rank {rank})" if world.launched else ""
            raise ValueError(f"{problem}{where}; stopped, the last good checkpoint is kept")


def _checkpoint_due(plan: list[Step], done: int, per_epoch: int, save_every: Optional[int], forced: bool) -> bool:
    """At every epoch end and replay boundary (the role changes), every `save_every` steps, when `forced` (a stop
    signal), and at the end; never between an online teacher step and the student step that uses its logits."""
    if done == len(plan):
        return True
    step, following = plan[done - 1], plan[done]
    if following.kind == "distill_live":
        return False
    return (forced or (step.batch + 1) % per_epoch == 0 or following.role != step.role
            or bool(save_every and done % save_every == 0))


def _snapshot(cfg, done, roles, losses, accuracy, images, run_dir, trace, world: World) -> dict:
    """Everything needed to continue exactly: tensors, numbers and strings only (loadable with weights_only).

    Called on every rank (the running losses are averaged over the ranks); rank 0 saves it. Its weights and
    optimizer state stand for every rank's, which are identical.
    """
    nets = {role.name: role for role in roles.values()}  # self methods: one network under two roles
    mean_totals = {name: float(all_sum(m.total.clone(), world)) / world.size for name, m in losses.items()}
    return {"config": cfg.to_dict(), "done": done, "images": images, "accuracy": accuracy,
            "roles": {name: {"model": r.model.state_dict(), "optimizer": r.optimizer.state_dict(),
                             "steps_done": r.steps_done} for name, r in nets.items()},
            "losses": {name: [mean_totals[name], m.count] for name, m in losses.items()},
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "metrics_bytes": run_dir.metrics.tell() if run_dir.metrics else None,
            "trace_bytes": trace.file.tell() if trace.file else None}


def _restore(state: dict, roles: dict, losses: dict) -> tuple[int, int, dict]:
    for role in {role.name: role for role in roles.values()}.values():
        saved = state["roles"][role.name]
        role.model.load_state_dict(saved["model"])
        device_lrs = [group["lr"] for group in role.optimizer.param_groups]
        role.optimizer.load_state_dict(saved["optimizer"])
        for group, lr in zip(role.optimizer.param_groups, device_lrs):
            group["lr"] = lr.fill_(float(group["lr"]))  # keep the lr in its device tensor
        role.steps_done = saved["steps_done"]
    for name, (total, count) in state["losses"].items():
        losses[name].total.fill_(total)
        losses[name].count = count
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["done"], state["images"], state["accuracy"]


def _run_step(step: Step, role: Role, roles: dict, fns: StepFunctions, batch, live_logits, cfg: Config):
    """One optimizer step of `role` on `batch`; returns (loss, per-term values, a CE step's logits or None).

    Outputs are copied out of the step's (CUDA-graph) memory before another step can overwrite them.
    """
    set_lr(role.optimizer, lr_at(cfg.lr_schedule, cfg.lr, role.steps_done, role.total_steps))
    role.steps_done += 1
    model, opt, x, y = role.stepper, role.optimizer, batch.x, batch.y
    if step.kind == "ce":
        loss, terms, logits = fns("ce", model, opt, x, y)
        return loss.clone(), terms.clone(), logits.clone()
    if step.kind == "distill_live":  # online: the logits of the teacher's own forward on this batch
        loss, terms = fns("distill_live", model, opt, x, y, live_logits)
    elif step.kind == "distill":
        teacher = roles["teacher"].model  # a no-grad forward: never through DDP
        # Default: eval mode, BatchNorm running statistics untouched. Official quirk: train mode during replay.
        teacher.train(cfg.teacher_train_mode_replay)
        loss, terms = fns("distill", model, teacher, opt, x, y)
        teacher.train(True)
    else:  # advance, self_distill
        loss, terms = fns(step.kind, model, opt, x, y)
    return loss.clone(), terms.clone(), None


def _epoch_record(step: Step, role: Role, train_loss: float, cfg: Config, batches, accuracy: dict,
                  images_per_s: float, world: World) -> dict:
    accuracy[role.name] = evaluate(role.model, batches, cfg.eval_batch_size, world)
    record = {"role": step.role, "epoch": step.batch // batches.batches_per_epoch, "train_loss": round(train_loss, 5),
              "lr": float(role.optimizer.param_groups[0]["lr"]), "images_per_s": round(images_per_s, 1)}
    for name in ("teacher", "student", "self"):
        if name in accuracy:
            record[f"{name}_top1"] = round(accuracy[name]["top1"], 2)
            record[f"{name}_top5"] = round(accuracy[name]["top5"], 2)
            if "heads_top1" in accuracy[name]:
                record["heads_top1"] = accuracy[name]["heads_top1"]
    return record


def _final_accuracies(cfg: Config, roles: dict, batches, world: World) -> dict:
    if cfg.method in SELF_METHODS:
        result = evaluate(roles["self"].model, batches, cfg.eval_batch_size, world)
        return {"teacher_top1": None, "student_top1": round(result["top1"], 2),
                "student_top5": round(result["top5"], 2), "heads_top1": result["heads_top1"]}
    out = {"teacher_top1": None}
    for name in ("teacher", "student"):
        if name in roles:
            result = evaluate(roles[name].model, batches, cfg.eval_batch_size, world)
            out[f"{name}_top1"] = round(result["top1"], 2)
            out[f"{name}_top5"] = round(result["top5"], 2)
    return out


def _describe(record: dict) -> str:
    parts = [f"{record['role']} epoch {record['epoch']}: loss {record['train_loss']:.4f}"]
    for name in ("teacher", "student", "self"):
        if f"{name}_top1" in record:
            parts.append(f"{name} top-1 {record[f'{name}_top1']:.2f}%")
    parts.append(f"{record['images_per_s']:.0f} img/s")
    return ", ".join(parts)
