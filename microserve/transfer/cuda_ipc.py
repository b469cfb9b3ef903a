"""`cuda_ipc`: engines on one host share GPU KV pools by CUDA IPC handle; a write is a one-sided copy
on a side stream.

Receiver: the pool is one `cudaMalloc`'d tensor; `describe()` exports its IPC handle (the fields of
`torch.multiprocessing.reductions.reduce_tensor`, written out as JSON, never pickled: kv_addr_info
comes over HTTP and unpickling it would run whatever a peer sent).

Sender: `connect` maps the receiver's pool once (`rebuild_cuda_tensor`, cached per peer) and
`write(layer, src, dst, remote)` copies rows on a side stream, ordered by events so the copy runs
while the rest of the layer (and the next layers) compute:

    compute stream:  ... store K/V of layer l ─┬─ attention l ── MLP l ── layer l+1 ...
                                   event `ready`│
    side stream:                    wait(ready) └─ gather rows ── write into peer pool ── event `done`

`flush` waits for every `done` (polling, so it can time out), then reports bytes, copy time (CUDA
event timing) and how long the caller was held up (the part of the transfer compute did not hide).

Rows are addressed by slot (`slot = page * page_size + offset`); a layer of the pool viewed as
`[2 (K, V), num_slots, kv_heads, head_dim]` makes one token's K or V one contiguous row:

    pool[layer]  [2, pages, page_size, H, D] ─flatten(1, 2)→ [2, pages * page_size, H, D]
    src slot s   ─ same layer, same kind ─→  dst slot d   (for each (s, d) pair)

Pools on different GPUs of one host work too: rows are gathered on the sender's GPU, copied
peer-to-peer, and scattered on the receiver's GPU, each on a side stream of its device.

Checks are the planner's (plan.py): a description maps only a contiguous pool of the described
geometry, held by a live process on this host, and every write's slots are checked against both
pools before any copy is queued, so a garbled kv_addr_info fails that transfer (400), never the
device (an out-of-range index_copy_ is a device assert that takes every request down with it).
"""
from __future__ import annotations

import base64
import binascii
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from microserve.transfer.base import KVTransport, TransferStats
from microserve.transfer.plan import CopyPlan, Geometry, Identity, MappedPeer, TransferError, bad, process_start_time

# Few runs: copy each as a plain memcpy per kind (no index tensors). Many runs (short, scattered):
# one gather and one scatter kernel, with index tensors uploaded once and reused by every layer.
MAX_SLICE_RUNS = 4


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode()


def _unb64(s: str | None) -> bytes | None:
    return None if s is None else base64.b64decode(s, validate=True)


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return out[::-1]


def _device_by_uuid(uuid: str) -> int | None:
    """This process's index of the GPU with this UUID (indices differ across CUDA_VISIBLE_DEVICES)."""
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    return None


@dataclass
class _Pending:
    done: torch.cuda.Event  # on the stream that finishes the copy
    timed: tuple[torch.cuda.Event, torch.cuda.Event]  # (start, end) on one device, for timing
    nbytes: int
    keep: list = field(default_factory=list)  # tensors the copy reads or writes, alive until it lands


