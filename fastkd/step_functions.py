"""The training updates, one function per step kind: pure functions of (models, optimizer, batch) with static
shapes, the optimizer update inside and no host sync, so that each compiles whole and captures into a CUDA graph.

Every soft-target loss goes through `fastkd.kernels.kd_loss`, except the official code's KL-on-probabilities
quirk, which is reproduced as written there. With a feature loss on, the two-network steps also compare the
student's pooled penultimate feature with the teacher's, both read by `FeatureTap`s from the forwards that give
the logits.
"""
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastkd.kernels.kd_loss import kd_loss

from .compiled_copy import own_code
from .distributed import SINGLE_PROCESS, DataParallelRanks
from .models.features import FeatureTap
from .optim import sgd_update
from .precision import AUTOCAST_DTYPES, autocast
from .step_terms import ADVANCE, CE, DISTILL_LIVE, MAX_TERMS, REPLAY, SELF_DISTILL

if TYPE_CHECKING:  # for the annotations only
    from .step_records import StepRecorder


@dataclass(frozen=True)
class LossSettings:
    temperature: float
    alpha: float  # weight of the soft (KL) term; 1 − α weighs the hard-label cross-entropy
    beta: float  # weight of the feature loss: the self-distillation one, or the two-network one below
    kl_on_probabilities: bool = False  # official-code quirk: KLDivLoss(softmax(s/T), softmax(t/T)), no T²
    feature_loss: str = "none"  # two-network methods: a FEATURE_LOSSES name, or "none"
    divergence: str = "forward_kl"  # the soft term's: a DIVERGENCES name
    jsd_beta: float = 0.5  # jsd's β (the others ignore it)


def soft_loss(student_logits: Tensor, teacher_logits: Tensor, y: Tensor, cfg: LossSettings) -> Tensor:
    """α·T²·D + (1−α)·CE from the fused kernel, D the divergence of `cfg` (forward KL(p_t ‖ p_s) by default); or the
    official code's variant under its quirk."""
    if cfg.kl_on_probabilities:
        t = cfg.temperature
        # Probabilities passed where log-probabilities belong, no T², and KLDivLoss's default elementwise mean
        # (over N·C, written out to avoid its deprecation warning): as the official code does.
        soft = F.kl_div(F.softmax(student_logits / t, 1), F.softmax(teacher_logits / t, 1), reduction="sum")
        soft = soft / student_logits.numel()
        return cfg.alpha * soft + (1 - cfg.alpha) * F.cross_entropy(student_logits, y)
    # The engine's steps range-check the labels in their own graph (fastkd.step_records.LabelGuard): skip kd_loss's
    # per-call check, a host sync on CUDA.
    # Every step backpropagates this term with weight 1, so the gradient the forward writes is final (one pass).
    return kd_loss(student_logits, teacher_logits, y, temperature=cfg.temperature, alpha=cfg.alpha,
                   check_target=False, fused_backward=True, divergence=cfg.divergence, jsd_beta=cfg.jsd_beta)


# The official code's feature losses (online_KD/train_space.py), between the (batch × width) pooled features:
# torch.dist is the 2-norm of the whole difference, not averaged over the batch; the others are means.
FEATURE_LOSSES = {"dist": torch.dist, "l2": F.mse_loss, "l1": F.l1_loss, "smoothl1": F.smooth_l1_loss}


def feature_loss(student_features: Tensor, teacher_features: Tensor, cfg: LossSettings,
                 parallel: DataParallelRanks = SINGLE_PROCESS) -> Tensor:
    """β·feature_loss(f_student, f_teacher detached) over the global batch, in float32 at least (bf16 features lose
    small differences over a norm of thousands of terms)."""
    f_s, f_t = _at_least_float32(student_features), _at_least_float32(teacher_features.detach())
    if cfg.feature_loss != "dist" or parallel.size == 1:
        # The means over equal shards average to the global mean, as the gradient averaging needs.
        return cfg.beta * FEATURE_LOSSES[cfg.feature_loss](f_s, f_t)
    # torch.dist is not a mean: the norm over the global batch, ‖D‖ = √S with S the ranks' summed squares (as the
    # official nn.DataParallel code computes it). Value β·‖D‖; gradient size·β·∂S_rank/(2‖D‖), which the
    # averaging over the ranks turns into the 1-process gradient β·∂S/(2‖D‖).
    squares = (f_s - f_t).square().sum()
    norm = parallel.sum_in_step(squares.detach()).sqrt()
    scale = (2 * norm).clamp_min(torch.finfo(norm.dtype).tiny)  # all features equal: gradient 0, as torch.dist's
    return cfg.beta * (norm + parallel.size * (squares - squares.detach()) / scale)


