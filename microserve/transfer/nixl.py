"""`nixl`: one-sided KV writes through NVIDIA NIXL's UCX backend. Works across hosts, CPU or GPU pools.

    receiver  allocate(): a torch.zeros pool, registered with this engine's NIXL agent.
              describe(): the agent's metadata (UCX address + memory keys) and the pool's base
              address, shape and dtype: everything a sender needs to address any slot.
    sender    connect(): loads the receiver's metadata once (UCX opens the endpoint here).
              write(): one layer's K and V rows -> (addr, nbytes, dev) descriptors per contiguous run,
              posted as a WRITE with a notification. flush(): waits until every WRITE reports DONE.

With `enable_prog_thread=False` NIXL moves nothing unless someone calls into the agent, and the
receiver has to progress too (UCX wire-up, TCP-emulated puts, notifications). So every transport
runs one small thread that owns the agent: it posts queued writes (on one host UCX's `cma` does the
copy inside the post call, so it runs here, beside the sender's compute), polls writes in flight
every 0.1 ms, and otherwise progresses the worker. A sender's WRITE only completes once the
receiver's worker answers (endpoint flush, notification), so the receiver's polling interval is
the floor of every transfer's latency: it polls every 0.2 ms from describe() (a prep_recv: bytes
are coming) until 1 s after the last WRITE landed, and every 2 ms otherwise (about 1% of a core).
Calls from other threads take `_agent_lock`.

We never unpickle a peer's descriptor lists (NIXL's `deserialize_descs` is pickle: code execution
for whoever writes kv_addr_info); remote descriptors are computed from the described base address,
and NIXL itself rejects any that fall outside the memory the peer registered.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from microserve.transfer.base import (KVTransport, RunCache, TransferError, TransferStats, process_start_time,
                                      slot_runs)

NOTIF = b"microserve-kv"
# NIXL errors that mean "this description is not usable" rather than "the peer is unreachable".
_BAD_DESCRIPTION = {"nixlMismatchError", "nixlInvalidParamError", "nixlNotFoundError"}


@dataclass
class NixlPeer:
    """A connected receiver: where its pool is and how its rows are laid out."""
    agent: str
    digest: str  # of its metadata: a re-published description must be reloaded
    base: int
    num_slots: int  # num_pages * page_size
    mem: str  # "DRAM" or "VRAM"
    devid: int
    host: str | None = None
    pid: int | None = None
    start: str | None = None
    stale: bool = False  # a transfer to it failed: reload its metadata (a fresh endpoint) on connect

    def alive(self) -> bool:
        """False only when we can prove it died (same host, pid gone or reused)."""
        if self.pid is None or self.host != socket.gethostname():
            return True
        return process_start_time(self.pid) == self.start


@dataclass
class _Job:
    """One posted-or-to-be-posted WRITE."""
    peer: NixlPeer
    local: np.ndarray  # [n, 3] uint64 (addr, nbytes, devid)
    remote: np.ndarray
    nbytes: int
    epoch: int
    ready: Any = None  # a CUDA event the copy must wait for (the layer's K/V store)
    handle: Any = None
    count: int = 1  # write() calls merged into this one WRITE


@dataclass
class _Progress:
    pending: int = 0
    error: TransferError | None = None
    first_post: float | None = None
    last_done: float = 0.0
    bytes: int = 0
    touched: dict[str, NixlPeer] = field(default_factory=dict)  # receivers written since the last flush


class NixlTransport(KVTransport):
    """KV pool registered with a NIXL agent (UCX); one-sided WRITEs into peers' pools. See the module
    docstring for the flow; the contract is `KVTransport`'s: write() never blocks on the copy and
    never raises for a peer's fault, flush() reports it (400 bad description or slots, 502 WRITE
    failed or receiver died, 504 timeout)."""

    name = "nixl"

    def __init__(self, idle_poll_s: float = 2e-3, expect_poll_s: float = 2e-4, busy_poll_s: float = 1e-4,
                 expect_s: float = 1.0) -> None:
        super().__init__()
        self._idle_s, self._expect_poll_s, self._busy_s, self._expect_s = idle_poll_s, expect_poll_s, busy_poll_s, expect_s
        self._expect_until = 0.0  # poll at expect_poll_s until then: writes to our pool are on the way
        self._agent: Any = None
        self._agent_name = ""
        self._reg: Any = None
        self._agent_lock = threading.Lock()  # every NIXL call: the agent runs with sync mode NONE
        self._cv = threading.Condition()  # guards everything below
        self._peers: dict[str, NixlPeer] = {}
        self._jobs: list[_Job] = []
        self._inflight: list[_Job] = []  # owned by the progress thread
        self._p = _Progress()
        self._epoch = 0  # bumped when a flush gives up: older jobs are dropped, not counted
        self._closed = False
        self._thread: threading.Thread | None = None
        self.notifs_received = 0  # WRITEs that landed in our pool (their notifications)
        self._runs = RunCache()

    # ---- receiver side ------------------------------------------------------------------------
    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        from nixl._api import nixl_agent, nixl_agent_config  # lazy: `import microserve` never needs nixl

        self.local = torch.zeros(shape, dtype=dtype, device=device)
        self._dtype = str(dtype).removeprefix("torch.")
        self._mem = "VRAM" if self.local.is_cuda else "DRAM"
        self._devid = (self.local.device.index or 0) if self.local.is_cuda else 0
        self._row = shape[4] * shape[5] * self.local.element_size()  # one token's K (or V) in one layer
        self._slots = shape[2] * shape[3]
        self._agent_name = f"microserve-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._agent = nixl_agent(self._agent_name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        if "UCX" not in self._agent.backends:
            raise RuntimeError("NIXL has no UCX backend here (is the nixl wheel complete?)")
        self._reg = self._agent.register_memory(self.local)
        self._meta = base64.b64encode(self._agent.get_agent_metadata()).decode()
        self._thread = threading.Thread(target=self._loop, name="nixl-progress", daemon=True)
        self._thread.start()
        return self.local

    def describe(self) -> dict:
        """How a peer reaches our pool (JSON-able). Called by prep_recv, so it also means "writes are
        coming": the progress thread polls fast for a while, since senders wait on our answers."""
        if self._agent is None:
            raise TransferError("the nixl transport has no KV pool yet", 500)
        with self._cv:
            self._expect_until = time.perf_counter() + self._expect_s
            self._cv.notify_all()
        pid = os.getpid()
        return {"agent": self._agent_name, "meta": self._meta, "addr": self.local.data_ptr(),
                "shape": list(self.local.shape), "dtype": self._dtype, "mem": self._mem, "devid": self._devid,
                "host": socket.gethostname(), "pid": pid, "start": process_start_time(pid)}

    # ---- sender side --------------------------------------------------------------------------
    def connect(self, peer: dict) -> NixlPeer:
        """Load the receiver's agent metadata (once per receiver) and return a handle for write().
        TransferError 400: the description is garbled, foreign or for another KV layout;
        502: the receiver is gone or unreachable."""
        if self._agent is None:
            raise TransferError("the nixl transport has no KV pool yet", 500)
        try:
            name, meta = str(peer["agent"]), base64.b64decode(peer["meta"], validate=True)
            shape, dtype = [int(s) for s in peer["shape"]], str(peer["dtype"])
            base, mem, devid = int(peer["addr"]), str(peer["mem"]), int(peer["devid"])
            host, pid = peer.get("host"), peer.get("pid")
            pid = None if pid is None else int(pid)
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise TransferError("kv_addr_info has no usable nixl peer description", 400) from None
        local = list(self.local.shape)
        if len(shape) != 6 or dtype != self._dtype or shape[:2] + shape[3:] != local[:2] + local[3:]:
            raise TransferError(f"receiver's KV layout {shape} {dtype} does not match ours {local} {self._dtype}", 400)
        if mem not in ("DRAM", "VRAM") or base <= 0 or not name or not meta:
            raise TransferError("kv_addr_info's nixl peer description is malformed", 400)
        digest = hashlib.sha1(meta).hexdigest()
        with self._cv:
            cached = self._peers.get(name)
        if cached is not None and cached.digest == digest and not cached.stale and cached.alive():
            return cached
        p = NixlPeer(name, digest, base, shape[2] * shape[3], mem, devid, host, pid, peer.get("start"))
        if not p.alive():
            raise TransferError(f"the receiving engine (pid {pid}) is not running", 502)
        with self._agent_lock:
            if cached is not None:
                self._forget(cached)
            if name != self._agent_name:  # our own pool needs no metadata: NIXL writes it in loopback
                try:
                    loaded = self._agent.add_remote_agent(meta)
                    loaded = loaded.decode(errors="replace") if isinstance(loaded, bytes) else str(loaded)
                except Exception as e:
                    status = 400 if type(e).__name__ in _BAD_DESCRIPTION else 502
                    raise TransferError(f"cannot reach the receiver's NIXL agent {name!r}: {e}", status) from None
                if loaded != name:  # metadata of some other agent: someone pasted the wrong description
                    with self._cv:
                        known = loaded in self._peers
                    if not known:  # (a peer we already use keeps its connection)
                        self._agent.remove_remote_agent(loaded)
                    raise TransferError(f"nixl metadata is for agent {loaded!r}, not {name!r}", 400)
        with self._cv:
            self._peers[name] = p
        return p

    def write(self, layer: int, src: list[int], dst: list[int], remote: NixlPeer) -> None:
        """Queue a WRITE of layer `layer`'s K and V rows `src` into the receiver's rows `dst`.
        Never blocks on the copy; a problem with it is reported by the next flush()."""
        if not src:
            return
        err, job = None, None
        if len(src) != len(dst) or not 0 <= layer < self.local.shape[0]:
            err = TransferError(f"write of layer {layer} got {len(src)} source and {len(dst)} destination slots", 500)
        else:
            local, remote_d, ok = self._descs(layer, src, dst, remote)
            if not ok:
                err = TransferError(f"write of layer {layer}: slots outside the pools ({self._slots} local, "
                                    f"{remote.num_slots} remote slots)", 400)
            else:
                job = _Job(remote, local, remote_d, 2 * len(src) * self._row, epoch=0)
                if self.local.is_cuda:  # the layer's K/V store is queued on the stream, maybe not done yet
                    job.ready = torch.cuda.Event()
                    job.ready.record()
        with self._cv:
            if self._p.first_post is None:
                self._p.first_post = time.perf_counter()
            self._p.touched[remote.agent] = remote
            if job is None:
                self._p.error = self._p.error or err
                return
            job.epoch = self._epoch
            self._p.pending += 1
            self._jobs.append(job)
            self._cv.notify_all()

    def _descs(self, layer: int, src: list[int], dst: list[int], remote: NixlPeer) -> tuple[np.ndarray, np.ndarray, bool]:
        """(addr, nbytes, devid) rows, K runs then V runs, for our side and the receiver's, and
        whether every run lies inside both pools. Pools are [layers, 2, slots, row] contiguous:
        K of layer l is plane 2l, V plane 2l+1."""
        row, ls, rs = self._row, self._slots, remote.num_slots
        lk = self.local.data_ptr() + 2 * layer * ls * row
        rk = remote.base + 2 * layer * rs * row
        if len(src) <= 64:  # decode-sized: plain Python beats numpy's per-call overhead
            runs = slot_runs(src, dst)
            ok = all(s >= 0 and d >= 0 and s + n <= ls and d + n <= rs for s, d, n in runs)
            local = [(lk + s * row, n * row, self._devid) for s, _, n in runs]
            local += [(a + ls * row, n, dev) for a, n, dev in local]
            far = [(rk + d * row, n * row, remote.devid) for _, d, n in runs]
            far += [(a + rs * row, n, dev) for a, n, dev in far]
            return np.array(local, dtype=np.uint64), np.array(far, dtype=np.uint64), ok
        r = self._runs(src, dst)
        ok = bool(r[:, :2].min() >= 0 and (r[:, 0] + r[:, 2]).max() <= ls and (r[:, 1] + r[:, 2]).max() <= rs)
        n = len(r)
        out = []
        for base, col, plane, dev in ((lk, 0, ls * row, self._devid), (rk, 1, rs * row, remote.devid)):
            d = np.empty((2 * n, 3), dtype=np.uint64)
            d[:n, 0] = r[:, col] * row + base
            d[n:, 0] = d[:n, 0] + plane
            d[:n, 1] = d[n:, 1] = r[:, 2] * row
            d[:, 2] = dev
            out.append(d)
        return out[0], out[1], ok

    def flush(self, timeout: float) -> TransferStats:
        """Wait until every write so far has landed. TransferError 504 on timeout; 502 when a WRITE
        failed or the receiver died (400 when its description pointed outside its pool). After an
        error, whatever was still queued is dropped and the next flush starts clean."""
        t0 = time.perf_counter()
        deadline = t0 + timeout
        with self._cv:
            while self._p.pending and self._p.error is None:
                dead = [a for a, peer in self._p.touched.items() if not peer.alive()]
                if dead:
                    self._p.error = TransferError(f"the receiving engine {dead[0]!r} died during the transfer", 502)
                    break
                left = deadline - time.perf_counter()
                if left <= 0:
                    self._p.error = TransferError(f"KV transfer did not complete within {timeout:.1f}s "
                                                  f"({self._p.pending} writes outstanding)", 504)
                    break
                self._cv.wait(min(left, 0.05))  # also re-check liveness: a dead peer may never answer
            p, err = self._p, self._p.error
            if err is None:
                p.error = next((TransferError(f"the receiving engine {a!r} died during the transfer", 502)
                                for a, peer in p.touched.items() if not peer.alive()), None)
                err = p.error
            self._p = _Progress()
            if err is not None:
                self._epoch += 1  # the progress thread drops (and releases) the older jobs
                for peer in p.touched.values():  # the next connect reloads its metadata, fresh endpoint
                    peer.stale = True
                self._cv.notify_all()
                raise err
        transfer = max(p.last_done - p.first_post, 0.0) if p.bytes else 0.0
        # waiting past the last completion is the progress thread's wake-up latency, not transfer
        return TransferStats(bytes=p.bytes, transfer_s=transfer, exposed_s=min(time.perf_counter() - t0, transfer))

    # ---- the progress thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                if not self._jobs and not self._closed:
                    wait = self._busy_s if self._inflight else \
                        self._expect_poll_s if time.perf_counter() < self._expect_until else self._idle_s
                    self._cv.wait(wait)
                if self._closed:
                    return
                jobs, self._jobs, epoch = self._jobs, [], self._epoch
            broken: TransferError | None = None
            with self._agent_lock:
                try:
                    done, failed = self._step(jobs, epoch)
                except Exception as e:  # never let the thread die: flush would only ever time out
                    done, failed, broken = [], [], TransferError(f"NIXL progress failed: {e}", 502)
                    for job in self._inflight:
                        self._release(job)
                    self._inflight = []
            if broken is not None:
                with self._cv:
                    if epoch == self._epoch:  # fail everything outstanding; flush reports it
                        self._p.error, self._p.pending = self._p.error or broken, 0
                    self._cv.notify_all()
            elif done or failed:
                now = time.perf_counter()
                with self._cv:
                    if epoch == self._epoch:
                        for job in done:
                            self._p.bytes += job.nbytes
                        self._p.pending -= sum(j.count for j in done) + sum(j.count for j, _ in failed)
                        self._p.last_done = now
                        if failed and self._p.error is None:
                            self._p.error = failed[0][1]
                        for job, e in failed:
                            job.peer.stale |= e.status == 502
                    self._cv.notify_all()

    def _step(self, jobs: list[_Job], epoch: int) -> tuple[list[_Job], list[tuple[_Job, TransferError]]]:
        """Post new jobs, poll those in flight, progress the worker (holding _agent_lock).
        Jobs of an older epoch (a flush gave up on them) are released and not reported."""
        done: list[_Job] = []
        failed: list[tuple[_Job, TransferError]] = []
        for job in self._batch([j for j in jobs if j.epoch == epoch]):
            try:
                self._post(job)
                self._inflight.append(job)
            except TransferError as e:
                failed.append((job, e))
        still: list[_Job] = []
        for job in self._inflight:
            try:
                state = "ERR" if job.epoch != epoch else self._agent.check_xfer_state(job.handle)
            except Exception:
                state = "ERR"
            if state == "PROC":
                still.append(job)
                continue
            self._release(job)
            if job.epoch != epoch:
                continue
            if state == "DONE":
                done.append(job)
            else:
                failed.append((job, TransferError(f"NIXL WRITE to {job.peer.agent!r} failed (receiver gone?)", 502)))
        self._inflight = still
        try:  # this is also the receiver's UCX progress (wire-up, TCP-emulated puts)
            got = sum(len(v) for v in self._agent.get_new_notifs().values())
        except Exception:
            got = 0
        self.notifs_received += got
        if got:
            self._expect_until = time.perf_counter() + self._expect_s
        return done, failed

    @staticmethod
    def _batch(jobs: list[_Job]) -> list[_Job]:
        """Writes queued for the same receiver become one WRITE: NIXL's per-request cost (~20 us)
        would otherwise dominate small per-layer writes whenever the thread falls behind."""
        by_peer: dict[str, list[_Job]] = {}
        for j in jobs:
            by_peer.setdefault(j.peer.agent, []).append(j)
        out = []
        for group in by_peer.values():
            if len(group) == 1:
                out.append(group[0])
                continue
            for j in group:
                if j.ready is not None:
                    j.ready.synchronize()
            out.append(_Job(group[0].peer, np.concatenate([j.local for j in group]),
                            np.concatenate([j.remote for j in group]), sum(j.nbytes for j in group),
                            group[0].epoch, count=len(group)))
        return out

    def _post(self, job: _Job) -> None:
        """Create and start one WRITE (holding _agent_lock). Raises TransferError."""
        if job.ready is not None:
            job.ready.synchronize()
        a = self._agent
        try:
            job.handle = a.initialize_xfer("WRITE", a.get_xfer_descs(job.local, self._mem),
                                           a.get_xfer_descs(job.remote, job.peer.mem), job.peer.agent, NOTIF)
            if a.transfer(job.handle) == "ERR":
                raise RuntimeError("postXferReq returned an error")
        except Exception as e:
            self._release(job)
            if type(e).__name__ in _BAD_DESCRIPTION:
                raise TransferError(f"NIXL rejected the WRITE to {job.peer.agent!r} (slots outside its "
                                    f"registered pool?): {e}", 400) from None
            raise TransferError(f"NIXL WRITE to {job.peer.agent!r} failed (receiver gone?): {e}", 502) from None

    def _release(self, job: _Job) -> None:
        if job.handle is not None:
            try:
                job.handle.release()
            except Exception:  # still active and not cancellable: the wrapper keeps it for later
                pass
            job.handle = None

    def _forget(self, p: NixlPeer) -> None:
        """Drop a peer's metadata and endpoint (holding _agent_lock), so a later connect starts over."""
        if p.agent != self._agent_name:
            try:
                self._agent.remove_remote_agent(p.agent)
            except Exception:
                pass

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._epoch += 1
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self._agent is None:
            return
        with self._agent_lock:
            for job in self._inflight:
                self._release(job)
            self._inflight = []
            for _ in range(3):  # let UCX retire failed endpoints: it asserts on teardown otherwise
                try:
                    self._agent.get_new_notifs()
                except Exception:
                    pass
            for p in self._peers.values():
                self._forget(p)
            self._peers.clear()
            try:
                self._agent.deregister_memory(self._reg)
            except Exception:
                pass
