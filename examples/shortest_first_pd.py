"""A custom strategy in a few lines: short prompts run data parallel, long ones disaggregate, with
the decode engine prefilling more of the prompt the longer it is.

    microserve up --engines 3 --prefill 1 --strategy examples.shortest_first_pd:LengthAwarePD
"""
from microserve.router.router import Router


class LengthAwarePD(Router):
    name = "length_aware_pd"
    short = 64  # tokens

    async def translate_request(self, req):
        if len(req) < self.short:
            engine = self.least_loaded(self.engines)
            async for chunk in engine.generate(req):
                yield chunk
            return
        p, d = self.least_loaded(self.prefill), self.least_loaded(self.decode)
        end = len(req) - 1 - min(len(req) // 8, 128)  # d prefills up to 1/8 of the prompt, 128 tokens at most
        async for chunk in self.disaggregate(req, p, d, end=end):
            yield chunk
