"""The CPU kernel's cache loads only what no one but this user can have written: a cache folder or library that
another user owns, that group or others may write, or that is a symbolic link is not loaded; the kernel is built in a
private folder instead, with one warning. A cached library cut short is built again once; $CXX may be a command. A
library built when fastkd was installed is loaded, with no compiler, only on the CPU it was built for."""
import os
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch

from fastkd.kernels import _kd_loss_cpu
from fastkd.kernels.kd_loss import kd_loss, kd_loss_reference

EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")


@pytest.fixture(scope="module")
def built_library(tmp_path_factory):
    """One library built by the loader itself, copied into each test's cache (one build, not one per test)."""
    cache = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTKD_CACHE_DIR", str(cache))
        patch.setattr(_kd_loss_cpu, "installed_library", lambda: cache / "not-installed.so")
        _kd_loss_cpu.kernel.cache_clear()
        _kd_loss_cpu.kernel()
    _kd_loss_cpu.kernel.cache_clear()
    (library,) = cache.glob("kd_loss_cpu-*.so")
    return library


@pytest.fixture
def cache(fresh_kernel):
    """The empty cache folder of conftest's fresh_kernel."""
    return fresh_kernel


@pytest.fixture
def builds(monkeypatch, built_library):
    """The targets the loader builds, in order; each build copies the module's library in (a compile on busy cores
    takes seconds), with its digest, as _build leaves them."""
    targets = []

    def build(compiler, target):
        targets.append(target)
        shutil.copy2(built_library, target)
        shutil.copy2(_kd_loss_cpu._digest_path(built_library), _kd_loss_cpu._digest_path(target))

    monkeypatch.setattr(_kd_loss_cpu, "_build", build)
    return targets


@pytest.fixture
def compiles_by_copying(monkeypatch, built_library):
    """_build runs as it is, but its compiler command copies the module's library to its output."""
    run = subprocess.run

    def compile_or_run(command, **kwargs):
        if "-o" not in command:
            return run(command, **kwargs)
        shutil.copy(built_library, command[-1])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", compile_or_run)


def _cached(built_library, cache, mode=0o700) -> Path:
    cache.mkdir(mode=mode)
    os.chmod(cache, mode)  # mkdir's mode passes through the umask
    library = cache / built_library.name
    shutil.copy2(built_library, library)
    shutil.copy2(_kd_loss_cpu._digest_path(built_library), _kd_loss_cpu._digest_path(library))
    return library


def _write_with_its_digest(library: Path, content: bytes) -> None:
    library.write_bytes(content)
    _kd_loss_cpu._digest_path(library).write_text(_kd_loss_cpu._digest(library))


def _assert_the_kernel_computes_kd_loss():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    torch.testing.assert_close(kd_loss(s, t, temperature=2.0), kd_loss_reference(s, t, temperature=2.0))


def _load_expecting_one_warning(cache, *rule):
    with pytest.warns(UserWarning) as record:
        _kd_loss_cpu.kernel()
        _kd_loss_cpu.kernel()
        _assert_the_kernel_computes_kd_loss()
    (warning,) = record
    message = str(warning.message)
    assert all(part in message for part in rule), message
    assert "built the kernel instead in the private folder" in message
    return message


def test_a_cache_folder_writable_by_group_or_others_is_not_loaded_and_warned_about_once(built_library, cache,
                                                                                         builds):
    library = _cached(built_library, cache, mode=0o777)
    _load_expecting_one_warning(cache, f"{cache} is writable by group or others (mode 777)")
    (private,) = builds
    assert private.parent != cache and not private.parent.exists()  # built elsewhere, and the folder removed
    assert sorted(cache.iterdir()) == [library, _kd_loss_cpu._digest_path(library)]  # nothing built there


def test_a_library_owned_by_another_user_is_not_loaded(built_library, cache, builds):
    if os.geteuid() != 0:
        pytest.skip("giving a file to another uid needs root")
    library = _cached(built_library, cache)
    os.chown(library, 65534, -1)
    _load_expecting_one_warning(cache, f"{library} is owned by uid 65534, not by this user (0)")
    assert len(builds) == 1 and builds[0].parent != cache


def test_a_cache_folder_owned_by_another_user_is_not_loaded(built_library, cache, builds, monkeypatch):
    _cached(built_library, cache)
    other = os.geteuid() + 1
    monkeypatch.setattr(os, "geteuid", lambda: other)
    _load_expecting_one_warning(cache, f"{cache} is owned by uid", f"not by this user ({other})")
    assert len(builds) == 1 and builds[0].parent != cache


def test_a_symlinked_library_is_not_loaded(built_library, cache, builds, tmp_path):
    elsewhere = _cached(built_library, tmp_path / "elsewhere")
    cache.mkdir(mode=0o700)
    (cache / built_library.name).symlink_to(elsewhere)
    _load_expecting_one_warning(cache, f"{cache / built_library.name} is a symbolic link")
    assert len(builds) == 1 and builds[0].parent != cache


def test_a_truncated_cached_library_is_built_again_once_and_loaded(built_library, cache, builds):
    library = _cached(built_library, cache)
    library.write_bytes(built_library.read_bytes()[:4096])  # a copy cut short by a full disk
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _kd_loss_cpu.kernel()
        _assert_the_kernel_computes_kd_loss()
    assert builds == [library] and library.stat().st_size == built_library.stat().st_size


