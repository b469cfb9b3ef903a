"""Process-wide settings for a long-running engine server.

- **Keep freed memory.** torch's CPU allocator is plain malloc. glibc serves large blocks with fresh
  mmap()s (above a threshold that adapts up to 32 MiB) and hands freed heap tops back to the OS, so
  each engine step page-faults its multi-MB activations in again: on the served benchmark's
  workload that cost 8-19% of engine throughput (docs/bench_engine.md). Raising both thresholds
  keeps freed blocks for the next step. vLLM's CPU backend gets the same by preloading tcmalloc.
- **Freeze start-up objects.** Modules, parameters and imported code live as long as the process;
  `gc.freeze()` moves them out of the collector's reach, so full collections (tens of ms on a loaded
  engine) only walk what was allocated since.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Tune glibc malloc to reuse freed blocks up to these sizes. Does nothing (returns False) off
    glibc, or when the user already tuned malloc through its environment variables."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    except (OSError, AttributeError):
        return False
    log.debug("malloc keeps freed blocks: mmap threshold %d MiB, trim threshold %d MiB (%s)",
              mmap_threshold >> 20, trim_threshold >> 20, "ok" if ok else "refused")
    return ok


def freeze_startup_objects() -> None:
    """Collect once, then move every live object to the permanent generation."""
    gc.collect()
    gc.freeze()
