"""`shm`: engines on one host share KV pools through shared memory; a write is a one-sided row copy.

The pool is a /dev/shm file that is unlinked right after it is mapped: peers open it through
`/proc/<pid>/fd/<fd>`, and the kernel frees it when the last process holding it exits, so no
segment outlives a crashed engine.
"""
from __future__ import annotations

import os
import socket
import uuid

import torch

from microserve.transfer.base import (CopyWorker, KVTransport, ProcessPeer, TransferError, TransferStats,
                                      process_start_time, slot_runs)


class ShmTransport(KVTransport):
    name = "shm"

    def __init__(self) -> None:
        super().__init__()
        self._fd: int | None = None
        self._peers: dict[tuple, ProcessPeer] = {}
        self._worker = CopyWorker("shm-kv-copy")
        self._touched: set[ProcessPeer] = set()

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
        self._dtype = str(dtype).removeprefix("torch.")
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
        if key in self._peers and self._peers[key].alive():
            return self._peers[key]
        if peer["host"] != socket.gethostname():
            raise TransferError(f"shm reaches engines on this host only; the receiver is on {peer['host']!r}"
                                " (use --kv-transport nixl across hosts)", 400)
        if dtype != self._dtype or shape[:2] + shape[3:] != list(self.local.shape[:2]) + list(self.local.shape[3:]):
            raise TransferError(f"receiver's KV layout {shape} {dtype} does not match ours "
                                f"{list(self.local.shape)} {self._dtype}", 400)
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
        local = self.local[layer].flatten(1, 2)  # [2, slots, H, D]
        target = remote.kv[layer].flatten(1, 2)
        runs = slot_runs(src, dst)
        nbytes = len(src) * local[:, 0].numel() * local.element_size()
        self._touched.add(remote)
        if len(runs) * 4 <= len(src):  # mostly whole pages: slice copies run at memcpy speed
            def copy():
                for s, d, n in runs:
                    target[:, d:d + n].copy_(local[:, s:s + n])
        else:
            src_t, dst_t = torch.tensor(src), torch.tensor(dst)

            def copy():
                target.index_copy_(1, dst_t, local.index_select(1, src_t))
        self._worker.submit(copy, nbytes)

    def flush(self, timeout: float) -> TransferStats:
        stats = self._worker.wait(timeout)
        touched, self._touched = self._touched, set()
        for peer in touched:  # memory we wrote is only worth something if its owner still runs
            if not peer.alive():
                raise TransferError(f"the receiving engine (pid {peer.pid}) died during the transfer", 502)
        return stats

    def close(self) -> None:
        self._worker.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
