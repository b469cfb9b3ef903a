"""The paper's long-input experiment at the paper's scale, simulated (docs/sim.md, "Paper scale").

Three setups, each DP, 1P1D, balanced PD (f = 0.1 and 0.2) and adaptive over the setup's rates and
5 seeds, through `microserve sim sweep` (the router's own strategy classes, analytic H100 roofline):

- `70b-long`: the MLC blog's: Llama-3.1-70B FP8 on 8 x H100, 2 x TP4 against 1P1D; 3000 +- 5 tokens
  in, 100 out; 1.6-5.6 req/s; 100 requests per GPU plus 40 warm-ups.
- `8b-long`: the seed's long-input setup: Llama-3.1-8B bf16 on 2 x H100; 3000 in, 100 out.
- `70b-sharegpt`: the 70B cluster on ShareGPT conversations, where the paper expects little gain.

    python benchmarks/paper/sim_scale.py --docs docs/sim         # ~22 CPU min on one core, all three
    python benchmarks/paper/sim_scale.py --setups 8b-long --seeds 2 --docs /tmp/x    # a quick look

Raw runs go to --result-dir (ignored by git); --docs gets one markdown report (paper_scale.md) and a
plot per setup (<setup>.png), which docs/sim.md embeds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

from microserve.bench.sweep import aggregate, load_results
from microserve.bench.plots import plot_sweep
from microserve.sim.__main__ import main as sim_main

FIXED = ("dp", "pd", "pd:balance=0.1", "pd:balance=0.2")


@dataclass(frozen=True)
class Setup:
    preset: str
    adaptive: str  # adaptive's spec: max_decode_batch is where a decode step costs ~1.5x batch 1
    title: str
    args: tuple[str, ...] = ()
    rates: tuple[float, ...] = ()  # empty: the preset's
    reported: str = ""  # what the blog or paper reported, for the side-by-side line
    strategies: tuple[str, ...] = field(default=FIXED)

    def specs(self) -> list[str]:
        return [*self.strategies, self.adaptive]


BLOG = "blog: PD -16% mean / -28% P99 JCT; balanced PD (0.1) better at higher rates"
PAPER = "paper: -21% mean / -47% P99 JCT (long inputs, 8B)"
SETUPS = {
    "70b-long": Setup("paper-70b", "adaptive:max_decode_batch=48",
                      "Llama-3.1-70B FP8, 8 x H100: 2 x TP4 (DP) vs 1P1D; 3000 in / 100 out",
                      ("--num-warmups", "40"), reported=BLOG),
    "8b-long": Setup("paper-8b", "adaptive:max_decode_batch=32",
                     "Llama-3.1-8B bf16, 2 x H100: DP vs 1P1D; 3000 in / 100 out",
                     ("--num-warmups", "10", "--num-prompts", "200"), reported=PAPER),
    "70b-sharegpt": Setup("paper-70b", "adaptive:max_decode_batch=48",
                          "Llama-3.1-70B FP8, 8 x H100 on ShareGPT (prompts <= 1024, total <= 2048 tokens)",
                          ("--num-warmups", "40", "--dataset-name", "sharegpt"), rates=(8, 16, 32, 48, 64),
                          reported="paper: little or no gain on ShareGPT"),
}


def run_setup(name: str, s: Setup, result_dir: str, seeds: int, more: list[str]) -> float:
    """The sweep (`more`: further `sim sweep` flags, which win); returns its wall seconds."""
    argv = ["sweep", "--preset", s.preset, "--strategies", *s.specs(), "--repeats", str(seeds),
            "--result-dir", result_dir, "--title", s.title, *s.args]
    if s.rates:
        argv += ["--rates", *map(str, s.rates)]
    argv += more
    t0 = time.perf_counter()
    if sim_main(argv) != 0:
        raise SystemExit(f"the {name} sweep failed")
    return time.perf_counter() - t0


def _per_seed(results: list[dict], strategy: str, rate: float, key: str) -> list[float]:
    return [float(r[key]) for r in results if r["strategy"] == strategy and float(r["request_rate"]) == rate]


def report(name: str, s: Setup, result_dir: str, docs: str, wall_s: float | None) -> tuple[str, bool]:
    """The setup's section of paper_scale.md, and whether adaptive held at every rate. Writes the plot."""
    results = load_results(result_dir)
    agg = aggregate(results)
    rates = sorted({r for _, r in agg})
    plot_sweep(agg, os.path.join(docs, f"{name}.png"), s.title, s.specs())
    seeds = max(row["n"] for row in agg.values())
    sim_s = sum(r["sim"]["sim_s"] for r in results)
    cpu_s = sum(r["sim"]["cpu_s"] for r in results)
    done, failed = sum(row["completed"] for row in agg.values()), sum(row["failed"] for row in agg.values())
    lines = [f"### {name}: {s.title}", "",
             f"{results[0]['num_prompts']} requests per run, {results[0].get('num_warmups', 0)} warm-ups, "
             f"{seeds} seeds (medians; ± is half the range over seeds). {len(results)} runs simulated "
             f"{sim_s:.0f} s of cluster time in {cpu_s:.0f} CPU s ({sim_s / cpu_s:.0f}x)"
             + (f", {wall_s:.0f} s wall." if wall_s else ".") + f" Requests completed: {done}, failed: {failed}.",
             "", f"![{name}]({name}.png)", "",
             "Change against DP (median of seeds), mean / P99 JCT, then mean TTFT and TPOT of each:", "",
             "| rate | " + " | ".join(f"`{x}`" for x in s.specs()) + " | DP TTFT / TPOT (ms) |",
             "|---|" + "---|" * (len(s.specs()) + 1)]
    best_mean = best_p99 = float("inf")  # the best PD variant's change, even where it loses to DP
    for rate in rates:
        dp = agg[("dp", rate)]
        cells = []
        for x in s.specs():
            row = agg[(x, rate)]
            if x == "dp":
                cells.append(f"{dp['mean_e2el_ms']:.0f} / {dp['p99_e2el_ms']:.0f} ms")
                continue
            dm, d99 = row["mean_e2el_ms"] / dp["mean_e2el_ms"] - 1, row["p99_e2el_ms"] / dp["p99_e2el_ms"] - 1
            if x in FIXED:  # dp itself took the branch above
                best_mean, best_p99 = min(best_mean, dm), min(best_p99, d99)
            cells.append(f"{100 * dm:+.0f}% / {100 * d99:+.0f}% ({row['mean_ttft_ms']:.0f}, {row['mean_tpot_ms']:.1f})")
        lines.append(f"| {rate:g} | " + " | ".join(cells) + f" | {dp['mean_ttft_ms']:.0f} / {dp['mean_tpot_ms']:.1f} |")
    lines += ["", f"Best fixed PD variant against DP, at the rate where it gains most (each of mean and P99 on its own): **{100 * best_mean:+.0f}% mean, "
                  f"{100 * best_p99:+.0f}% P99 JCT**; {s.reported}.", "",
              "Adaptive against the best fixed strategy at each rate (mean JCT, ms; holds when adaptive's median "
              "is at most the best's median plus the two half-ranges over seeds):", "",
              "| rate | best fixed | its mean JCT | adaptive | gap | half-ranges | holds |", "|---|---|---|---|---|---|---|"]
    ok_all = True
    for rate in rates:
        best = min(s.strategies, key=lambda x: agg[(x, rate)]["mean_e2el_ms"])
        b, a = agg[(best, rate)], agg[(s.adaptive, rate)]
        slack = (b["spread"]["mean_e2el_ms"] + a["spread"]["mean_e2el_ms"]) / 2
        gap = a["mean_e2el_ms"] - b["mean_e2el_ms"]
        ok = gap <= slack
        ok_all &= ok
        per_seed = _per_seed(results, s.adaptive, rate, "mean_e2el_ms")
        lines.append(f"| {rate:g} | `{best}` | {b['mean_e2el_ms']:.0f} | {a['mean_e2el_ms']:.0f} "
                     f"(seeds {min(per_seed):.0f}-{max(per_seed):.0f}) | {gap:+.0f} ({100 * gap / b['mean_e2el_ms']:+.1f}%) "
                     f"| ±{b['spread']['mean_e2el_ms'] / 2:.0f}, ±{a['spread']['mean_e2el_ms'] / 2:.0f} "
                     f"| {'yes' if ok else '**no**'} |")
    return "\n".join(lines) + "\n", ok_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Setups: " + "; ".join(f"{k}: {v.title}" for k, v in SETUPS.items()))
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--seeds", type=int, default=5, help="repeats with seeds 0..N-1 (default: %(default)s)")
    ap.add_argument("--result-dir", default="benchmarks/results/sim_scale",
                    help="raw runs, one folder per setup (default: %(default)s)")
    ap.add_argument("--docs", required=True, help="folder for paper_scale.md and one PNG per setup")
    ap.add_argument("--report-only", action="store_true", help="summarize the runs already in --result-dir")
    a, more = ap.parse_known_args(argv)  # the rest goes to every `sim sweep` (e.g. --num-prompts 50 --rates 2 4)
    os.makedirs(a.docs, exist_ok=True)
    sections, verdicts = [], {}
    for name in a.setups:
        s, rdir = SETUPS[name], os.path.join(a.result_dir, name)
        wall = None if a.report_only else run_setup(name, s, rdir, a.seeds, more)
        text, ok = report(name, s, rdir, a.docs, wall)
        sections.append(text)
        verdicts[name] = ok
        print(text, file=sys.stderr)
    head = ["## Paper scale, simulated", "", "Made by `python benchmarks/paper/sim_scale.py --docs "
            f"{a.docs}` (analytic H100 roofline with its default efficiencies; see docs/sim.md).", "",
            "Adaptive at most the best fixed strategy at every rate: "
            + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in verdicts.items()) + ".", ""]
    with open(os.path.join(a.docs, "paper_scale.md"), "w") as f:
        f.write("\n".join(head) + "\n" + "\n".join(sections))
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
