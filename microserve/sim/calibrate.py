"""`microserve sim calibrate`: the measured cost model, fitted from the real engine on this machine.

An in-process `Engine` (dummy weights of the given config, pinned to one core with one torch
thread by default, as `up --pin-cores` runs each engine) runs a grid of workloads: fresh prefills
of several lengths after several cached prefixes, decode batches at several contexts, and decodes
mixed with a prefill chunk. Every `Engine.step()` is timed whole (scheduler, model, sampler: what a
step costs a real engine) and its batch recorded as a `StepShape` the way the simulator forms
it. A non-negative least-squares fit on relative error gives the coefficients of
`LinearCostModel`; the JSON also keeps the raw points (to refit), the fit's error, the machine,
the engine flags and a measured memcpy bandwidth for the shared-memory KV link.

`measure_engine`, the probe the miniature preset was sized with (bench/presets.py; prefill seconds
by length, decode step by batch, benchmarks/paper/preset.py), times its steps through the same
probe: one step-timing path for the cost models and the preset.

A served engine pays more per step than the probe sees: the hand-offs and token delivery around
the step, and, on a host whose cores the engines fill, the client's, the router's and the other
engines' serving work. `calibrate_served` brings up a preset's engines with `--step-trace`, loads
them through the HTTP client (a shape grid on one, pulses on the other), and `fit_traces` fits the
traced steps with the interference factors of busy neighbours (`neighbour_overlap`).
`calibrate_from_traces` does the same for trace files that already exist (a sweep's runs, engines
in production); `trace_speed` says how fast traced steps ran against a model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

from microserve.bench.harness import machine
from microserve.bench.metrics import percentile
from microserve.bench.presets import Workload
from microserve.engine.step_trace import TracedStep
from microserve.sim.cost import FEATURES, LinearCostModel, ModelSpec, StepShape, batch_shape, features, nnls

log = logging.getLogger(__name__)

FULL_GRID = dict(prefill_lens=(16, 64, 128, 256, 512, 1024), prefill_starts=(0, 256, 640), repeats=3,
                 decode_batches=(1, 4, 16), decode_contexts=(128, 640), decode_steps=8,
                 extra_decode=((8, 960),), mixed=((4, 128), (4, 512), (16, 256)))
QUICK_GRID = dict(prefill_lens=(16, 64, 200), prefill_starts=(0, 64), repeats=2, decode_batches=(1, 4, 8),
                  decode_contexts=(32, 128), decode_steps=4, extra_decode=(), mixed=((4, 64),))


class _Probe:
    """An engine whose every step is timed and recorded with its shape."""

    def __init__(self, engine) -> None:
        self.engine, self.points = engine, []
        self.record = True
        self._shape: StepShape | None = None
        inner = engine.scheduler.schedule

        def schedule():
            batch = inner()
            self._shape = batch_shape(batch)
            return batch
        engine.scheduler.schedule = schedule  # this engine instance only
        self.n = 0

    def step(self) -> float:
        """One timed `Engine.step()`; returns its seconds."""
        t0 = time.perf_counter()
        self.engine.step()
        dt = time.perf_counter() - t0
        if self.record and self._shape is not None and self._shape.tokens:
            self.points.append((self._shape, dt))
        return dt

    def drain(self) -> float:
        """Step until the engine has no work; returns the seconds of those steps."""
        total = 0.0
        while self.engine.has_work():
            total += self.step()
        return total

    def add(self, ids: list[int], max_tokens: int) -> str:
        from microserve.engine.sampling import SamplingParams
        self.n += 1
        rid = f"cal{self.n}"
        self.engine.add_request(rid, ids, SamplingParams(max_tokens=max_tokens, temperature=0.6, top_p=0.9,
                                                         ignore_eos=True))
        return rid


def measure_link(nbytes: int = 64 << 20, run_bytes: int = 64 << 10, repeats: int = 4) -> float:
    """Bytes/s of copying KV run by run with ctypes.memmove into shuffled destinations (what the shm
    transport does per run of slots): a proxy for the shared-memory link between two engines on
    this host. Best of `repeats` passes (the first also faults the pages in)."""
    import ctypes

    import numpy as np
    n = nbytes // run_bytes
    src, dst = np.ones(n * run_bytes, np.uint8), np.zeros(n * run_bytes, np.uint8)
    sa, da = src.ctypes.data, dst.ctypes.data
    perm = np.random.default_rng(0).permutation(n).tolist()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i, j in enumerate(perm):
            ctypes.memmove(da + j * run_bytes, sa + i * run_bytes, run_bytes)
        best = min(best, time.perf_counter() - t0)
    return n * run_bytes / best


@contextmanager
def pinned_engine(path: str, core: int | None = 0, threads: int = 1, **config: Any) -> Iterator[Any]:
    """An in-process `Engine` over dummy weights of the config at `path`, pinned to `core` with
    `threads` torch threads (as `up --pin-cores` runs each engine), no KV transport; `config` is
    more EngineConfig fields. Closed, and this process's CPU affinity and torch threads restored, on exit."""
    import torch

    from microserve.config import EngineConfig
    from microserve.engine.engine import Engine

    threads0, affinity0 = torch.get_num_threads(), os.sched_getaffinity(0)
    eng = None
    try:
        eng = Engine(EngineConfig(**{"model": path, "load_format": "dummy", "num_threads": threads,
                                     "cpu_affinity": [core] if core is not None else None, "kv_transport": "none",
                                     **config}))
        yield eng
    finally:
        if eng is not None:
            eng.close()
        torch.set_num_threads(threads0)
        os.sched_setaffinity(0, affinity0)


