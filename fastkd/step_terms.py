"""The step kinds and the terms each reports besides its loss, in order: a non-finite value names the culprit when a
loss goes bad. Read both by the step functions (which report the terms) and by the step records (which name them)."""

# The kinds of optimizer step a schedule plans (fastkd.schedule.Step.kind), each one function of
# fastkd.step_functions.
CE = "ce"  # cross-entropy on the labels: the teacher advancing, or the baseline student
DISTILL_LIVE = "distill_live"  # online KD: the student distils from the logits of the teacher's step on this batch
REPLAY = "replay"  # the student replays a batch, distilling from the teacher as it is now (spaced, offline)
ADVANCE = "advance"  # spaced-self: only the deepest head's cross-entropy trains
SELF_DISTILL = "self_distill"  # one multi-exit network distils its shallow heads from its deepest
STEP_KINDS = (CE, DISTILL_LIVE, REPLAY, ADVANCE, SELF_DISTILL)

_DISTILL_TERMS = ("student logits", "teacher logits", "KD loss (α·T²·D + (1−α)·CE)", "feature loss (β·feature)")
TERM_NAMES = {
    CE: ("logits", "cross-entropy"),
    DISTILL_LIVE: _DISTILL_TERMS,
    REPLAY: _DISTILL_TERMS,
    ADVANCE: ("deepest-head logits", "deepest-head cross-entropy"),
    SELF_DISTILL: ("head logits", "deepest-head cross-entropy", "shallow-head KD losses", "feature loss"),
}
MAX_TERMS = max(len(names) for names in TERM_NAMES.values())
