"""Build, cache and load the CPU kernel library: attention kernels (attention/csrc) and the model's
GEMM and fused layer ops (model/csrc), one shared library compiled for this machine on first use.

- **Cache.** `$TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions)/microserve_cpu_<key>/, where
  the key hashes what the library's machine code depends on: every source and header, the flags,
  the compiler (its path and `--version`), Python, torch and the CPU's ISA flags. A finished build
  leaves a `done` marker; a start that finds it loads the library directly, without running
  ninja, so another ninja binary, PATH or working directory never rebuilds it.
- **One builder.** Builders hold an flock on the cache directory (released by the kernel if a
  builder dies, unlike cpp_extension's lock file); other processes wait for it and say so.
- **A visible build.** It runs in a child process, with every core this machine has (an engine
  pinned to one core would otherwise compile on one), and ninja from the `ninja` package that
  microserve depends on, not whichever is first on PATH. One line says it started and about how
  long it takes, a heartbeat follows every 10 s, and the last line says how long it took.
- **Failures.** A build the compiler refused is remembered under the same key (a changed source or
  compiler is a new key; a killed or timed-out build is not remembered) and reported as a warning;
  the engine then uses the torch path. With `MICROSERVE_REQUIRE_KERNELS=1` (CI) a failed build
  raises instead, so nothing falls back silently.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

log = logging.getLogger(__name__)

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTENTION_CSRC = os.path.join(PACKAGE, "attention", "csrc")
MODEL_CSRC = os.path.join(PACKAGE, "model", "csrc")
INCLUDE_DIRS = [ATTENTION_CSRC, MODEL_CSRC]
# The slowest to compile first, so the other files fill the remaining cores meanwhile.
SOURCES = [os.path.join(ATTENTION_CSRC, n) for n in ("paged_decode.cpp", "paged_prefill.cpp", "store_kv.cpp")] + [
    os.path.join(MODEL_CSRC, n) for n in ("layer_ops.cpp", "gemm.cpp")]
# -O3 matters for the decode kernel (1.2-1.8x over -O2, docs/bench_engine.md). -ffast-math lets the
# float reductions and expf vectorize (glibc's libmvec); it is a compile flag only: cpp_extension
# links without it, so crtfastmath (which would flush denormals for the whole process) is never linked.
CFLAGS = ["-O3", "-march=native", "-ffast-math"]
# CPU-seconds of a build, measured on a 2-core Xeon (AVX-512) with GCC 12; the estimate before a
# first build, scaled by the cores used. Later builds use the last measured time instead.
_CPU_SECONDS = 55.0
_HEARTBEAT_S = 10.0
_BUILD_TIMEOUT_S = 1800.0
REQUIRE_ENV = "MICROSERVE_REQUIRE_KERNELS"


class KernelBuildError(RuntimeError):
    """The kernels could not be built, and MICROSERVE_REQUIRE_KERNELS=1 asks for them."""


class CompileError(RuntimeError):
    """The compiler refused the sources: remembered under the cache key (a retry would fail the same
    way). A build that was killed or timed out is not remembered."""


def _compiler() -> tuple[str, str]:
    """The C++ compiler cpp_extension will use (its $CXX, else c++) as (resolved path, --version)."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        return cxx, "not found"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = "unknown"
    return os.path.realpath(path), out.strip()


def _isa() -> str:
    """The CPU's feature flags: -march=native code must not be loaded on another CPU that shares the cache."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "").strip()
    except OSError:
        return platform.processor()


def cache_key() -> str:
    """What the built library depends on, hashed. Deliberately absent: ninja, PATH, the working
    directory and where the package is installed (sources are hashed by content)."""
    import torch
    h = hashlib.sha256()
    files = sorted((name, os.path.join(d, name)) for d in INCLUDE_DIRS for name in os.listdir(d)
                   if name.endswith((".cpp", ".h")))
    for name, path in files:
        with open(path, "rb") as f:
            h.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    for part in (" ".join(CFLAGS), *_compiler(), platform.machine(), platform.python_version(),
                 torch.__version__, torch.version.git_version or "", _isa()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:12]


def library_name() -> str:
    return f"microserve_cpu_{cache_key()}"


def cache_root() -> str:
    from torch.utils.cpp_extension import get_default_build_root
    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def _estimate_s(root: str, jobs: int) -> float:
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(root, "microserve_cpu_build_seconds")) as f:
            return float(f.read())
    return _CPU_SECONDS / max(1, min(jobs, len(SOURCES)))


def _all_cores() -> set[int]:
    return set(range(os.cpu_count() or 1))


def _child_setup() -> None:
    """In the build child: every core (ninja's compilers inherit the mask), and die with the parent."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, _all_cores())
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _compile(name: str, build_dir: str) -> None:
    """Run the build in a child process, logging a heartbeat. Raises RuntimeError with the compiler's
    last lines when it fails."""
    jobs = len(_all_cores())
    root = os.path.dirname(build_dir)
    estimate = _estimate_s(root, jobs)
    log.info("building CPU kernels for this machine (once), about %.0f s", estimate)
    env = dict(os.environ)
    with contextlib.suppress(ImportError):  # the ninja our package depends on, not whichever is on PATH
        import ninja
        env["PATH"] = ninja.BIN_DIR + os.pathsep + env.get("PATH", "")
    env.setdefault("MAX_JOBS", str(jobs))
    out_path = os.path.join(build_dir, "build.log")
    t0 = time.monotonic()
    with open(out_path, "w") as out:
        argv = [sys.executable, "-m", "microserve.kernels.build", "--name", name, "--build-dir", build_dir,
                "--cflags", " ".join(CFLAGS), "--include", *INCLUDE_DIRS, "--sources", *SOURCES]
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 preexec_fn=_child_setup)
        try:
            while True:
                try:
                    child.wait(timeout=_HEARTBEAT_S)
                    break
                except subprocess.TimeoutExpired:
                    took = time.monotonic() - t0
                    if took > _BUILD_TIMEOUT_S:
                        child.kill()
                        child.wait()
                        raise RuntimeError(f"the kernel build took over {_BUILD_TIMEOUT_S:.0f} s; stopped it")
                    log.info("still building CPU kernels: %.0f s of about %.0f s", took, estimate)
        except BaseException:
            if child.poll() is None:
                child.kill()
                child.wait()
            raise
    took = time.monotonic() - t0
    if child.returncode != 0:
        with open(out_path, errors="replace") as f:
            lines = f.readlines()
        # the compiler's diagnostics, not the Python traceback that follows them
        errors = [line for line in lines if " error: " in line or line.startswith(("FAILED", "ninja: build stopped"))]
        detail = "".join((errors or lines)[-25:])
        error = CompileError if child.returncode > 0 else RuntimeError  # < 0: killed by a signal
        raise error(f"the kernel build failed after {took:.0f} s (exit {child.returncode}; "
                    f"full log: {out_path}):\n{detail}")
    with open(os.path.join(root, "microserve_cpu_build_seconds"), "w") as f:
        f.write(f"{took:.1f}")
    log.info("built CPU kernels in %.1f s (cached in %s)", took, build_dir)


