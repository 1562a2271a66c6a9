"""The pooled penultimate feature of a single-exit classifier, read from the forward that computes its logits.

The feature is the input of the model's classifier, taken to be the last `nn.Linear` it registers (the zoo's `fc`,
torchvision's `fc` / `classifier[-1]` / `heads.head`, timm's head): a forward pre-hook on that layer records it.
So any model, the zoo's, a library's or a user's, exposes it without a second forward and without a change to its
forward, its output or its state dict; the hook records only inside `FeatureTap.__call__`, so every other caller
(evaluation, analysis, the user) gets the plain forward.

`--feature-loss auto` (the default of the two-network methods) runs the term only where it can: `feature_term`.
"""
from contextlib import contextmanager
from typing import Iterator, Optional

from torch import Tensor, nn


def classifier_of(model: nn.Module, role: str) -> nn.Linear:
    """The model's last registered nn.Linear; ValueError naming `role` if it has none."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"--feature-loss compares pooled features, the input of each network's final nn.Linear; "
                         f"the {role} {type(model).__name__} has no nn.Linear (use --feature-loss none)")
    return linears[-1]


class ClassifierNotRun(ValueError):
    """The layer taken for the classifier did not run in the model's forward."""


class FeatureTap:
    """`tap(model, x)` is `(model(x), pooled feature)` from that one forward. `model` may be the network itself or
    its DistributedDataParallel wrapper; the hook sits on the network's classifier either way."""

    def __init__(self, model: nn.Module, role: str):
        self.role, self.classifier = role, classifier_of(model, role)
        self._armed, self._feature = False, None
        self._handle = self.classifier.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: tuple) -> None:
        if self._armed:
            self._feature = args[0]

    def __call__(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        self._armed = True
        logits = model(x)
        self._armed = False
        feature, self._feature = self._feature, None  # no reference kept past the step
        if feature is None:
            raise ClassifierNotRun(f"the {self.role}'s last nn.Linear did not run in its forward: it is not the "
                                   f"classifier whose input --feature-loss compares (use --feature-loss none)")
        return logits, feature

    def remove(self) -> None:
        self._handle.remove()


@contextmanager
def feature_taps(models: dict[str, nn.Module], on: bool) -> Iterator[dict[str, FeatureTap]]:
    """A tap on each of `models` (none when `on` is false), removed on exit: a user's module trained in place
    leaves fit as it came."""
    taps = {role: FeatureTap(model, role) for role, model in models.items()} if on else {}
    try:
        yield taps
    finally:
        for tap in taps.values():
            tap.remove()


def check_feature_widths(models: dict[str, nn.Module], names: dict[str, str], num_classes: int) -> None:
    """Raise one ValueError, before anything is written, when the teacher's and the student's pooled features
    cannot be compared: a classifier that does not output the classes, or two feature widths (no adapter is
    guessed: the official code pairs networks of equal width)."""
    widths = {}
    for role in ("teacher", "student"):
        linear = classifier_of(models[role], role)
        if linear.out_features != num_classes:
            raise ValueError(f"--feature-loss: the {role} {names[role]}'s last nn.Linear ({linear.in_features} → "
                             f"{linear.out_features}) is not its classifier ({num_classes} classes), whose input is "
                             f"the feature compared (use --feature-loss none)")
        widths[role] = linear.in_features
    if widths["teacher"] != widths["student"]:
        raise ValueError(f"--feature-loss compares pooled penultimate features of equal width, but the teacher "
                         f"{names['teacher']} has width {widths['teacher']} and the student {names['student']} "
                         f"width {widths['student']}: choose networks of equal width, or --feature-loss none")


AUTO = "fastkd: --feature-loss auto: "


def feature_term(asked: str, beta: float, models: dict[str, nn.Module], names: dict[str, str], num_classes: int,
                 not_run: tuple[str, ...] = ()) -> tuple[str, Optional[str]]:
    """The two-network feature term that runs for --feature-loss `asked`, and for `auto` the one line that says which
    and why. auto: dist where the teacher's and the student's features have equal widths, else none; a classifier
    that cannot be told (`not_run`: the roles whose last nn.Linear did not run in their forward) means none too. An
    explicit term whose features cannot be compared is one ValueError, as check_feature_widths says."""
    if asked != "auto":
        if asked != "none":
            check_feature_widths(models, names, num_classes)
        return asked, None
    for role in ("teacher", "student"):
        reason = (f"the {role} {names[role]}'s last nn.Linear did not run in its forward" if role in not_run
                  else _undetectable(models[role], f"{role} {names[role]}", num_classes))
        if reason:
            return "none", f"{AUTO}{reason} (its classifier is not detectable), no feature term"
    teacher, student = (classifier_of(models[role], role).in_features for role in ("teacher", "student"))
    if teacher != student:
        return "none", f"{AUTO}teacher width {teacher} and student width {student} differ, no feature term"
    return "dist", f"{AUTO}equal widths {teacher}: dist (β {beta:g})"


def _undetectable(model: nn.Module, who: str, num_classes: int) -> Optional[str]:
    """Why the last nn.Linear of `model` is not taken for its classifier, or None where it is."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return f"the {who} has no nn.Linear"
    if linears[-1].out_features != num_classes:
        return (f"the {who}'s last nn.Linear ({linears[-1].in_features} → {linears[-1].out_features}) does not "
                f"output the {num_classes} classes")
    return None
