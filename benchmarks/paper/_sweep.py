"""What every sweep experiment of benchmarks/paper/ shares: its flags, running the sweep on a
preset, and writing docs/paper/<name>.md (header, table, plot, notes) and docs/paper/<name>.png.

Raw results (one JSON per run, vLLM's keys) stay in docs/paper/results/<name>/runs/, so the table
and plot can be rebuilt (`--summarize-only`) and an interrupted experiment finished (`--resume`).

The same sweep runs simulated (`microserve sim`, the measured cost model of `sim calibrate`): with
`--sim COST.json` instead of the real cluster (results/<name>/sim/, <name>_sim.md), with
`--compare-sim COST.json` after it, then <name>_fidelity.md sets real and simulated side by side.
A COST.json that does not exist is calibrated first, on the preset's engines as served
(`sim calibrate --served`). With `--step-traces DIR` the real runs' engines trace their steps, and
the fidelity doc says how fast each run's steps ran against the cost model."""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from microserve.bench.harness import ROOT, command_line, machine_line
from microserve.bench.plots import plot_sweep
from microserve.bench.presets import PRESETS
from microserve.bench.sweep import SweepSpec, aggregate, load_results, markdown_table, run_sweep

DOCS = ROOT / "docs" / "paper"


def parser(doc: str, rates: list[float], num_prompts: int = 40) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", nargs="+", type=float, default=rates, help="request rates (default: %(default)s)")
    p.add_argument("--strategies", nargs="+", default=None, help="override the experiment's strategies")
    p.add_argument("--num-prompts", type=int, default=num_prompts, help="measured requests per run")
    p.add_argument("--num-warmups", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="keep runs already in docs/paper/results/<name>/runs")
    p.add_argument("--summarize-only", action="store_true", help="rebuild the doc and plot from saved runs")
    p.add_argument("--out", default=str(DOCS), help="folder for <name>.md, <name>.png and results/")
    p.add_argument("--sim", metavar="COST.json", default=None,
                   help="simulate the experiment (microserve sim) with this measured cost model instead of running "
                        "it; results/<name>/sim/, <name>_sim.md (calibrated first if the file does not exist)")
    p.add_argument("--compare-sim", metavar="COST.json", default=None,
                   help="after the real sweep, simulate the same one and write <name>_fidelity.md: real vs "
                        "simulated mean and P99 JCT, errors, strategy ranking at each rate")
    p.add_argument("--sim-args", default="", help="more `microserve sim` cluster flags, e.g. '--rpc-ms 1'")
    p.add_argument("--step-traces", metavar="DIR", default=None,
                   help="real runs: every engine writes its step trace (--step-trace) to DIR/<run>-<port>.jsonl, "
                        "for `microserve sim calibrate --from-traces`")
    return p


def cost_model(a: argparse.Namespace, preset: str = "miniature") -> str | None:
    """The cost-model JSON of --sim / --compare-sim; if it is not there, calibrated on the preset's
    engines as they are served (`microserve sim calibrate --served --preset PRESET`)."""
    path = a.sim or a.compare_sim
    if not path or os.path.exists(path):
        return path
    import json
    from microserve.sim.calibrate import calibrate_served, summary
    doc = calibrate_served(preset, progress=lambda m: print(f"[calibrate] {m}", file=sys.stderr, flush=True))
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(summary(doc), file=sys.stderr)
    return path


