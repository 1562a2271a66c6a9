"""Fault injection from outside the engine.

`python tests/kill_after.py N ARGS...` runs `python -m fastkd.train ARGS...` and kills its own process with SIGKILL
right after the N-th optimizer step it runs, before anything of that step is checkpointed, as a crash or an OOM kill
would. It works under torchrun too (each rank dies at step N).

`python tests/kill_after.py N ARGS... --then RESUME_ARGS...` does the same in a forked child, then (once the child
has died of SIGKILL) prints `killed; checkpoint done=D` and runs `fastkd.train RESUME_ARGS...` in this process:
a kill and its resume for one interpreter start. The fork happens before this process has run any torch op.

`python tests/kill_after.py --chaos SEED KILLS STEPS ARGS...` (STEPS: the run's optimizer steps; ARGS hold `--out`)
kills the run KILLS times, each in a forked child that (re)starts it: with `--resume OUT` (and the --trace and
--tensorboard of ARGS) where OUT holds a checkpoint, else afresh with `--overwrite`. A seeded RNG picks the moments,
increasing steps of the plan: most right after the first step at or past the chosen one, six inside the first save
at or past it (three with the temporary written and not yet renamed, three renamed and the folder not yet synced).
Then it runs the run to its end in this process. This process runs no torch op before its last fork.
"""
import os
import random
import signal
import sys

import torch

from fastkd import checkpoint, engine, train


def kill_after(n: int) -> None:
    run_step, count = engine.run_step, 0

    def counting_run_step(*args, **kwargs):
        nonlocal count
        result = run_step(*args, **kwargs)
        count += 1
        if count == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    engine.run_step = counting_run_step


def kill_then_resume(n: int, args: list, resume_args: list) -> int:
    child = os.fork()
    if child == 0:
        kill_after(n)
        os._exit(train.main(args))
    _, status = os.waitpid(child, 0)
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        print(f"kill_after: the run was not killed (wait status {status})", file=sys.stderr)
        return 3
    out = args[args.index("--out") + 1]
    done = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["done"]
    print(f"killed; checkpoint done={done}", flush=True)
    return train.main(resume_args)


def kill_at(moment: int, where: str, out: str) -> None:
    """SIGKILL once the run has done `moment` steps of its plan (counting from its checkpoint): right after a step
    (`step`), or inside the next save, before (`temporary`) or after (`renamed`) its rename."""
    saved = os.path.join(out, checkpoint.CHECKPOINT)
    done = torch.load(saved, weights_only=True)["done"] if os.path.exists(saved) else 0
    run_step, sync_folder, syncs = engine.run_step, checkpoint.sync_folder, 0

    def counting_run_step(*args, **kwargs):
        nonlocal done
        result = run_step(*args, **kwargs)
        done += 1
        if where == "step" and done >= moment:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    def syncing(folder):  # save_atomic syncs the folder twice: before its rename, then after it
        nonlocal syncs
        syncs += 1
        if done >= moment and where == ("temporary" if syncs % 2 else "renamed"):
            os.kill(os.getpid(), signal.SIGKILL)
        sync_folder(folder)

    engine.run_step, checkpoint.sync_folder = counting_run_step, syncing


def chaos(seed: int, kills: int, steps: int, args: list) -> int:
    rng = random.Random(seed)
    moments = sorted(rng.sample(range(1, steps), kills))
    places = ["temporary"] * 3 + ["renamed"] * 3 + ["step"] * (kills - 6)
    rng.shuffle(places)
    out = args[args.index("--out") + 1]
    resume = ["--resume", out, "--quiet"] + [a for i, a in enumerate(args) if a == "--tensorboard"
                                              or a == "--trace" or i and args[i - 1] == "--trace"]

    def command() -> list:
        return resume if os.path.exists(os.path.join(out, checkpoint.CHECKPOINT)) else [*args, "--overwrite"]

    for n, (moment, where) in enumerate(zip(moments, places), 1):
        argv = command()
        child = os.fork()
        if child == 0:
            kill_at(moment, where, out)
            os._exit(train.main(argv))
        _, status = os.waitpid(child, 0)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            print(f"kill_after: kill {n} ({where}, step {moment}) did not happen (wait status {status})",
                  file=sys.stderr)
            return 3
        print(f"kill {n}: {where} at step {moment} ({argv[0]})", flush=True)
    return train.main(command())


if __name__ == "__main__":
    if sys.argv[1] == "--chaos":
        seed, kills, steps = map(int, sys.argv[2:5])
        sys.exit(chaos(seed, kills, steps, sys.argv[5:]))
    steps, rest = int(sys.argv[1]), sys.argv[2:]
    if "--then" in rest:
        cut = rest.index("--then")
        sys.exit(kill_then_resume(steps, rest[:cut], rest[cut + 1:]))
    kill_after(steps)
    sys.exit(train.main(rest))
