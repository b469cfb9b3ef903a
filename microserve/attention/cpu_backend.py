"""The CPU default: compiled attention kernels that read the paged pool in place, one for decode
(csrc/paged_decode.cpp) and one for prefill chunks (csrc/paged_prefill.cpp), and one call that
stores a step's new K/V (csrc/store_kv.cpp).

The kernels are compiled on first use with torch.utils.cpp_extension (a few seconds, once per CPU
type, Python and torch version; later starts load them from the cache in $TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions). Where they cannot be built (no C++ compiler or ninja), `auto` falls back to
the pure torch backend, which gives the same results more slowly.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import time

import torch

from microserve.attention.base import AttentionMetadata
from microserve.attention.torch_backend import TorchSDPABackend

log = logging.getLogger(__name__)

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
# One library for all CPU kernels: attention here, and the model's GEMM and fused layer ops
# (model/csrc), which model/layers.py, model/llama.py and model/packed_linear.py use once the library
# is loaded (kernels_loaded()).
MODEL_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model", "csrc")
_SOURCES = [os.path.join(CSRC, name) for name in ("paged_decode.cpp", "paged_prefill.cpp", "store_kv.cpp")] + [
    os.path.join(MODEL_CSRC, name) for name in ("gemm.cpp", "layer_ops.cpp")]
# -ffast-math lets the float reductions and expf vectorize (glibc's libmvec). It is a compile flag
# only: cpp_extension links without it, so crtfastmath (which would flush denormals for the whole
# process) is never linked in.
CFLAGS = ["-O3", "-march=native", "-ffast-math"]


def _build_name() -> str:
    """-march=native code must not be loaded on another CPU that shares the cache directory, and a
    build links against one torch and one Python, so the cached build is keyed by all three."""
    key = f"{platform.machine()} {platform.python_version()} {torch.__version__}"
    try:
        with open("/proc/cpuinfo") as f:
            key += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"microserve_cpu_attention_{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _load(name: str) -> None:
    """torch.utils.cpp_extension.load, made safe against builders that die mid-build.

    cpp_extension serialises builds with a lock *file*, which outlives a process killed while
    compiling (an engine stopped during its first start), and then every later load waits on it
    forever. So builds of ours also hold an flock, which the kernel releases when its holder dies;
    whoever holds it knows any lock file left in the build directory is stale."""
    from torch.utils.cpp_extension import get_default_build_root, load
    build_dir = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root(), name)
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "microserve.flock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(build_dir, "lock"))
        load(name, _SOURCES, extra_cflags=CFLAGS, extra_include_paths=[CSRC, MODEL_CSRC], build_directory=build_dir,
             is_python_module=False)


_loaded = False


@functools.cache
def kernel_error() -> str | None:
    """Build (or load from cache) the CPU kernels. None when `torch.ops.microserve` has them, else why not."""
    global _loaded
    try:
        t0 = time.perf_counter()
        _load(_build_name())
        took = time.perf_counter() - t0
        if took > 1.0:  # a build, not a cache hit: say where the pause went
            log.info("compiled the CPU kernels in %.1f s (cached for later starts)", took)
        _loaded = True
        return None
    except Exception as e:  # noqa: BLE001 - any build failure means "use the torch path"
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"


def kernels_loaded() -> bool:
    """Whether this process has the CPU kernels loaded, without building them: the model's fused
    layer ops use them exactly when something chose them (the cpu attention backend, a test)."""
    return _loaded


class CPUPagedBackend(TorchSDPABackend):
    """TorchSDPABackend with both phases served by compiled kernels that read the paged pool in
    place (no gather, no padding, GQA by indexing): `torch.ops.microserve.paged_decode_attention`
    for decodes and `paged_prefill_attention` for prefill chunks, cached prefixes included.
    fp32, bf16 and fp16 (math in fp32); a pool whose dtype differs from q's takes the torch path."""

    name = "cpu"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        why = kernel_error()
        if why is not None:
            raise RuntimeError(f"the CPU attention kernels could not be built ({why}); use --attention-backend torch")

    @staticmethod
    def _fits(q: torch.Tensor, kv_layer: torch.Tensor) -> bool:
        return q.dtype in _KERNEL_DTYPES and kv_layer.dtype == q.dtype and q.device.type == "cpu"

    def _store(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        if not self._fits(k, kv_layer) or k.stride(-1) != 1 or k.stride(1) != k.shape[2] or v.stride(1) != v.shape[2]:
            super()._store(kv_layer, k, v, meta)
            return
        torch.ops.microserve.store_kv(kv_layer, k, v, meta.slot_mapping)

    def _decode(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, out: torch.Tensor) -> None:
        if not self._fits(q, kv_layer) or q.stride(-1) != 1:
            super()._decode(q, kv_layer, meta, out)
            return
        # the kernel reads the first len(q) rows of the tables and lengths: the decodes' (no slicing)
        torch.ops.microserve.paged_decode_attention(q, kv_layer, meta.block_tables, meta.seq_lens, self.scale, out)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                 meta: AttentionMetadata, out: torch.Tensor) -> None:
        if not self._fits(q, kv_layer) or q.stride(-1) != 1 or not out.is_contiguous():
            super()._prefill(q, k, v, kv_layer, meta, out)
            return
        nd = meta.num_decodes  # query_start_loc holds absolute rows of q, so its tail needs no rebasing
        torch.ops.microserve.paged_prefill_attention(q, kv_layer, meta.block_tables[nd:],
                                                     meta.query_start_loc[nd:], meta.seq_lens[nd:], self.scale, out)
