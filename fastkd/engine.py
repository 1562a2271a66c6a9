"""The training loop: the schedule × the batch source × the step functions.

`train` reads top to bottom as the paper's method: walk the planned steps in order; regenerate each step's batch from
its identity (never from a buffer); run that role's update; record the loss; at an epoch's end evaluate and log; at
each epoch end and replay boundary checkpoint. Around it, in their own modules: what is written
(`fastkd.outputs`), when and what is checkpointed (`fastkd.checkpoint`), and data parallelism
(`fastkd.distributed.DataParallelRanks`, passed in; the single process is its trivial case).
"""
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from . import checkpoint
from .config import Config
from .distributed import SINGLE_PROCESS, DataParallelRanks, fingerprint
from .models.features import feature_taps
from .optim import init_momentum, make_sgd
from .outputs import Progress, RunDirectory, Trace, describe, epoch_record
from .precision import AUTOCAST_DTYPES, autocast
from .schedule import SELF_METHODS, Step, plan_steps
from .step_functions import LossSettings, StepFunctions
from .step_records import LabelGuard, LrSchedule, NonFiniteGuard, RunningMean, StepRecorder
from .step_terms import CE, DISTILL_LIVE, REPLAY


def train(cfg: Config, batches, models: dict[str, nn.Module], out_dir: Path, device: torch.device,
          parallel: DataParallelRanks = SINGLE_PROCESS, trace_path: Optional[str] = None, quiet: bool = False,
          resume: Optional[dict] = None, save_every: Optional[int] = None, check_replay: bool = False,
          tensorboard: Optional[Path] = None, feature_term: Optional[str] = None) -> dict:
    """Train `models` ({"teacher", "student"}, or {"student"} for baseline and self methods) on `batches` as `cfg`
    says, into `out_dir`; returns the run's summary. `resume`: a checkpoint to continue from exactly.
    `feature_term`: the feature loss that runs where cfg.feature_loss is auto (fastkd.models.features.feature_term);
    None: cfg.feature_loss itself."""
    feature_term = feature_term or cfg.feature_loss
    if feature_term == "auto":
        raise ValueError("engine.train needs the feature term that --feature-loss auto resolved to (feature_term=)")
    per_epoch = batches.batches_per_epoch
    plan = list(plan_steps(cfg.method, cfg.epochs, per_epoch, cfg.resolved_interval(),
                           replay_leftover=not cfg.no_final_replay, train_teacher=not cfg.teacher_frozen()))
    run_dir = RunDirectory(out_dir, truncate_metrics_to=resume["metrics_bytes"] if resume else None,
                           writer=parallel.is_main, tensorboard=tensorboard)
    run_dir.write_config(cfg.to_dict(), batches.info, feature_term)
    trace = Trace(trace_path if parallel.is_main else None, truncate_to=resume.get("trace_bytes") if resume else None)
    parallel = parallel.for_steps(cfg.compile)
    roles = build_roles(cfg, models, plan, device, parallel)
    loss_settings = LossSettings(cfg.temperature, cfg.alpha, cfg.beta, cfg.kl_on_probabilities, feature_term,
                                 cfg.divergence, cfg.resolved_jsd_beta())
    step_functions = StepFunctions(loss_settings, cfg.compile, device, parallel=parallel, precision=cfg.precision)
    test_forward = TestForward(AUTOCAST_DTYPES[cfg.precision], cfg.compile)
    if cfg.compile and parallel.is_main:
        print("fastkd: --compile: each step compiled whole with inductor; "
              + ("captured in CUDA graphs." if step_functions.cuda_graphs
                 else "CUDA graphs skipped (not on a CUDA device)."))

    networks = {name: role.model for name, role in _networks(roles).items()}
    # The feature taps stay on until the last evaluation: a compiled evaluation guards on the hooks.
    with StopSignals() as stop, feature_taps(networks, on=feature_term != "none") as taps:
        losses = {name: RunningMean(device) for name in {step.role for step in plan}}
        accuracy, images, first = {}, 0, 0
        if resume:
            first, images, accuracy = _restore(resume, roles, losses)
        elif cfg.teacher_frozen():  # evaluated once: it never changes
            accuracy["teacher"] = evaluate(roles["teacher"].model, batches, cfg.eval_batch_size, parallel,
                                           test_forward)
        # The lr schedule, the loss totals and the guards (non-finite loss, label range) advance inside each step's
        # graph.
        guard = NonFiniteGuard(device, steps_done=first)
        labels = LabelGuard(guard)
        recorders = {name: StepRecorder(roles[name].schedule, losses[name], guard, labels) for name in losses}
        progress = Progress(len(plan)) if not quiet and parallel.is_main else None
        window = Throughput()
        start, online_teacher = time.perf_counter(), None
        for done, (step, batch) in enumerate(batches_along(plan, first, batches, check_replay), first + 1):
            role = roles[step.role]
            online_teacher = run_step(step, role, roles, step_functions, batch, online_teacher, cfg,
                                      recorders[step.role], taps)
            losses[step.role].count += 1
            images += cfg.batch_size
            window.add(cfg.batch_size)
            if trace_path:  # the global batch: every rank's share, gathered (a collective: on every rank)
                samples = parallel.gather_batch(batch.indices)
                if trace.file:
                    trace.write(step, per_epoch, samples)
            if progress:
                progress.update(done, f"{step.role} epoch {step.batch // per_epoch}")

            if (step.batch + 1) % per_epoch == 0:  # this role finished an epoch's last batch
                images_per_s = window.rate()
                accuracy[role.name] = evaluate(role.model, batches, cfg.eval_batch_size, parallel, test_forward)
                record = epoch_record(step, step.batch // per_epoch, losses[step.role].read_and_reset(parallel),
                                      float(role.optimizer.param_groups[0]["lr"]), images_per_s, accuracy)
                run_dir.log(record)
                if progress:
                    progress.note(done, describe(record))
                window.restart()  # evaluation time stays out of images/s

            # A signal stops a single process at the next step; the ranks of a data-parallel run agree on it at the
            # next regular checkpoint (epoch end, replay boundary, --save-every), where they meet anyway.
            if checkpoint.checkpoint_due(plan, done, per_epoch, save_every,
                                         forced=bool(stop.signum) and not parallel.launched):
                stop_signum = parallel.any_rank(stop.signum)
                # Never checkpoint weights that a bad label or a non-finite loss has touched.
                labels.check(plan, per_epoch, parallel)
                guard.check(plan, parallel)
                _save_checkpoint(cfg, done, roles, losses, accuracy, images, run_dir, trace, parallel)
                if stop_signum:
                    raise Interrupted(stop_signum, done, run_dir.path)
        if progress:
            progress.close()
        wall = time.perf_counter() - start
        trace.close()
        return _finish(cfg, roles, batches, run_dir, parallel, wall, images, len(plan), test_forward, accuracy)


