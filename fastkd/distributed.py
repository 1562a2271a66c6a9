"""Data-parallel training under torchrun, as one object: `DataParallelRanks` wraps the models, averages gradients
(eagerly or inside a compiled step), syncs BatchNorm buffers and reduces metrics. The single process is its trivial
case, in which every method is the identity.

A process started by torchrun (RANK and WORLD_SIZE set) joins a process group: NCCL on GPUs, gloo on CPU, even when
it is the only rank, so that a 1-process torchrun exercises the same path.

Gradients are averaged over ranks in one of two ways, with the same arithmetic:
- eager steps: each model is wrapped in DistributedDataParallel, whose reducer all-reduces gradient buckets from
  autograd hooks while the backward runs;
- compiled steps (`average_in_graph`): the reducer's hooks cannot live inside a whole-step graph, so the step
  averages the gradients itself with one coalesced functional all-reduce that the compiler places in the graph.
BatchNorm buffers are not broadcast at every forward (DDP's default); they are copied from rank 0 at every
checkpoint point (epoch ends and replay boundaries, so the teacher's replay targets agree on all ranks) and before
every evaluation: rank 0's statistics, as with DDP's broadcast, without a collective per step.
"""
import dataclasses
import hashlib
import inspect
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Private module on purpose: its functional collectives are the only ones the compiler can place inside a step's
# graph (torch.distributed's public all_reduce works in place and breaks the graph); torch has no public equivalent.
import torch.distributed._functional_collectives as funcol
from torch import nn

_CPU_GROUP = None  # host-side collectives (indices, flags, hashes): gloo, also when the main backend is NCCL


@dataclass(frozen=True)
class DataParallelRanks:
    """This process's place among the ranks of a data-parallel run, and what the ranks do together. (Not
    torch.nn.DataParallel: one process per rank, started by torchrun.)"""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun: a process group exists
    average_in_graph: bool = False  # compiled steps average their own gradients; eager ones go through DDP

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

    def for_steps(self, compiled: bool) -> "DataParallelRanks":
        """This object as the steps of a run see it: compiled data-parallel steps average in their graph."""
        return dataclasses.replace(self, average_in_graph=compiled and self.launched)

    # ---- models -----------------------------------------------------------------------------------------------

    def wrap(self, model: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
        """What the steps call: DistributedDataParallel around `model` for eager data-parallel steps, else the
        model itself (with rank 0's weights when the step averages in its graph).

        `find_unused`: a multi-exit net's advance step leaves its shallow heads out of the loss.
        """
        if not self.launched:
            return model
        if self.average_in_graph:
            self._from_rank0([*model.parameters(), *model.buffers()])  # what DDP does when it wraps a model
            return model
        ddp = nn.parallel.DistributedDataParallel
        # No buffer broadcast at every forward (see above); newer torch names that switch forward_sync_buffers.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else {"broadcast_buffers": False})
        # A conv weight with one input channel has two valid stride layouts; DDP warns, once per rank, that its
        # gradient's differs from the bucket's. Harmless (a copy), so not shown.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return ddp(model, device_ids=[device.index] if device.type == "cuda" else None,
                   find_unused_parameters=find_unused, **no_sync)

    def average_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Inside a compiled step: average every gradient over the ranks with one coalesced all-reduce. A no-op
        for a single process and for eager steps (DDP's reducer has averaged them during the backward)."""
        if not self.average_in_graph:
            return
        with torch.no_grad():
            for group in optimizer.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if not params:
                    continue
                summed = funcol.all_reduce_coalesced([p.grad for p in params], "sum", dist.group.WORLD)
                for p, g in zip(params, summed):
                    p.grad = g / self.size

    def sum_in_step(self, value: torch.Tensor) -> torch.Tensor:
        """Inside a step (eager or compiled): the sum of a detached tensor over the ranks, by a functional
        all-reduce that the compiler can place in the step's graph; the tensor itself for a single process."""
        if not self.launched:
            return value
        return funcol.all_reduce(value, "sum", dist.group.WORLD)

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's BatchNorm running statistics on every rank (at checkpoint points and before evaluations)."""
        self._from_rank0(model.buffers())

    def _from_rank0(self, tensors) -> None:
        if self.launched:
            with torch.no_grad():
                for tensor in tensors:
                    dist.broadcast(tensor, 0)

    # ---- metrics and host-side agreement --------------------------------------------------------------------

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.launched:
            dist.all_reduce(values)
        return values

    def any_rank(self, flag: int) -> int:
        """The largest of every rank's `flag` (0 where none is set)."""
        if not self.launched:
            return flag
        value = torch.tensor([flag], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_CPU_GROUP)
        return int(value)

    def gather_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Every rank's share of a global batch, concatenated in rank order: the global batch itself."""
        if not self.launched or self.size == 1:
            return indices
        shares = [torch.empty_like(indices) for _ in range(self.size)]
        dist.all_gather(shares, indices, group=_CPU_GROUP)
        return torch.cat(shares)

    def gather_objects(self, obj) -> list:
        """Every rank's `obj` (small, picklable), in rank order."""
        if not self.launched:
            return [obj]
        everyone = [None] * self.size
        dist.all_gather_object(everyone, obj, group=_CPU_GROUP)
        return everyone


SINGLE_PROCESS = DataParallelRanks()


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def join(device_name: str) -> tuple[DataParallelRanks, torch.device]:
    """This process's place in the run and its device; joins the process group when started by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return SINGLE_PROCESS, SINGLE_PROCESS.device(device_name)
    parallel = DataParallelRanks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                            int(os.environ.get("LOCAL_RANK", "0")), launched=True)
    device = parallel.device(device_name)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    global _CPU_GROUP
    _CPU_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return parallel, device


def leave(parallel: DataParallelRanks) -> None:
    global _CPU_GROUP
    if parallel.launched and dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None


def fingerprint(model: nn.Module) -> str:
    """A hash of the parameters' exact bytes: data-parallel ranks must agree bit for bit."""
    flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


def __getattr__(name):
    if name == "DataParallel":  # renamed: it read as torch.nn.DataParallel
        warnings.warn("fastkd.distributed.DataParallel is deprecated; it is named DataParallelRanks",
                      DeprecationWarning, stacklevel=2)
        return DataParallelRanks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
