"""Experiment 1: data parallel vs 1P1D vs balanced PD (f = 0.1 and a tuned f) vs adaptive on the
long-input workload (the paper's 3000/100, scaled to the CPU miniature: 640/100), JCT mean and
P99, TTFT and TPOT against request rate.

    python benchmarks/paper/exp1_long_input.py            # tune f at the top rate, then the sweep
    python benchmarks/paper/exp1_long_input.py --f 0.3 --resume   # as recorded (f tuned at 2.6 req/s)

The tuned f is picked before the main sweep, from short runs of pd:balance=F for each F in
--tune-f at the highest rate (lowest mean JCT wins), and written into the doc with those runs.
"""
from __future__ import annotations

import os


from _sweep import load_results, now, parser, sweep, write_doc

NAME, WORKLOAD = "exp1_long_input", "long"
TITLE = "Experiment 1: long input (miniature 640 in / 100 out), 2 engines"


def tune_f(a, candidates: list[float], run: bool = True) -> tuple[float, str]:
    """Run pd:balance=F at --tune-rate for each candidate; the F with the lowest mean JCT, and the
    table of those runs. With run=False, only read the tuning runs already saved."""
    import argparse
    t = argparse.Namespace(**{**vars(a), "rates": [a.tune_rate or max(a.rates)], "repeats": 1,
                              "summarize_only": a.summarize_only or not run})
    specs = [f"pd:balance={f:g}" for f in candidates]
    d = sweep(NAME, t, specs, WORKLOAD, result_sub="tune_f")
    res = {r["strategy"]: r for r in load_results(d)} if os.path.isdir(os.path.join(d, "runs")) else {}
    if not res:
        return float("nan"), ""
    rows = [f"| `{s}` | {res[s]['request_rate']:g} | {res[s]['mean_e2el_ms']:.0f} | {res[s]['p99_e2el_ms']:.0f} | "
            f"{res[s]['request_throughput']:.2f} |" for s in specs if s in res]
    best = min((s for s in specs if s in res), key=lambda s: (res[s]["mean_e2el_ms"], res[s]["p99_e2el_ms"]))
    table = (f"Tuning f ({a.num_prompts} requests each; lowest mean JCT wins: `{best}`):\n\n"
             "| strategy | rate (req/s) | mean JCT (ms) | P99 JCT (ms) | req/s done |\n|---|---|---|---|---|\n"
             + "\n".join(rows))
    return float(best.split("=")[1]), table


def main() -> int:
    p = parser(__doc__, rates=[0.5, 0.8, 1.1])
    p.add_argument("--tune-f", default="0.2,0.3,0.5", help="balance factors tried for the tuned f")
    p.add_argument("--tune-rate", type=float, default=None, help="rate of the tuning runs (default: the highest)")
    p.add_argument("--f", type=float, default=None, help="skip tuning; use this f")
    a = p.parse_args()
    started = now()
    candidates = [float(x) for x in a.tune_f.split(",")]
    if a.f is not None:  # given; the tuning runs already saved (if any) are still reported
        f, tuning = a.f, f"Tuned f given on the command line: {a.f:g}.\n\n" + tune_f(a, candidates, run=False)[1]
    else:
        f, tuning = tune_f(a, candidates)
    strategies = a.strategies or list(dict.fromkeys(["dp", "pd", "pd:balance=0.1", f"pd:balance={f:g}", "adaptive"]))
    d = sweep(NAME, a, strategies, WORKLOAD)
    write_doc(NAME, TITLE, a, d, strategies, WORKLOAD, started, notes=tuning)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
