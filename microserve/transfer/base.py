"""The transport interface, the `kv_append_metadata` wire format, and a copy worker for overlap.

`kv_append_metadata` (prep_recv's reply, remote_send's `kv_addr_info`) is an opaque base64 string
of JSON:

    {"transport": "shm", "peer": {...how to reach the receiver's pool...},
     "layout": [layers, kv_heads, head_dim, page_size, dtype], "runs": [n, begin1, len1, ...],
     "fence": {"id": ..., "url": the receiver's address, where a sender claims the fence}}

signed by the receiver with the cluster token (microserve/cluster.py) when there is one.

`runs` are the receiver's slots for prompt[matched:end) in MLC's compressed form.
"""
from __future__ import annotations

import base64
import binascii
import json
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from microserve.errors import ServeError
from microserve.kv.pool import compress_runs, expand_runs


class TransferError(ServeError):
    """A KV transfer could not be set up (400: bad or foreign kv_addr_info) or did not complete
    (502: peer failed or died, 504: timed out)."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message, status, "invalid_kv_addr_info" if status == 400 else "transfer_error")


@dataclass
class TransferStats:
    bytes: int = 0
    transfer_s: float = 0.0  # time the copies took
    exposed_s: float = 0.0  # of which compute waited for (the rest was hidden behind compute)


def encode_kv_addr(transport: str, peer: dict, layout: list, slots: list[int], fence: dict | None = None) -> str:
    doc = {"transport": transport, "peer": peer, "layout": layout, "runs": compress_runs(slots)}
    if fence is not None:  # the reservation's fence: {"id", "url"} (kv/cache.py, Fencing)
        doc["fence"] = fence
    return base64.b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()


def decode_kv_addr(s: str) -> tuple[dict, list[int]]:
    """Parse kv_addr_info; raises TransferError(400) on anything malformed."""
    try:
        doc = json.loads(base64.b64decode(s, validate=True))
        slots = expand_runs(doc["runs"])
        if not isinstance(doc["transport"], str) or not isinstance(doc["peer"], dict):
            raise ValueError("bad transport or peer")
        return doc, slots
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise TransferError(f"kv_addr_info is not valid kv_append_metadata: {e}", 400) from None


def slot_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Pairs of slots -> (src_begin, dst_begin, length) runs contiguous on both sides."""
    if len(src) > 64:  # a prefill window: numpy is ~5x faster than the loop below
        return [tuple(r) for r in slot_runs_array(src, dst).tolist()]
    runs: list[list[int]] = []
    for s, d in zip(src, dst):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [tuple(r) for r in runs]


def slot_runs_array(src: list[int], dst: list[int]) -> np.ndarray:
    """slot_runs as an int64 array [runs, 3] of (src_begin, dst_begin, length), vectorized."""
    n = min(len(src), len(dst))
    s, d = np.asarray(src[:n], dtype=np.int64), np.asarray(dst[:n], dtype=np.int64)
    if n == 0:
        return np.empty((0, 3), dtype=np.int64)
    starts = np.concatenate(([0], np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1))
    runs = np.empty((len(starts), 3), dtype=np.int64)
    runs[:, 0], runs[:, 1], runs[:, 2] = s[starts], d[starts], np.diff(starts, append=n)
    return runs


class RunCache:
    """slot_runs_array of the last (src, dst) pair asked for. A step's per-layer writes repeat the
    same slot lists, so every layer after the first costs a tuple comparison (~10 us for 8k slots)
    instead of a numpy conversion (~300 us). The returned array is shared: do not modify it."""

    def __init__(self) -> None:
        self._key: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._runs = np.empty((0, 3), dtype=np.int64)

    def __call__(self, src: list[int], dst: list[int]) -> np.ndarray:
        key = (tuple(src), tuple(dst))
        if key != self._key:
            self._key, self._runs = key, slot_runs_array(src, dst)
        return self._runs


def process_start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot): tells a live peer from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


class ProcessPeer:
    """A receiver's pool mapped into this process, from a peer on this host (shm, cuda_ipc)."""

    def __init__(self, desc: dict, kv: torch.Tensor) -> None:
        self.desc, self.kv = desc, kv
        self.pid, self.start = desc["pid"], desc["start"]

    def alive(self) -> bool:
        return process_start_time(self.pid) == self.start


def check_alive(peers) -> None:
    """Memory written into a peer's pool is only worth something if its owner still runs."""
    for peer in peers:
        if not peer.alive():
            raise TransferError(f"the receiving engine (pid {peer.pid}) died during the transfer", 502)


