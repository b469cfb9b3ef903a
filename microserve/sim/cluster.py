"""A simulated cluster driven by the real router, and the load generator that measures it.

    spec = ClusterSpec(model=MODELS["llama-3.1-8b"], cost=RooflineModel(...), engines=2)
    result, cluster = simulate(spec, "pd", requests, LoadConfig(base_url="sim://", request_rate=4))

The strategy object is made by the router's own `RouterService.make_strategy` (the class the
registry or `package.module:Class` names, with its parameters), over an `EngineSet` of the router's
own `EngineClient`s whose session is a `SimSession`. Requests go through `Router.run` (cleanup of
parked reservations, retries) exactly as router/app.py sends them; the client side measures what
`microserve bench` measures (loadgen.send_request: TTFT at the first output-carrying chunk, ITL,
E2E) on the virtual clock, and the result JSON is `loadgen.build_result`'s.
"""
from __future__ import annotations

import asyncio
import gc
import math
import time
import types
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from microserve.bench.datasets import SampleRequest
from microserve.bench.loadgen import (LoadConfig, LoadResult, arrival_times, build_result, concurrency_limit,
                                      sampling_fields)
from microserve.bench.metrics import RequestRecord
from microserve.config import EngineConfig, ModelConfig
from microserve.router.client import EngineClient, RouterRequest
from microserve.router.router import EngineSet, Router
from microserve.router.strategies import engine_roles
from microserve.sim import vloop
from microserve.sim.cost import LinkModel, ModelSpec, RooflineModel, StepCostModel
from microserve.sim.engine import SimAsyncEngine, SimEngine
from microserve.sim.server import SimServer, SimSession

KV_DTYPES = {1: torch.float8_e4m3fn, 2: torch.bfloat16, 4: torch.float32}


