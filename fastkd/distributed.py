"""Data-parallel training under torchrun: the process group, the model wrapping, and the few collectives the engine
needs (gradient averaging inside a compiled step, rank 0's BatchNorm buffers, reduced counts, gathered batches).

A process started by torchrun (RANK and WORLD_SIZE set) joins a process group: NCCL on GPUs, gloo on CPU, even when
it is the only rank, so that a 1-process torchrun exercises the same path. Otherwise `World` is the single process
and every collective here is the identity.

Gradients are averaged over ranks in one of two ways, with the same arithmetic:
- eager steps: each model is wrapped in DistributedDataParallel, whose reducer all-reduces gradient buckets from
  autograd hooks while the backward runs;
- compiled steps: the reducer's hooks cannot live inside a whole-step graph, so the step averages the gradients
  itself with one coalesced functional all-reduce that the compiler places in the graph (`average_gradients`).
BatchNorm buffers are not broadcast at every forward (DDP's default); they are copied from rank 0 at every
checkpoint point (epoch ends and replay boundaries, so the teacher's replay targets agree on all ranks) and before
every evaluation: rank 0's statistics, as with DDP's broadcast, without a collective per step.
"""
import hashlib
import inspect
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

_CPU_GROUP = None  # set by join()


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun: a process group exists

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """--device for this rank: each rank of a multi-rank run takes GPU LOCAL_RANK."""
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {name} asked for, but no CUDA GPU is available; use --device cpu")
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda" and self.launched:
            return torch.device("cuda", self.local_rank)
        if name.startswith("cuda:") and self.size > 1:
            raise ValueError(f"--device {name} names one GPU for {self.size} ranks; under torchrun use --device "
                             f"cuda (rank k takes cuda:LOCAL_RANK)")
        return torch.device(name)


SINGLE_PROCESS = World()


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def join(device_name: str) -> tuple[World, torch.device]:
    """This process's place in the run and its device; joins the process group when started by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return SINGLE_PROCESS, SINGLE_PROCESS.device(device_name)
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")),
                  launched=True)
    device = world.device(device_name)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    global _CPU_GROUP
    # Host-side collectives (indices, flags, hashes) go through gloo, also when the main backend is NCCL.
    _CPU_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return world, device


def leave(world: World) -> None:
    global _CPU_GROUP
    if world.launched and dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None


def wrap(model: nn.Module, world: World, device: torch.device, find_unused: bool) -> nn.Module:
    """The model DistributedDataParallel steps through (eager steps), or the model itself outside torchrun.

    `find_unused`: a multi-exit net's advance step leaves its shallow heads out of the loss.
    """
    if not world.launched:
        return model
    ddp = nn.parallel.DistributedDataParallel
    # No buffer broadcast at every forward (see above); newer torch names that switch forward_sync_buffers.
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
    # A conv weight with one input channel has two valid stride layouts; DDP warns, once per rank, that its
    # gradient's differs from the bucket's. Harmless (a copy), so not shown.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused,
               **no_sync)


def _from_rank0(tensors, world: World) -> None:
    if world.launched:
        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor, 0)


def broadcast_module(model: nn.Module, world: World) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does when it wraps a model)."""
    _from_rank0([*model.parameters(), *model.buffers()], world)


def sync_buffers(model: nn.Module, world: World) -> None:
    """Rank 0's BatchNorm running statistics on every rank (at checkpoint points and before evaluations)."""
    _from_rank0(model.buffers(), world)


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Average every gradient over the ranks with one coalesced all-reduce; traceable into a compiled step."""
    import torch.distributed._functional_collectives as funcol

    world_size = dist.get_world_size()
    with torch.no_grad():
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            summed = funcol.all_reduce_coalesced([p.grad for p in params], "sum", dist.group.WORLD)
            for p, g in zip(params, summed):
                p.grad = g / world_size


def all_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.launched:
        dist.all_reduce(values)
    return values


def any_rank(flag: int, world: World) -> int:
    """The largest of every rank's `flag` (0 where none is set)."""
    if not world.launched:
        return flag
    value = torch.tensor([flag], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_CPU_GROUP)
    return int(value)


def gather_batch(indices: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's share of a global batch, concatenated in rank order: the global batch itself."""
    if not world.launched or world.size == 1:
        return indices
    shares = [torch.empty_like(indices) for _ in range(world.size)]
    dist.all_gather(shares, indices, group=_CPU_GROUP)
    return torch.cat(shares)


def fingerprint(model: nn.Module) -> str:
    """A hash of the parameters' exact bytes: data-parallel ranks must agree bit for bit."""
    flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


def gather_objects(obj, world: World) -> list:
    """Every rank's `obj` (small, picklable), in rank order."""
    if not world.launched:
        return [obj]
    everyone = [None] * world.size
    dist.all_gather_object(everyone, obj, group=_CPU_GROUP)
    return everyone
