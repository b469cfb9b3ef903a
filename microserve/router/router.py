"""The Router base class and the building blocks strategies are written with.

A strategy subclasses `Router` and overrides one method:

    async def translate_request(self, req: RouterRequest) -> AsyncIterator[dict]:
        ...  # calls to EngineClient.prep_recv / remote_send / start_generate / commit / match / generate
        yield chunk  # OpenAI completion chunks from the engine that generates

Class attributes are the strategy's tunable parameters (e.g. `balance = 0.1`); the admin API sets
them at run time. What every strategy needs (picking engines, the disaggregation and migration
sequences, cleanup of parked requests, retries) lives here, so strategies stay a few lines.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import AsyncIterator

from microserve.router.client import EngineClient, EngineError, EngineUnavailable, RouterRequest

# Engine answers that mean "this request's reservation ended before its KV arrived" (its lease ran
# out while the prefill engine was busy): nothing reached the client, so it can simply run again.
RETRY_CODES = ("lease_expired", "stale_reservation")

log = logging.getLogger(__name__)


class EngineSet:
    """The engines a router knows, shared by every strategy instance (so switching strategy keeps them)."""

    def __init__(self, engines: list[EngineClient] | None = None) -> None:
        self.engines: list[EngineClient] = list(engines or [])

    def get(self, url: str) -> EngineClient | None:
        url = url.rstrip("/")
        return next((e for e in self.engines if e.url == url), None)

    def usable(self, *roles: str) -> list[EngineClient]:
        """Healthy, not draining engines whose role is one of `roles` (any role if none given)."""
        return [e for e in self.engines if e.healthy and not e.draining and (not roles or e.role in roles)]


class NoEngine(EngineUnavailable):
    def __init__(self, what: str) -> None:
        super().__init__("(none)", f"no healthy {what} engine is available", 503)


class Router:
    """Base class of every strategy. `name` is what the CLI and the admin API call it."""

    name = "base"
    max_retries = 1  # re-run a failed request on other engines, only while nothing was streamed
    max_lease_retries = 3  # re-run a request whose reservation ended before its KV came

    def __init__(self, engines: EngineSet) -> None:
        self.engine_set = engines
        self._rr = itertools.count()

    # ---- the one method a strategy writes ---------------------------------------------------------
    async def translate_request(self, req: RouterRequest) -> AsyncIterator[dict]:
        raise NotImplementedError
        yield {}

    # ---- engines by role ------------------------------------------------------------------------
    @property
    def engines(self) -> list[EngineClient]:
        return self._need(self.engine_set.usable(), "")

    @property
    def prefill(self) -> list[EngineClient]:
        """Engines for prefill work: role prefill; failing that (all down), any engine, so PD
        degrades to each decode engine prefilling for itself instead of failing."""
        u = self.engine_set.usable
        return self._need(u("prefill") or u("both") or u(), "prefill")

    @property
    def decode(self) -> list[EngineClient]:
        u = self.engine_set.usable
        return self._need(u("decode") or u("both") or u(), "decode")

    @staticmethod
    def _need(engines: list[EngineClient], what: str) -> list[EngineClient]:
        if not engines:
            raise NoEngine(what)
        return engines

    # ---- picking one -------------------------------------------------------------------------------
    def round_robin(self, engines: list[EngineClient]) -> EngineClient:
        return engines[next(self._rr) % len(engines)]

    @staticmethod
    def least_loaded(engines: list[EngineClient]) -> EngineClient:
        """Fewest pending prefill tokens, then fewest running requests."""
        return min(engines, key=lambda e: (e.load.prefill_tokens, e.load.running))

    async def best_match(self, req: RouterRequest, engines: list[EngineClient]) -> tuple[EngineClient, int]:
        """The engine with the longest cached prefix of the prompt (least loaded on ties)."""
        matches = await asyncio.gather(*(e.match(req) for e in engines), return_exceptions=True)
        scored = [(m, e) for m, e in zip(matches, engines) if isinstance(m, int)]
        if not scored:
            raise NoEngine("matching")
        best = max(m for m, _ in scored)
        return self.least_loaded([e for m, e in scored if m == best]), best

    # ---- the sequences strategies are made of -------------------------------------------------------
    async def disaggregate(self, req: RouterRequest, p: EngineClient, d: EngineClient, end: int,
                           bypass_tokens: int = 0) -> AsyncIterator[dict]:
        """Prefill prompt[:end] on p into d's KV cache, then generate on d (the paper's PD flow).

        d keeps what it already has cached (prefix_matched_length); if what is left to send is at
        most `bypass_tokens` (or p is d), p is skipped and d prefills it itself."""
        kv, matched = await d.prep_recv(req, end=end)
        begin = end
        if p is d or end - matched <= bypass_tokens:
            begin = matched
        elif matched < end:
            await p.remote_send(req, begin=matched, end=end, kv_addr_info=kv, recv_rank=d.rank)
        async for chunk in d.start_generate(req, begin=begin):
            yield chunk

    async def migrate(self, req: RouterRequest, src: EngineClient, dst: EngineClient, end: int) -> int:
        """Move the KV of prompt[:end] from src to dst's prefix cache; returns the tokens dst now caches."""
        kv, matched = await dst.prep_recv(req, end=end)
        if matched < end:
            await src.remote_send(req, begin=matched, end=end, kv_addr_info=kv, recv_rank=dst.rank)
        return await dst.commit(req)

    # ---- the driver (not for strategies to override) ----------------------------------------------
    async def run(self, req: RouterRequest) -> AsyncIterator[dict]:
        """translate_request with cleanup and retry: a reservation left parked by a failed or
        abandoned request is aborted, and a request that failed before any token reached the client
        is re-run (its failed engine is now unhealthy, so the strategy picks another)."""
        attempt = lease_attempt = 0
        while True:
            try:
                async for chunk in self.translate_request(req):
                    req.streamed = True
                    yield chunk
                return
            except EngineUnavailable as e:
                if req.streamed or attempt >= self.max_retries or isinstance(e, NoEngine):
                    raise
                attempt += 1
                log.warning("request %s: %s; retrying (%d/%d)", req.rid, e, attempt, self.max_retries)
            except EngineError as e:  # a reservation that ended before its KV came (lease ran out under load)
                if req.streamed or lease_attempt >= self.max_lease_retries or e.code not in RETRY_CODES:
                    raise
                lease_attempt += 1
                log.info("request %s: %s; retrying (%d/%d)", req.rid, e, lease_attempt, self.max_lease_retries)
            finally:
                await release_parked(req)


async def release_parked(req: RouterRequest) -> None:
    """Abort every prep_recv reservation the request still holds (best effort: the engine's lease
    frees it anyway if the engine is unreachable)."""
    for engine in list(req.parked.values()):
        try:
            await asyncio.shield(engine.abort(req))
        except Exception as e:  # noqa: BLE001 - cleanup must not mask the original failure
            log.info("abort of parked %s on %s failed: %s", req.rid, engine.url, e)
        req.parked.pop(engine.url, None)
