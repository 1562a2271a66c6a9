"""Runs the README's "Use it from Python" example as written, in the current folder: `python readme_example.py MODE`.

MODE: `full` (as written), or `kill:N` (in a forked child: SIGKILL right after the N-th optimizer step, from
outside the engine, as kill_after.py does; then, in this process, the same call with resume=True)."""
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def example_code() -> str:
    section = README.read_text().split("## Use it from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


if __name__ == "__main__":
    import os
    import signal

    import fastkd
    from fastkd import api

    code = compile(example_code(), str(README), "exec")
    mode = sys.argv[1]
    if mode.startswith("kill:"):
        sys.path.insert(0, str(Path(__file__).parent))
        from kill_after import kill_after

        child = os.fork()  # before any torch op has run here
        if child == 0:
            kill_after(int(mode.split(":")[1]))
            exec(code, {"__name__": "__example__"})
            os._exit(0)  # not killed: the parent says so
        _, status = os.waitpid(child, 0)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            sys.exit(f"readme_example: the run was not killed (wait status {status})")
        print("killed", flush=True)
        fastkd.fit = lambda **kwargs: api.fit(**kwargs, resume=True)
    exec(code, {"__name__": "__example__"})