# ---- the networks that train ------------------------------------------------------------------------------------

@dataclass
class Role:
    """A network that trains: its model, its optimizer, and where it stands in its own lr schedule.

    `step_module` is what its steps call: the model itself, or its DistributedDataParallel wrapper. `steps_done`
    counts on the host what `schedule.steps` counts on the device (read by checkpoints without a sync).
    """
    name: str
    model: nn.Module
    optimizer: torch.optim.SGD
    step_module: nn.Module
    schedule: LrSchedule
    steps_done: int = 0


def build_roles(cfg: Config, models: dict, plan: list[Step], device, parallel: DataParallelRanks) -> dict[str, Role]:
    """Teacher and student for two-network methods, the student alone for baseline; for self methods the one
    network under both names, with one optimizer and one schedule over all steps. Each lr schedule spans its
    optimizer's own number of steps in the plan."""
    def role(name, model, total_steps):  # total_steps: the span of its lr schedule
        model = model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        optimizer = make_sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
        init_momentum(optimizer)
        step_module = parallel.wrap(model, device, find_unused=cfg.method in SELF_METHODS)
        schedule = LrSchedule(optimizer, cfg.lr_schedule, cfg.lr, total_steps, device)
        return Role(name, model, optimizer, step_module, schedule)

    if cfg.method in SELF_METHODS:
        shared = role("self", models["student"], len(plan))
        return {"self": shared, "teacher": shared}
    counts = Counter(step.role for step in plan)
    return {name: role(name, models[name], counts[name]) for name in ("teacher", "student") if name in models}


def _networks(roles: dict) -> dict[str, Role]:
    return {role.name: role for role in roles.values()}  # self methods: one network under two roles


# ---- one step ---------------------------------------------------------------------------------------------------

def batches_along(plan: list[Step], first: int, batches, check_replay: bool = False) -> Iterator[tuple[Step, object]]:
    """(step, batch) for every step of plan[first:]. Each batch is (re)generated from its identity, in plan order;
    consecutive steps on one batch (online KD) share it. No image is ever stored for a later replay, except the one
    batch that `check_replay` compares with its first replay."""
    per_epoch = batches.batches_per_epoch
    identities = [divmod(plan[i].batch, per_epoch) for i in range(first, len(plan))
                  if i == first or plan[i - 1].batch != plan[i].batch]
    stream = batches.stream(identities)
    if check_replay:
        stream = ReplayCheck(identities, batches.info.name).around(stream)
    batch = None
    for step in plan[first:]:
        if batch is None or (batch.epoch, batch.position) != divmod(step.batch, per_epoch):
            batch = next(stream)
        yield step, batch


