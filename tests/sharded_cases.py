"""The sharded losses' cases, run by each spawned gloo rank (tests/test_kd_loss_sharded.py): every rank builds the
same seeded full tensors, shards them as FSDP2 or tensor parallelism would (DTensor Shard(0) heads, Shard(1)
logits), runs the sharded loss and compares its loss and gradients with one process's float64 computation on the
full head (backend="torch", autograd through the plain formula)."""
import os
import sys

import torch
import torch.distributed as dist

from fastkd.kernels import _kd_sharded
from fastkd.kernels.kd_loss import kd_loss, kd_loss_linear, kd_loss_sparse

N, H, HT, V, K = 6, 8, 5, 37, 4  # V not a multiple of 2 or 4: the last slices are short
IGNORE = -100


def _relative(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _data(case: dict, ranks: int):
    """The full problem in float64, the same on every rank: per-rank batches, heads, teachers, targets."""
    g = torch.Generator().manual_seed(1234 + case.get("seed", 0))
    width = case.get("width", V)
    d = {"hidden": torch.randn(ranks, N, H, generator=g, dtype=torch.float64) * 2,
         "weight": torch.randn(width, H, generator=g, dtype=torch.float64),
         "bias": torch.randn(width, generator=g, dtype=torch.float64),
         "t_hidden": torch.randn(ranks, N, HT, generator=g, dtype=torch.float64) * 2,
         "t_weight": torch.randn(case.get("teacher_width", width), HT, generator=g, dtype=torch.float64),
         "t_bias": torch.randn(case.get("teacher_width", width), generator=g, dtype=torch.float64)}
    vocabulary = case.get("vocab_size") or width
    d["t_logits"] = d["t_hidden"] @ d["t_weight"].T * 1.5
    d["target"] = torch.randint(0, vocabulary, (ranks, N), generator=g)
    d["target"][:, 1] = IGNORE
    scores = torch.rand(ranks, N, vocabulary, generator=g)
    d["topk_indices"] = scores.topk(K, dim=2).indices
    d["topk_values"] = torch.randn(ranks, N, K, generator=g, dtype=torch.float64) * 3
    return d


def _options(case: dict) -> dict:
    return {"temperature": case.get("temperature", 2.0), "alpha": 0.4, "ignore_index": IGNORE,
            "reduction": case.get("reduction", "mean"), "divergence": case.get("divergence", "forward_kl"),
            "jsd_beta": case.get("jsd_beta", 0.5), "softcap": case.get("softcap"),
            "vocab_size": case.get("vocab_size")}


def _teacher(case, d, batch, shard, replicate):
    kind = case.get("teacher", "hidden")
    if kind == "logits":
        return {"teacher_logits": d["t_logits"][batch]}
    if kind == "topk":
        return {"teacher_topk": (d["topk_values"][batch], d["topk_indices"][batch])}
    out = {"teacher_hidden": replicate(d["t_hidden"][batch]), "teacher_weight": shard(d["t_weight"])}
    if case.get("bias"):
        out["teacher_bias"] = shard(d["t_bias"])
    return out


def linear_case(case: dict, mesh, rank: int, ranks: int) -> dict:
    """kd_loss_linear, FSDP rows (mode "fsdp": a batch per rank) or TP rows (mode "tp": batch 0 everywhere)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    d = _data(case, ranks)
    dtype = case.get("dtype", torch.float64)
    dim = case.get("mesh_dim", 0)
    placements = [Replicate()] * mesh.ndim
    shard_placements = list(placements)
    shard_placements[dim] = Shard(0)
    fsdp = case["mode"] == "fsdp"
    batch = rank if fsdp else 0
    if fsdp and mesh.ndim == 2:  # HSDP-like: batches differ over the whole mesh
        batch = rank

    def shard(x):
        return distribute_tensor(x.to(dtype), mesh, shard_placements) if case.get("teacher_sharded", True) \
            else x.to(dtype)

    def replicate(x):
        return x.to(dtype) if fsdp else distribute_tensor(x.to(dtype), mesh, placements)

    weight = distribute_tensor(d["weight"].to(dtype), mesh, shard_placements).requires_grad_()
    bias = distribute_tensor(d["bias"].to(dtype), mesh, shard_placements).requires_grad_() if case.get("bias") \
        else None
    hidden_full = d["hidden"][batch].to(dtype)
    hidden = hidden_full.clone().requires_grad_() if fsdp else \
        distribute_tensor(hidden_full, mesh, placements).requires_grad_()
    target = d["target"][batch] if case.get("target", True) else None
    teacher = {k: v if not isinstance(v, torch.Tensor) or k == "teacher_logits" else v
               for k, v in _teacher(case, d, batch, shard, replicate).items()}
    if "teacher_logits" in teacher:
        teacher["teacher_logits"] = teacher["teacher_logits"].to(dtype)
    if "teacher_topk" in teacher:
        values, indices = teacher["teacher_topk"]
        teacher["teacher_topk"] = (values.to(dtype), indices)
    with _kd_sharded.counted_collectives() as received:
        loss = kd_loss_linear(hidden, weight, target, student_bias=bias, **teacher, **_options(case),
                              chunk_size=case.get("chunk_size"), gather=case.get("gather", "auto"))
        (loss.sum() * 1.5).backward()
    # The reference: every rank's batch on the full head in float64; the head's gradient FSDP's mean over ranks.
    refs = []
    for b in (range(ranks) if fsdp else [0]):
        h = d["hidden"][b].clone().requires_grad_()
        w = d["weight"].clone().requires_grad_()
        bb = d["bias"].clone().requires_grad_() if case.get("bias") else None
        t = _teacher(case, d, b, lambda x: x, lambda x: x)
        ref = kd_loss_linear(h, w, d["target"][b] if case.get("target", True) else None, student_bias=bb, **t,
                             **_options(case), backend="torch")
        (ref.sum() * 1.5).backward()
        refs.append((ref.detach(), h.grad, w.grad, bb.grad if bb is not None else None))
    own = refs[batch if fsdp else 0]
    d_hidden = hidden.grad if fsdp else hidden.grad.to_local()
    out = {"loss": _relative(loss.detach(), own[0]), "hidden": _relative(d_hidden, own[1]),
           "weight": _relative(weight.grad.full_tensor(), sum(r[2] for r in refs) / len(refs)),
           "received": received["total"]}
    if bias is not None:
        out["bias"] = _relative(bias.grad.full_tensor(), sum(r[3] for r in refs) / len(refs))
    return out


def logits_case(case: dict, mesh, rank: int, ranks: int) -> dict:
    """kd_loss / kd_loss_sparse on Shard(1) student logits (tensor parallelism's output), one batch everywhere."""
    from torch.distributed.tensor import Shard, distribute_tensor
    d = _data(case, ranks)
    dtype = case.get("dtype", torch.float64)
    full = (d["hidden"][0] @ d["weight"].T).to(dtype)
    student = distribute_tensor(full, mesh, [Shard(1)]).requires_grad_()
    target = d["target"][0]
    options = {k: v for k, v in _options(case).items() if case["loss"] == "kd_loss" or k != "softcap"}
    s = full.clone().requires_grad_()
    if case["loss"] == "kd_loss":
        teacher = d["t_logits"][0].to(dtype)
        if case.get("teacher_sharded"):
            teacher = distribute_tensor(teacher, mesh, [Shard(1)])
        loss = kd_loss(student, teacher, target, **options)
        ref = kd_loss(s, d["t_logits"][0].to(dtype), target, **options, backend="torch")
    else:
        topk = (d["topk_values"][0].to(dtype), d["topk_indices"][0])
        loss = kd_loss_sparse(student, *topk, target, **options)
        ref = kd_loss_sparse(s, *topk, target, **options, backend="torch")
    (loss.sum() * 0.5).backward()
    (ref.sum() * 0.5).backward()
    return {"loss": _relative(loss.detach(), ref.detach()), "logits": _relative(student.grad.full_tensor(), s.grad)}


def error_case(case: dict, mesh, rank: int, ranks: int) -> dict:
    """A bad layout: the ValueError's text, on every rank."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    d = _data(case, ranks)
    layout = case["layout"]
    weight = distribute_tensor(d["weight"], mesh, [Shard(1) if layout == "along_h" else Shard(0)])
    hidden = d["hidden"][rank]
    teacher = {"teacher_logits": d["t_logits"][rank]}
    if layout == "teacher_plain_on_rank_1":
        tw = distribute_tensor(d["t_weight"], mesh, [Shard(0)])
        teacher = {"teacher_hidden": d["t_hidden"][rank], "teacher_weight": d["t_weight"] if rank == 1 else tw}
    if layout == "other_mesh":
        other = dist.device_mesh.init_device_mesh("cpu", (ranks,), mesh_dim_names=("other",))
        teacher = {"teacher_hidden": d["t_hidden"][rank],
                   "teacher_weight": distribute_tensor(d["t_weight"][:V - 1], other, [Shard(0)])}
    if layout == "topk_repeated":
        indices = d["topk_indices"][rank].clone()
        indices[3, 1] = indices[3, 0]
        teacher = {"teacher_topk": (d["topk_values"][rank], indices)}
    if layout == "hidden_sharded":
        hidden = distribute_tensor(d["hidden"][0], mesh, [Shard(0)])
    if layout == "hidden_replicated_elsewhere":
        hidden = distribute_tensor(d["hidden"][0], mesh, [Replicate()])
        weight = distribute_tensor(d["weight"], mesh, [Shard(0)])
    try:
        kd_loss_linear(hidden, weight, d["target"][rank], **teacher, gather=case.get("gather", "auto"))
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def memory_case(case: dict, mesh, rank: int, ranks: int) -> dict:
    """The largest tensor made by a forward and backward on a bigger vocabulary, FSDP (hidden plan) or TP rows."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    n, h, v = case["n"], case["h"], case["v"]
    g = torch.Generator().manual_seed(7)
    weight = distribute_tensor(torch.randn(v, h, generator=g), mesh, [Shard(0)]).requires_grad_()
    t_weight = distribute_tensor(torch.randn(v, h, generator=g), mesh, [Shard(0)])
    hidden = torch.randn(ranks, n, h, generator=g)[rank if case["mode"] == "fsdp" else 0]
    t_hidden = torch.randn(n, h, generator=g)
    if case["mode"] == "tp":
        hidden = distribute_tensor(hidden, mesh, [Replicate()])
        t_hidden = distribute_tensor(t_hidden, mesh, [Replicate()])
    hidden.requires_grad_()
    target = torch.randint(0, v, (n,), generator=g)
    with _kd_sharded.largest_new_tensor() as largest:
        kd_loss_linear(hidden, weight, target, teacher_hidden=t_hidden, teacher_weight=t_weight,
                       chunk_size=case["chunk"], gather="hidden", divergence="jsd").backward()
    return {"largest": largest["elements"]}


CASE_KINDS = {"linear": linear_case, "logits": logits_case, "error": error_case, "memory": memory_case}


def worker(rank: int, ranks: int, init_file: str, cases: list, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks)
    meshes = {1: init_device_mesh("cpu", (ranks,))}
    if ranks == 4:
        meshes[2] = init_device_mesh("cpu", (2, 2))
    out = []
    try:
        for case in cases:
            if os.environ.get("SHARDED_CASES_VERBOSE") and rank == 0:
                print(case, file=sys.stderr, flush=True)
            mesh = meshes[case.get("mesh_ndim", 1)]
            out.append(CASE_KINDS[case["kind"]](case, mesh, rank, ranks))
    finally:
        results[rank] = out
        dist.destroy_process_group()


def run(cases: list, ranks: int, tmp_path) -> list:
    """Runs every case on `ranks` spawned gloo processes; per case, the list of each rank's result."""
    import torch.multiprocessing as mp
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(ranks, str(tmp_path / "init"), cases, results), nprocs=ranks)
        per_rank = [results[r] for r in range(ranks)]
    return [[per_rank[r][i] for r in range(ranks)] for i in range(len(cases))]


if __name__ == "__main__":  # a quick look: python tests/sharded_cases.py
    import pathlib
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        demo = [{"kind": "linear", "mode": "fsdp", "teacher": "hidden", "bias": True},
                {"kind": "linear", "mode": "tp", "teacher": "logits"}]
        for c, r in zip(demo, run(demo, 2, pathlib.Path(tmp))):
            print(c, r)

