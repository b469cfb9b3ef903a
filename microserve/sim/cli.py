"""`microserve sim`: the real router's strategies over simulated engines, in virtual time.

    microserve sim --preset paper-70b --strategy pd --request-rate 3.2          # one run, bench's summary
    microserve sim sweep --preset paper-70b --strategies dp pd pd:balance=0.1 --rates 1.6 3.2 5.6 \
        --result-dir sim-70b                                                     # runs/*.json, summary.md/png
    microserve sim calibrate --out cost-miniature.json                           # the measured CPU cost model
    microserve sim --preset miniature --cost-model cost-miniature.json --strategy pd --request-rate 1

Workload, load and result flags are `microserve bench`'s (same names, same JSON keys).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from datetime import datetime
from typing import Any

log = logging.getLogger("microserve.sim")

# bench flags whose default a --preset replaces (the workload and its size)
PRESET_DEFAULTS = ("dataset_name", "random_input_len", "random_output_len", "random_range_ratio", "num_prompts",
                   "request_rate")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `sim` (with `sim sweep` and `sim calibrate`) to the `microserve` subparsers."""
    from microserve.sim.presets import PRESETS
    p = subparsers.add_parser(
        "sim", help="simulate a cluster at any scale: the real router and scheduler in virtual time",
        description="Run the router's own strategy classes (built-in or package.module:Class) over simulated "
                    "engines: each is the real engine's scheduler and KV cache (token budget, chunked prefill, "
                    "prefix tree, page accounting, reservations) with the model forward replaced by a cost "
                    "model, KV transfers by a link model, and time virtual. Prints `microserve bench`'s summary "
                    "and writes its JSON keys. Presets: " + "; ".join(f"{k}: {v.doc}" for k, v in PRESETS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cluster_args(p)
    p.add_argument("--strategy", default="least_loaded",
                   help="routing strategy as `microserve up --strategy` takes it: round_robin, least_loaded (dp), "
                        "cache_aware, pd, balanced_pd, cache_aware_pd, migration, adaptive, or package.module:Class, "
                        "parameters after a colon (default: %(default)s)")
    add_workload_args(p)
    p.set_defaults(fn=cmd_sim)
    sub = p.add_subparsers(dest="sim_command", metavar="{sweep,calibrate}")
    s = sub.add_parser("sweep", help="strategies x rates (x seeds) in simulation; table and plots like bench sweep",
                       description="Every (seed, rate, strategy) on a fresh simulated cluster; RESULT_DIR/runs/*.json "
                                   "in `bench sweep`'s layout, then RESULT_DIR/summary.md and summary.png (bench "
                                   "sweep's table and plots). Repeats use seeds seed, seed+1, ...")
    add_cluster_args(s)
    s.add_argument("--strategies", nargs="+", required=True, metavar="SPEC", help="strategy specs")
    s.add_argument("--rates", nargs="+", type=float, default=None, metavar="REQ_PER_S",
                   help="request rates (default: the preset's)")
    s.add_argument("--repeats", type=int, default=1, help="runs of every setting, each with its own seed (default: 1)")
    s.add_argument("--result-dir", required=True, help="folder for runs/*.json, summary.md and summary.png")
    s.add_argument("--title", default="", help="title of the table and plot")
    s.add_argument("--baseline", default="dp", help="strategy the table compares against (default: %(default)s)")
    add_workload_args(s, results=False)
    s.set_defaults(fn=cmd_sweep)
    c = sub.add_parser("calibrate", help="fit the measured cost model from the real engine's step times here",
                       description="Time the real engine (in this process, dummy weights) over prefill lengths, "
                                   "cached prefixes, decode batches and contexts; fit a linear step-cost model and "
                                   "write it as JSON for `microserve sim --cost-model FILE`.")
    c.add_argument("--model", default="miniature",
                   help="'miniature' (bench's CPU preset config), a model directory, or a config.json path "
                        "(default: %(default)s)")
    c.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="(default: %(default)s, as the miniature runs)")
    c.add_argument("--core", type=int, default=0, help="pin to this core with --threads threads; -1: no pinning "
                                                       "(default: %(default)s)")
    c.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    c.add_argument("--attention-backend", default="auto", choices=["auto", "cpu", "torch"])
    c.add_argument("--max-num-batched-tokens", type=int, default=2048, help="(default: %(default)s)")
    c.add_argument("--quick", action="store_true", help="a small grid (seconds, for a tiny model or a smoke test)")
    c.add_argument("--no-link", action="store_true", help="do not measure the shared-memory copy bandwidth")
    c.add_argument("--served", action="store_true",
                   help="measure steps as the served cluster pays for them: bring up --preset's engines with "
                        "--step-trace behind a router, send a calibration load (spread prompt lengths, "
                        "concurrency 2 to 24, cached prefixes) through the HTTP client, and fit the traced "
                        "steps; about 2 minutes. --model, --dtype, --core, --threads and --quick do not apply")
    c.add_argument("--from-traces", nargs="+", default=None, metavar="PATH",
                   help="fit from existing step traces instead (files or folders of *.jsonl written by engines with "
                        "--step-trace, e.g. a sweep's --step-traces folder); the model's config is --preset's")
    c.add_argument("--preset", default="miniature",
                   help="with --served or --from-traces: the bench preset (model, engine flags) (default: %(default)s)")
    c.add_argument("--trace-dir", default=None, help="with --served: keep the engines' step traces in this folder")
    c.add_argument("--out", default=None, help="JSON file (default: sim-cost-<model>.json)")
    c.set_defaults(fn=cmd_calibrate)
    return p


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    from microserve.sim.presets import GPUS, LINKS, MODELS, PRESETS
    g = p.add_argument_group("simulated cluster")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="cluster, workload, rates and request count by name; flags below override it")
    g.add_argument("--model-preset", default=None, choices=sorted(MODELS),
                   help="model shape and number formats (default: the preset's, or the measured model's)")
    g.add_argument("--gpu", default=None, choices=sorted(GPUS), help="GPU of the roofline model (default: h100)")
    g.add_argument("--tp", type=int, default=None, help="GPUs per engine, tensor parallel (default: 1)")
    g.add_argument("--engines", type=int, default=None, help="engines (default: the preset's, or 2)")
    g.add_argument("--prefill", type=int, default=None,
                   help="prefill engines, the rest decode (default: as `up`: 1 for pd strategies, else 0)")
    g.add_argument("--gpus-per-node", type=int, default=None, help="engines on one node share the intra-node link "
                                                                   "(default: 8)")
    g.add_argument("--link", default=None, choices=sorted(LINKS), help="KV link within a node (default: nvlink, "
                                                                       "or the measured one)")
    g.add_argument("--inter-link", default="ib-ndr", choices=sorted(LINKS), help="KV link across nodes "
                                                                                 "(default: %(default)s)")
    g.add_argument("--link-gbs", type=float, default=None, help="override the intra-node link's GB/s per GPU")
    g.add_argument("--cost-model", default=None, metavar="roofline|FILE|gpu-bench:FILE",
                   help="roofline (analytic, needs --gpu), a calibration JSON from `sim calibrate` (measured), "
                        "or gpu-bench:FILE, benchmarks/gpu/run.py's JSON (default: roofline, or the preset's)")
    g.add_argument("--eta-mem", type=float, default=None, help="roofline: achieved share of HBM bandwidth (0.8)")
    g.add_argument("--eta-mm", type=float, default=None, help="roofline: achieved share of tensor-core peak (0.6)")
    g.add_argument("--step-overhead-ms", type=float, default=None, help="roofline: fixed cost per step (1.0)")
    g.add_argument("--rpc-ms", type=float, default=0.5,
                   help="round trip of one router-to-engine call, paid before the engine sees it (default: "
                        "%(default)s)")
    g.add_argument("--page-size", type=int, default=None, help="tokens per KV page (default: 16)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="step token budget (default: the preset's, or 2048 as the engine)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="(default: the preset's, or 128)")
    g.add_argument("--max-model-len", type=int, default=None, help="(default: the model's)")
    g.add_argument("--num-pages", type=int, default=None, help="KV pages per engine (default: what memory leaves)")
    g.add_argument("--no-prefix-caching", action="store_true")


def add_workload_args(p: argparse.ArgumentParser, results: bool = True) -> None:
    """`microserve bench`'s dataset, load and result flags, the same argparse actions (bench/cli.py);
    the defaults a preset sets are left None here and filled in by `resolve_workload`."""
    from microserve.bench.cli import add_bench_args
    donor = argparse.ArgumentParser(add_help=False)
    add_bench_args(donor)
    for group in donor._action_groups:
        if group.title not in ("dataset", "load", "results") or (group.title == "results" and not results):
            continue
        mine = p.add_argument_group(group.title)
        for action in group._group_actions:
            if action.dest in ("request_rate",) and not results:
                continue  # a sweep takes --rates
            if action.dest in PRESET_DEFAULTS:
                action.help = (action.help or "") + " [a --preset sets this]"
                p.set_defaults(**{f"_default_{action.dest}": action.default})
                action.default = None
            mine._add_action(action)


def _unset(a: argparse.Namespace, name: str) -> bool:
    return getattr(a, name, None) is None


def resolve_workload(a: argparse.Namespace, preset) -> None:
    """Fill the workload flags left unset: from the preset's workload, else bench's defaults."""
    w = preset.workload if preset else None
    from_preset = {}
    if w is not None:
        from_preset = {"dataset_name": w.dataset, "random_input_len": w.input_len, "random_output_len": w.output_len,
                       "random_range_ratio": w.range_ratio, "num_prompts": preset.num_prompts,
                       "request_rate": preset.rates[0] if preset.rates else None}
    for name in PRESET_DEFAULTS:
        if hasattr(a, name) and _unset(a, name):
            v = from_preset.get(name)
            setattr(a, name, v if v is not None else getattr(a, f"_default_{name}"))


def cluster_from_args(a: argparse.Namespace):
    """(ClusterSpec, preset) from the flags: preset values, then explicit flags."""
    from microserve.sim.cluster import ClusterSpec
    from microserve.sim.cost import LinearCostModel, LinkModel, ModelSpec, RooflineModel, roofline_from_gpu_bench
    from microserve.sim.presets import GPUS, LINKS, MODELS, PRESETS

    preset = PRESETS[a.preset] if a.preset else None

    def pick(flag, attr, default):
        v = getattr(a, flag, None)
        if v is not None:
            return v
        if preset is not None and getattr(preset, attr, None) is not None:
            return getattr(preset, attr)
        return default

    cost_spec = a.cost_model or ("roofline" if preset is None or preset.gpu else None)
    if cost_spec is None:
        raise SystemExit(f"preset {preset.name} needs a measured cost model: run `microserve sim calibrate --out "
                         f"cost.json` and pass --cost-model cost.json")
    tp = pick("tp", "tp", 1)
    gpu = GPUS[pick("gpu", "gpu", "h100")]
    link_name = pick("link", "link", "nvlink")
    link = LINKS[link_name]
    if cost_spec == "roofline" or cost_spec.startswith("gpu-bench:"):
        model = MODELS[pick("model_preset", "model", "llama-3.1-8b")]
        kw = {k: v for k, v in (("eta_mem", a.eta_mem), ("eta_mm", a.eta_mm)) if v is not None}
        if a.step_overhead_ms is not None:
            kw["overhead_s"] = a.step_overhead_ms / 1e3
        if cost_spec == "roofline":
            cost = RooflineModel(model, gpu, tp, **kw)
        else:
            cost = roofline_from_gpu_bench(cost_spec.split(":", 1)[1], model, gpu, tp,
                                           **{k: v for k, v in kw.items() if k == "overhead_s"})
    else:
        with open(cost_spec) as f:
            doc = json.load(f)
        cost = LinearCostModel.from_json(doc)
        model = MODELS[a.model_preset] if a.model_preset else ModelSpec.from_hf(
            str(doc.get("model_name", "measured")), doc["model"], kv_bytes=2 if doc.get("dtype") != "float32" else 4)
        if doc.get("link") and a.link is None:
            link = LinkModel(**doc["link"])
    if a.link_gbs is not None:
        link = dataclasses.replace(link, bandwidth=a.link_gbs * 1e9)
    spec = ClusterSpec(
        model=model, cost=cost, engines=pick("engines", "engines", 2), tp=tp, prefill=a.prefill,
        gpus_per_node=pick("gpus_per_node", "gpus_per_node", 8), intra_link=link, inter_link=LINKS[a.inter_link],
        page_size=pick("page_size", "page_size", 16),
        max_num_batched_tokens=pick("max_num_batched_tokens", "max_num_batched_tokens", 2048),
        max_num_seqs=pick("max_num_seqs", "max_num_seqs", 128), max_model_len=pick("max_model_len", "max_model_len", None),
        num_pages=pick("num_pages", "num_pages", None), enable_prefix_caching=not a.no_prefix_caching,
        rpc_s=a.rpc_ms / 1e3, name=preset.name if preset else "custom")
    return spec, preset


def build_workload(a: argparse.Namespace) -> tuple[list, dict[str, Any]]:
    """bench's `build_requests` (same flags, same requests), with text prompts (ShareGPT) turned into
    token ids of the same length (the simulator reads lengths only), as `bench sweep` does."""
    import numpy as np

    from microserve.bench.cli import build_requests
    from microserve.bench.datasets import SampleRequest
    reqs, info = build_requests(a, None, None)
    lo, hi = a.token_id_range if a.token_id_range else (3, 512)
    rng = np.random.default_rng(a.seed)
    out = [r if not isinstance(r.prompt, str) else
           SampleRequest(rng.integers(lo, hi, size=r.prompt_len).tolist(), r.prompt_len, r.output_len, r.group)
           for r in reqs]
    return out, info


def load_config(a: argparse.Namespace, spec, rate: float, seed: int):
    from microserve.bench.loadgen import LoadConfig
    return LoadConfig(base_url=f"sim://{spec.name}", model=spec.model.name, request_rate=rate,
                      burstiness=a.burstiness, max_concurrency=a.max_concurrency, ignore_eos=a.ignore_eos,
                      temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=seed, show_progress=False)


def _with_cwd_on_path() -> None:
    """`package.module:Class` strategies resolve from the current directory too (as `python -m` would)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def speed_line(run) -> str:
    s = run.result["sim"]
    return (f"Simulated {s['sim_s']:.1f} s of cluster time in {run.wall_s:.2f} s wall ({s['sim_s_per_wall_s']:.0f}x; "
            f"CPU {s['cpu_s']:.2f} s, {s['sim_s_per_cpu_s']:.0f}x)")


def cmd_sim(a: argparse.Namespace) -> int:
    from microserve.bench.metrics import format_results, parse_percentiles
    from microserve.sim.cluster import simulate

    _with_cwd_on_path()
    spec, preset = cluster_from_args(a)
    resolve_workload(a, preset)
    percentiles = parse_percentiles(a.metric_percentiles)
    try:
        reqs, ds_info = build_workload(a)
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    warm = [reqs[i % len(reqs)] for i in range(a.num_warmups)] if reqs else []  # as loadgen cycles them
    cfg = load_config(a, spec, a.request_rate, a.seed)
    print(f"Simulating {spec.engines} x {spec.model.name} (TP{spec.tp}, {spec.cost.kind} cost model), strategy "
          f"{a.strategy}: {len(reqs)} {a.dataset_name} requests, rate {a.request_rate} req/s")
    run = simulate(spec, a.strategy, reqs, cfg, percentiles, a.save_detailed,
                   {**ds_info, "label": a.label, "preset": a.preset, "engines": spec.engines}, warm)
    result = run.result
    print(format_results(result, percentiles, title="Simulated Serving Benchmark Result"))
    print(speed_line(run))
    for e in result["sim"]["engines"]:
        print(f"  {e['name']} ({e['role']}): {e['steps']} steps, busy {100 * e['utilization']:.0f}%, "
              f"KV sent {e['kv_sent_bytes'] / 1e9:.2f} GB (exposed {e['kv_exposed_s']:.3f} s), "
              f"{e['preemptions']} preemptions")
    if a.save_result or a.result_filename:
        os.makedirs(a.result_dir, exist_ok=True)
        rate = "inf" if math.isinf(a.request_rate) else f"{a.request_rate:g}"
        name = a.result_filename or (f"microserve-sim-{spec.name}-{re.sub(r'[^A-Za-z0-9._=-]+', '-', a.strategy)}-"
                                     f"{a.dataset_name}-{rate}qps-{result['date']}.json")
        path = os.path.join(a.result_dir, name)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"Saved the result to {path}")
    return 0 if result["completed"] == len(reqs) else 1


def cmd_sweep(a: argparse.Namespace) -> int:
    from microserve.bench.metrics import parse_percentiles
    from microserve.bench.presets import Workload
    from microserve.bench.sweep import summarize

    _with_cwd_on_path()
    spec, preset = cluster_from_args(a)
    a.request_rate = math.inf  # unused: each run takes its rate
    resolve_workload(a, preset)
    rates = a.rates or list(preset.rates if preset else [])
    if not rates:
        raise SystemExit("give --rates (the cluster has no preset rates)")
    percentiles = parse_percentiles("50,99")
    workload = Workload(a.dataset_name, a.random_input_len, a.random_output_len, a.random_range_ratio)
    runs_dir = os.path.join(a.result_dir, "runs")
    t0, n = time.perf_counter(), 0
    sim_total = 0.0
    for k in range(a.repeats):
        seed = a.seed + k
        a_k = argparse.Namespace(**{**vars(a), "seed": seed})
        reqs, ds_info = build_workload(a_k)
        warmups = [reqs[i % len(reqs)] for i in range(a.num_warmups)] if reqs else []  # as loadgen cycles them
        dn, ds = sweep_runs(spec, a.strategies, rates, reqs, runs_dir,
                            lambda rate, s=seed: load_config(a, spec, rate, s),
                            {**ds_info, "preset": a.preset, "engines": spec.engines,
                             "workload": dataclasses.asdict(workload), "num_warmups": len(warmups)}, repeat=k,
                            seed=seed, warmups=warmups, percentiles=percentiles)
        n, sim_total = n + dn, sim_total + ds
    wall = time.perf_counter() - t0
    print(f"{n} simulated runs in {wall:.1f} s wall: {sim_total:.0f} s of cluster time, {sim_total / wall:.0f}x",
          file=sys.stderr)
    table = summarize(a.result_dir, a.title or f"Simulated: {spec.name}", a.baseline if a.baseline else None,
                      a.strategies)
    print(table)
    return 0


def sweep_runs(spec, strategies, rates, requests, runs_dir: str, make_cfg, extra: dict[str, Any], repeat: int = 0,
               seed: int = 0, warmups=(), percentiles=(50.0, 99.0), detailed: bool = False) -> tuple[int, float]:
    """The simulated sweep's loop, shared by `sim sweep` and `simulate_sweep` (a `bench sweep` spec
    simulated): every (rate, strategy) on a fresh simulated cluster, strategies the inner loop as in
    bench sweep, each result saved as runs_dir/<strategy>_<rate>qps_r<repeat>.json. Returns (runs,
    simulated seconds)."""
    from microserve.bench.sweep import run_filename
    from microserve.sim.cluster import simulate

    os.makedirs(runs_dir, exist_ok=True)
    n, sim_total = 0, 0.0
    for rate in rates:
        for strategy in strategies:
            run = simulate(spec, strategy, requests, make_cfg(rate), percentiles, detailed,
                           {**extra, "strategy": strategy, "repeat": repeat}, warmups)
            with open(os.path.join(runs_dir, run_filename(strategy, rate, repeat)), "w") as f:
                json.dump(run.result, f)
            n += 1
            sim_total += run.sim_s
            r = run.result
            print(f"seed {seed} rate {rate:g} {strategy}: mean JCT {r['mean_e2el_ms']:.0f} ms, P99 "
                  f"{r['p99_e2el_ms']:.0f} ms ({r['completed']}/{r['num_prompts']}); {speed_line(run)}",
                  file=sys.stderr)
    return n, sim_total


def cluster_spec(argv: list[str]):
    """(ClusterSpec, preset) from `microserve sim`'s cluster flags given as a list of strings."""
    p = argparse.ArgumentParser(add_help=False)
    add_cluster_args(p)
    return cluster_from_args(p.parse_args(argv))


