"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from microserve.errors import ServeError

GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        # As vLLM: a temperature this small is argmax anyway, and dividing logits by it overflows to inf
        return self.temperature < GREEDY_EPS

    def validate(self) -> None:
        for bad, message, param in ((self.max_tokens < 1, "max_tokens must be at least 1", "max_tokens"),
                                    (not 0 <= self.temperature < math.inf, "temperature must be a finite number >= 0",
                                     "temperature"),
                                    (not 0 < self.top_p <= 1, "top_p must be in (0, 1]", "top_p"),
                                    (self.top_k < -1, "top_k must be -1 (off) or a positive integer", "top_k"),
                                    (self.seed is not None and not -2**63 <= self.seed < 2**64,
                                     "seed must fit in 64 bits", "seed")):
            if bad:
                raise ServeError(message, param=param)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of `logits` ([B, V] fp32). Greedy rows take the argmax; sampled rows use
    their own generator when seeded, so a seed fixes the output whatever the batch around it."""
    out = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k > 0 and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > p.top_p  # keep the smallest set reaching top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
        out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return out.tolist()  # the step's only host sync
