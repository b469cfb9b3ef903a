"""Context-cache migration: when the engine that holds a request's context is busier than the
idlest engine, move the context's KV there (prep_recv + remote_send + commit) and serve there."""
from __future__ import annotations

from microserve.router.router import Router


class Migration(Router):
    name = "migration"
    min_tokens = 32  # shorter contexts are cheaper to recompute than to move
    imbalance = 1  # move when the holder runs at least this many more requests than the idlest engine

    async def translate_request(self, req):
        src, cached = await self.best_match(req, self.engines)
        dst = self.least_loaded(self.engines)
        if dst is not src and cached >= self.min_tokens and src.load.running - dst.load.running >= self.imbalance:
            await self.migrate(req, src, dst, end=cached)
            src = dst
        async for chunk in src.generate(req):
            yield chunk