class KVTransport:
    """Contract:
    - `allocate(shape, dtype, device)` returns the engine's KV pool memory, reachable by peers.
    - `describe()` is a JSON-able dict that lets a peer's `connect` reach that memory.
    - `write(layer, src, dst, remote)` starts copying rows `src` of our layer `layer` (K and V) to
      rows `dst` of the same layer in `remote`. It may return before the bytes land.
    - `flush(timeout)` returns once every write so far has landed (raises TransferError if one
      failed, the peer died, or the timeout passed) and reports the bytes and times involved.
    """

    name = "base"

    def __init__(self) -> None:
        self.local: torch.Tensor | None = None

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        self.local = torch.zeros(shape, dtype=dtype, device=device)
        return self.local

    def describe(self) -> dict:
        raise TransferError(f"transport {self.name!r} cannot receive KV", 400)

    def connect(self, peer: dict) -> Any:
        raise TransferError(f"transport {self.name!r} cannot send KV", 400)

    def write(self, layer: int, src: list[int], dst: list[int], remote: Any) -> None:
        raise NotImplementedError

    def flush(self, timeout: float) -> TransferStats:
        return TransferStats()

    def close(self) -> None:
        pass


class CopyWorker:
    """Runs row copies on a background thread so they overlap the sender's compute.

    Copies (torch kernels, ctypes.memmove) release the GIL, so on CPU they run beside the next
    layer's matmuls; `wait` measures how long the caller still had to wait (the exposed part).
    Thread hand-offs are what cost on a small, busy host (each wake-up can wait for a time slice),
    so a job of at most `inline_bytes` submitted while the thread is idle runs in the caller, and
    the thread wakes a waiting caller once, when the last job is done. (Having `wait` run queued
    jobs itself, beside the thread, measured slower: two threads looping over short memmoves
    mostly trade the GIL.)"""

    def __init__(self, name: str, inline_bytes: int = 0) -> None:
        self.inline_bytes = inline_bytes
        self._q: queue.Queue = queue.Queue()
        self._pending = 0
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self.stats = TransferStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, nbytes: int) -> None:
        with self._cv:
            inline = nbytes <= self.inline_bytes and self._pending == 0
            self._pending += 1
        if inline:  # nothing queued before it, so the order of copies is kept
            self._do(fn, nbytes, exposed=True)
        else:
            self._q.put((fn, nbytes))

    def _run(self) -> None:
        while True:
            fn, nbytes = self._q.get()
            if fn is None:
                return
            self._do(fn, nbytes)

    def _do(self, fn, nbytes: int, exposed: bool = False) -> None:
        t0 = time.perf_counter()
        try:
            fn()
        except BaseException as e:  # reported by wait()
            self._error = e
        dt = time.perf_counter() - t0
        with self._cv:
            self.stats.bytes += nbytes
            self.stats.transfer_s += dt
            self.stats.exposed_s += dt if exposed else 0.0  # an inline copy held the caller up
            self._pending -= 1
            if self._pending == 0:
                self._cv.notify_all()

    def wait(self, timeout: float) -> TransferStats:
        t0 = time.perf_counter()
        with self._cv:
            if not self._cv.wait_for(lambda: self._pending == 0, timeout):
                raise TransferError(f"KV transfer did not complete within {timeout:.1f}s", 504)
            # the caller's time beyond the copies themselves is wake-up latency, not transfer
            self.stats.exposed_s = min(self.stats.exposed_s + time.perf_counter() - t0, self.stats.transfer_s)
            stats, self.stats = self.stats, TransferStats()
            err, self._error = self._error, None
        if isinstance(err, TransferError):  # raised by a job on purpose, with its own status
            raise err
        if err is not None:
            raise TransferError(f"KV transfer failed: {err}") from err
        return stats

    def close(self) -> None:
        self._q.put((None, 0))


def make_transport(name: str, **kw) -> KVTransport:
    if name == "shm":
        from microserve.transfer.shm import ShmTransport
        return ShmTransport(**kw)
    if name == "nixl":
        from microserve.transfer.nixl import NixlTransport
        return NixlTransport(**kw)
    if name == "cuda_ipc":
        from microserve.transfer.cuda_ipc import CudaIpcTransport
        return CudaIpcTransport(**kw)
    if name == "none":
        return KVTransport()
    raise ValueError(f"unknown KV transport {name!r} (choose shm, nixl, cuda_ipc or none)")
