"""Continuous batching with chunked prefill under one token budget.

Every step: running requests first, in arrival order (decodes cost 1 token, unfinished prefills
take what budget is left), then waiting requests are admitted while the budget, `max_num_seqs` and
the KV pool allow. When pages run out, the newest running request is preempted by recompute: its
computed full pages go to the prefix tree (so the re-run mostly hits the cache) and it waits again.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from microserve.engine.request import Request, Status
from microserve.kv.cache import KVCache


@dataclass
class ScheduledBatch:
    requests: list[Request]  # q_len == 1 rows first (decode group), then multi-token chunks
    num_tokens: list[int]  # tokens computed this step, per request

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    def __init__(self, cache: KVCache, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.cache = cache
        self.max_tokens = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.admitted: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, req: Request) -> None:
        """Take a request out of the queues (finish or abort); its KV is the caller's to release."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        self.cache.publish(victim.seq, victim.token_ids, victim.num_computed)
        self.cache.release(victim.seq)
        victim.seq, victim.num_computed, victim.status = None, 0, Status.WAITING
        self.waiting.appendleft(victim)
        self.num_preemptions += 1

    def schedule(self) -> ScheduledBatch:
        budget = self.max_tokens
        self.admitted: list[Request] = []  # newly running this step (the engine starts their sends)
        picked: list[tuple[Request, int]] = []
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not Status.RUNNING:  # preempted below, earlier in this loop
                continue
            n = min(req.num_remaining, budget)
            while not self.cache.allocate(req.seq, req.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    n = 0
                    break
            if n:
                picked.append((req, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            req = self.waiting[0]
            fresh = req.seq is None  # else: a start_generate handoff, arriving with its KV held
            if fresh:
                limit = len(req.token_ids) if req.send_only else len(req.token_ids) - 1
                req.seq = self.cache.match(req.token_ids, limit)
                req.num_computed = req.seq.cached_len
                req.num_cached_tokens = max(req.num_cached_tokens, req.seq.cached_len)
            n = min(req.num_remaining, budget)
            if not self.cache.allocate(req.seq, req.num_computed + n):
                if fresh:
                    self.cache.release(req.seq)
                    req.seq, req.num_computed = None, 0
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            self.admitted.append(req)
            if n:
                picked.append((req, n))
                budget -= n
        picked.sort(key=lambda rn: rn[1] != 1)  # stable: decode group first
        return ScheduledBatch([r for r, _ in picked], [n for _, n in picked])
