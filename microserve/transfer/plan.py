"""The write planner: everything a KV write checks and works out, once, for every transport.

shm, nixl and cuda_ipc differ only in how bytes move (memmove, a NIXL WRITE, a CUDA copy). What a
write *means* is the same everywhere, so it is decided here:

    connect(peer)   Identity.parse + Geometry.parse   the description: who the receiver is (host, pid,
                                                      process start time) and its pool's geometry
                    Geometry.check_matches            layers, kv heads, head dim, page size, dtype
                    Identity.alive                    the receiver still runs (not a reused pid)
    write(l, s, d)  Planner.plan -> CopyPlan          runs contiguous on both sides, inside both
                                                      pools, as slot runs and as byte addresses
    flush()                                           the mover's wait, then liveness again

Nothing from the wire names a file or address the sender opens or writes before it is checked:
the shm mover builds `/proc/<pid>/fd/<fd>` itself from a live peer's pid and verifies what it
points at; nixl asks NIXL whether the described pool is memory the receiver registered; cuda_ipc
maps only a contiguous pool of the described geometry. Every write's slots are checked here
against both pools before anything is posted.

One set of statuses (TransferError), the same fault giving the same status on every transport:

    400  a bad or foreign description (malformed, another host, another layout or dtype, a pid or
         fd that is not a microserve KV pool, memory the receiver did not register), destination
         slots outside the receiver's pool, or a source/destination length mismatch
    502  the receiver is dead (pid gone or reused) or unreachable, or a copy failed
    504  the copies did not land within the flush timeout
    500  our own misuse (no pool yet, a layer or source slot outside our own pool)

connect() raises for a description; write() never raises for a peer's fault: the fault is kept and
the next flush() raises it, after the copies already posted have landed.
"""
from __future__ import annotations

import functools
import socket
from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np
import torch

from microserve.errors import ServeError

# A write of at most this many slots (a decode step's, a few tokens) is planned in plain Python:
# numpy's per-call overhead is more than the whole loop. Larger ones (prefill) use numpy.
SMALL = 64


class TransferError(ServeError):
    """A KV transfer could not be set up (400: bad or foreign kv_addr_info) or did not complete
    (502: peer failed or died, 504: timed out). See the module docstring for the statuses."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message, status, "invalid_kv_addr_info" if status == 400 else "transfer_error")


def bad(message: str) -> TransferError:
    return TransferError(message, 400)


# ---- slot runs -------------------------------------------------------------------------------------
def slot_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Pairs of slots -> (src_begin, dst_begin, length) runs contiguous on both sides."""
    if len(src) > SMALL:  # a prefill window: numpy is ~5x faster than the loop below
        return [tuple(r) for r in slot_runs_array(src, dst).tolist()]
    return [tuple(r) for r in _slot_runs_small(src, dst)]


def _slot_runs_small(src: list[int], dst: list[int]) -> list[list[int]]:
    """slot_runs in plain Python, as [src_begin, dst_begin, length] lists."""
    runs: list[list[int]] = []
    last = None
    for s, d in zip(src, dst):
        if last is not None and last[0] + last[2] == s and last[1] + last[2] == d:
            last[2] += 1
        else:
            last = [s, d, 1]
            runs.append(last)
    return runs


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


# ---- who the receiver is -----------------------------------------------------------------------------
def this_host() -> str:
    return socket.gethostname()