class CudaIpcTransport(KVTransport):
    """KV pools in GPU memory shared by CUDA IPC; see the module docstring. Contract: `KVTransport`."""

    name = "cuda_ipc"
    local_only = True

    def __init__(self) -> None:
        super().__init__()
        self._desc: dict | None = None
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._pending: list[_Pending] = []
        self._index: dict[tuple[int, int, int], tuple[Any, Any, torch.Tensor, torch.Tensor]] = {}

    # ---- receiver side ---------------------------------------------------------------------------
    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The pool, in one CUDA allocation on `device` (a CUDA device; ValueError otherwise)."""
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError("the cuda_ipc transport holds KV in GPU memory; use shm (or nixl) for a CPU engine")
        return super().allocate(shape, dtype, device)

    def describe(self) -> dict:
        """How a peer on this host maps our pool: the IPC handle and the tensor's geometry.

        Exported once and cached: each export registers a new IPC reference with torch's sharing
        bookkeeping, and the pool lives as long as the engine anyway."""
        if self.local is None:
            raise TransferError("cuda_ipc transport has no KV pool yet", 500)
        if self._desc is None:
            from torch.multiprocessing.reductions import reduce_tensor
            _, args = reduce_tensor(self.local)
            (_, size, stride, offset, _, _, device, handle, size_bytes, offset_bytes, _, rc_handle, rc_offset,
             ev_handle, ev_sync) = args
            pid = os.getpid()
            self._desc = {
                "host": socket.gethostname(), "pid": pid, "start": process_start_time(pid),
                "gpu_uuid": str(torch.cuda.get_device_properties(device).uuid),
                "shape": list(size), "stride": list(stride), "offset": offset, "dtype": self.planner.geom.dtype,
                "handle": _b64(handle), "size_bytes": size_bytes, "offset_bytes": offset_bytes,
                "ref_counter_handle": _b64(rc_handle), "ref_counter_offset": rc_offset,
                "event_handle": _b64(ev_handle), "event_sync_required": bool(ev_sync),
            }
        return self._desc

    # ---- sender side: KVTransport.connect / write / flush, with these ---------------------------------
    def _peer_key(self, peer: dict, ident: Identity, geom: Geometry):
        return ident, geom, str(peer.get("handle")), str(peer.get("offset_bytes"))

    def _open(self, peer: dict, ident: Identity, geom: Geometry) -> MappedPeer:
        """Map the receiver's pool by its IPC handle: only a contiguous pool of the described geometry
        (400 for anything else, or a handle CUDA cannot open while its owner runs)."""
        try:
            uuid, handle = str(peer["gpu_uuid"]), _unb64(peer["handle"])
            rc_handle, ev_handle = _unb64(peer["ref_counter_handle"]), _unb64(peer.get("event_handle"))
            stride, offset, size_bytes, offset_bytes, rc_offset = (
                [int(x) for x in peer["stride"]], int(peer["offset"]), int(peer["size_bytes"]),
                int(peer["offset_bytes"]), int(peer["ref_counter_offset"]))
            ev_sync = bool(peer["event_sync_required"])
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise bad("kv_addr_info has no usable cuda_ipc peer description") from None
        if (stride != _contiguous_strides(geom.shape) or offset != 0 or size_bytes != geom.nbytes
                or not 0 <= offset_bytes < 2**48 or not handle):
            raise bad("kv_addr_info's cuda_ipc pool is not one contiguous KV pool of its described shape")
        if ident.pid == os.getpid():  # ourselves: CUDA cannot open a process's own IPC handle
            if geom != self.planner.geom:
                raise bad("kv_addr_info names this engine but not its KV pool")
            return MappedPeer(ident, geom, self.local)
        index = _device_by_uuid(uuid)
        if index is None:
            raise bad(f"the receiver's GPU {uuid} is not visible to this engine")
        try:
            from torch.multiprocessing.reductions import rebuild_cuda_tensor
            kv = rebuild_cuda_tensor(
                torch.Tensor, torch.Size(geom.shape), tuple(stride), offset, torch.storage.TypedStorage,
                self.local.dtype, index, handle, size_bytes, offset_bytes, False, rc_handle, rc_offset,
                ev_handle, ev_sync)
        except (RuntimeError, TypeError, ValueError) as e:
            raise bad(f"cannot map the receiver's KV pool by CUDA IPC: {e}") from None
        if tuple(kv.shape) != geom.shape or not kv.is_contiguous():
            raise bad("the receiver's KV pool mapped with another shape than described")
        return MappedPeer(ident, geom, kv)  # rows by slot: no base

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self._streams:
            self._streams[idx] = torch.cuda.Stream(device=idx)
        return self._streams[idx]

    def _indices(self, src: list[int], dst: list[int], src_dev: torch.device,
                 dst_dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Index tensors for (src, dst) on their devices, uploaded once per pair of lists: the runner
        passes the same lists for every layer of a step. Kept (with the lists, so their ids stay
        unique) until flush. Uploaded on the current (side) stream of each device."""
        key = (id(src), id(dst), dst_dev.index or 0)
        hit = self._index.get(key)
        if hit is None:
            s = torch.tensor(src, dtype=torch.int64).pin_memory().to(src_dev, non_blocking=True)
            d = torch.tensor(dst, dtype=torch.int64).pin_memory().to(dst_dev, non_blocking=True)
            hit = self._index[key] = (src, dst, s, d)
        return hit[2], hit[3]

    def _post(self, plan: CopyPlan, remote: MappedPeer) -> None:
        """Start copying the plan's K/V rows into `remote`'s pool after everything already queued on
        the compute stream (the layer's store). The planner checked every slot against both pools."""
        local = self.local[plan.layer].flatten(1, 2)  # [2, slots, H, D]
        target = remote.kv[plan.layer].flatten(1, 2)
        a, b = local.device, target.device
        side_a, side_b = self._stream(a), self._stream(b)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(a))  # the K/V just stored by the compute stream
        runs, (src, dst) = plan.runs, plan.slots
        keep: list = []
        # Nesting sets the current stream of both devices (and leaves a as the current device), so
        # every op below, including torch's cross-device copy, is queued on a side stream.
        with torch.cuda.stream(side_b), torch.cuda.stream(side_a):
            side_a.wait_event(ready)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(side_a)
            if a == b:
                if len(runs) <= MAX_SLICE_RUNS:
                    for s, d, n in (runs if isinstance(runs, list) else runs.tolist()):
                        for kind in (0, 1):  # K and V rows are each contiguous: plain memcpys
                            target[kind, d:d + n].copy_(local[kind, s:s + n], non_blocking=True)
                else:
                    s_t, d_t = self._indices(src, dst, a, b)
                    target.index_copy_(1, d_t, local.index_select(1, s_t))
                end.record(side_a)
                done = end
            else:  # gather on a, one peer copy a -> b (torch orders side_b after it), scatter on b
                s_t, d_t = self._indices(src, dst, a, b)
                rows = local.index_select(1, s_t)
                end.record(side_a)
                rows_b = rows.to(b, non_blocking=True)
                target.index_copy_(1, d_t, rows_b)
                done = torch.cuda.Event()
                done.record(side_b)
                keep += [rows, rows_b]
        self._pending.append(_Pending(done, (start, end), plan.nbytes, keep))

    def _wait(self, timeout: float, touched) -> TransferStats:
        """Wait until every write so far has landed: 504 on timeout, 502 on a CUDA error."""
        t0 = time.perf_counter()
        deadline = t0 + timeout
        pending, self._pending = self._pending, []
        try:
            for p in pending:
                while not p.done.query():  # an event wait cannot time out; polling can
                    if time.perf_counter() > deadline:
                        raise TransferError(f"KV transfer did not complete within {timeout:.1f}s", 504)
                    time.sleep(50e-6)
        except RuntimeError as e:  # a CUDA error surfaced by query()
            raise TransferError(f"KV transfer failed: {e}") from e
        exposed = time.perf_counter() - t0
        stats = TransferStats(bytes=sum(p.nbytes for p in pending), exposed_s=exposed,
                              transfer_s=sum(p.timed[0].elapsed_time(p.timed[1]) for p in pending) / 1e3)
        self._index.clear()  # the uploads have landed with the copies that used them
        return stats

    def close(self) -> None:
        if self._pending:
            try:
                self.flush(5.0)
            except TransferError:
                pass
        self._peers.clear()
        self._index.clear()
