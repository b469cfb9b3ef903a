"""Data parallel: every request runs whole on one engine. Three ways to pick it."""
from __future__ import annotations

from microserve.router.router import Router


class RoundRobin(Router):
    name = "round_robin"

    async def translate_request(self, req):
        async for chunk in self.round_robin(self.engines).generate(req):
            yield chunk


class LeastLoaded(Router):
    name = "least_loaded"

    async def translate_request(self, req):
        async for chunk in self.least_loaded(self.engines).generate(req):
            yield chunk


class CacheAware(Router):
    """The engine holding the longest prefix of the prompt; least loaded on ties."""
    name = "cache_aware"

    async def translate_request(self, req):
        engine, _ = await self.best_match(req, self.engines)
        async for chunk in engine.generate(req):
            yield chunk