def process_start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot): tells a live peer from a reused pid."""
    if type(pid) is not int or pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _int(v, what: str, lo: int = 0, hi: int = 2**62) -> int:
    if type(v) is not int or not lo <= v <= hi:  # JSON ints only: no bools, floats or strings
        raise bad(f"kv_addr_info's peer {what} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


@dataclass(frozen=True)
class Identity:
    """The receiving process: host, pid and start time (pid and start only mean something on this
    host). Transports that reach only this host (shm, cuda_ipc) require all three."""
    host: str | None
    pid: int | None
    start: str | None

    @classmethod
    def parse(cls, peer: dict, local_only: bool) -> Identity:
        host, pid, start = peer.get("host"), peer.get("pid"), peer.get("start")
        if local_only or pid is not None:
            if not isinstance(host, str) or not isinstance(start, str) or not start.isdigit():
                raise bad("kv_addr_info's peer has no usable host, pid and start time")
            pid = _int(pid, "pid", 1, 2**31)
        elif host is not None and not isinstance(host, str):
            raise bad("kv_addr_info's peer host must be a string")
        if local_only and host != this_host():
            raise bad(f"this transport reaches engines on this host only; the receiver is on {host!r}"
                      " (use --kv-transport nixl across hosts)")
        return cls(host, pid, start)

    def local(self) -> bool:
        return self.pid is not None and self.host == this_host()

    def alive(self) -> bool:
        """False only when we can prove it died (on this host: pid gone or reused)."""
        return not self.local() or process_start_time(self.pid) == self.start

    def require_alive(self) -> None:
        if not self.alive():
            raise TransferError(f"the receiving engine (pid {self.pid}) is not running", 502)


# ---- what its pool looks like --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _itemsize(dtype: str) -> int | None:
    t = getattr(torch, dtype, None) if dtype.isidentifier() else None
    return torch.empty((), dtype=t).element_size() if isinstance(t, torch.dtype) else None


@dataclass(frozen=True)
class Geometry:
    """A KV pool [layers, 2 (K, V), pages, page_size, kv_heads, head_dim] of `dtype`, contiguous:
    K of layer l is plane 2l, V plane 2l+1, and one token's K (or V) in a layer is one row."""
    shape: tuple[int, ...]
    dtype: str
    itemsize: int
    # worked out once (a write reads them): layers, slots (pages * page_size), row (one token's K or
    # V in one layer, bytes), plane (K or V of one layer, bytes), nbytes (the whole pool)
    layers: int = field(init=False, compare=False)
    slots: int = field(init=False, compare=False)
    row: int = field(init=False, compare=False)
    plane: int = field(init=False, compare=False)
    nbytes: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        layers, _, pages, page_size, heads, dim = self.shape
        slots, row = pages * page_size, heads * dim * self.itemsize
        for k, v in (("layers", layers), ("slots", slots), ("row", row), ("plane", slots * row),
                     ("nbytes", layers * 2 * slots * row)):
            object.__setattr__(self, k, v)

    @classmethod
    def of(cls, t: torch.Tensor) -> Geometry:
        return cls(tuple(t.shape), str(t.dtype).removeprefix("torch."), t.element_size())

    @classmethod
    def parse(cls, shape, dtype) -> Geometry:
        if not isinstance(shape, list) or len(shape) != 6:
            raise bad(f"kv_addr_info's pool shape must be [layers, 2, pages, page_size, heads, dim], got {shape!r}")
        shape = tuple(_int(s, "pool shape", 1, 2**31) for s in shape)
        size = _itemsize(dtype) if isinstance(dtype, str) else None
        if shape[1] != 2 or size is None:
            raise bad(f"kv_addr_info's KV pool {list(shape)} {dtype!r} is not a K/V pool of a torch dtype")
        g = cls(shape, dtype, size)
        if g.nbytes > 2**48:
            raise bad(f"kv_addr_info's KV pool {list(shape)} {dtype} is impossibly large")
        return g

    def check_matches(self, other: Geometry) -> None:
        """`other` (a peer's pool) holds KV laid out as ours: all but the number of pages agree."""
        a, b = self.shape, other.shape
        if self.dtype != other.dtype or a[:2] + a[3:] != b[:2] + b[3:]:
            raise bad(f"receiver's KV layout {list(b)} {other.dtype} does not match ours {list(a)} {self.dtype}")


def parse_peer(peer, local_only: bool) -> tuple[Identity, Geometry]:
    """A peer description's identity and pool geometry (400 for anything unusable)."""
    if not isinstance(peer, dict):
        raise bad("kv_addr_info's peer is not an object")
    return Identity.parse(peer, local_only), Geometry.parse(peer.get("shape"), peer.get("dtype"))


class Peer:
    """A connected receiver: who it is, its pool's geometry and where that pool starts (an address
    in this process for shm, in the receiver's for nixl; 0 where the mover addresses by slot)."""

    def __init__(self, ident: Identity, geom: Geometry, base: int = 0) -> None:
        self.ident, self.geom, self.base = ident, geom, base

    @property
    def pid(self) -> int | None:
        return self.ident.pid

    def alive(self) -> bool:
        return self.ident.alive()


class MappedPeer(Peer):
    """A receiver whose pool is mapped into this process as `kv` (shm, cuda_ipc)."""

    def __init__(self, ident: Identity, geom: Geometry, kv: torch.Tensor, base: int = 0) -> None:
        super().__init__(ident, geom, base)
        self.kv = kv


def dead_peer(peers) -> TransferError | None:
    """Memory written into a peer's pool is only worth something if its owner still runs."""
    for p in peers:
        if not p.alive():
            return TransferError(f"the receiving engine (pid {p.pid}) died during the transfer", 502)
    return None


