"""A simulated engine: the real `Engine` (its microserving verbs, its `step`, the real `Scheduler`,
`KVCache`, prefix tree and page accounting) with the model forward replaced by a cost model.

- `SimEngine` subclasses `microserve.engine.engine.Engine` without loading a model: the KV pool is a
  zero-stride tensor of the modeled shape (`torch.empty(()).expand(...)`: page ids and byte counts
  are right, no memory is used). `prep_recv`, `remote_send`, `start_generate`, `commit`, `abort`,
  `match`, `add_request`, `validate`, `_finish` and `Engine.step` itself are inherited unchanged.
- `SimRunner` stands where `ModelRunner` stands: `run(batch)` returns no logits and records the
  step's shape (prefill tokens, decodes, contexts) and the KV it sends; `SimEngine.step` then
  appends one placeholder token to every row the real runner would have sampled (the sampler is
  the only step code not run: it needs logits).
- `SimTransport` stands for shm/NIXL: `flush` prices the step's KV writes with the link model
  (layer-wise overlap with the step's compute) and reports them as the real transport does.
- `SimAsyncEngine` subclasses `AsyncEngine` (its `call`, streams, `generate`, `start_generate`,
  `remote_send`); only the loop differs: a step takes its modeled time as a virtual-time sleep.

Generated tokens are a placeholder id that is never EOS: every request produces exactly its
max_tokens, as `ignore_eos` does on the real engine.
"""
from __future__ import annotations

import asyncio
import logging
import math
import traceback
import types
from typing import TYPE_CHECKING

import torch

from microserve.config import EngineConfig, ModelConfig
from microserve.engine.async_engine import AsyncEngine
from microserve.engine.engine import Engine, EngineStats
from microserve.engine.scheduler import ScheduledBatch, Scheduler
from microserve.kv.cache import KVCache
from microserve.kv.pool import KVPool
from microserve.sim.cost import LinkModel, StepCostModel, StepShape, batch_shape
from microserve.transfer.base import KVTransport, TransferStats

if TYPE_CHECKING:
    from microserve.engine.request import Request

log = logging.getLogger(__name__)

SIM_TOKEN = 3  # what every simulated step "samples"


class SimPeer:
    """What `SimTransport.connect` returns: the receiving engine, shaped like the transports' connected
    peer where the engine reads it (`geom.slots`, `geom.layers`, `alive()`)."""

    def __init__(self, engine: "SimEngine") -> None:
        self.engine, self.name = engine, engine.name
        pool = engine.pool
        self.geom = types.SimpleNamespace(shape=tuple(pool.kv.shape), layers=pool.num_layers,
                                          slots=pool.num_pages * pool.page_size)

    def alive(self) -> bool:
        return True


class SimTransport(KVTransport):
    """Reaches other simulated engines by name; prices each step's writes with the link model."""
    name = "sim"

    def __init__(self, engine: "SimEngine", peers: dict[str, "SimEngine"]) -> None:
        super().__init__()
        self.engine, self.peers = engine, peers
        self._connected: dict[str, SimPeer] = {}

    def describe(self) -> dict:
        return {"engine": self.engine.name}

    def connect(self, peer: dict) -> SimPeer:
        name = peer["engine"]
        if name not in self._connected:
            self._connected[name] = SimPeer(self.peers[name])
        return self._connected[name]

    def flush(self, timeout: float) -> TransferStats:
        return self.engine.runner.price_sends()


