"""Installs fastkd for the GPU check (python benchmarks/install.py OUT), offline: `pip install --no-deps
--no-build-isolation -e .` (no dependencies: DALI is not on the GPU machine; no build isolation: it would fetch
setuptools). Where pip fails (an old setuptools without bdist_wheel, say), the check does not lose its call: the
package is laid out under OUT/fastkd-path as setup.py maps it (fastkd/, and kernels/ as fastkd.kernels), through
symbolic links to this checkout, and gpu_check.py puts that folder first on PYTHONPATH for every later command. The
summary says so. Exit status 0 either way, 1 when neither works.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIM = "fastkd-path"


def lay_out(folder: Path) -> None:
    """folder/fastkd: a link to each entry of fastkd/, and kernels/ as fastkd/kernels."""
    package = folder / "fastkd"
    package.mkdir(parents=True, exist_ok=True)
    for entry in (ROOT / "fastkd").iterdir():
        if entry.name != "__pycache__" and not (package / entry.name).exists():
            (package / entry.name).symlink_to(entry)
    if not (package / "kernels").exists():
        (package / "kernels").symlink_to(ROOT / "kernels")


def main(out: Path, pip: list) -> int:
    if subprocess.run([*pip, "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)]).returncode == 0:
        shutil.rmtree(out / SHIM, ignore_errors=True)  # an earlier call's shim must not shadow the installed package
        return 0
    print(f"pip could not install fastkd: using the path shim {out / SHIM} instead (PYTHONPATH of every later step)")
    lay_out(out / SHIM)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(out / SHIM), os.environ.get("PYTHONPATH", "")]))
    check = subprocess.run([sys.executable, "-c", "import fastkd.kernels.kd_loss, fastkd.train"], env=env, cwd="/")
    return check.returncode and 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), [sys.executable, "-m", "pip"]))
