"""`microserve bench sweep`: strategies x request rates, each on a freshly started cluster.

For every (repeat, rate, strategy) the sweep starts the engines `microserve up` would, through the
same launcher, and a router process over them, waits until they are healthy, warms it up with requests
that share nothing with the measured ones, sends the workload with `loadgen.benchmark`, stops the
cluster, and saves the result JSON (vLLM's keys plus `strategy`, `repeat`, `preset`). Every run
starts cold, so no run inherits another's prefix cache. Strategies are the inner loop: runs that
are compared side by side (same rate) are close in time, so slow drift of the machine's load hits
them alike.

`summarize` rebuilds the markdown table and the plots from whatever JSONs a result folder holds,
so an interrupted sweep still reports (and `--resume` finishes it).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from microserve.bench.presets import PRESETS, Preset, Workload, model_dir

log = logging.getLogger("microserve.bench.sweep")

# (result key, table header) of the columns the table shows, in ms unless noted.
TABLE_COLUMNS = (("mean_e2el_ms", "mean JCT"), ("p99_e2el_ms", "P99 JCT"), ("mean_ttft_ms", "mean TTFT"),
                 ("p99_ttft_ms", "P99 TTFT"), ("mean_tpot_ms", "mean TPOT"), ("p99_tpot_ms", "P99 TPOT"))


@dataclass
class SweepSpec:
    """One sweep. `model` is a path, "embedded" or a config dict (served with dummy weights)."""
    strategies: list[str]
    rates: list[float]
    model: str | dict[str, Any]
    workload: Workload
    result_dir: str
    engines: int = 2
    prefill: int | None = None  # prefill engines for PD strategies (None: `up`'s default, 1)
    pin_cores: bool = False
    engine_args: list[str] = field(default_factory=list)
    num_prompts: int = 40
    num_warmups: int = 4
    seed: int = 0
    repeats: int = 1
    percentiles: tuple[float, ...] = (50.0, 99.0)
    preset: str | None = None
    resume: bool = False
    startup_timeout_s: float = 180.0
    log_dir: str | None = None
    show_progress: bool = True
    trace_dir: str | None = None  # each run's engines write --step-trace files here (<run>-<port>.jsonl)


def slug(text: str) -> str:
    """A strategy spec as a file-name part: 'pd:balance=0.1' -> 'pd-balance=0.1'."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-")


def run_filename(strategy: str, rate: float, repeat: int) -> str:
    return f"{slug(strategy)}_{rate:g}qps_r{repeat}.json"


