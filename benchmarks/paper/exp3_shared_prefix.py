"""Experiment 3: cache-aware PD and context migration on the shared-prefix workload (4 documents
of 576 tokens, distinct 64-token questions, 100 tokens out, interleaved across documents), against
data parallel (least loaded, cache-blind), cache-aware data parallel and plain 1P1D.

    python benchmarks/paper/exp3_shared_prefix.py
"""
from __future__ import annotations

from _sweep import now, parser, sweep, write_doc

NAME, WORKLOAD = "exp3_shared_prefix", "prefix"
TITLE = "Experiment 3: shared-prefix workload (4 x 576-token documents), 2 engines"


def main() -> int:
    a = parser(__doc__, rates=[0.6, 1.2], num_prompts=32).parse_args()
    started = now()
    strategies = a.strategies or ["dp", "cache_aware", "pd", "cache_aware_pd", "migration"]
    d = sweep(NAME, a, strategies, WORKLOAD)
    write_doc(NAME, TITLE, a, d, strategies, WORKLOAD, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
