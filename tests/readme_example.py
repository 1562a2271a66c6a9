"""Runs the README's "Use it from Python" example as written, in the current folder: `python readme_example.py MODE`.

MODE: `full` (as written), `kill:N` (SIGKILL right after the N-th optimizer step, from outside the engine, as in
kill_after.py) or `resume` (the same call with resume=True)."""
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def example_code() -> str:
    section = README.read_text().split("## Use it from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


if __name__ == "__main__":
    import fastkd
    from fastkd import api

    mode = sys.argv[1]
    if mode.startswith("kill:"):
        sys.path.insert(0, str(Path(__file__).parent))
        from kill_after import kill_after

        kill_after(int(mode.split(":")[1]))
    elif mode == "resume":
        fastkd.fit = lambda **kwargs: api.fit(**kwargs, resume=True)
    exec(compile(example_code(), str(README), "exec"), {"__name__": "__example__"})
