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

import torch

from microserve.kv.pool import compress_runs, expand_runs
from microserve.transfer.plan import (CopyPlan, Peer, Planner, RunCache, TransferError, dead_peer,  # noqa: F401
                                      parse_peer, process_start_time, slot_runs, slot_runs_array)


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


def decode_kv_addr(s: str, max_slots: int | None = None) -> tuple[dict, list[int]]:
    """Parse kv_addr_info; raises TransferError(400) on anything malformed, or naming more than
    `max_slots` slots."""
    try:
        doc = json.loads(base64.b64decode(s, validate=True))
        slots = expand_runs(doc["runs"], max_slots)
        if not isinstance(doc["transport"], str) or not isinstance(doc["peer"], dict):
            raise ValueError("bad transport or peer")
        return doc, slots
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise TransferError(f"kv_addr_info is not valid kv_append_metadata: {e}", 400) from None


class KVTransport:
    """Contract:
    - `allocate(shape, dtype, device)` returns the engine's KV pool memory, reachable by peers.
    - `describe()` is a JSON-able dict that lets a peer's `connect` reach that memory.
    - `connect(peer)` checks a description (from the wire: nothing in it is trusted) and returns a
      handle for write(); TransferError 400 for a bad or foreign description, 502 for a dead or
      unreachable receiver.
    - `write(layer, src, dst, remote)` starts copying rows `src` of our layer `layer` (K and V) to
      rows `dst` of the same layer in `remote`. It may return before the bytes land, and never
      raises for a peer's fault (slots outside its pool, a length mismatch): the next flush does.
    - `flush(timeout)` returns once every write so far has landed (raises TransferError if one
      failed or was refused, the peer died, or the timeout passed) and reports the bytes and times.

    The checks and the address arithmetic are the planner's (plan.py), here for every transport;
    a transport (a mover) supplies `_open` (reach a checked peer), `_post` (start one planned
    write) and `_wait` (until everything posted has landed)."""

    name = "base"
    local_only = False  # reaches engines on this host only (shm, cuda_ipc): host, pid and start required

    def __init__(self) -> None:
        self.local: torch.Tensor | None = None
        self.planner: Planner | None = None
        self._peers: dict[Any, Peer] = {}  # connected receivers, by what identifies their mapping
        self._fault: TransferError | None = None  # a refused write, reported by the next flush
        self._touched: dict[int, Peer] = {}  # receivers written since the last flush

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        self.local = torch.zeros(shape, dtype=dtype, device=device)
        self.planner = Planner(self.local)
        return self.local

    def describe(self) -> dict:
        raise TransferError(f"transport {self.name!r} cannot receive KV", 400)

    # ---- sender side: the same steps for every transport ----------------------------------------------
    def connect(self, peer: dict) -> Peer:
        if type(self)._open is KVTransport._open:
            raise TransferError(f"transport {self.name!r} cannot send KV", 400)
        ident, geom = parse_peer(peer, self.local_only)
        if self.planner is None:
            raise TransferError(f"the {self.name} transport has no KV pool yet", 500)
        self.planner.geom.check_matches(geom)
        key = self._peer_key(peer, ident, geom)
        cached = self._peers.get(key)
        if cached is not None and cached.alive() and self._reusable(cached):
            return cached
        for k, old in list(self._peers.items()):  # let go of receivers that are gone (and their mappings)
            if old is cached or not old.alive():
                self._drop(self._peers.pop(k))
        ident.require_alive()
        try:
            p = self._open(peer, ident, geom)
        except TransferError:
            ident.require_alive()  # it died meanwhile: that is what to report
            raise
        if not p.alive():  # died while we reached it: its pid may already name another process
            self._drop(p)
            ident.require_alive()
        self._peers[key] = p
        return p

    def write(self, layer: int, src: list[int], dst: list[int], remote: Peer) -> None:
        if not src and not dst:
            return
        self._touched[id(remote)] = remote
        try:
            plan = self.planner.plan(layer, src, dst, remote)
        except TransferError as e:  # nothing is posted; flush reports it, once
            self._fault = self._fault or e
            return
        self._post(plan, remote)

    def flush(self, timeout: float) -> TransferStats:
        touched, self._touched = self._touched, {}
        fault, self._fault = self._fault, None
        stats, waited = TransferStats(), None
        try:
            stats = self._wait(timeout, touched.values())  # every posted write, even after a refused one
        except TransferError as e:
            waited = e
        err = fault or waited or dead_peer(touched.values())  # a refused write is the root cause
        if err is not None:
            self._failed(touched.values(), waited or err)
            raise err
        return stats

    # ---- what a mover supplies -------------------------------------------------------------------------
    def _peer_key(self, peer: dict, ident, geom) -> Any:
        """What identifies a receiver's mapping (a cached one is reused while it is alive)."""
        return (ident, geom)

    def _reusable(self, p: Peer) -> bool:
        return True

    def _open(self, peer: dict, ident, geom) -> Peer:
        """Reach the receiver's pool, described by `peer` (identity and geometry already checked, the
        receiver alive). 400 when the live receiver does not hold what `peer` says; 502 unreachable."""
        raise NotImplementedError

    def _drop(self, p: Peer) -> None:
        """Forget a receiver (it died, or is being reconnected)."""

    def _post(self, plan: CopyPlan, remote: Peer) -> None:
        raise NotImplementedError

    def _wait(self, timeout: float, touched) -> TransferStats:
        """Until every posted write has landed: 504 on timeout, 502 when a copy failed."""
        return TransferStats()

    def _failed(self, touched, err: TransferError) -> None:
        """A flush is about to raise `err` for writes to `touched`."""

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