class SimRunner:
    """The model runner's place in `Engine.step`: shapes instead of logits."""

    def __init__(self, engine: "SimEngine") -> None:
        self.engine = engine
        self.begin()

    def begin(self) -> None:
        self.shape = StepShape()
        self.compute_s = 0.0
        self.sample_reqs: list[Request] = []
        self.layer_sends: dict[str, int] = {}  # receiver name -> tokens whose KV goes layer by layer
        self.cached_sends: dict[str, int] = {}  # receiver name -> tokens already in KV, sent page to page
        self.transfer = TransferStats()

    def send_cached(self, req: "Request", upto: int) -> bool:
        w = req.send
        n = min(upto, w.end) - w.begin
        if n <= 0:
            return False
        self.cached_sends[w.remote.name] = self.cached_sends.get(w.remote.name, 0) + n
        return True

    def run(self, batch: ScheduledBatch):
        for req, n in zip(batch.requests, batch.num_tokens):
            start = req.num_computed
            stop = start + n
            if stop == len(req.token_ids) and not req.send_only:
                self.sample_reqs.append(req)
            w = req.send
            if w is not None and start < w.end and stop > w.begin:
                name = w.remote.name
                self.layer_sends[name] = self.layer_sends.get(name, 0) + min(stop, w.end) - max(start, w.begin)
        self.shape = batch_shape(batch)
        eng = self.engine
        self.compute_s = eng.cost.cost(self.shape) * eng.cost.slowdown(*eng.neighbours_busy())
        return None, self.sample_reqs, bool(self.layer_sends)

    def price_sends(self) -> TransferStats:
        """This step's KV writes: per receiver, the link's transfer and exposed time; the step waits
        for the slowest (the real transport's flush waits for every write)."""
        eng = self.engine
        bpt = eng.pool.bytes_per_token_layer * eng.pool.num_layers
        stats = TransferStats()
        for name in sorted(set(self.layer_sends) | set(self.cached_sends)):
            link = eng.link_to(name)
            lb, cb = self.layer_sends.get(name, 0) * bpt, self.cached_sends.get(name, 0) * bpt
            total, exposed = link.exposed(self.compute_s, eng.cost.num_layers, lb, cb)
            stats.bytes += int(lb + cb)
            stats.transfer_s += total
            stats.exposed_s = max(stats.exposed_s, exposed)
        self.transfer = stats
        return stats


class SimEngine(Engine):
    """`Engine` with a cost model in place of the model (see the module doc). `links(sender,
    receiver)` returns the LinkModel between two engines by name."""

    def __init__(self, name: str, config: EngineConfig, model_config: ModelConfig, cost: StepCostModel,
                 num_pages: int, links, peers: dict[str, "SimEngine"], dtype: torch.dtype = torch.bfloat16) -> None:
        c = self.config = config
        self.name = name
        self.cost, self._links = cost, links
        self.model_path, self.model_name = None, c.served_model_name or c.model
        self.model_config = mc = model_config
        self.device, self.dtype = torch.device("cpu"), dtype
        self.model, self.tokenizer, self.eos_ids = None, None, set()
        shape = (mc.num_layers, 2, num_pages, c.page_size, mc.num_kv_heads, mc.head_dim)
        self.transport = SimTransport(self, peers)
        self.pool = KVPool(torch.empty((), dtype=dtype).expand(shape))  # the shape without the memory
        self.cache = KVCache(self.pool, c.enable_prefix_caching, c.recv_lease_s, hold_s=c.transfer_timeout_s + 5.0)
        self.max_model_len = min(c.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings,
                                 num_pages * c.page_size)
        self.scheduler = Scheduler(self.cache, c.max_num_batched_tokens, c.max_num_seqs)
        self.runner = SimRunner(self)
        self.requests = {}
        self._fenced = {}
        self.stats = EngineStats()
        self._sent_since_flush = False
        self.layout = [mc.num_layers, mc.num_kv_heads, mc.head_dim, c.page_size, str(dtype).removeprefix("torch.")]
        self.now = 0.0  # virtual time, set by SimAsyncEngine before every call
        self.last_step_s = 0.0
        self.busy_s = 0.0
        self.exposed_s = 0.0
        self.max_running = 0
        self.neighbours: list[SimEngine] = []  # engines sharing this one's host (SimCluster sets them)
        self.stepping: str | None = None  # "decode" or "prefill" while a step's modeled time runs
        peers[name] = self

    def link_to(self, receiver: str) -> LinkModel:
        return self._links(self.name, receiver)

    def neighbours_busy(self) -> tuple[float, float]:
        """The shares of this host's other engines now in a step with decode rows, and in a
        prefill-only step: what `StepCostModel.slowdown` takes."""
        n = len(self.neighbours)
        if not n:
            return 0.0, 0.0
        return (sum(e.stepping == "decode" for e in self.neighbours) / n,
                sum(e.stepping == "prefill" for e in self.neighbours) / n)

    # ---- the step: Engine.step, then the sampler's place ------------------------------------------
    def step(self):
        self.runner.begin()
        outputs = super().step()
        for req in self.runner.sample_reqs:
            if req.rid in self.requests:  # not finished meanwhile (e.g. its fence closed)
                outputs.append(self._append_token(req, SIM_TOKEN))
        r = self.runner
        if r.shape.tokens:  # busy until SimAsyncEngine's sleep for this step ends
            self.stepping = "decode" if r.shape.decode_batch else "prefill"
        self.last_step_s = r.compute_s + r.transfer.exposed_s
        self.busy_s += self.last_step_s
        self.exposed_s += r.transfer.exposed_s
        self.max_running = max(self.max_running, len(self.scheduler.running))
        return outputs

    # ---- leases in virtual time -------------------------------------------------------------------
    def prep_recv(self, rid, prompt_ids, end, params, fence_url=None):
        out = super().prep_recv(rid, prompt_ids, end, params, fence_url)
        self.cache.reservations[rid].deadline = self.now + self.cache.recv_lease_s
        return out

    def hold(self, fence: str) -> bool:
        """A sender holds the reservation behind `fence` while its send is queued or running (as
        the real sender's fence claims renew the lease). False if it has ended."""
        res = self.cache.fences.get(fence)
        if res is None:
            return False
        res.deadline = math.inf
        return True

    def unhold(self, fence: str) -> None:
        res = self.cache.fences.get(fence)
        if res is not None:
            res.deadline = self.now + self.cache.recv_lease_s

    def expire(self) -> list[str]:
        return self.cache.expire(now=self.now)

    def next_deadline(self) -> float:
        return min((r.deadline for r in self.cache.reservations.values()), default=math.inf)