def _token_ids(eng, seed: int):
    """ids(n): n random token ids of the engine's vocabulary past the special ones (no cache hits)."""
    import torch
    gen, vocab = torch.Generator().manual_seed(seed), eng.model_config.vocab_size
    return lambda n: torch.randint(3, vocab, (n,), generator=gen).tolist()


def measure_engine(model: str | dict[str, Any], core: int | None = 0, prefill_lens: tuple[int, ...] = (256,),
                   batches: tuple[int, ...] = (1, 4, 16), context: int = 256, steps: int = 20,
                   engine_args: dict[str, Any] | None = None, repeats: int = 3) -> dict[str, Any]:
    """Time one engine in this process, pinned to `core` with one torch thread (as `up --pin-cores`).

    Returns {"prefill_s": {len: median seconds to prefill a fresh prompt of that length},
    "decode_step_s": {batch: median seconds of one decode step with that many requests each holding
    `context` tokens}, "params": parameter count, "weight_bytes": bytes of weights}. Prompts are
    random token ids (no prefix-cache hits); the sampler is the paper's (temperature 0.6, top_p 0.9).
    Steps are timed by the calibration's probe (`Engine.step()` whole).
    """
    from microserve.bench.presets import model_dir

    config = {"max_num_batched_tokens": 8192, "kv_cache_memory_mb": 1024, **(engine_args or {})}
    with pinned_engine(model_dir(model, "probe"), core, 1, **config) as eng:
        probe, ids = _Probe(eng), _token_ids(eng, 0)
        probe.add(ids(64), 4)
        probe.drain()  # warm-up: first passes are 10-50x slower
        prefill: dict[int, float] = {}
        for n in prefill_lens:
            ts = []
            for _ in range(repeats):
                probe.add(ids(n), 1)
                ts.append(probe.drain())  # one token out: the step that prefills also samples it
            prefill[n] = statistics.median(ts)
        decode: dict[int, float] = {}
        for b in batches:
            for _ in range(b):
                probe.add(ids(context), steps + 2)
            probe.step()  # prefill all of them (budget allows), first token each
            probe.step()
            decode[b] = statistics.median([probe.step() for _ in range(steps)])
            probe.drain()
        params = list(eng.model.parameters())
        return {"prefill_s": prefill, "decode_step_s": decode, "params": sum(p.numel() for p in params),
                "weight_bytes": sum(p.numel() * p.element_size() for p in params)}