def sweep(name: str, a: argparse.Namespace, strategies: list[str], workload: str = "long",
          preset: str = "miniature", result_sub: str = "") -> str:
    """Run (or resume) the sweep of `strategies` x a.rates on `preset`'s `workload`; returns the
    result folder. With --sim, the simulated sweep instead (result folder <result_dir>/sim); with
    --compare-sim, the simulated one after the real one."""
    pre = PRESETS[preset]
    result_dir = os.path.join(a.out, "results", name, result_sub) if result_sub else os.path.join(a.out, "results", name)
    spec = SweepSpec(strategies=strategies, rates=a.rates, model=pre.model, workload=pre.workloads[workload],
                     result_dir=result_dir, engines=pre.engines, pin_cores=pre.pin_cores,
                     engine_args=list(pre.engine_args), num_prompts=a.num_prompts, num_warmups=a.num_warmups,
                     seed=a.seed, repeats=a.repeats, preset=preset, resume=a.resume, trace_dir=a.step_traces)
    cost = cost_model(a, preset)
    if not a.summarize_only and not a.sim:
        run_sweep(spec)
    # simulated afresh each time (seconds), except where --sim --summarize-only only rebuilds the doc
    if cost and not (a.sim and a.summarize_only) and (a.sim or os.path.isdir(os.path.join(result_dir, "runs"))):
        from microserve.sim.cli import simulate_sweep
        simulate_sweep(spec, cost, os.path.join(result_dir, "sim"), shlex.split(a.sim_args))
    return os.path.join(result_dir, "sim") if a.sim else result_dir


def write_doc(name: str, title: str, a: argparse.Namespace, result_dir: str, strategies: list[str],
              workload: str, started: str, notes: str = "", preset: str = "miniature") -> str:
    """docs/paper/<name>.md and .png from the runs in result_dir; returns the markdown table. With
    --sim, <name>_sim.md and .png; with --compare-sim, <name>_fidelity.md as well."""
    if a.sim:
        name, title = f"{name}_sim", f"{title} (simulated)"
    results = [r for r in load_results(result_dir) if r["strategy"] in strategies]
    agg = aggregate(results)
    table = markdown_table(agg, "dp" if any(s == "dp" for s, _ in agg) else None, strategies)
    png = Path(a.out) / f"{name}.png"
    plot_sweep(agg, str(png), title, strategies)
    w = PRESETS[preset].workloads[workload]
    cmd = command_line()
    loads = [f"{r['load_average'][0]:.1f}" for r in results if r.get("load_average")]
    body = (f"# {title}\n\n"
            f"- command: `{cmd}`\n- started: {started}\n- finished: {machine_line()}\n"
            f"- preset `{preset}`: {PRESETS[preset].doc}\n"
            f"- workload `{workload}`: `{dataclasses.asdict(w)}`\n"
            f"- {a.num_prompts} measured requests per run (Poisson arrivals, seed {a.seed}), {a.num_warmups} warm-ups "
            f"with distinct prompts; every run on a freshly started cluster; {a.repeats} repeat(s). "
            f"1-minute load average at each run's start: {', '.join(loads)}.\n"
            f"- times in ms; with repeats, the median and ± half the range; `vs dp`: change against data "
            f"parallel at the same rate (negative = better). P99 over {a.num_prompts} requests is close to the max.\n\n"
            f"{table}\n\n![{title}]({png.name})\n")
    if notes:
        body += f"\n{notes.strip()}\n"
    (Path(a.out) / f"{name}.md").write_text(body)
    print(table)
    if a.compare_sim:
        print(write_fidelity(name, title, a, result_dir, strategies))
    return table