# engine flags of a `bench sweep` preset that the simulated cluster takes too (same names)
ENGINE_FLAGS = ("--max-model-len", "--max-num-batched-tokens", "--max-num-seqs", "--page-size", "--num-pages")


def simulate_sweep(spec, cost_model: str, result_dir: str, sim_args: list[str] = ()) -> str:
    """Simulate a `bench sweep` (a bench.sweep.SweepSpec): the same preset's cluster (engines, prefill
    engines, the engine flags the simulator knows), the same requests, warm-ups, arrival seed, rates,
    strategies and repeats, on simulated engines with the measured `cost_model` (a `sim calibrate`
    JSON). `sim_args` are further `microserve sim` cluster flags (e.g. `--rpc-ms 1`). The runs land in
    result_dir/runs in bench sweep's layout; returns result_dir."""
    from microserve.bench.loadgen import LoadConfig
    from microserve.bench.presets import model_dir
    from microserve.bench.sweep import build_workload as bench_workload
    from microserve.sim.presets import PRESETS

    _with_cwd_on_path()
    argv = ["--cost-model", cost_model, "--engines", str(spec.engines)]
    if spec.preset in PRESETS:
        argv += ["--preset", spec.preset]
    if spec.prefill is not None:
        argv += ["--prefill", str(spec.prefill)]
    ea = list(spec.engine_args)
    for i, flag in enumerate(ea[:-1]):
        if flag in ENGINE_FLAGS:
            argv += [flag, ea[i + 1]]
    cluster, _ = cluster_spec(argv + list(sim_args))
    path = model_dir(spec.model, spec.preset or "sweep")
    w = spec.workload
    requests = bench_workload(w, path, spec.num_prompts, spec.seed)  # bench sweep's requests, to the token
    warmups = bench_workload(w, path, spec.num_warmups, spec.seed + 10_000) if spec.num_warmups else []

    def make_cfg(rate: float) -> LoadConfig:
        return LoadConfig(base_url=f"sim://{cluster.name}", model=cluster.model.name, request_rate=rate,
                          ignore_eos=w.ignore_eos, temperature=w.temperature, top_p=w.top_p, seed=spec.seed,
                          show_progress=False)
    extra = {"preset": spec.preset, "engines": spec.engines, "engine_args": list(spec.engine_args),
             "workload": dataclasses.asdict(w), "num_warmups": len(warmups), "cost_model": cost_model,
             "sim_args": list(sim_args)}
    t0 = time.perf_counter()
    n = total = 0
    for k in range(spec.repeats):  # bench sweep sends the same requests and arrivals every repeat
        dn, ds = sweep_runs(cluster, spec.strategies, spec.rates, requests, os.path.join(result_dir, "runs"),
                            make_cfg, extra, repeat=k, seed=spec.seed, warmups=warmups, percentiles=spec.percentiles,
                            detailed=True)  # per-request lists, as bench sweep saves them
        n, total = n + dn, total + ds
    print(f"{n} simulated runs in {time.perf_counter() - t0:.1f} s wall: {total:.0f} s of cluster time",
          file=sys.stderr)
    return result_dir