def test_an_intact_cached_file_that_does_not_load_is_built_again_once(built_library, cache, builds):
    library = _cached(built_library, cache)
    _write_with_its_digest(library, b"not a shared library\n" * 64)  # dlopen refuses it
    _kd_loss_cpu.kernel()
    _assert_the_kernel_computes_kd_loss()
    assert builds == [library] and library.read_bytes() == built_library.read_bytes()


def test_a_cached_library_without_the_entry_point_is_built_again_and_loaded(built_library, cache, builds, tmp_path):
    library = _cached(built_library, cache)
    source = tmp_path / "other.cpp"
    source.write_text('extern "C" int other_entry() { return 0; }\n')
    subprocess.run([*_kd_loss_cpu._compiler(), "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    _write_with_its_digest(library, library.read_bytes())
    _kd_loss_cpu.kernel()
    _assert_the_kernel_computes_kd_loss()
    assert builds == [library]


def test_a_build_that_fails_again_is_an_error(built_library, cache, monkeypatch):
    library = _cached(built_library, cache)
    library.write_bytes(b"cut short")
    monkeypatch.setattr(_kd_loss_cpu, "_build", lambda compiler, target: _write_with_its_digest(target, b"bad"))
    with pytest.raises(OSError):
        _kd_loss_cpu.kernel()


def test_the_cache_folder_and_library_are_private_under_a_permissive_umask(cache, compiles_by_copying):
    old = os.umask(0o002)
    try:
        _kd_loss_cpu.kernel()
    finally:
        os.umask(old)
    (library,) = cache.glob("kd_loss_cpu-*.so")
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    for path in (library, _kd_loss_cpu._digest_path(library)):
        assert path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH) == 0, path


def test_the_built_library_is_fsynced_before_its_rename_and_the_folder_after(cache, compiles_by_copying,
                                                                             monkeypatch):
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", str(src), str(dst))),
                                                         replace(src, dst)))
    _kd_loss_cpu.kernel()
    (library,) = cache.glob("kd_loss_cpu-*.so")
    (_, partial, target), = [e for e in events if e[0] == "replace" and e[2].endswith(".so")]
    assert target == str(library)
    digest = str(_kd_loss_cpu._digest_path(library))
    (_, partial_digest, _), = [e for e in events if e[0] == "replace" and e[2] == digest]
    assert events == [("fsync", partial), ("fsync", partial_digest), ("replace", partial, target),
                      ("replace", partial_digest, digest), ("fsync", str(cache))]


def test_a_cxx_command_with_arguments_is_run_as_a_command(cache, tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    wrapper = tmp_path / "record-and-run"  # stands in for ccache, which may be absent
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(calls))}\nexec "$@"\n')
    wrapper.chmod(0o700)
    monkeypatch.setenv("CXX", f"{shlex.quote(str(wrapper))} g++")
    _kd_loss_cpu.kernel()
    lines = calls.read_text().splitlines()
    assert lines[0] == "g++ --version" and lines[1].startswith("g++ -O3 ") and len(lines) == 2
    assert list(cache.glob("kd_loss_cpu-*.so"))


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package folder for the loader: the install-time library is looked for beside its (pretended) file."""
    folder = tmp_path / "package"
    folder.mkdir()
    monkeypatch.setattr(_kd_loss_cpu, "__file__", str(folder / "_kd_loss_cpu.py"))
    return folder


def _install(built_library) -> Path:
    library = Path(_kd_loss_cpu.__file__).with_name(_kd_loss_cpu.installed_name() + EXT_SUFFIX)
    shutil.copy2(built_library, library)
    return library


def test_the_library_built_at_install_time_is_loaded_without_a_compiler_or_cache(built_library, package, tmp_path,
                                                                                    monkeypatch):
    _install(built_library)
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    _kd_loss_cpu.kernel.cache_clear()
    try:
        _assert_the_kernel_computes_kd_loss()
    finally:
        _kd_loss_cpu.kernel.cache_clear()
    assert not (tmp_path / "cache").exists()


def test_a_library_installed_for_another_cpu_is_not_loaded(built_library, package, builds, tmp_path, monkeypatch):
    installed = _install(built_library)
    monkeypatch.setattr(_kd_loss_cpu, "_cpu_identity", lambda: "another CPU")
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path / "cache"))
    _kd_loss_cpu.kernel.cache_clear()
    try:
        _kd_loss_cpu.kernel()
    finally:
        _kd_loss_cpu.kernel.cache_clear()
    (built,) = builds
    assert built.parent == tmp_path / "cache" and installed.is_file()


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["g++", "none"])
def test_setup_builds_the_library_where_the_loader_looks_and_installs_without_a_compiler(tmp_path, compiler):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": os.path.dirname(shutil.which("g++")) if compiler == "g++" else str(tmp_path)}
    env.pop("CXX", None)
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "temp")], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    library = tmp_path / "lib" / "fastkd" / "kernels" / (_kd_loss_cpu.installed_name() + EXT_SUFFIX)
    if compiler == "g++":
        assert library.is_file() and _kd_loss_cpu._load(library)
    else:
        assert "the CPU kernel is not built at install time (it is built on first use)" in done.stderr
        assert not list(tmp_path.glob("lib/**/*.so"))