def fidelity_table(real: list[dict], sim: list[dict], strategies: list[str]) -> tuple[str, dict[str, Any]]:
    """Real vs simulated mean and P99 JCT at each (rate, strategy), the error of the simulation
    ((sim - real) / real), and at each rate the strategies ranked by mean (and P99) JCT in both.
    Returns the markdown and a summary (worst errors, points within 10% / 20%, rates ranked alike)."""
    ra, sa = aggregate(real), aggregate(sim)
    rates = sorted({r for _, r in ra} & {r for _, r in sa})
    strategies = [s for s in strategies if any((s, r) in ra and (s, r) in sa for r in rates)]
    lines = ["| rate (req/s) | strategy | real mean JCT | sim mean JCT | error | real P99 JCT | sim P99 JCT | error | "
             "mean TTFT real / sim | mean TPOT real / sim |", "|---|---|---|---|---|---|---|---|---|---|"]

    def real_cell(row: dict, key: str) -> str:  # with repeats: the median ± half the range
        return f"{row[key]:.0f}" + (f" ±{row['spread'][key] / 2:.0f}" if row["n"] > 1 else "")
    errs_mean, errs_p99, ranks = [], [], []
    for rate in rates:
        here = [s for s in strategies if (s, rate) in ra and (s, rate) in sa]
        for s in here:
            r, m = ra[(s, rate)], sa[(s, rate)]
            em = m["mean_e2el_ms"] / r["mean_e2el_ms"] - 1
            ep = m["p99_e2el_ms"] / r["p99_e2el_ms"] - 1
            errs_mean.append(em)
            errs_p99.append(ep)
            lines.append(f"| {rate:g} | `{s}` | {real_cell(r, 'mean_e2el_ms')} | {m['mean_e2el_ms']:.0f} | "
                         f"{100 * em:+.1f}% | "
                         f"{real_cell(r, 'p99_e2el_ms')} | {m['p99_e2el_ms']:.0f} | {100 * ep:+.1f}% | "
                         f"{r['mean_ttft_ms']:.0f} / {m['mean_ttft_ms']:.0f} | {r['mean_tpot_ms']:.1f} / "
                         f"{m['mean_tpot_ms']:.1f} |")
        for key, label in (("mean_e2el_ms", "mean"), ("p99_e2el_ms", "P99")):
            order_r = sorted(here, key=lambda s: ra[(s, rate)][key])
            order_s = sorted(here, key=lambda s: sa[(s, rate)][key])
            ranks.append((rate, label, order_r, order_s))
    # The pairs the real runs resolve: their means differ by more than the two repeat half-ranges
    # together. Where they do not, no order is a fact to reproduce.
    resolved, agreed, pair_lines = 0, 0, []
    for rate in rates:
        here = [s for s in strategies if (s, rate) in ra and (s, rate) in sa]
        for i, s1 in enumerate(here):
            for s2 in here[i + 1:]:
                r1, r2 = ra[(s1, rate)], ra[(s2, rate)]
                gap = r2["mean_e2el_ms"] - r1["mean_e2el_ms"]
                if abs(gap) <= (r1["spread"]["mean_e2el_ms"] + r2["spread"]["mean_e2el_ms"]) / 2:
                    continue
                sim_gap = sa[(s2, rate)]["mean_e2el_ms"] - sa[(s1, rate)]["mean_e2el_ms"]
                resolved += 1
                agreed += (gap > 0) == (sim_gap > 0)
                better, worse = (s1, s2) if gap > 0 else (s2, s1)
                pair_lines.append(f"| {rate:g} | `{better}` < `{worse}` by {abs(gap):.0f} | "
                                  f"{'yes' if (gap > 0) == (sim_gap > 0) else 'no'} ({sim_gap * (1 if gap > 0 else -1):+.0f}) |")
    rank_lines = ["| rate (req/s) | by | real, best first | simulated, best first | same |", "|---|---|---|---|---|"]
    rank_lines += [f"| {rate:g} | {label} JCT | {' < '.join(order_r)} | {' < '.join(order_s)} | "
                   f"{'yes' if order_r == order_s else 'no'} |" for rate, label, order_r, order_s in ranks]
    if pair_lines:
        rank_lines += ["", "Pairs of strategies whose real mean JCTs differ by more than their repeats' half-ranges "
                       "together, and whether the simulation orders them alike (its gap in ms):", "",
                       "| rate (req/s) | real, by mean JCT | simulated alike |", "|---|---|---|", *pair_lines]
    summary = {"points": len(errs_mean),
               "mean_within_10": sum(abs(e) <= 0.10 for e in errs_mean),
               "p99_within_20": sum(abs(e) <= 0.20 for e in errs_p99),
               "worst_mean": max(errs_mean, key=abs, default=0.0), "worst_p99": max(errs_p99, key=abs, default=0.0),
               "mean_abs_mean": statistics.mean(map(abs, errs_mean)) if errs_mean else 0.0,
               "rates_ranked_alike_mean": sum(o1 == o2 for _, lb, o1, o2 in ranks if lb == "mean"),
               "rates": len(rates), "pairs_resolved": resolved, "pairs_alike": agreed}
    return "\n".join(lines) + "\n\n" + "\n".join(rank_lines), summary