class ReplayCheck:
    """Keeps a copy of the first batch that the plan replays and compares its replay with it, bit for bit."""

    def __init__(self, identities: list, dataset_name: str):
        seen, self.first_replayed = set(), None
        for identity in identities:
            if identity in seen:
                self.first_replayed = identity
                break
            seen.add(identity)
        self.dataset_name, self.kept = dataset_name, None

    def around(self, stream):
        for batch in stream:
            if (batch.epoch, batch.position) == self.first_replayed:
                if self.kept is None:
                    self.kept = (batch.x.clone(), batch.y.clone())
                elif not (torch.equal(self.kept[0], batch.x) and torch.equal(self.kept[1], batch.y)):
                    raise ValueError(
                        f"check_replay: the replay of batch (epoch {batch.epoch}, position {batch.position}) differs "
                        f"from the batch the teacher saw: {self.dataset_name} breaks the replay contract (draw "
                        f"randomness only from torch, random and numpy; carry no state between __getitem__ calls)")
            yield batch


def run_step(step: Step, role: Role, roles: dict, step_functions: StepFunctions, batch, online_teacher,
             cfg: Config, recorder: StepRecorder, taps: Optional[dict] = None):
    """One optimizer step of `role` on `batch`, its lr, loss and guard kept by `recorder` inside the step; returns an
    online teacher step's (logits, pooled features or None) for the student's next step, copied out of the step's
    CUDA-graph memory, or None. `taps`: the FeatureTaps by network, when a feature loss is on."""
    role.steps_done += 1
    model, opt, x, y = role.step_module, role.optimizer, batch.x, batch.y
    taps = taps or {}
    if step.kind == CE:
        online = cfg.method == "online"  # only online KD's next step reads the teacher's outputs
        _, _, logits, features = step_functions(CE, model, opt, x, y, recorder=recorder,
                                                tap=taps.get(role.name) if online else None)
        return (logits.clone(), features.clone() if features is not None else None) if online else None
    if step.kind == DISTILL_LIVE:  # online: the logits (and features) of the teacher's own forward on this batch
        step_functions(DISTILL_LIVE, model, opt, x, y, *online_teacher, recorder=recorder, tap=taps.get(role.name))
    elif step.kind == REPLAY:
        teacher = roles["teacher"].model  # a no-grad forward: never through DDP
        # Default: eval mode, BatchNorm running statistics untouched. Official quirk: train mode during replay.
        teacher.train(cfg.teacher_train_mode_replay)
        step_functions(REPLAY, model, teacher, opt, x, y, recorder=recorder, tap=taps.get(role.name),
                       teacher_tap=taps.get("teacher"))
        teacher.train(True)
    else:  # advance, self_distill
        step_functions(step.kind, model, opt, x, y, recorder=recorder)
    return None


# ---- what is measured -------------------------------------------------------------------------------------------

