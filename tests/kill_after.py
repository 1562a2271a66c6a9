"""Fault injection from outside the engine: `python tests/kill_after.py N ARGS...` runs `python -m fastkd.train
ARGS...` and kills its own process with SIGKILL right after the N-th optimizer step it runs, before anything of that
step is checkpointed, as a crash or an OOM kill would. It works under torchrun too (each rank dies at step N)."""
import os
import signal
import sys

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


if __name__ == "__main__":
    kill_after(int(sys.argv[1]))
    sys.exit(train.main(sys.argv[2:]))
