"""kd_loss_linear, kd_loss and kd_loss_sparse on vocabulary-sharded heads and logits (FSDP2 rows, tensor
parallelism), on 2 gloo ranks (4 in the slow tier), against one process's float64 computation on the full head.

Tolerances: float64 results are the same sums in another order and grouping (per-slice partial sums of
exponentials, then an all-reduce), so they agree to a few ulps times the row's terms: 1e-12 relative leaves
four orders of margin over the ~1e-16 they reach. bf16: the logits are rounded to 8 bits before the float32 math,
and the reference is exact, so |error| ≲ a few units of 2⁻⁸ relative: 4·2⁻⁸."""
import pytest
import sharded_cases
import torch

from fastkd.kernels import _kd_sharded

FP64 = 1e-12
BF16 = 4 * 2.0**-8

FSDP = [
    {"teacher": "hidden", "bias": True},
    {"teacher": "logits", "divergence": "reverse_kl", "softcap": 3.0, "reduction": "none"},
    {"teacher": "topk", "divergence": "jsd", "jsd_beta": 0.3, "reduction": "sum"},
    {"teacher": "hidden", "teacher_sharded": False, "divergence": "jsd", "jsd_beta": 1.0, "chunk_size": 4},
    {"teacher": "hidden", "gather": "head", "bias": True, "divergence": "jsd", "softcap": 2.5},
    {"teacher": "hidden", "teacher_sharded": False, "width": 37, "teacher_width": 40, "vocab_size": 33,
     "divergence": "reverse_kl"},
    {"teacher": "logits", "target": False, "temperature": 1.0, "gather": "hidden", "chunk_size": 5},
    {"teacher": "hidden", "dtype": torch.bfloat16, "divergence": "jsd", "jsd_beta": 0.6},
]
TP = [
    {"teacher": "logits", "bias": True},
    {"teacher": "hidden", "divergence": "reverse_kl", "softcap": 3.0, "reduction": "none"},
    {"teacher": "topk", "divergence": "jsd", "jsd_beta": 0.7, "chunk_size": 4},
]
LOGITS = [
    {"loss": "kd_loss", "teacher_sharded": True, "divergence": "jsd", "jsd_beta": 0.4, "softcap": 4.0},
    {"loss": "kd_loss", "divergence": "reverse_kl", "reduction": "none"},
    {"loss": "kd_loss_sparse", "reduction": "sum"},
]
MEMORY = [dict(kind="memory", mode=mode, n=32, h=16, v=1000, chunk=8) for mode in ("fsdp", "tp")]
ERRORS = [
    ({"layout": "along_h"}, "needs its vocabulary (dimension 0)"),
    ({"layout": "teacher_plain_on_rank_1"}, "different layouts"),
    ({"layout": "other_mesh"}, "mesh"),
    ({"layout": "hidden_sharded"}, "Replicate()"),
    ({"layout": "hidden_replicated_elsewhere", "gather": "head"}, "gather='head'"),
    ({"layout": "fine", "gather": "both"}, "gather must be one of"),
    ({"layout": "topk_repeated"}, "teacher_topk indices of row 3 hold class"),
]


def _cases():
    cases = [dict(kind="linear", mode="fsdp", **c) for c in FSDP]
    cases += [dict(kind="linear", mode="tp", **c) for c in TP]
    cases += [dict(kind="logits", **c) for c in LOGITS]
    cases += [dict(kind="error", **c) for c, _ in ERRORS]
    return cases + MEMORY


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    cases = _cases()
    return dict(zip(map(repr, cases), sharded_cases.run(cases, 2, tmp_path_factory.mktemp("gloo2"))))


def _check(case: dict, per_rank: list) -> None:
    tolerance = BF16 if case.get("dtype") == torch.bfloat16 else FP64
    for rank, result in enumerate(per_rank):
        for what, error in result.items():
            if what != "received":
                assert error <= tolerance, f"rank {rank}: {what} off by {error:.3g} relative in {case}"


