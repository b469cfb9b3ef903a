"""The unified KV cache interface: one object per engine owns pages, the prefix tree and receive
reservations. Computing, receiving, sending and reusing KV all go through it.

Every page is in exactly one of three states, which `accounting()` checks:

    total == free + cached (in the prefix tree; `evictable` of them unlocked) + owned (private to a
             running sequence or a parked reservation)

where total leaves out the pages the pool reserved for good (`KVPool.reserve_page`).

**Fencing.** A reservation's slots are written by another engine, one-sidedly, so the pages must
not be reused while a write into them could still land. Each reservation has a fence (a unique
id in its kv_append_metadata). A sender claims the fence before it writes and renews it while its
send is queued or running; each claim or renewal extends the lease and tells the sender a wall-clock
deadline after which it starts no write. A fence that was never claimed ends with its reservation:
a later claim gets 409 and nothing is written. The pages of a claimed reservation that is aborted
or expires are quarantined (still owned, never read) until the last granted deadline plus the
longest a started write may take (`hold_s`), or until every sender that claimed it has said it is
done (`settle`), then freed.

A sequence's block table `SeqKV.pages` mixes tree pages (a locked, shared prefix) and private pages:

    positions   0 ........ cached_len ............... len(pages) * page_size
    pages       [tree, tree, ...    | private, private, ...]
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from microserve.errors import ServeError
from microserve.kv.pool import KVPool, slots_for
from microserve.kv.radix import Node, PrefixTree


class KVCacheError(ServeError):
    """A request the cache cannot honour (unknown or ended reservation, no pages)."""


@dataclass(eq=False)
class SeqKV:
    pages: list[int] = field(default_factory=list)
    node: Node | None = None  # deepest tree node this sequence holds a lock on
    private: set[int] = field(default_factory=set)
    cached_len: int = 0  # leading tokens whose pages are (locked) tree pages


@dataclass(eq=False)
class Fence:
    """A sender's claim on a receiver's reservation: no write may start after `deadline` (wall
    clock, as the receiver granted it) or once `revoked`. Renewed from the event loop, read by the step."""
    id: str
    url: str
    deadline: float
    revoked: bool = False

    def open(self) -> bool:
        return not self.revoked and time.time() < self.deadline


@dataclass(eq=False)
class SendWindow:
    """Positions [begin, end) of a sequence go to `dst_slots` (one per position) in `remote`."""
    begin: int
    end: int
    dst_slots: list[int]
    remote: Any
    fence: Fence | None = None


@dataclass(eq=False)
class Reservation:
    """A parked request on the receiving engine: slots reserved for prompt[matched:end)."""
    rid: str
    tokens: list[int]
    end: int
    matched: int
    seq: SeqKV
    deadline: float  # monotonic: the lease
    payload: Any = None  # the original request, used by start_generate
    fence: str = field(default_factory=lambda: uuid.uuid4().hex)
    granted: float | None = None  # wall-clock deadline last given to a sender (None: never claimed)
    claims: int = 0  # senders that claimed the fence and have not said they are done

    def slots(self, page_size: int) -> list[int]:
        return slots_for(self.seq.pages, self.matched, self.end, page_size)


class KVCache:
    def __init__(self, pool: KVPool, enable_prefix_caching: bool = True, recv_lease_s: float = 60.0,
                 hold_s: float = 35.0) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.tree = PrefixTree(pool.page_size)
        self.enable_prefix_caching = enable_prefix_caching
        self.recv_lease_s = recv_lease_s
        self.hold_s = hold_s  # a started write lands within this (the sender's transfer timeout + clock slack)
        self.reservations: dict[str, Reservation] = {}
        self.fences: dict[str, Reservation] = {}  # fence id -> live (parked) reservation
        self.quarantine: list[tuple[float, Reservation]] = []  # (monotonic release time, ended reservation)
        self.ended: dict[str, str] = {}  # rid -> "expired" | "started" | "committed" | "aborted" (bounded)
        self._live: set[SeqKV] = set()

    # ---- read-only -------------------------------------------------------------------------
    def peek(self, tokens) -> int:
        """Cached prefix length of `tokens` in tokens (a multiple of page_size). Touches nothing."""
        return self.tree.peek(tokens) if self.enable_prefix_caching else 0

    # ---- sequences ---------------------------------------------------------------------------
    def match(self, tokens, limit: int) -> SeqKV:
        """A new sequence holding (locked) the longest cached prefix of tokens[:limit]."""
        seq = SeqKV()
        if self.enable_prefix_caching and limit > 0:
            path = self.tree.match(tokens[:limit])
            if path:
                seq.node = path[-1]
                self.tree.lock(seq.node)
                seq.pages = [n.page for n in path]
                seq.cached_len = len(path) * self.page_size
        self._live.add(seq)
        return seq

    def allocate(self, seq: SeqKV, num_tokens: int) -> bool:
        """Grow seq's pages to cover positions [0, num_tokens), evicting cache if needed.
        Returns False (taking nothing) if the pool cannot hold them."""
        need = -(-num_tokens // self.page_size) - len(seq.pages)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            self.pool.free(self.tree.evict(need - self.pool.num_free))
        pages = self.pool.alloc(need)
        if pages is None:
            return False
        seq.pages += pages
        seq.private.update(pages)
        return True

    def publish(self, seq: SeqKV, tokens, num_computed: int) -> None:
        """Put the full pages of tokens[:num_computed] (KV computed) into the prefix tree."""
        if not self.enable_prefix_caching:
            return
        full = num_computed // self.page_size
        if full * self.page_size <= seq.cached_len:
            return
        path, dups = self.tree.insert(tokens[:full * self.page_size], seq.pages[:full])
        dup = set(dups)
        seq.private.difference_update(p for p in seq.pages[:full] if p not in dup)
        self.tree.lock(path[-1])
        self.tree.unlock(seq.node)
        seq.node, seq.cached_len = path[-1], full * self.page_size

    def release(self, seq: SeqKV) -> None:
        """Drop a sequence: unlock its tree prefix and free its private pages."""
        if seq not in self._live:
            return
        self._live.discard(seq)
        self.tree.unlock(seq.node)
        self.pool.free(seq.private)
        seq.node, seq.pages, seq.private, seq.cached_len = None, [], set(), 0

    # ---- receiving (prep_recv / start_generate / commit / abort) ----------------------------
    def reserve_recv(self, rid: str, tokens: list[int], end: int, payload: Any = None) -> Reservation:
        """Match tokens[:end] (at most end-1 tokens), reserve slots for the rest of [0, end), park.

        The reserved pages stay private, so nothing else can read the KV until it is committed or
        generation starts (MLC publishes at this point, before the bytes arrive)."""
        if rid in self.reservations:
            raise KVCacheError(f"request id {rid!r} already has a parked reservation", 409, "conflict")
        seq = self.match(tokens, max(end - 1, 0))
        if not self.allocate(seq, end):
            self.release(seq)
            raise KVCacheError(f"not enough KV pages to receive {end} tokens", 503, "kv_cache_full")
        res = Reservation(rid, list(tokens), end, seq.cached_len, seq, time.monotonic() + self.recv_lease_s, payload)
        self.reservations[rid] = res
        self.fences[res.fence] = res
        return res

    def claim(self, fence: str, renew: bool = False) -> float:
        """A sender is about to write (or, `renew`, still is): extend the lease, return the wall-clock
        deadline until which it may start writes. 409 if the reservation has ended (never write then)."""
        res = self.fences.get(fence)
        if res is None:
            raise KVCacheError("the reservation this kv_addr_info names has ended (started, committed, aborted "
                               "or expired): its slots may belong to someone else now", 409, "stale_reservation")
        res.claims += not renew
        res.deadline = time.monotonic() + self.recv_lease_s
        res.granted = time.time() + self.recv_lease_s
        return res.granted

    def settle(self, fence: str) -> None:
        """A sender that claimed the fence says none of its writes can land any more (it stopped
        before writing, or all it started has landed). Once no claim is open, the pages need no
        quarantine."""
        res = self.fences.get(fence) or next((r for _, r in self.quarantine if r.fence == fence), None)
        if res is None or res.claims == 0:
            return
        res.claims -= 1
        if res.claims == 0 and res.rid not in self.reservations:  # ended meanwhile: free it now
            self.quarantine = [q for q in self.quarantine if q[1] is not res]
            self.release(res.seq)

    def take(self, rid: str) -> Reservation:
        """Remove and return a parked reservation; 404 unknown, 409 expired or already ended."""
        res = self.reservations.pop(rid, None)
        if res is None:
            how = self.ended.get(rid)
            if how is None:
                raise KVCacheError(f"no parked request with id {rid!r}", 404, "not_found")
            code = "lease_expired" if how.startswith("expired") else "conflict"
            raise KVCacheError(f"request {rid!r} is no longer parked: it {how}", 409, code)
        self.fences.pop(res.fence, None)
        return res

    def _end(self, rid: str, how: str) -> None:
        self.ended[rid] = how
        while len(self.ended) > 10_000:
            self.ended.pop(next(iter(self.ended)))

    def commit(self, rid: str) -> int:
        """Publish a parked request's KV for tokens[:end] into the prefix tree; returns tokens cached."""
        res = self.take(rid)
        self.publish(res.seq, res.tokens, res.end)
        cached = res.seq.cached_len
        self.release(res.seq)
        self._end(rid, "was committed")
        return cached

    def abort(self, rid: str) -> None:
        res = self.take(rid)
        self._retire(res)
        self._end(rid, "was aborted")

    def _retire(self, res: Reservation) -> None:
        """Free an aborted or expired reservation's pages, or quarantine them while a sender that
        claimed the fence may still write (see Fencing above)."""
        if res.claims == 0:
            self.release(res.seq)
            return
        self.tree.unlock(res.seq.node)  # the shared prefix is never written by a sender
        res.seq.node = None
        hold = max(res.granted - time.time(), 0.0) + self.hold_s
        self.quarantine.append((time.monotonic() + hold, res))

    def started(self, rid: str) -> None:
        self._end(rid, "already started generating")

    def expire(self, now: float | None = None) -> list[str]:
        """End reservations whose lease ran out, and free quarantined pages whose time is up."""
        now = time.monotonic() if now is None else now
        gone = [rid for rid, r in self.reservations.items() if r.deadline <= now]
        for rid in gone:
            res = self.reservations.pop(rid)
            self.fences.pop(res.fence, None)
            self._retire(res)
            self._end(rid, "expired (its lease ran out)")
        if self.quarantine and min(q[0] for q in self.quarantine) <= now:
            for _, res in [q for q in self.quarantine if q[0] <= now]:
                self.release(res.seq)
            self.quarantine = [q for q in self.quarantine if q[0] > now]
        return gone

    # ---- accounting --------------------------------------------------------------------------
    def accounting(self) -> dict[str, int]:
        owned = sum(len(s.private) for s in self._live)
        return {"total": self.pool.num_usable, "free": self.pool.num_free, "cached": self.tree.num_nodes,
                "evictable": self.tree.num_evictable, "owned": owned, "live_seqs": len(self._live),
                "parked": len(self.reservations), "quarantined": sum(len(r.seq.private) for _, r in self.quarantine)}

    def check(self) -> dict[str, int]:
        a = self.accounting()
        assert a["free"] + a["cached"] + a["owned"] == a["total"], f"KV page accounting broken: {a}"
        assert 0 <= a["evictable"] <= a["cached"], f"evictable out of range: {a}"
        return a
