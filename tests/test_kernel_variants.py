"""Every ISA variant of the CPU kernel library this machine can run passes the kernel tests
(`MICROSERVE_CPU_ISA=avx512|avx2|generic`, kernels/build.py): each is built and loaded in its own
process and checked against the torch backend by the same tests the default variant passes. A
variant the CPU cannot run is refused with a clear error, never loaded (that would be a SIGILL)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from microserve.kernels import build

ROOT = Path(__file__).resolve().parent.parent
# The kernel tests: attention (random batches, page sizes, GQA, fp32/bf16/fp16, poisoned outputs),
# the fused layer ops and the brgemm linear route.
KERNEL_TESTS = ["tests/test_attention.py", "tests/test_layer_ops.py", "tests/test_packed_linear.py"]


def test_default_is_the_best_runnable_variant(monkeypatch):
    monkeypatch.delenv(build.ISA_ENV, raising=False)
    runnable = build.runnable_isas()
    assert runnable[-1] == "generic" and build.isa() == runnable[0]
    if build.kernel_error() is None and not os.environ.get(build.ISA_ENV):
        assert build.loaded_isa() == runnable[0]


def test_unknown_variant_is_refused(monkeypatch):
    monkeypatch.setenv(build.ISA_ENV, "sse9")
    with pytest.raises(build.IsaError, match="not a kernel variant .*avx512, avx2, generic"):
        build.isa()


@pytest.mark.parametrize("variant", build.ISAS)
def test_variant_matches_torch(variant):
    env = {**os.environ, build.ISA_ENV: variant, build.REQUIRE_ENV: "1"}
    if variant not in build.runnable_isas():  # e.g. avx512 on an AVX2-only CPU: refused, loudly
        code = "from microserve.kernels.build import kernel_error; kernel_error()"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "IsaError" in r.stderr and "cannot run" in r.stderr, r.stderr[-2000:]
        return
    code = ("import sys, pytest\nfrom microserve.kernels.build import kernel_error, loaded_isa\n"
            f"kernel_error(); assert loaded_isa() == {variant!r}, loaded_isa()\n"
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', *sys.argv[1:]]))")
    r = subprocess.run([sys.executable, "-c", code, *KERNEL_TESTS], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "skipped" not in r.stdout and "failed" not in r.stdout, tail


def test_a_variant_the_cpu_lacks_is_refused_naming_what_it_lacks(monkeypatch):
    if not build._x86():
        pytest.skip("x86 variants: this CPU is not x86")  # off x86 only generic exists, tested above
    flags = build.cpu_flags() - {"avx512f", "avx512bw"}  # as an AVX2-only CPU (Zen 2/3, older Xeons)
    monkeypatch.setattr(build, "cpu_flags", lambda: flags)
    monkeypatch.setenv(build.ISA_ENV, "avx512")
    assert "avx512" not in build.runnable_isas()
    with pytest.raises(build.IsaError, match="cannot run .*lacks avx512bw avx512f"):
        build.isa()
