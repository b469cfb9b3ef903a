"""Prefill/decode disaggregation, balanced and cache-aware, over any number of prefill and decode
engines (xPyD): each request picks the least-loaded engine of each role."""
from __future__ import annotations

from microserve.router.router import Router


class PD(Router):
    """prep_recv on D, remote_send of prompt[:end] from P, start_generate on D.

    balance = f moves the last f of the prompt's prefill to the decode engine (balanced PD);
    f = 0 is plain disaggregation (D computes only the last token)."""
    name = "pd"
    balance = 0.0

    async def translate_request(self, req):
        p, d = self.least_loaded(self.prefill), self.least_loaded(self.decode)
        end = min(int((1 - self.balance) * len(req)), len(req) - 1)
        async for chunk in self.disaggregate(req, p, d, end=end):
            yield chunk


class BalancedPD(PD):
    name = "balanced_pd"
    balance = 0.1


class CacheAwarePD(Router):
    """Send to the decode engine that caches most of the prompt, ship only what it lacks, and skip
    the prefill engine entirely when that is at most `bypass_tokens`."""
    name = "cache_aware_pd"
    bypass_tokens = 64

    async def translate_request(self, req):
        d, _ = await self.best_match(req, self.decode)
        p = self.least_loaded(self.prefill)
        async for chunk in self.disaggregate(req, p, d, end=len(req) - 1, bypass_tokens=self.bypass_tokens):
            yield chunk