class Throughput:
    """Images per second since the last restart."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.images, self.start = 0, time.perf_counter()

    def add(self, images: int) -> None:
        self.images += images

    def rate(self) -> float:
        return self.images / max(1e-9, time.perf_counter() - self.start)


def _test_forward(model: nn.Module, x: torch.Tensor, amp: Optional[torch.dtype]):
    with autocast(amp, x.device.type):
        return model(x)


class TestForward:
    """The evaluation forward, in the run's precision; compiled with --compile (one graph for each model and test
    batch shape, so the full batch and the tail: none more across epochs)."""

    def __init__(self, amp: Optional[torch.dtype] = None, compile: bool = False):
        self.amp = amp
        self.forward = torch.compile(_test_forward, fullgraph=True, dynamic=False) if compile else _test_forward

    def __call__(self, model: nn.Module, x: torch.Tensor):
        return self.forward(model, x, self.amp)


@torch.no_grad()
def evaluate(model: nn.Module, batches, batch_size: int, parallel: DataParallelRanks = SINGLE_PROCESS,
             forward: Optional[TestForward] = None) -> dict:
    """Top-1 and top-5 (%) on every test sample; for a multi-exit net, the deepest head plus every head's top-1.

    Under data parallelism each rank evaluates every size-th test batch with rank 0's BatchNorm statistics, and the
    counts are summed over the ranks.
    """
    forward = TestForward() if forward is None else forward  # plain float32, uncompiled
    parallel.sync_buffers(model)
    was_training = model.training
    model.eval()
    counts = None  # correct top-1, correct top-5, samples, then each head's correct top-1
    for i, (x, y) in enumerate(batches.test_batches(batch_size)):
        if i % parallel.size != parallel.rank:
            continue
        out = forward(model, x)
        heads = out[0] if isinstance(out, (tuple, list)) else None
        logits = heads[-1] if heads is not None else out
        if counts is None:
            counts = torch.zeros(3 + (len(heads) if heads is not None else 0), dtype=torch.int64, device=x.device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts[0] += (top[:, 0] == y).sum()
        counts[1] += (top == y[:, None]).any(dim=1).sum()
        counts[2] += len(y)
        if heads is not None:
            counts[3:] += torch.stack([(h.argmax(1) == y).sum() for h in heads])
    model.train(was_training)
    # A rank may have had no test batch: it learns the count layout (how many heads) from the others.
    width = max(w for w in parallel.gather_objects(None if counts is None else len(counts)) if w)
    if counts is None:
        counts = torch.zeros(width, dtype=torch.int64, device=next(model.parameters()).device)
    correct1, correct5, total, *heads_correct = parallel.all_sum(counts).tolist()
    result = {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}
    if heads_correct:
        result["heads_top1"] = [round(100.0 * c / total, 2) for c in heads_correct]
    return result


# ---- stopping, saving and finishing ------------------------------------------------------------------------------

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


def _save_checkpoint(cfg, done, roles, losses, accuracy, images, run_dir, trace, parallel: DataParallelRanks) -> None:
    # Every rank takes rank 0's BatchNorm statistics here, at each epoch end and replay boundary: the teacher's
    # replay targets are then the same on all ranks, and a resumed run continues exactly.
    networks = _networks(roles)
    for role in networks.values():
        parallel.sync_buffers(role.model)
    state = checkpoint.snapshot(
        cfg.to_dict(), done, {name: (r.model, r.optimizer, r.steps_done) for name, r in networks.items()},
        {name: [m.rank_mean_total(parallel), m.count] for name, m in losses.items()}, accuracy, images,
        run_dir.position(), trace.position())
    if parallel.is_main:
        checkpoint.save_atomic(state, run_dir.path / checkpoint.CHECKPOINT)


def _restore(state: dict, roles: dict, losses: dict) -> tuple[int, int, dict]:
    for role in _networks(roles).values():
        role.steps_done = checkpoint.restore_network(state["roles"][role.name], role.model, role.optimizer)
        role.schedule.steps.fill_(role.steps_done)
    for name, (total, count) in state["losses"].items():
        losses[name].total.fill_(total)
        losses[name].count = count
    checkpoint.restore_rng(state)
    return state["done"], state["images"], state["accuracy"]


def _finish(cfg, roles, batches, run_dir, parallel: DataParallelRanks, wall: float, images: int, steps: int,
            test_forward: TestForward, accuracy: dict) -> dict:
    """Final evaluation, saved weights and the summary (the last metrics.jsonl line)."""
    nets = ({"student": roles["self"].model} if cfg.method in SELF_METHODS
            else {name: role.model for name, role in _networks(roles).items()})
    summary = {"teacher_top1": None}
    for name, model in nets.items():
        frozen = name == "teacher" and cfg.teacher_frozen()
        result = accuracy["teacher"] if frozen else evaluate(model, batches, cfg.eval_batch_size, parallel,
                                                              test_forward)
        summary[f"{name}_top1"], summary[f"{name}_top5"] = round(result["top1"], 2), round(result["top5"], 2)
        if "heads_top1" in result:
            summary["heads_top1"] = result["heads_top1"]
        run_dir.save_model(name, model)
    summary.update({"wall_s": round(wall, 2), "images_per_s": round(images / wall, 1), "steps": steps})
    if parallel.launched:
        summary["ranks"] = parallel.size
        summary["rank_fingerprints"] = {name: parallel.gather_objects(fingerprint(m)) for name, m in nets.items()}
    run_dir.log({"summary": summary})
    run_dir.close()
    diverged = [name for name, prints in summary.get("rank_fingerprints", {}).items() if len(set(prints)) > 1]
    if diverged:
        raise ValueError(f"the data-parallel ranks ended with different weights for {', '.join(diverged)} "
                         f"(fingerprints in {run_dir.path / 'metrics.jsonl'}): a fastkd bug, please report it")
    return summary
