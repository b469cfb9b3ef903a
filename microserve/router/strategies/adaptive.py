"""Adaptive: the paper's dynamic reconfiguration, decided per request instead of by an operator.

Disaggregation pays when a prefill would otherwise stall running decodes and the decode engine can
take one more sequence almost for free. So, per long request: prefill on the engine running the
fewest decodes, decode on the engine already running the most decodes while its batch is below
`max_decode_batch` (decodes pack onto one engine, the other is left free to prefill: 1P1D when load
is light or moderate); once every decode engine is that full, or for short prompts, whole requests
go data parallel. `max_decode_batch` is the hardware's: the batch up to which a decode step costs
little more than batch 1 (about 4 on one CPU core in the miniature, docs/paper/preset.md; dozens on a
GPU). When the prefill engine's queue dwarfs the decode engine's, the decode engine also prefills
a share of the prompt (balanced PD)."""
from __future__ import annotations

from microserve.router.router import Router


class Adaptive(Router):
    name = "adaptive"
    short_prompt = 256  # tokens; below this, data parallel
    max_decode_batch = 4
    max_balance = 0.5

    async def translate_request(self, req):
        room = [e for e in self.decode if e.load.running < self.max_decode_batch]
        if len(req) < self.short_prompt or len(self.engines) < 2 or not room:
            async for chunk in self.least_loaded(self.engines).generate(req):
                yield chunk
            return
        d = max(room, key=lambda e: (e.load.running, -e.load.prefill_tokens))  # pack decodes
        p = min(self.prefill, key=lambda e: (e.load.running, e.load.prefill_tokens))  # stall the fewest
        queued_p, queued_d = p.load.prefill_tokens, d.load.prefill_tokens
        balance = min(self.max_balance, max(0.0, (queued_p - queued_d) / (queued_p + queued_d + len(req)) - 0.5))
        end = min(int((1 - balance) * len(req)), len(req) - 1)
        async for chunk in self.disaggregate(req, p, d, end=end):  # p is d: d prefills it alone
            yield chunk
