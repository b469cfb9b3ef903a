"""The CPU kernel library's build: a cache key that only real changes move, one builder at a time
with progress, a cached library loaded without ninja, and loud failures."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from microserve.kernels import build

PY = sys.executable


def run_py(code: str, env: dict | None = None, cwd: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter with the kernel build's log on stderr."""
    prelude = ("import logging; logging.basicConfig(level='INFO', format='%(asctime)s %(levelname)s %(name)s: "
               "%(message)s')\n")
    return subprocess.run([PY, "-c", prelude + textwrap.dedent(code)], env={**os.environ, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_cache_key_ignores_path_ninja_and_cwd(tmp_path):
    """With and without the Python environment's bin on PATH (a different ninja comes first), and
    from another directory, the key is the same, so nothing is rebuilt."""
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "c++").symlink_to(build._compiler()[0])  # the same compiler, nothing else on PATH
    code = "from microserve.kernels.build import cache_key; print(cache_key())"
    keys = {run_py(code, env={"PATH": p}, cwd=c).stdout.strip()
            for p, c in ((os.environ["PATH"], None), (str(bare), str(tmp_path)), ("/usr/bin:/bin", "/"))}
    assert keys == {build.cache_key()}


def test_cache_key_moves_with_sources_flags_and_compiler(tmp_path, monkeypatch):
    base = build.cache_key()
    monkeypatch.setattr(build, "CFLAGS", build.CFLAGS + ["-DX"])
    assert build.cache_key() != base
    monkeypatch.undo()
    copy = tmp_path / "csrc"
    copy.mkdir()
    for d in build.INCLUDE_DIRS:
        for f in Path(d).iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(build, "INCLUDE_DIRS", [str(copy)])
    assert build.cache_key() == base  # where the sources live does not matter, only what they say
    (copy / "gemm.h").write_text((copy / "gemm.h").read_text() + "\n// changed\n")
    assert build.cache_key() != base
    monkeypatch.undo()
    monkeypatch.setattr(build, "_compiler", lambda: ("/usr/bin/other-c++", "other 1.0"))
    assert build.cache_key() != base


def test_cached_library_loads_without_ninja(tmp_path):
    """The library the session built (conftest) loads with no ninja reachable and no build."""
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "c++").symlink_to(build._compiler()[0])
    r = run_py("""
        import microserve.kernels.build as b, sys
        b.__dict__.pop('ninja', None); sys.modules['ninja'] = None   # no ninja package either
        print(b.kernel_error())
        import torch; print(hasattr(torch.ops.microserve, 'paged_decode_attention'))
    """, env={"PATH": str(bare)})
    assert r.stdout.split() == ["None", "True"], r.stderr[-2000:]
    assert "building" not in r.stderr


def test_one_process_builds_while_the_other_waits(tmp_path):
    """A cold cache with a stale cpp_extension lock (a builder killed mid-build): two processes
    start together; one builds, with its start line, heartbeat and time taken; the other says it
    waits, then loads the same library. Each object file was compiled once."""
    name = build.library_name()
    (tmp_path / name).mkdir()
    (tmp_path / name / "lock").touch()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    code = ("import logging, sys; logging.basicConfig(level='INFO', format='%(levelname)s %(name)s: %(message)s')\n"
            "from microserve.kernels.build import kernel_error; print(kernel_error())")
    procs = [subprocess.Popen([PY, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [o.strip() for o, _ in outs] == ["None", "None"], [e[-2000:] for _, e in outs]
    logs = sorted((e for _, e in outs), key=lambda e: "waiting for process" in e)
    assert "building CPU kernels for this machine (once), about" in logs[0]
    assert "built CPU kernels in" in logs[0]
    assert "waiting for process" in logs[1] and "building CPU kernels" not in logs[1]
    ninja_log = (tmp_path / name / ".ninja_log").read_text().splitlines()[1:]
    objects = [line.split("\t")[3] for line in ninja_log]
    assert sorted(objects) == sorted({*objects}) and len(objects) == len(build.SOURCES) + 1


@pytest.fixture
def broken_source(tmp_path):
    """A kernel source that does not compile, in a copy of the include dirs."""
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "broken.cpp").write_text('#error "deliberately broken kernel source"\n')
    return src


BROKEN_BUILD = """
    import microserve.kernels.build as b
    b.INCLUDE_DIRS = [{src!r}]
    b.SOURCES = [{src!r} + '/broken.cpp']
    print(b.kernel_error())
"""


def test_broken_build_is_a_loud_warning_and_torch_fallback(tmp_path, broken_source):
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), "MICROSERVE_REQUIRE_KERNELS": "0"}
    r = run_py(BROKEN_BUILD.format(src=str(broken_source)), env=env)
    assert r.returncode == 0 and r.stdout.startswith("CompileError: the kernel build failed"), r.stderr[-2000:]
    assert "WARNING microserve.kernels.build: the CPU kernels are unavailable" in r.stderr
    assert "deliberately broken kernel source" in r.stderr  # the compiler's own words
    again = run_py(BROKEN_BUILD.format(src=str(broken_source)), env=env)  # remembered: no second build
    assert "remembered from an earlier try" in again.stderr and "building CPU kernels" not in again.stderr


def test_broken_build_is_an_error_when_kernels_are_required(tmp_path, broken_source):
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), "MICROSERVE_REQUIRE_KERNELS": "1"}
    r = run_py(BROKEN_BUILD.format(src=str(broken_source)), env=env)
    assert r.returncode != 0 and "KernelBuildError: MICROSERVE_REQUIRE_KERNELS is set" in r.stderr
    assert "deliberately broken kernel source" in r.stderr
