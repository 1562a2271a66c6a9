"""Builds and loads the CPU kernel (kd_loss_cpu.cpp): at install time (setup.py runs this file's recipe), else once
per machine with its C++ compiler, cached on disk.

The library is keyed by the source, the flags, the compiler's version and the CPU (it is built for this CPU's vector
units, -march=native), so a shared home directory across different machines never loads a foreign build. It needs no
torch headers, so a build takes about a second; it runs OpenMP over rows on torch's own thread count.

A cached library is loaded only if no one but this user can have written it (see _check_trusted); otherwise the
kernel is built for this process alone, in a private folder, with one warning.
"""
import _ctypes
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sysconfig
import tempfile
import warnings
from pathlib import Path

# No torch import at module level: setup.py runs this file to build the library at install time.
SOURCE = Path(__file__).with_name("kd_loss_cpu.cpp")
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared", "-std=c++17",
         "-ffp-contract=off")
DTYPE_CODES = {"torch.float32": 0, "torch.bfloat16": 1, "torch.float16": 2, "torch.float64": 3}
DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}  # kd_loss_cpu.cpp's enum Divergence
REDUCTION_CODES = {"mean": 0, "sum": 1, "none": 2}  # kd_loss_cpu.cpp's enum Reduction
_ARGTYPES = ([ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
             + [ctypes.c_int64] * 2 + [ctypes.c_double] * 4 + [ctypes.c_int64, ctypes.c_int]
             + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [ctypes.c_double] * 2)


def cache_dir() -> Path:
    if os.environ.get("FASTKD_CACHE_DIR"):
        return Path(os.environ["FASTKD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastkd"


class CompilerMissing(RuntimeError):
    """No C++ compiler to build the kernel with (backend="auto" then falls back to plain torch)."""


def _compiler() -> list[str]:
    """The compiler command: $CXX split like a shell would (`ccache g++`), else g++, else c++."""
    name = os.environ.get("CXX") or "g++"
    command = shlex.split(name) or ["g++"]
    path = shutil.which(command[0])
    if path is not None:
        return [path, *command[1:]]
    path = shutil.which("c++")
    if path is None:
        raise CompilerMissing(f"fastkd: kd_loss on the CPU needs a C++ compiler: neither {name!r} nor 'c++' is on "
                              "PATH (install g++, or set CXX)")
    return [path]


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
    except OSError:
        lines = []
    return platform.machine() + "".join(dict.fromkeys(lines))


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(library: Path) -> str:
    return hashlib.sha256(library.read_bytes()).hexdigest()


def _digest_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _build(compiler: list[str], target: Path) -> None:
    """Build target with its digest beside it: a library whose bytes no longer match (cut short by a full disk or a
    crash) is not loaded, since dlopen maps such a file without complaint and the process dies of SIGBUS later."""
    # Built beside the target and renamed into place: processes building at the same time never see half a file,
    # and the fsyncs make sure a crash after the rename leaves the whole file, not an empty one, under its name.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial, digest = Path(tmp) / target.name, Path(tmp) / "digest"
        done = subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", str(partial)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"fastkd: building the CPU kd_loss kernel failed ({shlex.join(compiler)} "
                               f"{' '.join(FLAGS)} {SOURCE}):\n{done.stderr[-2000:]}")
        digest.write_text(_digest(partial))
        for path in (partial, digest):
            os.chmod(path, 0o700)  # not the umask's group-writable mode, which the trust rule would refuse
            _fsync(path)
        os.replace(partial, target)
        os.replace(digest, _digest_path(target))  # last: a crash between the two leaves a mismatch, not a match
    _fsync(target.parent)


class _Untrusted(Exception):
    """A path of the cache that someone other than this user could have written."""


def _check_trusted(path: Path, root: Path) -> None:
    """Raise _Untrusted unless path and every folder from it up to root are this user's, not writable by group or
    others, and not symbolic links: then no one else can have put code there or swap it before it is loaded."""
    uid = os.geteuid()
    while True:
        mode = os.lstat(path)
        if stat.S_ISLNK(mode.st_mode):
            raise _Untrusted(f"{path} is a symbolic link")
        if mode.st_uid != uid:
            raise _Untrusted(f"{path} is owned by uid {mode.st_uid}, not by this user ({uid})")
        if mode.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise _Untrusted(f"{path} is writable by group or others (mode {stat.S_IMODE(mode.st_mode):o})")
        if path == root:
            return
        path = path.parent


def _load(library: Path):
    """The entry point of library; OSError if the file is not a loadable library or lacks the entry point."""
    handle = ctypes.CDLL(str(library))
    try:
        entry = handle.fastkd_kd_loss
    except AttributeError:
        _ctypes.dlclose(handle._handle)  # else loading a rebuilt file under the same name returns this one again
        raise OSError(f"{library} has no fastkd_kd_loss") from None
    entry.argtypes, entry.restype = _ARGTYPES, ctypes.c_int
    return entry


def _intact(library: Path) -> bool:
    record = _digest_path(library)
    return library.is_file() and record.is_file() and record.read_text() == _digest(library)


def _load_from_cache(compiler: list[str], library: Path):
    root = library.parent
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_trusted(root, root)  # before reading from it or building into it
    for path in (library, _digest_path(library)):
        if os.path.lexists(path):
            _check_trusted(path, root)
    if _intact(library):
        try:
            return _load(library)
        except OSError:  # intact but not loadable (the entry point missing, say): built again, once
            pass
    _build(compiler, library)
    return _load(library)


# Built by setup.py when fastkd is installed, beside this file (in place for an editable install), under a name that
# says what it was built from and for: only a library built from this source for this CPU is found. It is as trusted
# as this file: whoever can write one can write the other.
def installed_name() -> str:
    """The module name of the install-time library: keyed by this source, these flags and this CPU (-march=native
    code may not run on another), not by the compiler's version, which may change without making it wrong."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, _cpu_identity()]).encode()).hexdigest()
    return f"kd_loss_cpu_native_{key[:16]}"


def installed_library() -> Path:
    return Path(__file__).with_name(installed_name() + sysconfig.get_config_var("EXT_SUFFIX"))


@functools.lru_cache(maxsize=None)
def kernel():
    """The library's entry point `fastkd_kd_loss`: the one built at install time, else from the cache, built on
    first use."""
    if installed_library().is_file():
        return _load(installed_library())
    compiler = _compiler()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu_identity()]).encode()).hexdigest()
    library = cache_dir() / f"kd_loss_cpu-{key[:16]}.so"
    try:
        return _load_from_cache(compiler, library)
    except _Untrusted as refused:
        # Memoised, so this warns once per process; the private folder goes once the library is loaded.
        with tempfile.TemporaryDirectory(prefix="fastkd-kernel-") as private:  # mkdtemp: mode 0700
            built = Path(private) / library.name
            _build(compiler, built)
            entry = _load(built)
        warnings.warn(f"fastkd: the CPU kernel's cache is not used: {refused}; built the kernel instead in the "
                      f"private folder {private} for this process (removed once loaded)", stacklevel=2)
        return entry


def run(s, t, target, inv_t, kl_loss_scale, kl_grad_scale, ce_weight, ignore_index, reduction, rows, reduced,
        grad, divergence="forward_kl", jsd_beta=0.5, softcap=0.0) -> None:
    """Fill rows (N,), reduced () (unless reduction is "none") and grad (N, C) contiguous (or None) for CPU tensors
    s, t with classes at stride 1 and target None or int64 contiguous. softcap 0 (or None): off."""
    import torch
    status = kernel()(DTYPE_CODES[str(s.dtype)], s.data_ptr(), s.stride(0), t.data_ptr(), t.stride(0),
                      None if target is None else target.data_ptr(), s.shape[0], s.shape[1], inv_t, kl_loss_scale,
                      kl_grad_scale, ce_weight, ignore_index, REDUCTION_CODES[reduction], rows.data_ptr(),
                      reduced.data_ptr(), None if grad is None else grad.data_ptr(), torch.get_num_threads(),
                      DIVERGENCE_CODES[divergence], jsd_beta, softcap or 0.0)
    if status == 1:
        raise MemoryError(f"fastkd: kd_loss on the CPU could not allocate its scratch rows ({s.shape[1]} classes)")
    if status != 0:
        raise RuntimeError(f"fastkd: the CPU kd_loss kernel returned {status} for dtype {s.dtype}")