def calibrate(model: str | dict = "miniature", dtype: str = "bfloat16", core: int | None = 0, threads: int = 1,
              grid: dict | None = None, attention_backend: str = "auto", max_num_batched_tokens: int = 2048,
              page_size: int = 16, seed: int = 0, link: bool = True, progress=None) -> dict[str, Any]:
    """Profile the real engine and fit the linear cost model; returns the JSON document
    (LinearCostModel.from_json reads it). Restores this process's CPU affinity and torch threads."""
    from microserve.bench.presets import MINIATURE_MODEL, model_dir

    g = dict(FULL_GRID, **(grid or {}))
    cfg_dict = MINIATURE_MODEL if model == "miniature" else model
    name = "miniature" if model == "miniature" else (model if isinstance(model, str) else "config")
    path = model_dir(cfg_dict, "calibrate")
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    longest = max(max(g["prefill_lens"]) + max(g["prefill_starts"]),
                  *(c for c in g["decode_contexts"]), *(c for _, c in g["extra_decode"]), 64) + 64
    t_start = time.perf_counter()
    with pinned_engine(path, core, threads, dtype=dtype, attention_backend=attention_backend,
                       max_num_batched_tokens=max_num_batched_tokens, page_size=page_size,
                       max_model_len=max(longest, 256), kv_cache_memory_mb=512, seed=seed) as eng:
        probe, ids = _Probe(eng), _token_ids(eng, seed)
        say = progress or (lambda msg: None)
        probe.record = False
        probe.add(ids(64), 4)
        probe.drain()  # warm-up: first passes are much slower
        probe.record = True
        say("prefill")
        for start in g["prefill_starts"]:
            for n in g["prefill_lens"]:
                for _ in range(g["repeats"]):
                    prefix = ids(start)
                    if start:  # cache the prefix first (not recorded): the measured step starts after it
                        probe.record = False
                        probe.add(prefix, 1)
                        probe.drain()
                        probe.record = True
                    probe.add(prefix + ids(n), 1)
                    probe.drain()
        say("decode")
        configs = [(b, c) for b in g["decode_batches"] for c in g["decode_contexts"]] + list(g["extra_decode"])
        for b, ctx in configs:
            for _ in range(b):
                probe.add(ids(ctx), g["decode_steps"] + 2)
            probe.drain()
        say("mixed")
        for b, n in g["mixed"]:
            for _ in range(b):
                probe.add(ids(max(g["decode_contexts"])), g["decode_steps"] + 4)
            for _ in range(3):
                probe.step()
            probe.add(ids(n), 1)
            probe.drain()
        points = probe.points
        layers = eng.model_config.num_layers
        n_params = sum(p.numel() for p in eng.model.parameters())
    model_fit = fit(points, layers)
    doc = model_fit.to_json()
    doc.update({
        "model_name": name, "model": hf, "dtype": dtype, "params": n_params,
        "engine": {"max_num_batched_tokens": max_num_batched_tokens, "page_size": page_size,
                   "attention_backend": attention_backend, "threads": threads, "core": core},
        "machine": {**machine(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "calibration_s": time.perf_counter() - t_start,
        "features": list(FEATURES),
        "point_fields": [f.name for f in dataclasses.fields(StepShape)] + ["seconds"],
        "points": [[*dataclasses.astuple(s), t] for s, t in points],
    })
    if link:
        doc["link"] = shm_link(pinned=core is not None and threads == 1)
    return doc


def shm_link(pinned: bool = True) -> dict[str, Any]:
    """The LinkModel (as JSON) of the shared-memory KV transport here: measured memcpy bandwidth.
    One pinned core does the compute and the copies, so they do not overlap (0); threads > 1 may."""
    bw = measure_link()
    return {"name": f"shm (memcpy measured, {bw / 1e9:.1f} GB/s)", "bandwidth": bw, "latency_s": 20e-6,
            "overlap": 0.0 if pinned else 0.5}


# The served calibration's load. Engine 0 gets the shape grid, straight from the client, phase by
# phase: (what it covers, a bench Workload, requests, concurrency). Meanwhile engine 1 pulses (PULSES, in a
# loop): a decode burst, an idle gap, a prefill-only request, a gap. So engine 0's steps of every
# shape meet a neighbour that is idle, decoding or prefilling, interleaved within seconds (the
# host's speed drifts by several percent over minutes here: separate phases would confound it),
# and engine 1's steps add more. Lengths are spread wide so each feature varies on its own; none of
# it is an experiment's workload or arrival process.
def _phase(what: str, n: int, concurrency: int, **workload: Any) -> tuple[str, Workload, int, int]:
    return what, Workload(**workload), n, concurrency


SERVED_PHASES = (
    _phase("one request at a time", 12, 1, input_len=480, output_len=32, range_ratio=0.9),
    _phase("decode batches of ~4", 24, 4, input_len=480, output_len=48, range_ratio=0.7),
    _phase("decode batches of ~12", 36, 12, input_len=400, output_len=48, range_ratio=0.7),
    _phase("prefills after a cached prefix", 16, 2, dataset="prefix", prefix_num_groups=4, prefix_len=512,
           prefix_question_len=96, prefix_output_len=16),
)
PULSES = ((1, 600, 100), (4, 600, 60), (1, 300, 100), (8, 500, 40))  # (concurrency, prompt, output) per burst
PULSE_GAP_S = 2.5


def calibrate_served(preset: str = "miniature", phases=SERVED_PHASES, seed: int = 0, link: bool = True,
                     trace_dir: str | None = None, progress=None, pulses=PULSES,
                     pulse_gap_s: float = PULSE_GAP_S) -> dict[str, Any]:
    """The measured cost model as a served engine pays for steps: bring up `preset`'s engines
    (pinned as `up --pin-cores` pins them) with `--step-trace`, send `phases` to the first engine
    and pulses to the second through the real HTTP client, and fit `period_s` of every traced step
    (the step plus the hand-offs and token delivery around it) together with the interference
    factors of a busy neighbour (`neighbour_overlap`, `fit`). Needs at least 2 engines. Returns the
    JSON document `calibrate` returns; the traces stay in `trace_dir` if given."""
    import math
    import tempfile
    import threading

    from microserve.bench import datasets as ds
    from microserve.bench.loadgen import LoadConfig, run
    from microserve.bench.presets import PRESETS, model_dir
    from microserve.bench.sweep import Cluster, SweepSpec, build_workload, model_vocab
    from microserve.engine.step_trace import read_trace

    pre = PRESETS[preset]
    if pre.engines < 2:
        raise ValueError(f"preset {preset} has {pre.engines} engine; the served calibration needs 2 (one busy "
                         "neighbour to measure)")
    path = model_dir(pre.model, preset)
    vocab = (3, model_vocab(path))
    say = progress or (lambda msg: None)
    t_start = time.perf_counter()

    def check(res, what: str) -> None:
        failed = [r.error for r in res.records if not r.success]
        if failed:
            raise RuntimeError(f"{len(failed)} calibration requests ({what}) failed: {failed[0]}")

    with tempfile.TemporaryDirectory(prefix="microserve-calibrate-") as tmp:
        tdir = trace_dir or tmp
        os.makedirs(tdir, exist_ok=True)
        for old in os.listdir(tdir):  # a previous calibration's traces must not mix in
            if old.startswith("step-trace-"):
                os.remove(os.path.join(tdir, old))
        args = list(pre.engine_args) + ["--step-trace", os.path.join(tdir, "step-trace-{port}.jsonl")]
        spec = SweepSpec(strategies=["least_loaded"], rates=[], model=pre.model, workload=Workload(),  # not sent
                         result_dir=tmp, engines=2, pin_cores=pre.pin_cores, engine_args=args)
        cluster = Cluster(path, "least_loaded", spec, os.path.join(tmp, "logs"))
        with cluster:
            base = dict(ignore_eos=True, temperature=0.6, top_p=0.9, request_rate=math.inf, show_progress=False,
                        timeout_s=600.0, model=None)
            grid, pulsed = (dict(base_url=e.url, **base) for e in cluster.launcher.engines[:2])
            for i, where in enumerate((grid, pulsed)):
                check(run(ds.random_requests(3, 64, 4, 0.0, vocab, seed + 90 + i),
                          LoadConfig(max_concurrency=1, **where)), "warm-up")
            for f in os.listdir(tdir):  # warm-up steps are first passes: not what a step costs
                if f.startswith("step-trace-"):
                    open(os.path.join(tdir, f), "w").close()
            done, errors = threading.Event(), []

            def pulse() -> None:
                k = 0
                while not done.is_set():
                    conc, n_in, n_out = pulses[k % len(pulses)]
                    try:
                        check(run(ds.random_requests(conc, n_in, n_out, 0.0, vocab, seed + 1000 + k),
                                  LoadConfig(max_concurrency=conc, **pulsed)), "pulse")
                        done.wait(pulse_gap_s)
                        check(run(ds.random_requests(1, n_in + 200, 1, 0.0, vocab, seed + 5000 + k),
                                  LoadConfig(max_concurrency=1, **pulsed)), "pulse")
                        done.wait(pulse_gap_s)
                    except Exception as e:  # noqa: BLE001 - reported after the grid
                        errors.append(e)
                        return
                    k += 1
            pulser = threading.Thread(target=pulse, name="calibration-pulses", daemon=True)
            pulser.start()
            try:
                for k, (what, workload, n, conc) in enumerate(phases):
                    say(f"{what} (concurrency {conc}), the other engine pulsing")
                    check(run(build_workload(workload, path, n, seed + k), LoadConfig(max_concurrency=conc, **grid)),
                          what)
            finally:
                done.set()
                pulser.join()
            if errors:
                raise errors[0]
        traces = [read_trace(os.path.join(tdir, f)) for f in sorted(os.listdir(tdir)) if f.startswith("step-trace-")]
    doc = fit_traces([traces], preset, "served")
    doc.update({"phases": [[what, dataclasses.asdict(w), n, c] for what, w, n, c in phases], "pulses": [list(p) for p in pulses],
                "calibration_s": time.perf_counter() - t_start})
    if link:
        doc["link"] = shm_link(pinned=pre.pin_cores)
    return doc


def trace_groups(paths: list[str]) -> dict[str, list[str]]:
    """`--step-trace` files grouped by host and time, by run name: `<run>-<port>.jsonl` files that
    share <run> (and folder) are one run's engines (the sweep's and `calibrate --served`'s names);
    any other file is a run of its own, named by its file name without `.jsonl`."""
    import re
    from collections import Counter
    groups: dict[str, list[str]] = {}
    for p in sorted(paths):
        m = re.fullmatch(r"(.*)-\d+\.jsonl", os.path.basename(p))
        run = m.group(1) if m else os.path.basename(p).removesuffix(".jsonl")
        groups.setdefault(os.path.join(os.path.dirname(p), run), []).append(p)
    names = Counter(os.path.basename(k) for k in groups)
    return {os.path.basename(k) if names[os.path.basename(k)] == 1 else k: v for k, v in groups.items()}


def calibrate_from_traces(paths: list[str], preset: str = "miniature") -> dict[str, Any]:
    """The measured cost model fitted from existing `--step-trace` files (of a sweep's runs, of
    `calibrate --served`, of engines in production): every step's `period_s` with the busy shares
    of the engines traced beside it (`trace_groups`). The model's config and engine flags are
    `preset`'s. Returns the JSON document."""
    from microserve.engine.step_trace import read_trace

    files = []
    for p in paths:
        files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".jsonl")) if os.path.isdir(p) else [p]
    if not files:
        raise ValueError(f"no step traces (*.jsonl) in {', '.join(paths)}")
    doc = fit_traces([[read_trace(f) for f in g] for g in trace_groups(files).values()], preset, "traces")
    doc["traces"] = {"files": len(files), "from": paths}
    return doc