@pytest.mark.parametrize("case", [c for c in _cases() if c["kind"] not in ("error", "memory")], ids=repr)
def test_each_rank_equals_one_process_on_the_full_head(two_ranks, case):
    """Loss and ∂hidden of each rank's batch, the head's gradient (full_tensor) the mean over ranks (FSDP) or the
    one batch's (TP); every divergence, soft cap, reduction, teacher form, chunking, padded widths, bf16."""
    _check(case, two_ranks[repr(case)])


@pytest.mark.parametrize("case,message", ERRORS, ids=lambda c: repr(c))
def test_a_bad_layout_is_one_error_naming_it_on_every_rank(two_ranks, case, message):
    errors = [r["error"] for r in two_ranks[repr(dict(kind="error", **case))]]
    assert all(e is not None and message in e for e in errors), errors


@pytest.mark.parametrize("case", MEMORY, ids=lambda c: c["mode"])
def test_no_rank_makes_the_logits_or_the_whole_head(two_ranks, case):
    """N = 32 rows a rank, H = 16, V = 1000 on 2 ranks, chunks of 8 rows: the largest tensor any op makes is the
    local head slice (500·16, and its gradient) or the gathered hidden states, never (N, V) logits or (V, H)."""
    n, h, v, chunk = case["n"], case["h"], case["v"], case["chunk"]
    bound = max(v // 2 * h, 2 * n * h, chunk * (v // 2 + 1))
    for result in two_ranks[repr(case)]:
        assert result["largest"] <= bound < min(n * v, v * h), result


def test_the_bytes_received_are_the_cost_rules_count(two_ranks):
    """Counted collectives (ring counts) equal gather_plan's bytes for both plans: the rule compares what runs."""
    n, h, ht, v = sharded_cases.N, sharded_cases.H, sharded_cases.HT, sharded_cases.V
    hidden_case = dict(kind="linear", mode="fsdp", **FSDP[3])  # plain teacher head: nothing of it is gathered
    # JSD sums two parts a row at every β, its ends (here β = 1) included: β's value is never read on the host.
    hidden_plan = _kd_sharded.gather_plan(n, h, v, 2, 8, ht * 8, 0, divergence_parts=2)["hidden"]
    assert [r["received"] for r in two_ranks[repr(hidden_case)]] == [hidden_plan] * 2
    head_case = dict(kind="linear", mode="fsdp", **FSDP[4])
    piece = -(-v // 2)
    bias_bytes = piece * 8 + piece * 8  # the student bias gathered (float64) and its gradient reduced (float64)
    head_plan = _kd_sharded.gather_plan(n, h, v, 2, 8, ht * 8, piece * ht * 8, divergence_parts=2)["head"]
    assert [r["received"] for r in two_ranks[repr(head_case)]] == [head_plan + bias_bytes + piece * 8] * 2


def test_the_cost_rule_at_llm_scale_gathers_the_hidden_states():
    """N = 8192 rows a rank, H = 4096, V = 128256, 8 ranks, bf16, teacher given as its hidden states (the same
    width) and a sharded head: the hidden states cost less than the head, and both are what docs/kernels.md says."""
    costs = _kd_sharded.gather_plan(8192, 4096, 128256, 8, 2, 4096 * 2, 16032 * 4096 * 2, divergence_parts=1)
    assert costs["hidden"] < costs["head"]
    assert round(costs["hidden"] / 2**30, 2) == 1.75 and round(costs["head"] / 2**30, 2) == 3.42, costs


@pytest.mark.slow
def test_four_ranks_and_a_two_dimensional_mesh(tmp_path):
    """4 ranks on one mesh dimension, and a 2×2 mesh with the head split over its second dimension: FSDP rows
    averaged over all 4 batches (HSDP), TP rows, and sharded logits."""
    cases = [dict(kind="linear", mode="fsdp", teacher="hidden", bias=True, divergence="jsd"),
             dict(kind="linear", mode="tp", teacher="logits", softcap=3.0),
             dict(kind="linear", mode="fsdp", teacher="topk", mesh_ndim=2, mesh_dim=1, divergence="jsd"),
             dict(kind="linear", mode="tp", teacher="hidden", mesh_ndim=2, mesh_dim=0, reduction="none")]
    for case, per_rank in zip(cases, sharded_cases.run(cases, 4, tmp_path)):
        _check(case, per_rank)
