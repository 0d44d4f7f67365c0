"""Building and loading kiln's C++ CPU ops: a build killed midway leaves torch's `lock` file behind, and
the next start must not wait on it forever; the sources are built from a copy in the cache folder, so every
checkout of the same sources on the same torch install shares one build, and another install gets its own."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import kiln.kernels.cpu_extension as ext

if not ext.cpu_ops_available():
    pytest.skip("kiln's C++ CPU ops could not be built here", allow_module_level=True)

ROOT = Path(ext.__file__).resolve().parents[2]


def test_a_stale_lock_of_a_killed_build_does_not_block_the_next_start():
    stale = ext._build_dir() / "lock"  # what torch's FileBaton leaves when its process is killed
    stale.write_text("")
    environment = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    completed = subprocess.run(
        [sys.executable, "-c", "from kiln.kernels.cpu_extension import cpu_ops_available as a; print(a())"],
        capture_output=True, text=True, env=environment, timeout=300,
    )  # fmt: skip
    assert completed.stdout.strip() == "True", completed.stderr[-2000:]
    assert not stale.exists()


def test_sources_are_copied_once_and_built_from_the_cache(tmp_path):
    target = tmp_path / "src"
    sources = ext._copy_sources(target)
    assert sorted(Path(s).name for s in sources) == sorted(p.name for p in ext.CSRC.glob("*.cpp"))
    assert all(Path(s).parent == target for s in sources)
    assert (target / "simd.h").read_bytes() == (ext.CSRC / "simd.h").read_bytes()
    stamps = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    ext._copy_sources(target)  # unchanged sources are not rewritten: ninja sees nothing new
    assert stamps == {p.name: p.stat().st_mtime_ns for p in target.iterdir()}


def test_another_torch_install_builds_in_its_own_folder(monkeypatch):
    import torch

    here = ext._build_dir()
    monkeypatch.setattr(torch, "__file__", "/elsewhere/venv/site-packages/torch/__init__.py")
    assert ext._build_dir() != here
    assert ext._build_dir().parent == here.parent
