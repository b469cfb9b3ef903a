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
from microserve.sim.cost import FEATURES, LinearCostModel, StepShape, batch_shape, features, nnls

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
        bw = measure_link()
        # one pinned core does the compute and the copies: they do not overlap (0); threads > 1 may
        doc["link"] = {"name": f"shm (memcpy measured, {bw / 1e9:.1f} GB/s)", "bandwidth": bw, "latency_s": 20e-6,
                       "overlap": 0.0 if core is not None and threads == 1 else 0.5}
    return doc


def fit(points: list[tuple[StepShape, float]], layers: int = 1) -> LinearCostModel:
    """Non-negative least squares on relative error over every recorded step."""
    import numpy as np

    if len(points) < len(FEATURES):
        raise ValueError(f"{len(points)} timed steps are too few to fit {len(FEATURES)} coefficients")
    a = np.array([features(s) for s, _ in points])
    t = np.array([dt for _, dt in points])
    coef = nnls(a, t, weights=1.0 / t ** 2)
    pred = a @ coef
    rel = np.abs(pred - t) / t
    ss_res, ss_tot = float(((pred - t) ** 2).sum()), float(((t - t.mean()) ** 2).sum())
    meta = {"fit": {"points": len(points), "median_rel_err": float(np.median(rel)),
                    "p90_rel_err": percentile(rel, 90), "max_rel_err": float(rel.max()),
                    "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0}}
    return LinearCostModel({k: float(v) for k, v in zip(FEATURES, coef)}, layers, meta)


def refit(doc: dict[str, Any]) -> LinearCostModel:
    """Fit again from a calibration JSON's raw points."""
    pts = [(StepShape(*[int(x) for x in p[:-1]]), float(p[-1])) for p in doc["points"]]
    return fit(pts, int(doc.get("num_layers", 1)))


def summary(doc: dict[str, Any]) -> str:
    """A few lines: the fit, and what the model predicts for typical steps next to the median measured."""
    m = LinearCostModel.from_json(doc)
    f = doc["fit"]
    lines = [f"measured cost model of {doc.get('model_name')} ({doc.get('params', 0) / 1e6:.0f}M params, "
             f"{doc.get('dtype')}), {f['points']} steps: median error {100 * f['median_rel_err']:.1f}%, "
             f"p90 {100 * f['p90_rel_err']:.1f}%, R^2 {f['r2']:.3f}",
             "coefficients: " + ", ".join(f"{k} {v:.3g}" for k, v in m.coef.items() if v)]
    for p, b, c in ((640, 0, 0), (0, 1, 640), (0, 4, 640), (0, 16, 640), (256, 4, 640)):
        lines.append(f"  prefill {p:4d} + {b:2d} decodes at context {c}: {1e3 * m.step_time(p, b, c):7.1f} ms")
    if "link" in doc:
        lines.append(f"KV link: {doc['link']['name']}")
    return "\n".join(lines)
