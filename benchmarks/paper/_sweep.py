"""What every sweep experiment of benchmarks/paper/ shares: its flags, running the sweep on a
preset, and writing docs/paper/<name>.md (header, table, plot, notes) and docs/paper/<name>.png.

Raw results (one JSON per run, vLLM's keys) stay in docs/paper/results/<name>/runs/, so the table
and plot can be rebuilt (`--summarize-only`) and an interrupted experiment finished (`--resume`)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from microserve.bench.plots import plot_sweep  # noqa: E402
from microserve.bench.presets import PRESETS  # noqa: E402
from microserve.bench.sweep import SweepSpec, aggregate, load_results, markdown_table, run_sweep  # noqa: E402

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
    return p


def machine_line() -> str:
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, commit {rev}, {os.cpu_count()} CPUs; "
            f"`uptime`: `{up}`")


def sweep(name: str, a: argparse.Namespace, strategies: list[str], workload: str = "long",
          preset: str = "miniature", result_sub: str = "") -> str:
    """Run (or resume) the sweep of `strategies` x a.rates on `preset`'s `workload`; returns the
    result folder."""
    pre = PRESETS[preset]
    result_dir = os.path.join(a.out, "results", name, result_sub) if result_sub else os.path.join(a.out, "results", name)
    spec = SweepSpec(strategies=strategies, rates=a.rates, model=pre.model, workload=pre.workloads[workload],
                     result_dir=result_dir, engines=pre.engines, pin_cores=pre.pin_cores,
                     engine_args=list(pre.engine_args), num_prompts=a.num_prompts, num_warmups=a.num_warmups,
                     seed=a.seed, repeats=a.repeats, preset=preset, resume=a.resume)
    if not a.summarize_only:
        run_sweep(spec)
    return result_dir


def write_doc(name: str, title: str, a: argparse.Namespace, result_dir: str, strategies: list[str],
              workload: str, started: str, notes: str = "", preset: str = "miniature") -> str:
    """docs/paper/<name>.md and .png from the runs in result_dir; returns the markdown table."""
    results = [r for r in load_results(result_dir) if r["strategy"] in strategies]
    agg = aggregate(results)
    table = markdown_table(agg, "dp" if any(s == "dp" for s, _ in agg) else None, strategies)
    png = Path(a.out) / f"{name}.png"
    plot_sweep(agg, str(png), title, strategies)
    w = PRESETS[preset].workloads[workload]
    cmd = " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *map(shlex.quote, sys.argv[1:])])
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
    return table


def now() -> str:
    return machine_line()


def elapsed(t0: float) -> str:
    return f"{time.perf_counter() - t0:.0f} s"