# ---- one write -----------------------------------------------------------------------------------
class CopyPlan(tuple):
    """One validated write of a layer's K and V rows: `runs` of (src_slot, dst_slot, n) contiguous
    on both sides (a list for a small write, an int64 array [runs, 3] for a large one), and `src`,
    `dst`, `lens`: each run's K-plane byte address on either side and its length in bytes (lists, or
    int64 arrays). A V run is the K run plus `src_v` / `dst_v` bytes. `slots` are the write's (src,
    dst) slot lists themselves, as given (checked: every slot is in a run). A tuple: a decode step
    makes one per layer and receiver, and building a tuple costs a tenth of an object's __init__."""
    __slots__ = ()
    layer, runs, slots, nbytes, src, dst, lens, src_v, dst_v = (property(itemgetter(i)) for i in range(9))

    def moves(self) -> tuple[list[int], list[int], list[int]]:
        """K-plane (src, dst, nbytes) of every run, as Python lists (for ctypes.memmove)."""
        if isinstance(self.src, list):
            return self.src, self.dst, self.lens
        return self.src.tolist(), self.dst.tolist(), self.lens.tolist()

    def descs(self, src_dev: int, dst_dev: int) -> tuple[np.ndarray, np.ndarray]:
        """(addr, nbytes, devid) uint64 rows, K runs then V runs, for each side (NIXL's lists)."""
        out = []
        if isinstance(self.src, list):  # a small write: columns from lists (each numpy op costs ~1 us)
            lens = self.lens * 2
            for addr, v, dev in ((self.src, self.src_v, src_dev), (self.dst, self.dst_v, dst_dev)):
                d = np.empty((len(lens), 3), dtype=np.uint64)
                d[:, 0], d[:, 1], d[:, 2] = addr + [a + v for a in addr], lens, dev
                out.append(d)
            return out[0], out[1]
        for addr, v, dev in ((self.src, self.src_v, src_dev), (self.dst, self.dst_v, dst_dev)):
            n = len(addr)
            d = np.empty((2 * n, 3), dtype=np.uint64)
            d[:n, 0] = addr
            d[n:, 0] = d[:n, 0] + v
            d[:n, 1] = d[n:, 1] = self.lens
            d[:, 2] = dev
            out.append(d)
        return out[0], out[1]


_plan = functools.partial(tuple.__new__, CopyPlan)


class Planner:
    """Turns a send window's write (our src slots, the receiver's dst slots, a layer) into a CopyPlan
    for one connected Peer, or raises TransferError. One per transport (it caches the runs of the
    last slot lists: a step writes the same lists for every layer)."""

    def __init__(self, local: torch.Tensor) -> None:
        if not local.is_contiguous():
            raise ValueError("a KV pool must be one contiguous tensor")
        self.geom = Geometry.of(local)
        self.base = local.data_ptr()
        self._runs = RunCache()
        self._last: np.ndarray | None = None
        self._bounds = (0, 0, 0, 0)
        self._bytes = np.empty((0, 3), dtype=np.int64)

    def plan(self, layer: int, src: list[int], dst: list[int], peer: Peer) -> CopyPlan:
        g, r = self.geom, peer.geom
        n = len(src)
        if n != len(dst):
            raise bad(f"write of layer {layer}: {n} source slots but {len(dst)} destination slots")
        if not 0 <= layer < g.layers:
            raise TransferError(f"write of layer {layer}: our pool has {g.layers} layers", 500)
        row, ls, rs = g.row, g.slots, r.slots
        sk, dk = self.base + 2 * layer * g.plane, peer.base + 2 * layer * r.plane
        if n <= SMALL:  # decode-sized: plain Python beats numpy's per-call overhead
            runs = _slot_runs_small(src, dst)
            srcs, dsts, lens = [], [], []
            for s, d, k in runs:
                if s < 0 or d < 0 or s + k > ls or d + k > rs:
                    self._check(layer, min(s for s, _, _ in runs), max(s + k for s, _, k in runs),
                                min(d for _, d, _ in runs), max(d + k for _, d, k in runs), ls, rs)
                srcs.append(sk + s * row)
                dsts.append(dk + d * row)
                lens.append(k * row)
            return _plan((layer, runs, (src, dst), 2 * n * row, srcs, dsts, lens, g.plane, r.plane))
        try:
            runs = self._runs(src, dst)
        except (OverflowError, TypeError, ValueError):
            raise bad(f"write of layer {layer}: slots are not integers of a KV pool") from None
        if runs is not self._last:  # a new pair of lists: every layer after the first reuses this
            s, d, k = runs[:, 0], runs[:, 1], runs[:, 2]
            huge_s, huge_d = int(s.max()) >= 2**48, int(d.max()) >= 2**48  # beyond any pool (Geometry
            # caps pools there): refused below, before a sum or product could wrap around
            self._bounds = (int(s.min()), 2**62 if huge_s else int((s + k).max()),
                            int(d.min()), 2**62 if huge_d else int((d + k).max()))
            self._last, self._bytes = (None, self._bytes) if huge_s or huge_d else (runs, runs * row)
        self._check(layer, *self._bounds, ls, rs)
        b = self._bytes
        return _plan((layer, runs, (src, dst), 2 * n * row, b[:, 0] + sk, b[:, 1] + dk, b[:, 2], g.plane, r.plane))

    @staticmethod
    def _check(layer: int, lo_s: int, hi_s: int, lo_d: int, hi_d: int, ls: int, rs: int) -> None:
        if lo_d < 0 or hi_d > rs:
            raise bad(f"write of layer {layer}: destination slots [{lo_d}, {hi_d}) outside the receiver's "
                      f"pool of {rs} slots")
        if lo_s < 0 or hi_s > ls:
            raise TransferError(f"write of layer {layer}: source slots [{lo_s}, {hi_s}) outside our pool "
                                f"of {ls} slots", 500)
