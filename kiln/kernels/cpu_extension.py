"""kiln's C++ CPU ops: every kiln/kernels/csrc/*.cpp compiled into one library with
torch.utils.cpp_extension, registering its ops under `torch.ops.kiln.*` (TORCH_LIBRARY_FRAGMENT(kiln, m)).

The library is built once per machine and source version (about a minute; `make install` builds it) and
cached under $KILN_CACHE/cpu_ops (default ~/.cache/kiln/cpu_ops). The sources are copied into the cache
folder and built from there, so every checkout of the same sources shares one build (ninja's commands hold
the source paths: two checkouts rebuilt each other's library), and the build runs under an OS file lock that
dies with its process (torch's own lock file outlives a build killed midway and made every later start wait
on it forever). Without a C++ compiler or OpenMP, or
when the build fails, `cpu_ops_available()` is False, one line says why, and every caller runs its torch
reference instead. `KILN_CPU_OPS=0` switches the ops off (to compare against the references).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only", "-std=c++17"]


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of Linux /proc/cpuinfo (key -> value); empty elsewhere."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if not key.strip():  # the blank line after the first processor
                    break
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags (Linux /proc/cpuinfo; empty elsewhere): what -march=native builds for,
    and what decides which of the ops' paths (AVX-512, AVX2, scalar) the library holds."""
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_family() -> tuple[str, int]:
    """This CPU's vendor and family from /proc/cpuinfo (("AuthenticAMD", 23) for Zen to Zen 2, 25 for Zen 3
    and 4); ("", 0) elsewhere. Row limits measured on one microarchitecture key on it where the flags alone
    do not tell two CPUs apart (cpu_linear._max_rows)."""
    info = _cpuinfo()
    family = info.get("cpu family", "")
    return info.get("vendor_id", ""), int(family) if family.isdigit() else 0


def avx2_paths(flags: frozenset[str]) -> bool:
    """Whether a -march=native build for a CPU with these flags holds the ops' AVX2 + FMA paths: AVX2, FMA
    and F16C without AVX-512 (simd.h's KILN_AVX2, which linear.cpp and quant_linear.cpp use where they have
    no AVX-512F path)."""
    return {"avx2", "fma", "f16c"} <= flags and "avx512f" not in flags


def _build_dir() -> Path:
    """A folder per source version, compiler flags, CPU flags and torch build and install (its path: two
    venvs used in turn each rewrote the other's build file, with their torch's include paths in it, and
    rebuilt the ops, ~50 s at every switch), so a stale library, or one built with -march=native for another
    CPU (a shared home folder), is never loaded."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h")):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(
        " ".join(FLAGS).encode() + torch.__version__.encode() + str(Path(torch.__file__).parent).encode()
    )
    digest.update(" ".join(sorted(cpu_flags())).encode())
    root = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))
    return root / "cpu_ops" / digest.hexdigest()[:16]


@functools.cache
def cpu_ops_available() -> bool:
    """Build (once) and load the library; False, with one line on stderr saying why, when it can't be."""
    if os.environ.get("KILN_CPU_OPS", "1") == "0":
        return False
    reason = _load()
    if reason is not None:
        print(f"kiln: C++ CPU ops unavailable ({reason}); using the torch reference path", file=sys.stderr)
        return False
    return True


@torch.compiler.assume_constant_result
def cpu_ops_built() -> bool:
    """`cpu_ops_available()` for the ops' routing rules: a constant to torch.compile, evaluated once at trace
    time (building the library touches files), so a compiled graph keeps the op."""
    return cpu_ops_available()


def _load() -> str | None:
    """Load the library, building it if needed; the reason it could not be, or None."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} is not on PATH"
    if not _find_ninja():
        return "no ninja: `pip install ninja` (a kiln dependency) puts it beside this Python"
    if not any(CSRC.glob("*.cpp")):
        return f"no sources in {CSRC}"
    build_dir = _build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        from torch.utils import cpp_extension

        with _build_lock(build_dir):
            cpp_extension.load(
                name="kiln_cpu_ops",
                sources=_copy_sources(build_dir / "src"),
                extra_cflags=FLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
    except Exception as error:  # a compiler error, no ninja, no OpenMP: fall back, say why in one line
        first = str(error).strip().splitlines()
        return f"build failed: {first[0] if first else type(error).__name__}; see {build_dir}"
    return None


def _copy_sources(target: Path) -> list[str]:
    """The csrc files copied into `target` (rewritten only when they differ, so ninja sees no change)."""
    target.mkdir(exist_ok=True)
    for path in sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h")):
        copy = target / path.name
        if not copy.is_file() or copy.read_bytes() != path.read_bytes():
            shutil.copyfile(path, copy)
    return [str(target / path.name) for path in sorted(CSRC.glob("*.cpp"))]


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """One process at a time builds or loads in `build_dir`; the OS releases the lock when its holder dies.
    Inside it no other kiln process is building here, so torch's `lock` file, if any, is a killed build's."""
    with open(build_dir / ".kiln-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _find_ninja() -> bool:
    """cpp_extension runs `ninja` from PATH. The pip package's binary sits beside this interpreter, which a
    venv run without activating it (`.venv/bin/python`, as `make install` does) leaves off PATH: put it on."""
    if shutil.which("ninja") is not None:
        return True
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja", path=scripts) is None:
        return False
    os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    return True


if __name__ == "__main__":  # `python -m kiln.kernels.cpu_extension`: build now (make install runs it)
    ok = cpu_ops_available()
    print(f"kiln: C++ CPU ops {'ready' if ok else 'not built'} ({_build_dir()})")
