"""Experiment 2: the same strategies on ShareGPT first turns (short chat), scaled to the
miniature like the long workload (prefill:decode time keeps ShareGPT's proportions). The paper
reports little or no gain from disaggregation here.

    python benchmarks/paper/exp2_sharegpt.py
"""
from __future__ import annotations

from _sweep import now, parser, sweep, write_doc

NAME, WORKLOAD = "exp2_sharegpt", "sharegpt"
TITLE = "Experiment 2: ShareGPT (scaled to the miniature), 2 engines"


def main() -> int:
    a = parser(__doc__, rates=[0.5, 1.0, 1.5], num_prompts=30).parse_args()
    started = now()
    strategies = a.strategies or ["dp", "pd", "pd:balance=0.1", "adaptive"]
    d = sweep(NAME, a, strategies, WORKLOAD)
    write_doc(NAME, TITLE, a, d, strategies, WORKLOAD, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