def trace_speed(paths: list[str], model: LinearCostModel) -> dict[str, tuple[float, int]]:
    """How fast the traced steps ran against `model`, per run (`trace_groups`): {run: (sum of the
    steps' period_s / sum of what the model gives for them with their neighbours' busy shares,
    steps)}. 1.0 is the model's speed; 1.1 means the steps took 10% longer."""
    from microserve.engine.step_trace import read_trace

    out = {}
    for name, group in trace_groups(paths).items():
        traces = [read_trace(f) for f in group]
        real = pred = 0.0
        n = 0
        for tr, shares in zip(traces, neighbour_overlap(traces)):
            for st, o in zip(tr, shares):
                real += st.period_s
                pred += model.cost(st.shape) * model.slowdown(*o)
                n += 1
        out[name] = (real / pred if pred else float("nan"), n)
    return out


def fit_traces(groups: list[list[list[TracedStep]]], preset: str, source: str) -> dict[str, Any]:
    """Fit the linear model and the interference factors on traced steps; `groups` holds, per host
    and time, the traces of its engines. The JSON document, with `preset`'s model and engine flags."""
    from microserve.bench.presets import PRESETS, model_dir

    pre = PRESETS[preset]
    with open(os.path.join(model_dir(pre.model, preset), "config.json")) as f:
        hf = json.load(f)
    ea = list(pre.engine_args)
    flag = lambda name, default: ea[ea.index(name) + 1] if name in ea else default  # noqa: E731
    steps = [st for g in groups for tr in g for st in tr]
    overlap = [o for g in groups for shares in neighbour_overlap(g) for o in shares]
    points = [(st.shape, st.period_s) for st in steps]
    doc = fit(points, int(hf["num_hidden_layers"]), overlap).to_json()
    doc.update({
        "model_name": preset, "model": hf, "dtype": flag("--dtype", "auto"),
        "params": ModelSpec.from_hf(preset, hf).params, "source": source,
        "engine": {"max_num_batched_tokens": int(flag("--max-num-batched-tokens", "2048")),
                   "page_size": int(flag("--page-size", "16")),
                   "attention_backend": flag("--attention-backend", "auto"), "threads": 1,
                   "core": "one per engine" if pre.pin_cores else None, "engines": pre.engines},
        "machine": {**machine(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "features": list(FEATURES),
        "point_fields": [f.name for f in dataclasses.fields(StepShape)] + ["seconds", "others_decoding",
                                                                           "others_prefilling"],
        "points": [[*dataclasses.astuple(s), t, od, op] for (s, t), (od, op) in zip(points, overlap)],
    })
    return doc


def neighbour_overlap(traces: list[list[TracedStep]]) -> list[list[tuple[float, float]]]:
    """For every traced step of every engine on one host: the share of its period during which the
    other engines were in a step with decode rows, and in a prefill-only step (each 0-1: overlap
    seconds over the period times the number of other engines)."""
    out = []
    for i, mine in enumerate(traces):
        others = sorted((st for j, tr in enumerate(traces) if j != i for st in tr), key=lambda st: st.start)
        n, starts, k0, shares = max(len(traces) - 1, 1), [st.start for st in others], 0, []
        longest = max((st.period_s for st in others), default=0.0)
        for st in mine:
            while k0 < len(others) and starts[k0] < st.start - longest:
                k0 += 1
            dec = pre = 0.0
            for o in others[k0:]:
                if o.start >= st.end:
                    break
                ov = min(o.end, st.end) - max(o.start, st.start)
                if ov > 0:
                    if o.shape.decode_batch:
                        dec += ov
                    else:
                        pre += ov
            period = max(st.period_s, 1e-9)
            shares.append((min(dec / (period * n), 1.0), min(pre / (period * n), 1.0)))
        out.append(shares)
    return out


def fit(points: list[tuple[StepShape, float]], layers: int = 1,
        overlap: list[tuple[float, float]] | None = None) -> LinearCostModel:
    """Non-negative least squares on relative error over every recorded step. With `overlap` (per
    point, the neighbours' busy shares of `neighbour_overlap`), also the interference factors:
    seconds = linear(shape) * (1 + g_d * decoding + g_p * prefilling), fitted by alternating the
    two least-squares problems (each is linear while the other is held)."""
    import numpy as np

    if len(points) < len(FEATURES):
        raise ValueError(f"{len(points)} timed steps are too few to fit {len(FEATURES)} coefficients")
    a = np.array([features(s) for s, _ in points])
    t = np.array([dt for _, dt in points])
    o = np.array(overlap, dtype=np.float64) if overlap is not None else np.zeros((len(points), 2))
    def linear(g):
        scale = 1.0 + o @ g
        return nnls(a, t / scale, weights=(scale / t) ** 2)

    g = np.zeros(2)
    coef = linear(g)
    for _ in range(30 if overlap is not None else 0):
        lin = np.maximum(a @ coef, 1e-12)
        g_new = nnls(o, t / lin - 1.0)  # relative excess over the linear part, on equal weights
        done = np.allclose(g_new, g, rtol=0.0, atol=1e-4)
        g, coef = g_new, linear(g_new)
        if done:
            break
    pred = (a @ coef) * (1.0 + o @ g)
    rel = np.abs(pred - t) / t
    ss_res, ss_tot = float(((pred - t) ** 2).sum()), float(((t - t.mean()) ** 2).sum())
    meta = {"fit": {"points": len(points), "median_rel_err": float(np.median(rel)),
                    "p90_rel_err": percentile(rel, 90), "max_rel_err": float(rel.max()),
                    "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0}}
    inter = {"decode": float(g[0]), "prefill": float(g[1])} if overlap is not None else {}
    return LinearCostModel({k: float(v) for k, v in zip(FEATURES, coef)}, layers, meta, inter)


def refit(doc: dict[str, Any]) -> LinearCostModel:
    """Fit again from a calibration JSON's raw points (with the neighbours' busy shares, if it has them)."""
    n = len(dataclasses.fields(StepShape))
    pts = [(StepShape(*[int(x) for x in p[:n]]), float(p[n])) for p in doc["points"]]
    overlap = [(float(p[n + 1]), float(p[n + 2])) for p in doc["points"]] if "others_decoding" in doc.get(
        "point_fields", ()) else None
    return fit(pts, int(doc.get("num_layers", 1)), overlap)


def summary(doc: dict[str, Any]) -> str:
    """A few lines: the fit, what the model predicts for typical steps, and its neighbour factors."""
    m = LinearCostModel.from_json(doc)
    f = doc["fit"]
    how = {"served": ", steps as served", "traces": ", from step traces"}.get(doc.get("source", ""), "")
    lines = [f"measured cost model of {doc.get('model_name')} ({doc.get('params', 0) / 1e6:.0f}M params, "
             f"{doc.get('dtype')}{how}), {f['points']} steps: median error {100 * f['median_rel_err']:.1f}%, "
             f"p90 {100 * f['p90_rel_err']:.1f}%, R^2 {f['r2']:.3f}",
             "coefficients: " + ", ".join(f"{k} {v:.3g}" for k, v in m.coef.items() if v)]
    for p, b, c in ((640, 0, 0), (0, 1, 640), (0, 4, 640), (0, 16, 640), (256, 4, 640)):
        lines.append(f"  prefill {p:4d} + {b:2d} decodes at context {c}: {1e3 * m.step_time(p, b, c):7.1f} ms")
    if m.interference:
        lines.append(f"busy neighbours: a step lasts x{m.slowdown(1, 0):.2f} while the host's other engines decode, "
                     f"x{m.slowdown(0, 1):.2f} while they prefill")
    if "link" in doc:
        lines.append(f"KV link: {doc['link']['name']}")
    return "\n".join(lines)