@dataclass
class ClusterSpec:
    """Engines, their hardware and their flags. `tp` GPUs per engine, placed in order on nodes of
    `gpus_per_node`: engines on one node exchange KV over `intra_link`, others over `inter_link`
    (both per GPU; an engine sends over its tp GPUs at once). roles: None gives `microserve up`'s
    default for the strategy (1 prefill engine for pd strategies, else all "both"), or `prefill`
    prefill engines. num_pages None: what the GPU memory leaves (roofline models) or
    `kv_cache_memory_mb` (the CPU engine's default pool)."""
    model: ModelSpec
    cost: StepCostModel
    engines: int = 2
    tp: int = 1
    prefill: int | None = None
    roles: list[str] | None = None
    gpus_per_node: int = 8
    intra_link: LinkModel = field(default_factory=lambda: LinkModel("nvlink", 360e9))
    inter_link: LinkModel = field(default_factory=lambda: LinkModel("ib-ndr", 45e9, 15e-6))
    page_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_model_len: int | None = None
    num_pages: int | None = None
    kv_cache_memory_mb: int = 256
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    recv_lease_s: float = 60.0
    rpc_s: float = 0.5e-3
    name: str = "sim"

    def pages(self) -> int:
        if self.num_pages:
            return self.num_pages
        per_page = self.model.kv_bytes_per_token * self.page_size
        if isinstance(self.cost, RooflineModel):
            return max(int(self.cost.kv_capacity_bytes(self.gpu_memory_utilization) // per_page), 1)
        return max(int(self.kv_cache_memory_mb * 2**20 // per_page), 1)

    def node_of(self, engine: int) -> int:
        return engine * self.tp // max(self.gpus_per_node, 1)

    def link_for(self, a: int, b: int) -> LinkModel:
        base = self.intra_link if self.node_of(a) == self.node_of(b) else self.inter_link
        return LinkModel(base.name, base.bandwidth * self.tp, base.latency_s, base.overlap)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model.name, "engines": self.engines, "tp": self.tp,
                "gpus_per_node": self.gpus_per_node, "intra_link": self.intra_link.describe(),
                "inter_link": self.inter_link.describe(), "page_size": self.page_size,
                "max_num_batched_tokens": self.max_num_batched_tokens, "max_num_seqs": self.max_num_seqs,
                "max_model_len": self.max_model_len, "num_pages": self.pages(),
                "enable_prefix_caching": self.enable_prefix_caching, "rpc_s": self.rpc_s,
                "cost_model": self.cost.describe()}


def make_strategy(spec: str, engine_set: EngineSet) -> Router:
    """The router's own RouterService.make_strategy (registry or package.module:Class, parameters
    coerced), called on a stand-in that has only what it reads: the engine set."""
    from microserve.router.app import RouterService
    return RouterService.make_strategy(types.SimpleNamespace(engine_set=engine_set), spec)


class SimCluster:
    """Simulated engines (SimEngine + SimAsyncEngine + SimServer each), the router's EngineClients
    over a SimSession, and the strategy. Build and use inside a running (virtual-time) loop."""

    def __init__(self, spec: ClusterSpec, strategy: str) -> None:
        self.spec, self.strategy_spec = spec, strategy
        self.roles = engine_roles_of(spec, strategy)
        if len(self.roles) != spec.engines:
            raise ValueError(f"{len(self.roles)} roles for {spec.engines} engines")
        m = spec.model
        mc = ModelConfig(architecture="LlamaForCausalLM", vocab_size=m.vocab, hidden_size=m.hidden,
                         intermediate_size=m.intermediate, num_layers=m.layers, num_heads=m.heads,
                         num_kv_heads=m.kv_heads, head_dim=m.head_dim, max_position_embeddings=m.max_position)
        cfg = EngineConfig(model=m.name, served_model_name=m.name, page_size=spec.page_size,
                           max_model_len=spec.max_model_len, max_num_batched_tokens=spec.max_num_batched_tokens,
                           max_num_seqs=spec.max_num_seqs, enable_prefix_caching=spec.enable_prefix_caching,
                           recv_lease_s=spec.recv_lease_s, kv_transport="sim")
        pages = spec.pages()
        dtype = KV_DTYPES.get(int(m.kv_bytes), torch.bfloat16)
        self.session = SimSession(spec.rpc_s)
        peers: dict[str, SimEngine] = {}
        index = {f"e{i}": i for i in range(spec.engines)}
        links = {}

        def link(a: str, b: str) -> LinkModel:
            key = (a, b)
            if key not in links:
                links[key] = spec.link_for(index[a], index[b])
            return links[key]

        self.engines = [SimEngine(f"e{i}", cfg, mc, spec.cost, pages, link, peers, dtype) for i in range(spec.engines)]
        for i, e in enumerate(self.engines):
            e.neighbours = [o for j, o in enumerate(self.engines) if j != i and spec.node_of(j) == spec.node_of(i)]
        self.aengines = [SimAsyncEngine(e) for e in self.engines]
        self.urls = [f"http://sim-engine-{i}" for i in range(spec.engines)]
        for url, ae in zip(self.urls, self.aengines):
            self.session.add(SimServer(url, ae, self.session))
        self.clients = [EngineClient(url, role, i, self.session, timeout_s=3600.0, cluster_token="sim")
                        for i, (url, role) in enumerate(zip(self.urls, self.roles))]
        self.engine_set = EngineSet(self.clients)
        self.strategy = make_strategy(strategy, self.engine_set)

    async def start(self) -> None:
        for ae in self.aengines:
            await ae.start()
        for c in self.clients:
            c.info = await c.health()

    async def stop(self) -> None:
        for ae in self.aengines:
            await ae.stop()

    def accounting(self) -> list[dict[str, int]]:
        """KVCache.check() of every engine (raises if pages are lost)."""
        return [e.cache.check() for e in self.engines]

    def engine_stats(self, duration: float) -> list[dict[str, Any]]:
        out = []
        for e, role in zip(self.engines, self.roles):
            s = e.stats
            out.append({"name": e.name, "role": role, "steps": s.steps, "busy_s": e.busy_s,
                        "utilization": e.busy_s / duration if duration > 0 else 0.0,
                        "preemptions": e.scheduler.num_preemptions, "kv_sent_bytes": s.kv_sent_bytes,
                        "kv_transfer_s": s.kv_transfer_s, "kv_exposed_s": s.kv_exposed_s,
                        "max_running": e.max_running, "finished": dict(s.requests_finished),
                        "prefix_hit_tokens": s.prefix_hit_tokens, "num_pages": e.pool.num_pages})
        return out


# ---- the client side --------------------------------------------------------------------------------
def router_body(r: SampleRequest, cfg: LoadConfig) -> dict[str, Any]:
    """The sampling fields the router forwards (router/app.py FORWARD) for one bench request."""
    return {"max_tokens": r.output_len, "temperature": cfg.temperature, **sampling_fields(cfg)}


async def send(strategy: Router, rid: str, r: SampleRequest, cfg: LoadConfig, index: int, t0: float) -> RequestRecord:
    """One request through Router.run, timed like loadgen.send_request (virtual clock)."""
    loop = asyncio.get_running_loop()
    rec = RequestRecord(index=index, prompt_len=r.prompt_len)
    st = loop.time()
    rec.start, last, first = st - t0, st, True
    req = RouterRequest(rid, list(r.prompt), router_body(r, cfg), stream=True)
    try:
        async with aclosing(strategy.run(req)) as chunks:
            async for chunk in chunks:
                now = loop.time()
                usage = chunk.get("usage")
                if usage and not chunk.get("choices"):
                    rec.usage_reported = True
                    rec.prompt_len = int(usage.get("prompt_tokens", rec.prompt_len))
                    rec.output_len = int(usage.get("completion_tokens", 0))
                    rec.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
                    continue
                choice = chunk["choices"][0]
                ids, fr = choice.get("token_ids") or [], choice.get("finish_reason")
                if fr:
                    rec.finish_reason = fr
                if ids or choice.get("text") or (fr and first):
                    if first:
                        rec.ttft, first = now - st, False
                    else:
                        rec.itl.append(now - last)
                    last = now
                    rec.counted_output_tokens += len(ids)
        if not rec.usage_reported:
            rec.output_len = rec.counted_output_tokens
        if rec.finish_reason == "error":
            rec.error = "the engine ended the stream with finish_reason 'error'"
        elif first:
            rec.error = "the stream carried no output"
        else:
            rec.success = True
    except Exception as e:  # noqa: BLE001 - a failed request is data, as in loadgen
        rec.error = f"{type(e).__name__}: {e}"[:1000]
    rec.e2el = loop.time() - st
    return rec


async def drive(cluster: SimCluster, requests: Sequence[SampleRequest], cfg: LoadConfig,
                warmups: Sequence[SampleRequest] = ()) -> LoadResult:
    """loadgen.run_load against the simulated cluster: warm-ups (all at once, not measured), then
    the requests at Poisson (gamma) arrivals, capped by max_concurrency."""
    loop = asyncio.get_running_loop()
    strategy = cluster.strategy
    limited = concurrency_limit(cfg.max_concurrency)

    if warmups:
        recs = await asyncio.gather(*(limited(send(strategy, f"warm-{i}", r, cfg, i, loop.time()))
                                      for i, r in enumerate(warmups)))
        if not any(r.success for r in recs):
            raise RuntimeError(f"every warm-up request failed; the first: {recs[0].error}")
    offsets = arrival_times(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
    t0 = loop.time()

    async def one(i: int) -> RequestRecord:
        delay = t0 + offsets[i] - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        rec = await limited(send(strategy, f"sim-{i}", requests[i], cfg, i, t0))
        rec.scheduled = offsets[i]
        return rec

    records = await asyncio.gather(*(one(i) for i in range(len(requests))))
    return LoadResult(list(records), loop.time() - t0, cfg.model or cluster.spec.model.name, time.time())


@dataclass
class SimRun:
    result: dict[str, Any]
    load: LoadResult
    accounting: list[dict[str, int]]
    engines: list[dict[str, Any]]
    wall_s: float
    sim_s: float


def simulate(spec: ClusterSpec, strategy: str, requests: Sequence[SampleRequest], cfg: LoadConfig,
             percentiles: Sequence[float] = (99.0,), detailed: bool = False, extra: dict[str, Any] | None = None,
             warmups: Sequence[SampleRequest] = ()) -> SimRun:
    """Run one workload on a fresh simulated cluster in virtual time. The result dict has
    `microserve bench`'s keys (loadgen.build_result) plus `strategy`, `simulated` and `sim`
    (cluster, cost model, engines' steps/utilization/KV sent, KV accounting at the end, wall
    seconds and simulated seconds per wall second)."""
    wall0, cpu0 = time.perf_counter(), time.process_time()

    async def main() -> tuple[LoadResult, list, list, float]:
        cluster = SimCluster(spec, strategy)
        await cluster.start()
        try:
            load = await drive(cluster, requests, cfg, warmups)
            # let engines finish what a finished request left behind (aborts of parked reservations)
            for _ in range(3):
                await asyncio.sleep(0)
            end = asyncio.get_running_loop().time()
        finally:
            await cluster.stop()
        return load, cluster.accounting(), cluster.engine_stats(end), end  # busy time counts warm-ups too

    # A run makes ~10^5 short-lived objects per simulated minute, nearly all freed by refcount; the
    # cyclic collector's passes over the whole heap (torch's objects included) cost ~25% of a run.
    # Freezing what exists and collecting young objects less often keeps the cycles collected.
    threshold = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        load, acct, engines, sim_s = vloop.run(main())
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    info = {"strategy": strategy, "simulated": True, "label": (extra or {}).get("label") or strategy}
    info.update(extra or {})
    result = build_result(load, cfg, percentiles, detailed, info)
    result["sim"] = {"cluster": spec.describe(), "roles": engine_roles_of(spec, strategy), "engines": engines,
                     "kv_accounting": acct, "wall_s": wall, "cpu_s": cpu, "sim_s": sim_s,
                     "sim_s_per_wall_s": sim_s / wall if wall > 0 else math.inf,
                     "sim_s_per_cpu_s": sim_s / cpu if cpu > 0 else math.inf}
    return SimRun(result, load, acct, engines, wall, sim_s)


def engine_roles_of(spec: ClusterSpec, strategy: str) -> list[str]:
    return list(spec.roles) if spec.roles else engine_roles(spec.engines, strategy, spec.prefill)