def write_fidelity(name: str, title: str, a: argparse.Namespace, result_dir: str, strategies: list[str]) -> str:
    """<name>_fidelity.md: the real runs in result_dir against the simulated ones in result_dir/sim."""
    import json
    real = [r for r in load_results(result_dir) if r["strategy"] in strategies]
    sim = [r for r in load_results(os.path.join(result_dir, "sim")) if r["strategy"] in strategies]
    table, s = fidelity_table(real, sim, strategies)
    with open(a.compare_sim) as f:
        cost = json.load(f)
    coef = ", ".join(f"{k} {v:.3g}" for k, v in cost["coef"].items() if v)
    if cost.get("interference"):
        coef += "; busy neighbours: " + ", ".join(f"{k} +{100 * v:.0f}%" for k, v in cost["interference"].items())
    cmd = command_line()
    body = (f"# {title}: real vs simulated\n\n- command: `{cmd}`; finished {machine_line()}\n"
            f"- cost model `{a.compare_sim}` (calibrated {cost.get('created')}, load average "
            f"{', '.join(f'{x:.1f}' for x in cost.get('machine', {}).get('load_average', []))}): {coef}; fit median "
            f"error {100 * cost['fit']['median_rel_err']:.1f}%; simulator flags `{a.sim_args}`\n"
            f"- times in ms; error = simulated / real - 1\n"
            f"- mean JCT within 10%: {s['mean_within_10']}/{s['points']} points (worst {100 * s['worst_mean']:+.1f}%, "
            f"mean |error| {100 * s['mean_abs_mean']:.1f}%); P99 JCT within 20%: {s['p99_within_20']}/{s['points']} "
            f"(worst {100 * s['worst_p99']:+.1f}%); strategies ranked alike by mean JCT at "
            f"{s['rates_ranked_alike_mean']}/{s['rates']} rates; of the {s['pairs_resolved']} pairs the real "
            f"repeats resolve, ordered alike: {s['pairs_alike']}\n\n{table}\n")
    if a.step_traces and os.path.isdir(a.step_traces):
        body += "\n" + speed_table(a.step_traces, cost, real, strategies) + "\n"
    (Path(a.out) / f"{name}_fidelity.md").write_text(body)
    return body


def speed_table(trace_dir: str, cost: dict[str, Any], real: list[dict], strategies: list[str]) -> str:
    """How fast each real run's engine steps ran against the cost model (`sim.calibrate.trace_speed`
    on the runs' --step-trace files): what the cost model got wrong, apart from what the simulator
    does with the steps."""
    import glob
    from microserve.bench.sweep import run_filename
    from microserve.sim.calibrate import trace_speed
    from microserve.sim.cost import LinearCostModel

    speed = trace_speed(sorted(glob.glob(os.path.join(trace_dir, "*.jsonl"))), LinearCostModel.from_json(cost))
    repeats = sorted({r["repeat"] for r in real})
    rows = sorted({(r["request_rate"], r["strategy"]) for r in real}, key=lambda x: (x[0], strategies.index(x[1])))
    lines = ["| rate (req/s) | strategy | " + " | ".join(f"repeat {k}" for k in repeats) + " |",
             "|---|---|" + "---|" * len(repeats)]
    ratios = []
    for rate, strategy in rows:
        cells = []
        for k in repeats:
            got = speed.get(run_filename(strategy, rate, k).removesuffix(".json"))
            cells.append(f"{got[0]:.3f}" if got else "")
            ratios += [got[0]] if got else []
        lines.append(f"| {rate:g} | `{strategy}` | " + " | ".join(cells) + " |")
    head = (f"The real runs' engine steps against the cost model: the sum of each run's traced step "
            f"periods over the model's time for the same steps, with their neighbours' busy shares "
            f"(`--step-traces {trace_dir}`; 1.000 = the model's speed). Range "
            f"{min(ratios, default=float('nan')):.3f}-{max(ratios, default=float('nan')):.3f}.\n\n")
    return head + "\n".join(lines)


def now() -> str:
    """The run's date, commit, CPUs and `uptime` (harness.machine_line), for a doc's started/finished lines."""
    return machine_line()


def elapsed(t0: float) -> str:
    return f"{time.perf_counter() - t0:.0f} s"
