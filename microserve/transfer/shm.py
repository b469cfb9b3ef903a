"""`shm`: engines on one host share KV pools through shared memory; a write is a one-sided row copy.

The pool is a /dev/shm file that is unlinked right after it is mapped: peers open it through
`/proc/<pid>/fd/<fd>`, and the kernel frees it when the last process holding it exits, so no
segment outlives a crashed engine. It is populated when it is mapped, as the other transports'
`torch.zeros` pools are when they are zeroed: left to first touch, every fresh 4 KiB page cost a
fault inside the step that first wrote K/V into it (~2.8 ms of a 2048-token stories260K prefill
of ~17 ms; 256 MiB populate in ~0.16 s at start-up instead).

A write is one `memmove` per contiguous run and kind (K, V), on the CopyWorker thread. A run is a
page (16 KiB per layer and kind for an 8-head, 64-dim bf16 model) or more, so each call moves data
at memcpy speed; indexed copies (index_select + index_copy_) would pay a second pass through a
temporary, and torch slice copies cost ~5 us of dispatch each, as much as the 16 KiB they move.
Addresses are bounds-checked against both pools before anything is copied.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import socket
import uuid

import torch

from microserve.transfer.base import (CopyWorker, KVTransport, ProcessPeer, RunCache, TransferError, TransferStats,
                                      check_alive, process_start_time, slot_runs)

# Copies up to this size run in the caller when the copy thread is idle (a few tokens, a page or
# two): a ~10 us copy is cheaper than waking the thread. Larger ones overlap compute.
INLINE_BYTES = 128 << 10


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def _populate(t: torch.Tensor) -> None:
    """Fault in every page of a mapped tensor now, writably, without changing its contents."""
    addr, nbytes = t.data_ptr(), t.numel() * t.element_size()
    start = addr - addr % mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(addr + nbytes - start), _MADV_POPULATE_WRITE) != 0:
        t.zero_()  # older kernels: touch it (the file is new, so it is zeros already)


class ShmTransport(KVTransport):
    name = "shm"

    def __init__(self) -> None:
        super().__init__()
        self._fd: int | None = None
        self._peers: dict[tuple, ProcessPeer] = {}
        self._worker = CopyWorker("shm-kv-copy", inline_bytes=INLINE_BYTES)
        self._touched: set[ProcessPeer] = set()
        self._runs = RunCache()

    def allocate(self, shape, dtype, device) -> torch.Tensor:
        if torch.device(device).type != "cpu":
            raise ValueError("the shm transport holds KV in host memory; use cuda_ipc or nixl on GPU")
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        path = f"/dev/shm/microserve-kv-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(self._fd, nbytes)
            self.local = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
        finally:
            os.unlink(path)
        _populate(self.local)
        self._dtype = str(dtype).removeprefix("torch.")
        self._row = shape[4] * shape[5] * self.local.element_size()  # one token's K (or V) in one layer
        self._slots = shape[2] * shape[3]
        return self.local

    def describe(self) -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "start": process_start_time(pid),
                "path": f"/proc/{pid}/fd/{self._fd}", "shape": list(self.local.shape), "dtype": self._dtype}

    def connect(self, peer: dict) -> ProcessPeer:
        try:
            key = (peer["host"], peer["pid"], peer["start"], peer["path"])
            shape, dtype = list(peer["shape"]), peer["dtype"]
        except (KeyError, TypeError):
            raise TransferError("kv_addr_info has no usable shm peer description", 400) from None
        if peer["host"] != socket.gethostname():
            raise TransferError(f"shm reaches engines on this host only; the receiver is on {peer['host']!r}"
                                " (use --kv-transport nixl across hosts)", 400)
        if dtype != self._dtype or shape[:2] + shape[3:] != list(self.local.shape[:2]) + list(self.local.shape[3:]):
            raise TransferError(f"receiver's KV layout {shape} {dtype} does not match ours "
                                f"{list(self.local.shape)} {self._dtype}", 400)
        if key in self._peers and self._peers[key].alive() and list(self._peers[key].kv.shape) == shape:
            return self._peers[key]
        numel = 1
        for s in shape:
            numel *= s
        try:
            kv = torch.from_file(peer["path"], shared=True, size=numel, dtype=self.local.dtype).view(shape)
        except (RuntimeError, OSError) as e:
            raise TransferError(f"cannot map the receiver's KV pool (is it alive?): {e}", 502) from None
        p = ProcessPeer(peer, kv)
        if not p.alive():
            raise TransferError("the receiving engine is not running", 502)
        self._peers[key] = p
        return p

    def write(self, layer: int, src: list[int], dst: list[int], remote: ProcessPeer) -> None:
        """Queue the copy of layer `layer`'s K and V rows `src` into the receiver's rows `dst`.
        Slots outside either pool copy nothing and fail the next flush (400)."""
        if not src:
            return
        local, target = self.local, remote.kv
        row = self._row
        lslots, rslots = self._slots, target.shape[2] * target.shape[3]
        # [layers, 2, slots, row] is one contiguous buffer: K of layer l is plane 2l, V plane 2l+1
        lk = local.data_ptr() + 2 * layer * lslots * row
        rk = target.data_ptr() + 2 * layer * rslots * row
        lv, rv = lslots * row, rslots * row  # K -> V distance in each pool
        self._touched.add(remote)
        ok = len(src) == len(dst) and 0 <= layer < local.shape[0]
        if len(src) <= 64:  # decode-sized: plain Python beats numpy's per-call overhead
            runs = slot_runs(src, dst)
            ok = ok and all(s >= 0 and d >= 0 and s + n <= lslots and d + n <= rslots for s, d, n in runs)
            srcs, dsts, lens = [lk + s * row for s, _, _ in runs], [rk + d * row for _, d, _ in runs], \
                [n * row for _, _, n in runs]
        else:
            r = self._runs(src, dst)
            ok = ok and r[:, :2].min() >= 0 and (r[:, 0] + r[:, 2]).max() <= lslots \
                and (r[:, 1] + r[:, 2]).max() <= rslots
            srcs, dsts, lens = (r[:, 0] * row + lk).tolist(), (r[:, 1] * row + rk).tolist(), (r[:, 2] * row).tolist()
        if not ok:
            err = TransferError(f"write of layer {layer}: slots outside the pools ({lslots} local, {rslots} "
                                f"remote slots) or {len(src)} != {len(dst)} slots", 400)

            def fail() -> None:
                raise err
            self._worker.submit(fail, 0)
            return

        def copy(keep=(local, target)) -> None:  # keep: both mappings stay alive until the copy ran
            move = ctypes.memmove  # a C call that releases the GIL: compute threads keep running
            for dv, sv in ((0, 0), (rv, lv)):  # all K runs, then all V runs: forward through memory
                for d, s, n in zip(dsts, srcs, lens):
                    move(d + dv, s + sv, n)
        self._worker.submit(copy, 2 * len(src) * row)

    def flush(self, timeout: float) -> TransferStats:
        stats = self._worker.wait(timeout)
        touched, self._touched = self._touched, set()
        check_alive(touched)
        return stats

    def close(self) -> None:
        self._worker.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
