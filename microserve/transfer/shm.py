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

A peer's description names no path: it gives the receiver's pid, start time and the fd number of
its pool. The sender builds `/proc/<pid>/fd/<fd>` itself, and only for a live process with that
start time; it opens it (O_RDWR, never O_CREAT) only if it is a deleted
`/dev/shm/microserve-kv-<pid>-*` file of exactly the described size, then maps that fd. Slots,
layouts and liveness are the planner's (plan.py).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import re
import socket
import stat
import uuid

import torch

from microserve.transfer.base import CopyWorker, KVTransport, TransferStats
from microserve.transfer.plan import (CopyPlan, Geometry, Identity, MappedPeer, Planner, TransferError, bad,
                                      process_start_time)

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


_SHM_DIR = os.path.realpath("/dev/shm")  # as /proc/<pid>/fd names it (/run/shm on some systems)


def _pool_name(pid: int) -> str:
    """Every pool's file name starts so: `allocate` adds 8 hex digits, `_open` checks for them."""
    return f"{_SHM_DIR}/microserve-kv-{pid}-"


class ShmTransport(KVTransport):
    name = "shm"
    local_only = True

    def __init__(self) -> None:
        super().__init__()
        self._fd: int | None = None
        self._worker = CopyWorker("shm-kv-copy", inline_bytes=INLINE_BYTES)

    def allocate(self, shape, dtype, device) -> torch.Tensor:
        if torch.device(device).type != "cpu":
            raise ValueError("the shm transport holds KV in host memory; use cuda_ipc or nixl on GPU")
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        path = f"{_pool_name(os.getpid())}{uuid.uuid4().hex[:8]}"
        self._fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(self._fd, nbytes)
            self.local = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
        finally:
            os.unlink(path)
        _populate(self.local)
        self.planner = Planner(self.local)
        return self.local

    def describe(self) -> dict:
        if self._fd is None:
            raise TransferError("the shm transport has no KV pool yet", 500)
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "start": process_start_time(pid), "fd": self._fd,
                "shape": list(self.local.shape), "dtype": self.planner.geom.dtype}

    def _peer_key(self, peer, ident, geom):
        fd_no = peer.get("fd")
        if type(fd_no) is not int or not 0 <= fd_no < 2**31:
            raise bad("kv_addr_info's shm peer has no usable fd (an integer)")
        return ident, geom, fd_no

    def _open(self, peer: dict, ident: Identity, geom: Geometry) -> MappedPeer:
        """Map a live receiver's pool through /proc/<pid>/fd/<fd>, after checking that this is a
        microserve KV pool of exactly the described size (400 otherwise)."""
        fd_no = peer["fd"]  # an int: _peer_key checked it
        proc = f"/proc/{ident.pid}/fd/{fd_no}"
        try:
            target = os.readlink(proc)
            st = os.stat(proc)
        except OSError as e:
            raise bad(f"pid {ident.pid} has no fd {fd_no} we can reach: {e.strerror}") from None
        name = re.escape(_pool_name(ident.pid))
        if (not re.fullmatch(rf"{name}[0-9a-f]{{8}} \(deleted\)", target) or not stat.S_ISREG(st.st_mode)
                or st.st_dev != os.stat(_SHM_DIR).st_dev):
            raise bad(f"fd {fd_no} of pid {ident.pid} is not a microserve KV pool")
        if st.st_size != geom.nbytes:
            raise bad(f"the KV pool of pid {ident.pid} holds {st.st_size} bytes, not the {geom.nbytes} its "
                      "description says")
        try:
            fd = os.open(proc, os.O_RDWR | os.O_CLOEXEC)  # no O_CREAT: this opens what is there, or nothing
        except OSError as e:
            raise bad(f"cannot open the KV pool of pid {ident.pid}: {e.strerror}") from None
        try:
            mine = os.fstat(fd)  # the same file, still deleted: fd_no was not swapped since we looked
            if (mine.st_dev, mine.st_ino, mine.st_size) != (st.st_dev, st.st_ino, st.st_size) or mine.st_nlink:
                raise bad(f"fd {fd_no} of pid {ident.pid} changed while it was opened")
            mm = mmap.mmap(fd, geom.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise bad(f"cannot map the KV pool of pid {ident.pid}: {e.strerror}") from None
        finally:
            os.close(fd)  # the mapping keeps the file
        kv = torch.frombuffer(mm, dtype=getattr(torch, geom.dtype)).view(geom.shape)  # holds mm
        return MappedPeer(ident, geom, kv, kv.data_ptr())

    def _post(self, plan: CopyPlan, remote: MappedPeer) -> None:
        """Queue the copy: one memmove per run, K then V (a C call that releases the GIL)."""
        srcs, dsts, lens = plan.moves()  # K runs; a V run is its K run plus the K -> V distance
        sv, dv = plan.src_v, plan.dst_v

        def copy(keep=(self.local, remote.kv)) -> None:  # keep: both mappings stay alive until the copy ran
            move = ctypes.memmove
            for ov, iv in ((0, 0), (dv, sv)):  # all K runs, then all V runs: forward through memory
                for d, s, n in zip(dsts, srcs, lens):
                    move(d + ov, s + iv, n)
        self._worker.submit(copy, plan.nbytes)

    def _wait(self, timeout: float, touched) -> TransferStats:
        return self._worker.wait(timeout)

    def close(self) -> None:
        self._worker.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
