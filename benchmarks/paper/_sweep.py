"""What every sweep experiment of benchmarks/paper/ shares: its flags, running the sweep on a
preset, and writing docs/paper/<name>.md (header, table, plot, notes) and docs/paper/<name>.png.

Raw results (one JSON per run, vLLM's keys) stay in docs/paper/results/<name>/runs/, so the table
and plot can be rebuilt (`--summarize-only`) and an interrupted experiment finished (`--resume`).

The same sweep runs simulated (`microserve sim`, the measured cost model of `sim calibrate`): with
`--sim COST.json` instead of the real cluster (results/<name>/sim/, <name>_sim.md), with
`--compare-sim COST.json` after it, then <name>_fidelity.md sets real and simulated side by side.
A COST.json that does not exist is calibrated first, on the preset's model and engine flags."""
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
from microserve.bench.presets import MINIATURE_MODEL, PRESETS
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
    return p


def cost_model(a: argparse.Namespace, preset: str = "miniature") -> str | None:
    """The cost-model JSON of --sim / --compare-sim; calibrated (sim calibrate) on the preset's model,
    dtype and engine flags, one core and one thread as the preset's engines run, if it is not there."""
    path = a.sim or a.compare_sim
    if not path or os.path.exists(path):
        return path
    import json
    pre = PRESETS[preset]
    ea = list(pre.engine_args)

    def flag(name: str, default: str) -> str:
        return ea[ea.index(name) + 1] if name in ea else default
    from microserve.sim.calibrate import calibrate, summary
    doc = calibrate("miniature" if pre.model == MINIATURE_MODEL else pre.model,
                    flag("--dtype", "bfloat16"), 0 if pre.pin_cores else None, 1,
                    max_num_batched_tokens=int(flag("--max-num-batched-tokens", "2048")),
                    progress=lambda m: print(f"[calibrate] {m}", file=sys.stderr, flush=True))
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
                     seed=a.seed, repeats=a.repeats, preset=preset, resume=a.resume)
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
    rank_lines = ["| rate (req/s) | by | real, best first | simulated, best first | same |", "|---|---|---|---|---|"]
    rank_lines += [f"| {rate:g} | {label} JCT | {' < '.join(order_r)} | {' < '.join(order_s)} | "
                   f"{'yes' if order_r == order_s else 'no'} |" for rate, label, order_r, order_s in ranks]
    summary = {"points": len(errs_mean),
               "mean_within_10": sum(abs(e) <= 0.10 for e in errs_mean),
               "p99_within_20": sum(abs(e) <= 0.20 for e in errs_p99),
               "worst_mean": max(errs_mean, key=abs, default=0.0), "worst_p99": max(errs_p99, key=abs, default=0.0),
               "mean_abs_mean": statistics.mean(map(abs, errs_mean)) if errs_mean else 0.0,
               "rates_ranked_alike_mean": sum(o1 == o2 for _, lb, o1, o2 in ranks if lb == "mean"),
               "rates": len(rates)}
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
    cmd = command_line()
    body = (f"# {title}: real vs simulated\n\n- command: `{cmd}`; finished {machine_line()}\n"
            f"- cost model `{a.compare_sim}` (calibrated {cost.get('created')}, load average "
            f"{', '.join(f'{x:.1f}' for x in cost.get('machine', {}).get('load_average', []))}): {coef}; fit median "
            f"error {100 * cost['fit']['median_rel_err']:.1f}%; simulator flags `{a.sim_args}`\n"
            f"- times in ms; error = simulated / real - 1\n"
            f"- mean JCT within 10%: {s['mean_within_10']}/{s['points']} points (worst {100 * s['worst_mean']:+.1f}%, "
            f"mean |error| {100 * s['mean_abs_mean']:.1f}%); P99 JCT within 20%: {s['p99_within_20']}/{s['points']} "
            f"(worst {100 * s['worst_p99']:+.1f}%); strategies ranked alike by mean JCT at "
            f"{s['rates_ranked_alike_mean']}/{s['rates']} rates\n\n{table}\n")
    (Path(a.out) / f"{name}_fidelity.md").write_text(body)
    return body


def now() -> str:
    """The run's date, commit, CPUs and `uptime` (harness.machine_line), for a doc's started/finished lines."""
    return machine_line()


def elapsed(t0: float) -> str:
    return f"{time.perf_counter() - t0:.0f} s"
