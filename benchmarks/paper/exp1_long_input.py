"""Experiment 1: data parallel vs 1P1D vs balanced PD (f = 0.1 and a tuned f) vs adaptive on the
long-input workload (the paper's 3000/100, scaled to the CPU miniature: 640/100), JCT mean and
P99, TTFT and TPOT against request rate.

    python benchmarks/paper/exp1_long_input.py            # tune f at the top rate, then the sweep

The tuned f is picked before the main sweep, from short runs of pd:balance=F for each F in
--tune-f at the highest rate (lowest mean JCT wins), and written into the doc with those runs.
"""
from __future__ import annotations


from _sweep import load_results, now, parser, sweep, write_doc

NAME, WORKLOAD = "exp1_long_input", "long"
TITLE = "Experiment 1: long input (miniature 640 in / 100 out), 2 engines"


def tune_f(a, candidates: list[float]) -> tuple[float, str]:
    """Run pd:balance=F at the highest rate for each candidate; the F with the lowest mean JCT."""
    import argparse
    t = argparse.Namespace(**{**vars(a), "rates": [max(a.rates)], "repeats": 1})
    specs = [f"pd:balance={f:g}" for f in candidates]
    d = sweep(NAME, t, specs, WORKLOAD, result_sub="tune_f")
    res = {r["strategy"]: r for r in load_results(d)}
    rows = [f"| `{s}` | {res[s]['mean_e2el_ms']:.0f} | {res[s]['p99_e2el_ms']:.0f} |" for s in specs if s in res]
    best = min((s for s in specs if s in res), key=lambda s: (res[s]["mean_e2el_ms"], res[s]["p99_e2el_ms"]))
    table = (f"Tuning f at {max(a.rates):g} req/s ({a.num_prompts} requests each):\n\n"
             "| strategy | mean JCT (ms) | P99 JCT (ms) |\n|---|---|---|\n" + "\n".join(rows))
    return float(best.split("=")[1]), table


def main() -> int:
    p = parser(__doc__, rates=[0.8, 1.4, 2.0, 2.6])
    p.add_argument("--tune-f", default="0.2,0.3,0.5", help="balance factors tried for the tuned f")
    p.add_argument("--f", type=float, default=None, help="skip tuning; use this f")
    a = p.parse_args()
    started = now()
    if a.f is not None:
        f, tuning = a.f, f"Tuned f given on the command line: {a.f:g}."
    else:
        f, tuning = tune_f(a, [float(x) for x in a.tune_f.split(",")])
    strategies = a.strategies or list(dict.fromkeys(["dp", "pd", "pd:balance=0.1", f"pd:balance={f:g}", "adaptive"]))
    d = sweep(NAME, a, strategies, WORKLOAD)
    write_doc(NAME, TITLE, a, d, strategies, WORKLOAD, started, notes=tuning)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
