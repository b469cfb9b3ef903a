"""Build, cache and load the CPU kernel library: attention kernels (attention/csrc) and the model's
GEMM and fused layer ops (model/csrc), one shared library compiled on first use, for one ISA variant.

- **ISA variants.** `avx512` (x86-64-v4), `avx2` (x86-64-v3: AVX2, FMA, F16C) and `generic`
  (baseline x86-64, or the compiler's default target elsewhere: NEON on aarch64). The sources take
  their vector width and register blocking from the target (attention/csrc/vec.h), so each
  variant's inner loops fit its registers. `MICROSERVE_CPU_ISA=avx512|avx2|generic` picks one;
  by default the best this CPU runs (its /proc/cpuinfo flags). One process loads one variant; a
  variant the CPU cannot run is refused with IsaError before anything is built or loaded (a
  SIGILL otherwise). torch's own kernels dispatch at run time: cap them with
  `ATEN_CPU_CAPABILITY=avx2` beside `MICROSERVE_CPU_ISA=avx2` to time an AVX2 machine honestly.
- **Cache.** `$TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions)/microserve_cpu_<isa>_<key>/,
  where the key hashes what the library's machine code depends on: every source and header, the
  variant's flags, the compiler (its path and `--version`), Python and torch. A finished build
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
# -Wno-psabi: vector values passed between inline functions on a narrower target warn about an ABI
# that no caller outside the library sees.
CFLAGS = ["-O3", "-ffast-math", "-Wno-psabi"]
ISA_ENV = "MICROSERVE_CPU_ISA"
ISAS = ("avx512", "avx2", "generic")  # best first
# What each x86 variant's -march needs from /proc/cpuinfo (x86-64-v3 and -v4 as GCC defines them;
# LZCNT is listed as abm).
_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_X86_NEEDS = {"avx512": _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}, "avx2": _V3,
              "generic": set()}
_X86_MARCH = {"avx512": "x86-64-v4", "avx2": "x86-64-v3", "generic": "x86-64"}
# CPU-seconds of a build, measured on a 2-core Xeon (AVX-512) with GCC 12; the estimate before a
# first build, scaled by the cores used. Later builds use the last measured time instead.
_CPU_SECONDS = 55.0
_HEARTBEAT_S = 10.0
_BUILD_TIMEOUT_S = 1800.0
REQUIRE_ENV = "MICROSERVE_REQUIRE_KERNELS"


class KernelBuildError(RuntimeError):
    """The kernels could not be built, and MICROSERVE_REQUIRE_KERNELS=1 asks for them."""


class IsaError(KernelBuildError):
    """MICROSERVE_CPU_ISA names a variant that does not exist or that this CPU cannot run. Raised
    whatever MICROSERVE_REQUIRE_KERNELS says: it is a configuration error, not a failed build."""


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


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def runnable_isas() -> list[str]:
    """The variants this CPU can run, best first. Off x86 only `generic` (NEON is baseline on
    aarch64). Without /proc/cpuinfo (not Linux), what torch's own dispatch detected."""
    if not _x86():
        return ["generic"]
    flags = cpu_flags()
    if not flags:
        import torch
        cap = torch.backends.cpu.get_cpu_capability().lower()  # "avx512", "avx2" or "default"
        return [i for i in ISAS if i == "generic" or i == cap or (i == "avx2" and cap == "avx512")]
    return [i for i in ISAS if _X86_NEEDS[i] <= flags]


def isa() -> str:
    """The variant this process builds and loads: $MICROSERVE_CPU_ISA, else the best this CPU runs.
    Raises IsaError for an unknown name or one this CPU cannot run."""
    want = os.environ.get(ISA_ENV, "").strip().lower()
    runnable = runnable_isas()
    if not want:
        return runnable[0]
    if want not in ISAS:
        raise IsaError(f"{ISA_ENV}={want!r} is not a kernel variant (choose {', '.join(ISAS)})")
    if want not in runnable:
        missing = " ".join(sorted(_X86_NEEDS[want] - cpu_flags())) if _x86() else f"an x86 CPU ({platform.machine()})"
        raise IsaError(f"{ISA_ENV}={want} asks for kernels this CPU cannot run (it lacks {missing}); "
                       f"it runs: {', '.join(runnable)}")
    return want