def _terms(*values: Tensor) -> Tensor:
    """Detached per-term values padded to MAX_TERMS, for the non-finite check (no host sync)."""
    values = [v.detach().float().reshape(()) for v in values]
    return torch.stack(values + [values[0].new_zeros(())] * (MAX_TERMS - len(values)))


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _forward(model: nn.Module, x: Tensor, tap: Optional[FeatureTap]) -> tuple[Tensor, Optional[Tensor]]:
    """The logits and, with a tap, the pooled feature of the same forward (else None)."""
    return tap(model, x) if tap is not None else (model(x), None)


def _peak(logits: Tensor) -> Tensor:
    return logits.detach().abs().amax()  # NaN and inf survive amax


def _checked(y: Tensor, logits: Tensor, recorder: Optional["StepRecorder"]) -> Tensor:
    """The labels the loss takes: with `recorder` (the engine's), range-checked against the logits' width in the step's
    own graph, an out-of-range one recorded and replaced so the loss cannot fail; without, y as given."""
    return recorder.labels(y, logits.shape[1]) if recorder is not None else y


def _update(loss: Tensor, terms: Tensor, optimizer, parallel: DataParallelRanks,
            recorder: Optional["StepRecorder"]) -> Tensor:
    """Backward, gradient averaging and SGD; with `recorder` (the engine's), this step's lr is set first and the loss
    and its terms are recorded after, all in the same graph."""
    if recorder is not None:
        recorder.before()
    loss.backward()
    parallel.average_gradients(optimizer)  # compiled data-parallel steps only: no DDP hooks in a graph
    sgd_update(optimizer)
    if recorder is not None:
        recorder.record(loss, terms)
    return loss.detach()


def ce_step(model: nn.Module, optimizer, x: Tensor, y: Tensor, parallel: DataParallelRanks = SINGLE_PROCESS,
            amp: Optional[torch.dtype] = None, recorder: Optional["StepRecorder"] = None,
            tap: Optional[FeatureTap] = None) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """A cross-entropy step (the teacher advancing, or the baseline student); also returns the logits and, with
    `tap`, the pooled features (online KD's student distils from both). Every step runs its forward under autocast
    to `amp` (None: float32) and its backward and update outside."""
    with autocast(amp, x.device.type):
        logits, features = _forward(model, x, tap)
        loss = F.cross_entropy(logits, _checked(y, logits, recorder))
    terms = _terms(_peak(logits), loss)
    features = features.detach() if features is not None else None
    return _update(loss, terms, optimizer, parallel, recorder), terms, logits.detach(), features


def distill_step(student: nn.Module, optimizer, x: Tensor, y: Tensor, teacher_logits: Tensor,
                 teacher_features: Optional[Tensor], cfg: LossSettings, parallel: DataParallelRanks = SINGLE_PROCESS,
                 amp: Optional[torch.dtype] = None, recorder: Optional["StepRecorder"] = None,
                 tap: Optional[FeatureTap] = None) -> tuple[Tensor, Tensor]:
    """The student distilling from given teacher logits (online KD: those of the teacher's own step); with `tap`
    (the student's) and the teacher's features, plus β·feature_loss between the two networks' pooled features."""
    with autocast(amp, x.device.type):
        logits, features = _forward(student, x, tap)
        soft = soft_loss(logits, teacher_logits.to(logits.dtype), _checked(y, logits, recorder), cfg)
        feature = feature_loss(features, teacher_features, cfg, parallel) if tap is not None else soft.new_zeros(())
    terms = _terms(_peak(logits), _peak(teacher_logits), soft, feature)
    # soft keeps weight 1 in the sum, as kd_loss's fused backward needs (adding a zero leaves it bit for bit).
    return _update(soft + feature, terms, optimizer, parallel, recorder), terms


def replay_step(student: nn.Module, teacher: nn.Module, optimizer, x: Tensor, y: Tensor,
                cfg: LossSettings, parallel: DataParallelRanks = SINGLE_PROCESS, amp: Optional[torch.dtype] = None,
                recorder: Optional["StepRecorder"] = None, tap: Optional[FeatureTap] = None,
                teacher_tap: Optional[FeatureTap] = None) -> tuple[Tensor, Tensor]:
    """The student replaying a batch, distilling from the teacher as it is now (its mode is set by the caller)."""
    with torch.no_grad(), autocast(amp, x.device.type):
        teacher_logits, teacher_features = _forward(teacher, x, teacher_tap)
    return distill_step(student, optimizer, x, y, teacher_logits, teacher_features, cfg, parallel, amp, recorder, tap)


def advance_step(net: nn.Module, optimizer, x: Tensor, y: Tensor, parallel: DataParallelRanks = SINGLE_PROCESS,
                 amp: Optional[torch.dtype] = None,
                 recorder: Optional["StepRecorder"] = None) -> tuple[Tensor, Tensor]:
    """The spaced-self advance: only the deepest head's cross-entropy trains."""
    with autocast(amp, x.device.type):
        logits, _ = net(x)
        loss = F.cross_entropy(logits[-1], _checked(y, logits[-1], recorder))
    terms = _terms(_peak(logits[-1]), loss)
    return _update(loss, terms, optimizer, parallel, recorder), terms


