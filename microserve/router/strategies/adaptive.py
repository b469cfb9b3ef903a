"""Adaptive: the paper's dynamic reconfiguration, decided per request instead of by an operator.

Short prompts gain nothing from disaggregation (the transfer and the extra hop cost more than the
decode interference they remove): serve them data parallel. Long prompts go PD, and the balance
factor follows live load: the more prefill work is queued on the prefill engine compared with the
decode engine, the larger the share of the prompt the decode engine prefills itself."""
from __future__ import annotations

from microserve.router.router import Router


class Adaptive(Router):
    name = "adaptive"
    short_prompt = 256  # tokens; below this, data parallel
    max_balance = 0.5

    async def translate_request(self, req):
        engines = self.engines
        if len(req) < self.short_prompt or len(engines) < 2:
            async for chunk in self.least_loaded(engines).generate(req):
                yield chunk
            return
        p = self.least_loaded(self.prefill)
        d = min((e for e in self.decode if e is not p), key=lambda e: (e.load.running, e.load.prefill_tokens), default=p)
        queued_p, queued_d = p.load.prefill_tokens + len(req), d.load.prefill_tokens
        balance = min(self.max_balance, max(0.0, (queued_p - queued_d) / (queued_p + queued_d) - 0.5))
        end = min(int((1 - balance) * len(req)), len(req) - 1)
        async for chunk in self.disaggregate(req, p, d, end=end):
            yield chunk