def isa_cflags(variant: str) -> list[str]:
    """The target flags of a variant; `generic` off x86 is the compiler's default target."""
    if _x86():
        return [f"-march={_X86_MARCH[variant]}", "-mtune=generic"]
    if variant != "generic":
        raise IsaError(f"the {variant} variant is x86 only")
    return []


def cache_key(variant: str | None = None) -> str:
    """What the built library of `variant` (default: this process's) depends on, hashed.
    Deliberately absent: ninja, PATH, the working directory, where the package is installed
    (sources are hashed by content) and the exact CPU (the variant's flags name the target)."""
    import torch
    h = hashlib.sha256()
    files = sorted((name, os.path.join(d, name)) for d in INCLUDE_DIRS for name in os.listdir(d)
                   if name.endswith((".cpp", ".h")))
    for name, path in files:
        with open(path, "rb") as f:
            h.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    flags = CFLAGS + isa_cflags(variant or isa())
    for part in (" ".join(flags), *_compiler(), platform.machine(), platform.python_version(),
                 torch.__version__, torch.version.git_version or ""):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:12]


def library_name(variant: str | None = None) -> str:
    variant = variant or isa()
    return f"microserve_cpu_{variant}_{cache_key(variant)}"


def library_dir(variant: str | None = None) -> str:
    """Where the variant's library is (or will be) built and cached, with what is kept beside it."""
    return os.path.join(cache_root(), library_name(variant))


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


def _compile(name: str, build_dir: str, variant: str) -> None:
    """Run the build in a child process, logging a heartbeat. Raises RuntimeError with the compiler's
    last lines when it fails."""
    jobs = len(_all_cores())
    root = os.path.dirname(build_dir)
    estimate = _estimate_s(root, jobs)
    log.info("building CPU kernels for this machine (once), about %.0f s (the %s variant)", estimate, variant)
    env = dict(os.environ)
    with contextlib.suppress(ImportError):  # the ninja our package depends on, not whichever is on PATH
        import ninja
        env["PATH"] = ninja.BIN_DIR + os.pathsep + env.get("PATH", "")
    env.setdefault("MAX_JOBS", str(jobs))
    out_path = os.path.join(build_dir, "build.log")
    t0 = time.monotonic()
    with open(out_path, "w") as out:
        argv = [sys.executable, "-m", "microserve.kernels.build", "--name", name, "--build-dir", build_dir,
                "--cflags", " ".join(CFLAGS + isa_cflags(variant)), "--include", *INCLUDE_DIRS, "--sources", *SOURCES]
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


def _build_or_load(variant: str) -> None:
    import torch
    name = library_name(variant)
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
                    _compile(name, build_dir, variant)
                except CompileError as e:
                    with open(failed, "w") as f:
                        f.write(str(e))
                    raise
                with open(done, "w") as f:
                    f.write(name)
    torch.ops.load_library(so)


_loaded: str | None = None  # the variant loaded into this process


@functools.cache
def kernel_error() -> str | None:
    """Build (or load from the cache) the CPU kernels of this process's variant (isa()). None when
    `torch.ops.microserve` has them, else why not. Raises KernelBuildError instead when
    MICROSERVE_REQUIRE_KERNELS=1, and IsaError (always) for a variant this CPU cannot run."""
    global _loaded
    variant = isa()  # outside the try: a variant the CPU cannot run is an error, never a fallback
    try:
        _build_or_load(variant)
        _loaded = variant
        return None
    except Exception as e:  # noqa: BLE001 - any build failure means "use the torch path", loudly
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            raise KernelBuildError(f"{REQUIRE_ENV} is set and the CPU kernels are unavailable: {e}") from e
        log.warning("the CPU kernels are unavailable, so the slower torch path runs instead: %s", e)
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def kernels_loaded() -> bool:
    """Whether this process has the CPU kernels loaded, without building them."""
    return _loaded is not None


def loaded_isa() -> str | None:
    """The variant this process loaded, or None."""
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
