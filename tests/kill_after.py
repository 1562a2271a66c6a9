"""Fault injection from outside the engine.

`python tests/kill_after.py N ARGS...` runs `python -m fastkd.train ARGS...` and kills its own process with SIGKILL
right after the N-th optimizer step it runs, before anything of that step is checkpointed, as a crash or an OOM kill
would. It works under torchrun too (each rank dies at step N).

`python tests/kill_after.py N ARGS... --then RESUME_ARGS...` does the same in a forked child, then (once the child
has died of SIGKILL) prints `killed; checkpoint done=D` and runs `fastkd.train RESUME_ARGS...` in this process:
a kill and its resume for one interpreter start. The fork happens before this process has run any torch op.
"""
import os
import signal
import sys

import torch

from fastkd import engine, train


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


if __name__ == "__main__":
    steps, rest = int(sys.argv[1]), sys.argv[2:]
    if "--then" in rest:
        cut = rest.index("--then")
        sys.exit(kill_then_resume(steps, rest[:cut], rest[cut + 1:]))
    kill_after(steps)
    sys.exit(train.main(rest))