def self_distill_step(net: nn.Module, optimizer, x: Tensor, y: Tensor, cfg: LossSettings,
                      parallel: DataParallelRanks = SINGLE_PROCESS, amp: Optional[torch.dtype] = None,
                      recorder: Optional["StepRecorder"] = None) -> tuple[Tensor, Tensor]:
    """CE(deepest) + Σ_shallow [α·kd(shallow, deepest detached) + (1−α)·CE] + β·Σ_shallow ‖adapter(f) − f_deep‖₂
    (the net's forward returns the shallow features already through their adapters)."""
    with autocast(amp, x.device.type):
        logits, features = net(x)
        deep_logits, deep_features = logits[-1].detach(), features[-1].detach()
        y = _checked(y, logits[-1], recorder)
        ce = F.cross_entropy(logits[-1], y)
        kd = sum(soft_loss(shallow, deep_logits.to(shallow.dtype), y, cfg) for shallow in logits[:-1])
        # The feature distance in float32 at least: a norm over thousands of bf16 terms loses small differences.
        feature = cfg.beta * sum((_at_least_float32(adapted) - _at_least_float32(deep_features)).norm(dim=1).mean()
                                 for adapted in features[:-1])
    terms = _terms(torch.stack([_peak(h) for h in logits]).amax(), ce, kd, feature)
    return _update(ce + kd + feature, terms, optimizer, parallel, recorder), terms


STEP_FUNCTIONS = {CE: ce_step, DISTILL_LIVE: distill_step, REPLAY: replay_step, ADVANCE: advance_step,
                  SELF_DISTILL: self_distill_step}
SOFT_TARGET_KINDS = (DISTILL_LIVE, REPLAY, SELF_DISTILL)  # the kinds that take the LossSettings
OLD_KIND_NAMES = {"distill": REPLAY}  # deprecated: the replay step's kind was named "distill"


class StepFunctions:
    """The update of every step kind, each compiled whole (forward, loss, backward, SGD) when `compile` is set.

    Compiled updates are fullgraph: a graph break is an error, not a silent slowdown. On CUDA they are captured in
    CUDA graphs; the caller copies any output it keeps before the next call can overwrite it. `parallel` is the
    run's DataParallelRanks as the steps see it (it averages the gradients of compiled data-parallel steps).
    """

    def __init__(self, cfg: LossSettings, compile: bool, device: torch.device, cuda_graphs: Optional[bool] = None,
                 parallel: DataParallelRanks = SINGLE_PROCESS, precision: str = "fp32"):
        self.cfg, self.compile, self.parallel = cfg, compile, parallel
        self.amp = AUTOCAST_DTYPES[precision]
        # CUDA graphs come with compiling on a CUDA device unless switched off (benchmarks compare both).
        self.cuda_graphs = compile and device.type == "cuda" and cuda_graphs is not False
        if compile:
            if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
                raise ValueError(f"--compile needs torch >= 2.11 to trace loss.backward() into the step graph; "
                                 f"this is torch {torch.__version__}")
            # Each run's copy: Dynamo guards a step on the optimizer's identity, so with one shared code object
            # every run in a process would be a recompile and the ninth would meet Dynamo's limit.
            self.steps = {kind: torch.compile(own_code(fn), fullgraph=True,
                                              options={"triton.cudagraphs": self.cuda_graphs})
                          for kind, fn in STEP_FUNCTIONS.items()}
        else:
            self.steps = dict(STEP_FUNCTIONS)

    def __call__(self, kind: str, *args, recorder: Optional["StepRecorder"] = None, **taps):
        """One step of `kind`; `recorder` (the engine's) sets its lr and records its loss inside the step. `taps`:
        the FeatureTaps of a feature loss (`tap=` the stepping network's, `teacher_tap=` for a replay)."""
        kind, recorder = _deprecated_names(kind, recorder, taps)
        if kind in SOFT_TARGET_KINDS:
            args = (*args, self.cfg)
        if not self.compile:
            return self.steps[kind](*args, self.parallel, self.amp, recorder, **taps)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        # Lets Dynamo trace loss.backward() into the step's graph instead of breaking it there; scoped to the call.
        # Private config on purpose: no public switch does this (torch.compiler.config has none).
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return self.steps[kind](*args, self.parallel, self.amp, recorder, **taps)


def _deprecated_names(kind: str, recorder, taps: dict):
    """The kind and recorder under their current names; the old ones ("distill", books=) still work, with a
    DeprecationWarning, for one release."""
    if kind in OLD_KIND_NAMES:
        warnings.warn(f"step kind {kind!r} is deprecated; it is named {OLD_KIND_NAMES[kind]!r}", DeprecationWarning,
                      stacklevel=3)
        kind = OLD_KIND_NAMES[kind]
    if "books" in taps:
        warnings.warn("books= is deprecated; pass recorder=", DeprecationWarning, stacklevel=3)
        recorder = taps.pop("books")
    return kind, recorder
