"""Builds and loads the CPU kernel (kd_loss_cpu.cpp): once per machine with its C++ compiler, cached on disk.

The library is keyed by the source, the flags, the compiler's version and the CPU (it is built for this CPU's vector
units, -march=native), so a shared home directory across different machines never loads a foreign build. It needs no
torch headers, so a build takes about a second; it runs OpenMP over rows on torch's own thread count.
"""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kd_loss_cpu.cpp")
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-ffp-contract=off")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_ARGTYPES = ([ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
             + [ctypes.c_int64] * 2 + [ctypes.c_double] * 4 + [ctypes.c_int64, ctypes.c_int]
             + [ctypes.c_void_p] * 3 + [ctypes.c_int])


def cache_dir() -> Path:
    if os.environ.get("FASTKD_CACHE_DIR"):
        return Path(os.environ["FASTKD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastkd"


def _compiler() -> str:
    name = os.environ.get("CXX") or "g++"
    path = shutil.which(name) or shutil.which("c++")
    if path is None:
        raise RuntimeError(f"fastkd: kd_loss on the CPU needs a C++ compiler: neither {name!r} nor 'c++' is on "
                           "PATH (install g++, or set CXX)")
    return path


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
    except OSError:
        lines = []
    return platform.machine() + "".join(dict.fromkeys(lines))


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: processes building at the same time never see half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"fastkd: building the CPU kd_loss kernel failed ({compiler} {' '.join(FLAGS)} "
                               f"{SOURCE}):\n{done.stderr[-2000:]}")
        os.replace(partial, target)


@functools.lru_cache(maxsize=None)
def kernel():
    """The library's entry point `fastkd_kd_loss`, built on first use."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu_identity()]).encode()).hexdigest()
    library = cache_dir() / f"kd_loss_cpu-{key[:16]}.so"
    if not library.is_file():
        _build(compiler, library)
    entry = ctypes.CDLL(str(library)).fastkd_kd_loss
    entry.argtypes, entry.restype = _ARGTYPES, ctypes.c_int
    return entry


def run(s, t, target, inv_t, kl_loss_scale, kl_grad_scale, ce_weight, ignore_index, reduction, rows, reduced,
        grad) -> None:
    """Fill rows (N,), reduced () (unless reduction is NONE) and grad (N, C) contiguous (or None) for CPU tensors
    s, t with classes at stride 1 and target None or int64 contiguous."""
    status = kernel()(DTYPE_CODES[s.dtype], s.data_ptr(), s.stride(0), t.data_ptr(), t.stride(0),
                      None if target is None else target.data_ptr(), s.shape[0], s.shape[1], inv_t, kl_loss_scale,
                      kl_grad_scale, ce_weight, ignore_index, reduction, rows.data_ptr(), reduced.data_ptr(),
                      None if grad is None else grad.data_ptr(), torch.get_num_threads())
    if status == 1:
        raise MemoryError(f"fastkd: kd_loss on the CPU could not allocate its scratch rows ({s.shape[1]} classes)")
    if status != 0:
        raise RuntimeError(f"fastkd: the CPU kd_loss kernel returned {status} for dtype {s.dtype}")