def _wait_for_lock(lock, build_dir: str) -> None:
    """flock the build directory; while another process holds it, say which and keep saying so."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    holder = "?"
    with contextlib.suppress(OSError):
        with open(os.path.join(build_dir, "builder.pid")) as f:
            holder = f.read().strip()
    log.info("waiting for process %s, which is building the CPU kernels", holder)
    t0 = time.monotonic()
    beat = t0 + _HEARTBEAT_S
    while True:
        time.sleep(0.25)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            log.info("the other build finished after %.0f s of waiting", time.monotonic() - t0)
            return
        except BlockingIOError:
            pass
        if time.monotonic() >= beat:
            log.info("still waiting for the CPU kernel build: %.0f s", time.monotonic() - t0)
            beat += _HEARTBEAT_S


def _build_or_load() -> None:
    import torch
    name = library_name()
    build_dir = os.path.join(cache_root(), name)
    so, done, failed = (os.path.join(build_dir, f) for f in (f"{name}.so", "done", "failed"))
    if not os.path.exists(done):
        os.makedirs(build_dir, exist_ok=True)
        with open(os.path.join(build_dir, "microserve.flock"), "w") as lock:
            _wait_for_lock(lock, build_dir)
            if os.path.exists(failed):
                with open(failed) as f:
                    raise RuntimeError(f.read() + f"\n(remembered from an earlier try; delete {build_dir} to retry)")
            if not os.path.exists(done):
                with open(os.path.join(build_dir, "builder.pid"), "w") as f:
                    f.write(str(os.getpid()))
                with contextlib.suppress(FileNotFoundError):  # cpp_extension's lock, left by a killed build
                    os.remove(os.path.join(build_dir, "lock"))
                try:
                    _compile(name, build_dir)
                except CompileError as e:
                    with open(failed, "w") as f:
                        f.write(str(e))
                    raise
                with open(done, "w") as f:
                    f.write(name)
    torch.ops.load_library(so)


_loaded = False


@functools.cache
def kernel_error() -> str | None:
    """Build (or load from the cache) the CPU kernels. None when `torch.ops.microserve` has them,
    else why not. Raises KernelBuildError instead when MICROSERVE_REQUIRE_KERNELS=1."""
    global _loaded
    try:
        _build_or_load()
        _loaded = True
        return None
    except Exception as e:  # noqa: BLE001 - any build failure means "use the torch path", loudly
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            raise KernelBuildError(f"{REQUIRE_ENV} is set and the CPU kernels are unavailable: {e}") from e
        log.warning("the CPU kernels are unavailable, so the slower torch path runs instead: %s", e)
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def kernels_loaded() -> bool:
    """Whether this process has the CPU kernels loaded, without building them: the model's fused
    layer ops use them exactly when something chose them (the cpu attention backend, a test)."""
    return _loaded


def _main() -> None:
    """The build child: compile and link the library into --build-dir with cpp_extension."""
    ap = argparse.ArgumentParser(description="build the microserve CPU kernels (run by kernel_error())")
    ap.add_argument("--name", required=True)
    ap.add_argument("--build-dir", required=True)
    ap.add_argument("--cflags", required=True)
    ap.add_argument("--include", nargs="+", required=True)
    ap.add_argument("--sources", nargs="+", required=True)
    a = ap.parse_args()
    from torch.utils.cpp_extension import load
    load(a.name, a.sources, extra_cflags=a.cflags.split(), extra_include_paths=a.include, build_directory=a.build_dir,
         is_python_module=False, verbose=True)


if __name__ == "__main__":
    _main()
