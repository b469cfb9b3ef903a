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
for whoever writes kv_addr_info); remote descriptors are computed by the planner (plan.py) from the
described base address, inside the described pool, and connect() has NIXL confirm that the whole
described pool is memory the receiver registered (NIXL checks every WRITE against it again). An
agent name says whose it is (`microserve-<host>-<pid>-<id>`); a description whose host or pid
disagrees with its agent is refused.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from microserve.transfer.base import KVTransport, TransferStats
from microserve.transfer.plan import (CopyPlan, Geometry, Identity, Peer, TransferError, bad, dead_peer,
                                      process_start_time)

NOTIF = b"microserve-kv"
# NIXL errors that mean "this description is not usable" rather than "the peer is unreachable".
_BAD_DESCRIPTION = {"nixlMismatchError", "nixlInvalidParamError", "nixlNotFoundError"}


class NixlPeer(Peer):
    """A connected receiver: its agent, and where its pool is (`base`, an address in its process)."""

    def __init__(self, ident: Identity, geom: Geometry, base: int, agent: str, mem: str, devid: int) -> None:
        super().__init__(ident, geom, base)
        self.agent, self.mem, self.devid = agent, mem, devid
        self.stale = False  # a transfer to it failed: reload its metadata (a fresh endpoint) on connect


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
        self._jobs: list[_Job] = []
        self._inflight: list[_Job] = []  # owned by the progress thread
        self._p = _Progress()
        self._epoch = 0  # bumped when a flush gives up: older jobs are dropped, not counted
        self._closed = False
        self._thread: threading.Thread | None = None
        self.notifs_received = 0  # WRITEs that landed in our pool (their notifications)

    # ---- receiver side ------------------------------------------------------------------------
    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        from nixl._api import nixl_agent, nixl_agent_config  # lazy: `import microserve` never needs nixl

        super().allocate(shape, dtype, device)
        self._mem = "VRAM" if self.local.is_cuda else "DRAM"
        self._devid = (self.local.device.index or 0) if self.local.is_cuda else 0
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
                "shape": list(self.local.shape), "dtype": self.planner.geom.dtype, "mem": self._mem,
                "devid": self._devid, "host": socket.gethostname(), "pid": pid, "start": process_start_time(pid)}

    # ---- sender side: KVTransport.connect / write / flush, with these -----------------------------------
    def _peer_key(self, peer: dict, ident: Identity, geom: Geometry):
        f = tuple(peer.get(k) for k in ("agent", "meta", "addr", "mem", "devid"))
        if not all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(f, (str, str, int, str, int))):
            raise bad("kv_addr_info has no usable nixl peer description")
        return ident, geom, f

    def _reusable(self, p: NixlPeer) -> bool:
        return not p.stale

    def _open(self, peer: dict, ident: Identity, geom: Geometry) -> NixlPeer:
        """Load the receiver's agent metadata (once per receiver); have NIXL confirm the described
        pool is memory that agent registered. 400: the description is garbled, foreign or names
        memory the receiver did not register; 502: the receiver is unreachable."""
        if self._agent is None:
            raise TransferError("the nixl transport has no KV pool yet", 500)
        name, base, mem, devid = peer["agent"], peer["addr"], peer["mem"], peer["devid"]
        try:
            meta = base64.b64decode(peer["meta"], validate=True)
        except (binascii.Error, ValueError):
            raise bad("kv_addr_info's nixl metadata is not base64") from None
        if mem not in ("DRAM", "VRAM") or not 0 < base < 2**64 - geom.nbytes or not 0 <= devid < 2**16 or not meta:
            raise bad("kv_addr_info's nixl peer description is malformed")
        # our agents are named microserve-<host>-<pid>-<8 hex>: the name must agree with host and pid
        pid = "[0-9]+" if ident.pid is None else str(ident.pid)
        if ident.host is not None and not re.fullmatch(rf"microserve-{re.escape(ident.host)}-{pid}-[0-9a-f]{{8}}",
                                                        name):
            raise bad(f"nixl agent {name!r} is not the engine the description names ({ident.host}, pid {ident.pid})")
        p = NixlPeer(ident, geom, base, name, mem, devid)
        if name == self._agent_name:  # our own pool: NIXL writes it in loopback, no metadata to load
            if (base, geom, mem, devid) != (self.planner.base, self.planner.geom, self._mem, self._devid):
                raise bad("kv_addr_info names this engine's agent but not its KV pool")
            return p
        in_use = {q.agent for q in self._peers.values()}  # (a peer in use keeps its connection)
        with self._agent_lock:  # loading an agent's metadata again (re-published) replaces it
            try:
                loaded = self._agent.add_remote_agent(meta)
                loaded = loaded.decode(errors="replace") if isinstance(loaded, bytes) else str(loaded)
            except Exception as e:
                status = 400 if type(e).__name__ in _BAD_DESCRIPTION else 502
                raise TransferError(f"cannot reach the receiver's NIXL agent {name!r}: {e}", status) from None
            if loaded != name:  # metadata of some other agent: someone pasted the wrong description
                if loaded not in in_use:
                    self._agent.remove_remote_agent(loaded)
                raise bad(f"nixl metadata is for agent {loaded!r}, not {name!r}")
            pool = np.array([[base, geom.nbytes, devid]], dtype=np.uint64)
            if not self._agent.check_remote_metadata(name, self._agent.get_xfer_descs(pool, mem)):
                if name not in in_use:
                    self._forget(p)
                raise bad(f"the pool kv_addr_info describes is not memory that agent {name!r} registered")
        return p

    def _drop(self, p: NixlPeer) -> None:
        with self._agent_lock:
            self._forget(p)
        for q in self._peers.values():  # other descriptions of that agent: reload it when next used
            q.stale |= q.agent == p.agent

    def _post(self, plan: CopyPlan, remote: NixlPeer) -> None:
        """Queue one WRITE of the plan's K and V runs. Never blocks on the copy."""
        local, far = plan.descs(self._devid, remote.devid)
        job = _Job(remote, local, far, plan.nbytes, epoch=0)
        if self.local.is_cuda:  # the layer's K/V store is queued on the stream, maybe not done yet
            job.ready = torch.cuda.Event()
            job.ready.record()
        with self._cv:
            if self._p.first_post is None:
                self._p.first_post = time.perf_counter()
            job.epoch = self._epoch
            self._p.pending += 1
            self._jobs.append(job)
            self._cv.notify_all()

    def _wait(self, timeout: float, touched) -> TransferStats:
        """Wait until every WRITE so far has landed: 504 on timeout; 502 when a WRITE failed or a
        receiver died meanwhile (400 when NIXL refused it). After an error, whatever was still
        queued is dropped and the next flush starts clean."""
        t0 = time.perf_counter()
        deadline = t0 + timeout
        with self._cv:
            while self._p.pending and self._p.error is None:
                dead = dead_peer(touched)  # a dead peer may never answer
                if dead is not None:
                    self._p.error = dead
                    break
                left = deadline - time.perf_counter()
                if left <= 0:
                    self._p.error = TransferError(f"KV transfer did not complete within {timeout:.1f}s "
                                                  f"({self._p.pending} writes outstanding)", 504)
                    break
                self._cv.wait(min(left, 0.05))
            p, self._p = self._p, _Progress()
            if p.error is not None:
                self._epoch += 1  # the progress thread drops (and releases) the older jobs
                self._cv.notify_all()
                raise p.error
        transfer = max(p.last_done - p.first_post, 0.0) if p.bytes else 0.0
        # waiting past the last completion is the progress thread's wake-up latency, not transfer
        return TransferStats(bytes=p.bytes, transfer_s=transfer, exposed_s=min(time.perf_counter() - t0, transfer))

    def _failed(self, touched, err: TransferError) -> None:
        if err.status != 400:  # the next connect reloads their metadata: a fresh endpoint
            for peer in touched:
                if isinstance(peer, NixlPeer):
                    peer.stale = True

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
                self._start(job)
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

    def _start(self, job: _Job) -> None:
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