# ---- workloads ----------------------------------------------------------------------------------
def model_vocab(path: str) -> int:
    with open(os.path.join(path, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


def build_workload(w: Workload, path: str, n: int, seed: int) -> list:
    """`n` requests of workload `w` for the model at `path` (token-id prompts, ids in [3, vocab)).

    ShareGPT lengths come from the model's tokenizer when it has one, else from the 4-bytes-per-token
    estimate, filtered as vLLM does, then scaled by w.input_scale / w.output_scale; prompts are
    random token ids of those lengths (content does not matter to a dummy-weight model, and ids
    keep lengths exact)."""
    from microserve.bench import datasets as ds

    vocab = (3, model_vocab(path))
    if w.dataset == "random":
        return ds.random_requests(n, w.input_len, w.output_len, w.range_ratio, vocab, seed)
    if w.dataset == "prefix":
        return ds.prefix_requests(w.prefix_num_groups, w.prefix_len, max(1, n // w.prefix_num_groups),
                                  w.prefix_question_len, w.prefix_output_len, w.range_ratio, "interleave", vocab, seed)
    if w.dataset == "sharegpt":
        tok = ds.load_tokenizer(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None
        reqs = ds.sharegpt_requests(n, None, tok, None, seed, max_prompt_len=w.sharegpt_max_prompt_len,
                                    max_total_len=w.sharegpt_max_total_len)
        import numpy as np
        rng = np.random.default_rng(seed)
        out = []
        for r in reqs:
            n, m = max(1, round(r.prompt_len * w.input_scale)), max(1, round(r.output_len * w.output_scale))
            out.append(ds.SampleRequest(rng.integers(*vocab, size=n).tolist(), n, m))
        return out
    raise ValueError(f"unknown dataset {w.dataset!r} (random, prefix or sharegpt)")


# ---- one run ------------------------------------------------------------------------------------
class Cluster:
    """One run's engines and router, through the launcher (the one `microserve up` uses): the
    engines `up` would start, and a `microserve router` process over them; a context manager that
    yields the router URL and stops every process on exit."""

    def __init__(self, path: str, strategy: str, spec: SweepSpec, log_dir: str) -> None:
        from microserve.cluster import new_token
        from microserve.launch import LocalLauncher, engine_specs
        from microserve.router.strategies import engine_roles

        self.specs = engine_specs(path, engine_roles(spec.engines, strategy, spec.prefill), spec.engine_args,
                                  spec.pin_cores)
        self.path, self.strategy, self.log_dir = path, strategy, log_dir
        self.launcher = LocalLauncher(log_dir, token=new_token(), startup_timeout_s=spec.startup_timeout_s,
                                      progress=None)

    def __enter__(self) -> str:
        try:
            self.launcher.start(self.specs)
            router = self.launcher.start_router(self.strategy, self.path, ["--served-model-name", "sweep"], timeout=60)
        except Exception as e:
            self.__exit__()
            raise RuntimeError(f"the cluster did not come up ({e}); logs in {self.log_dir}") from None
        return router.url

    def __exit__(self, *exc: Any) -> None:
        self.launcher.stop(grace=30.0)


def run_one(spec: SweepSpec, path: str, strategy: str, rate: float, repeat: int,
            requests: list, warmups: list) -> dict[str, Any]:
    """Bring up a cluster for `strategy`, warm it, send `requests` at `rate`, stop it; the result dict."""
    from microserve.bench.loadgen import LoadConfig, benchmark, run

    w = spec.workload
    log_dir = os.path.join(spec.log_dir or tempfile.gettempdir(), "microserve-sweep-logs",
                           f"{slug(strategy)}_{rate:g}qps_r{repeat}")
    if spec.trace_dir:
        os.makedirs(spec.trace_dir, exist_ok=True)
        trace = os.path.join(spec.trace_dir, run_filename(strategy, rate, repeat).removesuffix(".json") + "-{port}.jsonl")
        spec = dataclasses.replace(spec, engine_args=[*spec.engine_args, "--step-trace", trace])
    with Cluster(path, strategy, spec, log_dir) as url:
        base = dict(base_url=url, model="sweep", ignore_eos=w.ignore_eos, temperature=w.temperature, top_p=w.top_p,
                    extra_body={"return_token_ids": True}, show_progress=False, timeout_s=1800.0)
        if warmups:  # distinct prompts: a warm-up must not seed the prefix cache of measured requests
            warm = run(warmups, LoadConfig(request_rate=math.inf, seed=spec.seed + 1, **base))
            if not any(r.success for r in warm.records):
                raise RuntimeError(f"every warm-up request failed: {warm.records[0].error}")
            if spec.trace_dir:  # warm-up steps are first passes: keep only the measured run's
                for f in glob.glob(trace.replace("{port}", "*")):
                    open(f, "w").close()
        cfg = LoadConfig(request_rate=rate, seed=spec.seed, **base)
        extra = {"strategy": strategy, "repeat": repeat, "preset": spec.preset, "label": strategy,
                 "engines": spec.engines, "pin_cores": spec.pin_cores, "engine_args": spec.engine_args,
                 "workload": dataclasses.asdict(w), "num_warmups": len(warmups),
                 "load_average": os.getloadavg()}
        result, _ = benchmark(requests, cfg, spec.percentiles, detailed=True, extra=extra)
    result["load_average_after"] = os.getloadavg()
    return result


def run_sweep(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every (repeat, rate, strategy) run; each result is saved to
    <result_dir>/runs/<strategy>_<rate>qps_r<repeat>.json as soon as it is in. With `resume`, runs
    whose JSON exists are loaded instead of re-run. A run that fails is logged and skipped (its
    error is saved as <name>.error.txt), so one bad setting does not lose the rest."""
    from tqdm.auto import tqdm

    path = model_dir(spec.model, spec.preset or "sweep")
    runs_dir = os.path.join(spec.result_dir, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    requests = build_workload(spec.workload, path, spec.num_prompts, spec.seed)
    warmups = build_workload(spec.workload, path, spec.num_warmups, spec.seed + 10_000) if spec.num_warmups else []
    plan = [(k, r, s) for k in range(spec.repeats) for r in spec.rates for s in spec.strategies]
    results = []
    bar = tqdm(plan, desc="sweep", unit="run", disable=not spec.show_progress)
    for k, rate, strategy in bar:
        bar.set_postfix_str(f"{strategy} @ {rate:g} req/s")
        out = os.path.join(runs_dir, run_filename(strategy, rate, k))
        if spec.resume and os.path.exists(out):
            with open(out) as f:
                results.append(json.load(f))
            continue
        try:
            res = run_one(spec, path, strategy, rate, k, requests, warmups)
        except Exception as e:  # noqa: BLE001 - record and go on with the other runs
            log.error("run %s at %g req/s (repeat %d) failed: %s", strategy, rate, k, e)
            with open(out.removesuffix(".json") + ".error.txt", "w") as f:
                f.write(f"{type(e).__name__}: {e}\n")
            continue
        with open(out, "w") as f:
            json.dump(res, f)
        results.append(res)
    bar.close()
    return results


# ---- summaries ----------------------------------------------------------------------------------
def load_results(result_dir: str) -> list[dict[str, Any]]:
    out = []
    for p in sorted(glob.glob(os.path.join(result_dir, "runs", "*.json"))):
        with open(p) as f:
            out.append(json.load(f))
    return out


def aggregate(results: Sequence[dict[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    """(strategy, rate) -> the median over repeats of each TABLE_COLUMNS key, plus `n` (repeats),
    `spread` (max - min of each key over repeats), `completed`, `failed` (summed) and
    `request_throughput` (median)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in results:
        groups.setdefault((r["strategy"], float(r["request_rate"])), []).append(r)
    out = {}
    for key, rs in groups.items():
        row: dict[str, Any] = {"n": len(rs), "spread": {}}
        for k in [c for c, _ in TABLE_COLUMNS] + ["request_throughput"]:
            vals = [float(r[k]) for r in rs]
            row[k] = statistics.median(vals)
            row["spread"][k] = max(vals) - min(vals)
        row["completed"] = sum(int(r["completed"]) for r in rs)
        row["failed"] = sum(int(r["failed"]) for r in rs)
        out[key] = row
    return out


def _ordered(keys, order: Sequence[str] | None) -> tuple[list[str], list[float]]:
    strategies = list(dict.fromkeys(s for s, _ in keys))
    if order:
        strategies = [s for s in order if s in strategies] + [s for s in strategies if s not in order]
    return strategies, sorted({r for _, r in keys})


def markdown_table(agg: dict[tuple[str, float], dict[str, Any]], baseline: str | None = None,
                   order: Sequence[str] | None = None) -> str:
    """One row per (rate, strategy): the TABLE_COLUMNS in ms, throughput, and when `baseline` ran at
    that rate, the change in mean and P99 JCT against it (negative = faster). With repeats, values
    are medians and `±` gives half the range over repeats."""
    strategies, rates = _ordered(agg, order)
    head = ["rate (req/s)", "strategy", "ok/sent"] + [f"{h} (ms)" for _, h in TABLE_COLUMNS] + ["req/s done"]
    if baseline:
        head += [f"mean JCT vs {baseline}", f"P99 JCT vs {baseline}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rate in rates:
        for s in strategies:
            row = agg.get((s, rate))
            if row is None:
                continue
            cells = [f"{rate:g}", f"`{s}`", f"{row['completed']}/{row['completed'] + row['failed']}"]
            for k, _ in TABLE_COLUMNS:
                v = f"{row[k]:.0f}"
                if row["n"] > 1:
                    v += f" ±{row['spread'][k] / 2:.0f}"
                cells.append(v)
            cells.append(f"{row['request_throughput']:.2f}")
            base = agg.get((baseline, rate)) if baseline else None
            if baseline:
                for k in ("mean_e2el_ms", "p99_e2el_ms"):
                    cells.append(f"{100 * (row[k] / base[k] - 1):+.0f}%" if base and base[k] and s != baseline
                                 else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(result_dir: str, title: str = "", baseline: str | None = "dp",
              order: Sequence[str] | None = None, out_md: str | None = None,
              out_png: str | None = None) -> str:
    """Write the markdown table (<result_dir>/summary.md or `out_md`) and the 2x2 plot
    (<result_dir>/summary.png or `out_png`) from the JSONs in <result_dir>/runs; returns the table."""
    from microserve.bench.plots import plot_sweep

    results = load_results(result_dir)
    if not results:
        raise FileNotFoundError(f"no results in {result_dir}/runs")
    agg = aggregate(results)
    if baseline and not any(s == baseline for s, _ in agg):
        baseline = None
    table = markdown_table(agg, baseline, order)
    first = results[0]
    wl = first.get("workload") or {}
    lengths = (f" (input {wl.get('input_len')}, output {wl.get('output_len')}, spread "
               f"±{100 * float(wl.get('range_ratio') or 0):.2g}%)" if wl.get("dataset") == "random" else "")
    meta = (f"Workload: {wl.get('dataset')}{lengths}, {first['num_prompts']} requests per run, "
            f"{first.get('num_warmups', 0)} warm-ups; preset {first.get('preset')}; "
            f"{max(r['n'] for r in agg.values())} repeat(s).") if wl else ""
    with open(out_md or os.path.join(result_dir, "summary.md"), "w") as f:
        f.write(f"# {title or 'Sweep'}\n\n{meta}\n\n{table}\n")
    plot_sweep(agg, out_png or os.path.join(result_dir, "summary.png"), title, order)
    return table


# ---- command line -------------------------------------------------------------------------------
def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `sweep` to a subparsers object (the `microserve bench` parser's)."""
    p = subparsers.add_parser(
        "sweep", help="run strategies x request rates, each on a fresh cluster; table and plots",
        description="For every request rate and strategy: start engines and a router (as `microserve up` does), "
                    "warm it, send the workload, stop it, save the result JSON under RESULT_DIR/runs; then write "
                    "RESULT_DIR/summary.md (table) and summary.png (mean/P99 JCT, TTFT, TPOT vs rate). "
                    "--preset miniature is the paper's experiment on a 2-core CPU (docs/benchmarks_paper.md). "
                    "Unknown flags go to every engine (e.g. --max-num-batched-tokens 512).")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="cluster + workloads by name; flags below override it (default: none)")
    p.add_argument("--workload", default=None,
                   help="one of the preset's named workloads (miniature: long, sharegpt, prefix) (default: long)")
    p.add_argument("--strategies", nargs="+", required=True, metavar="SPEC",
                   help="strategy specs as `up --strategy` takes them, e.g. dp pd pd:balance=0.1 adaptive")
    p.add_argument("--rates", nargs="+", type=float, required=True, metavar="REQ_PER_S", help="request rates")
    p.add_argument("--model", default=None, help="model directory or 'embedded' (default: the preset's)")
    p.add_argument("--engines", type=int, default=None, help="engines per cluster (default: the preset's, or 2)")
    p.add_argument("--prefill", type=int, default=None, help="prefill engines for PD strategies (default: 1)")
    p.add_argument("--pin-cores", action="store_true", default=None, help="one core and one thread per engine")
    p.add_argument("--dataset-name", default=None, choices=["random", "sharegpt", "prefix"],
                   help="override the workload's dataset")
    p.add_argument("--random-input-len", type=int, default=None)
    p.add_argument("--random-output-len", type=int, default=None)
    p.add_argument("--random-range-ratio", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None, help="(default: the workload's, 0.6)")
    p.add_argument("--num-prompts", type=int, default=40, help="measured requests per run (default: %(default)s)")
    p.add_argument("--num-warmups", type=int, default=4,
                   help="warm-up requests per run, distinct from the measured ones (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="runs of every setting (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--metric-percentiles", default="50,99", help="(default: %(default)s)")
    p.add_argument("--result-dir", required=True, help="folder for runs/*.json, summary.md and summary.png")
    p.add_argument("--title", default="", help="title of the table and plot")
    p.add_argument("--baseline", default="dp", help="strategy the table compares against (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="keep runs whose JSON is already in RESULT_DIR/runs")
    p.add_argument("--log-dir", default=None, help="engine and router logs (default: the temp folder)")
    p.add_argument("--summarize-only", action="store_true", help="rebuild summary.md/png from RESULT_DIR/runs")
    p.set_defaults(fn=cmd_sweep, passthrough=True)
    return p


def spec_from_args(a: argparse.Namespace, extra: list[str]) -> SweepSpec:
    """The SweepSpec the flags describe: the preset's values, overridden by explicit flags."""
    from microserve.bench.metrics import parse_percentiles

    preset: Preset | None = PRESETS[a.preset] if a.preset else None
    wname = a.workload or "long"
    if preset and wname not in preset.workloads:
        raise SystemExit(f"preset {preset.name} has no workload {wname!r}; it has {', '.join(preset.workloads)}")
    w = preset.workloads[wname] if preset else Workload()
    overrides = {k: v for k, v in (("dataset", a.dataset_name), ("input_len", a.random_input_len),
                                   ("output_len", a.random_output_len), ("range_ratio", a.random_range_ratio),
                                   ("temperature", a.temperature)) if v is not None}
    w = dataclasses.replace(w, **overrides)
    model = a.model or (preset.model if preset else "embedded")
    return SweepSpec(
        strategies=a.strategies, rates=a.rates, model=model, workload=w, result_dir=a.result_dir,
        engines=a.engines or (preset.engines if preset else 2), prefill=a.prefill,
        pin_cores=a.pin_cores if a.pin_cores is not None else bool(preset and preset.pin_cores),
        engine_args=list(preset.engine_args if preset else ()) + list(extra), num_prompts=a.num_prompts,
        num_warmups=a.num_warmups, seed=a.seed, repeats=a.repeats,
        percentiles=tuple(parse_percentiles(a.metric_percentiles)), preset=a.preset, resume=a.resume,
        log_dir=a.log_dir)


def cmd_sweep(a: argparse.Namespace, extra: list[str]) -> int:
    if not a.summarize_only:
        spec = spec_from_args(a, extra)
        t0 = time.perf_counter()
        results = run_sweep(spec)
        print(f"{len(results)} runs in {time.perf_counter() - t0:.0f}s; results in {a.result_dir}/runs", file=sys.stderr)
    try:
        table = summarize(a.result_dir, a.title, a.baseline, a.strategies)
    except FileNotFoundError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(table)
    return 0
