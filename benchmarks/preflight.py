"""The GPU check's preflight (python benchmarks/preflight.py OUT): the machine, then every package and module the
check imports, one line per missing package. Writes OUT/machine.txt and OUT/packages.json
({"missing_optional": [...]}). Exit status 3 when a core package is missing (the check stops), 1 when a fastkd
module does not import, else 0.
"""
import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

# Without these no step can run.
CORE = ["torch", "triton", "pytest", "pytest_benchmark", "torchvision", "numpy", "scipy", "sklearn", "tqdm", "PIL"]
# Without these only some cases or steps cannot run (gpu_check.py's OPTIONAL says which).
OPTIONAL = ["nvidia.dali", "liger_kernel", "mlxtend", "timm"]


def imports(name: str) -> str | None:
    """None when `name` imports, else the error in one line."""
    try:
        importlib.import_module(name)
    except Exception as error:  # an ImportError, or a package that breaks while importing
        return f"{type(error).__name__}: {error}"
    return None


def machine() -> str:
    import torch
    import triton

    versions = f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}"
    if not torch.cuda.is_available():
        return f"no CUDA device; {versions}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:  # no nvidia-smi on the PATH: torch still names the device
        smi = ""
    gpu = smi or torch.cuda.get_device_name()
    return f"{gpu}; CUDA {torch.version.cuda}; {versions}"


def main(out: Path) -> int:
    missing_core = [(name, error) for name in CORE if (error := imports(name))]
    for name, error in missing_core:
        print(f"missing core package {name}: {error}")
    if missing_core:
        return 3
    missing = [name for name in OPTIONAL if imports(name)]
    for name in missing:
        print(f"missing optional package {name}")
    (out / "packages.json").write_text(json.dumps({"missing_optional": missing}) + "\n")
    description = machine()
    (out / "machine.txt").write_text(description + "\n")
    print(description)
    import fastkd

    broken = [(m.name, error) for m in pkgutil.walk_packages(fastkd.__path__, "fastkd.")
              if (error := imports(m.name))]
    for name, error in broken:
        print(f"{name} does not import: {error}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