def cmd_calibrate(a: argparse.Namespace) -> int:
    from microserve.sim.calibrate import QUICK_GRID, calibrate, calibrate_from_traces, calibrate_served, shm_link
    say = lambda s: print(f"[calibrate] {s}", file=sys.stderr, flush=True)  # noqa: E731
    if a.served and a.from_traces:
        raise SystemExit("give --served (measure now) or --from-traces (fit existing traces), not both")
    from microserve.bench.presets import PRESETS as BENCH_PRESETS
    if (a.served or a.from_traces) and a.preset not in BENCH_PRESETS:
        raise SystemExit(f"unknown preset {a.preset!r}; known: {', '.join(sorted(BENCH_PRESETS))}")
    if a.served:
        doc = calibrate_served(a.preset, link=not a.no_link, trace_dir=a.trace_dir, progress=say)
        return _write_calibration(doc, a.out)
    if a.from_traces:
        try:
            doc = calibrate_from_traces(a.from_traces, a.preset)
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"cannot fit from {' '.join(a.from_traces)}: {e}") from None
        if not a.no_link:
            doc["link"] = shm_link()
        return _write_calibration(doc, a.out)
    model: Any = a.model
    if model != "miniature" and os.path.isfile(model):
        with open(model) as f:
            model = json.load(f)
    elif model != "miniature":
        with open(os.path.join(model, "config.json")) as f:
            model = json.load(f)
    doc = calibrate(model, a.dtype, None if a.core < 0 else a.core, a.threads, QUICK_GRID if a.quick else None,
                    a.attention_backend, a.max_num_batched_tokens, link=not a.no_link, progress=say)
    if a.model != "miniature":
        doc["model_name"] = os.path.basename(a.model.rstrip("/"))
    return _write_calibration(doc, a.out)


def _write_calibration(doc: dict[str, Any], out: str | None) -> int:
    from microserve.sim.calibrate import summary
    out = out or f"sim-cost-{re.sub(r'[^A-Za-z0-9._-]+', '_', doc['model_name'])}.json"
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(summary(doc))
    took = f"calibrated in {doc['calibration_s']:.0f} s" if "calibration_s" in doc else "fitted"
    print(f"{took}; wrote {out} ({datetime.now():%H:%M})")
    return 0
