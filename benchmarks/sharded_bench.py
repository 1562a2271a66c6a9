"""The sharded kd_loss_linear's two FSDP plans side by side: gather the hidden states or gather the head.

    python benchmarks/sharded_bench.py [--ranks 2] [--rows 512] [--hidden 256] [--vocab 32000]

Spawns gloo ranks on the CPU (NCCL where each rank has its GPU); each rank its own batch, the student's and the
teacher's heads DTensors split along the vocabulary. Prints, per plan, the median step time (forward + backward)
over 5 steps, the bytes each rank received (counted), the cost rule's prediction, and the largest tensor any op
made. A separate script, not a pytest-benchmark: one step is several processes."""
import argparse
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank, args, init_file, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fastkd.kernels import _kd_sharded
    from fastkd.kernels.kd_loss import kd_loss_linear
    cuda = torch.cuda.device_count() >= args.ranks
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=args.ranks)
    mesh = init_device_mesh(device.split(":")[0], (args.ranks,))
    g = torch.Generator().manual_seed(0)
    n, h, v = args.rows, args.hidden, args.vocab
    weight = distribute_tensor((0.1 * torch.randn(v, h, generator=g)).to(device), mesh, [Shard(0)])
    t_weight = distribute_tensor((0.1 * torch.randn(v, h, generator=g)).to(device), mesh, [Shard(0)])
    weight.requires_grad_()
    torch.manual_seed(rank)
    hidden = torch.randn(n, h, device=device, requires_grad=True)
    t_hidden, target = torch.randn(n, h, device=device), torch.randint(0, v, (n,), device=device)
    out = {}
    for plan in ("hidden", "head"):
        def step(plan=plan):
            kd_loss_linear(hidden, weight, target, teacher_hidden=t_hidden, teacher_weight=t_weight,
                           temperature=2.0, alpha=0.5, gather=plan).backward()
        step()
        times = []
        for _ in range(5):
            dist.barrier()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        with _kd_sharded.counted_collectives() as received, _kd_sharded.largest_new_tensor() as largest:
            step()
        predicted = _kd_sharded.gather_plan(n, h, v, args.ranks, 4, h * 4, -(-v // args.ranks) * h * 4)[plan]
        out[plan] = (statistics.median(times), received["total"], predicted, largest["bytes"])
    results[rank] = out
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(args, f"{tmp}/init", results), nprocs=args.ranks)
        out = results[0]
    print(f"{args.ranks} ranks, N={args.rows} rows a rank, H={args.hidden}, V={args.vocab}, float32, teacher "
          "hidden states with a sharded head")
    print(f"{'plan':8} {'median step':>12} {'received':>12} {'rule':>12} {'largest tensor':>15}")
    for plan, (seconds, received, predicted, largest) in out.items():
        print(f"{plan:8} {seconds * 1e3:9.1f} ms {received / 2**20:8.2f} MiB {predicted / 2**20:8.2f} MiB "
              f"{largest / 2**20:11.2f} MiB")


if __name__ == "__main__":
    main()