class SimAsyncEngine(AsyncEngine):
    """AsyncEngine whose loop runs `step()` in the event loop and then sleeps the step's modeled
    time (virtual). Calls arriving during a step wait for it (`AsyncEngine.call`), as on the real one."""

    def __init__(self, engine: SimEngine, min_step_s: float = 1e-4) -> None:
        super().__init__(engine)
        self.min_step_s = min_step_s

    async def call(self, fn, *args, **kw):
        self.engine.now = asyncio.get_running_loop().time()
        return await super().call(fn, *args, **kw)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        eng: SimEngine = self.engine
        while True:
            eng.now = now = loop.time()
            if eng.next_deadline() <= now:
                for rid in eng.expire():
                    log.info("%s: reservation %s expired", eng.name, rid)
            if not eng.has_work():
                self._wake.clear()
                deadline = eng.next_deadline()
                if math.isinf(deadline):
                    await self._wake.wait()
                else:
                    try:
                        await asyncio.wait_for(self._wake.wait(), max(deadline - now, 0.0) + 1e-6)
                    except asyncio.TimeoutError:
                        pass
                continue
            self._stepping = True
            self._idle.clear()
            try:
                try:
                    outputs = eng.step()
                except Exception:  # noqa: BLE001 - as AsyncEngine: fail the step's requests, go on
                    log.error("simulated step failed; aborting its requests:\n%s", traceback.format_exc())
                    outputs = eng.fail_all("internal engine error (see the log)")
                    eng.last_step_s = 0.0
                # a step that did nothing must still take time, or the loop would spin at one instant
                await asyncio.sleep(eng.last_step_s if outputs or eng.last_step_s else self.min_step_s)
            finally:
                eng.stepping = None
                self._stepping = False
                self._idle.set()
            self._deliver(outputs)
            await asyncio.sleep(0)

    async def stop(self) -> None:
        await self._cancel_loop()
        self._executor.shutdown(wait=False)
