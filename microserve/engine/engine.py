"""Engine: one model, one KV cache, one scheduler. Single-threaded and synchronous by design;
`AsyncEngine` drives it from an event loop.

The microserving verbs map onto the unified KV cache:

    prep_recv(end)          cache.reserve_recv -> park; reply slots for prompt[matched:end)
    remote_send(begin,end)  a send-only request over prompt[:end] with a SendWindow [begin, end)
    start_generate(begin)   cache.take -> a normal request whose first begin tokens have KV
    commit / abort          cache.commit / cache.abort on the parked request
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

import torch

from microserve.attention.base import AttentionMetadata, ForwardContext
from microserve.config import EngineConfig, ModelConfig
from microserve.engine.cuda_graph import DecodeGraphRunner
from microserve.engine.request import Request, RequestOutput, Status
from microserve.engine.runner import ModelRunner
from microserve.engine.sampling import SamplingParams, sample
from microserve.engine.scheduler import Scheduler
from microserve.engine.step_trace import StepShape, batch_shape
from microserve.tokenizer import IncrementalDetokenizer, Tokenizer
from microserve.errors import ServeError
from microserve.protocol import fit_context
from microserve.kv.cache import Fence, KVCache, SendWindow
from microserve.kv.pool import KVPool
from microserve.model.loader import load_model, resolve_dtype, resolve_model_path
from microserve.transfer.base import TransferError, decode_kv_addr, encode_kv_addr, make_transport

log = logging.getLogger(__name__)


class RequestError(ServeError):
    """Bad input to the engine."""


@dataclass
class EngineStats:
    """Running totals the server exports to Prometheus."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_hit_tokens: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)
    kv_sent_bytes: int = 0
    kv_received_bytes: int = 0  # counted by the receiver when the sender reports it (start/commit)
    kv_transfer_s: float = 0.0
    kv_exposed_s: float = 0.0
    steps: int = 0


class Engine:
    trace_shapes = False  # AsyncEngine sets it with --step-trace: each step leaves its shape in last_shape
    last_shape: StepShape | None = None

    def __init__(self, config: EngineConfig) -> None:
        self.config = c = config
        if c.num_threads:
            torch.set_num_threads(c.num_threads)
        if c.cpu_affinity:
            os.sched_setaffinity(0, c.cpu_affinity)
        self.model_path = resolve_model_path(c.model)
        load_format = c.load_format
        if c.model == "embedded" and load_format == "auto":
            load_format = "dummy"
        self.model_name = c.served_model_name or c.model
        self.model_config = mc = ModelConfig.from_dir(self.model_path)
        self.device = torch.device("cuda" if c.device == "auto" and torch.cuda.is_available() else
                                   "cpu" if c.device == "auto" else c.device)
        self.dtype = resolve_dtype(c.dtype, mc, self.device)
        torch.manual_seed(c.seed)
        self.model = load_model(self.model_path, mc, load_format, self.dtype, self.device, c.attention_backend, c.seed,
                                c.linear_backend)
        self.tokenizer = Tokenizer(self.model_path) if os.path.exists(
            os.path.join(self.model_path, "tokenizer.json")) else None
        self.eos_ids = set(mc.eos_token_ids)

        page_bytes = mc.num_layers * 2 * c.page_size * mc.num_kv_heads * mc.head_dim * self.dtype.itemsize
        # On CUDA the warm-up is the profiling run (a full token budget); on CPU a short one will do.
        warm_tokens = c.max_num_batched_tokens if self.device.type == "cuda" else 256
        peak = self.warmup(min(warm_tokens, c.max_num_batched_tokens, mc.max_position_embeddings))
        if c.num_pages:
            num_pages = c.num_pages
        elif self.device.type == "cuda":  # what the measured peak leaves of the allowed share
            total = torch.cuda.get_device_properties(self.device).total_memory
            num_pages = int((total * c.gpu_memory_utilization - peak) // page_bytes)
            if num_pages < 1:
                raise ValueError(f"--gpu-memory-utilization {c.gpu_memory_utilization} leaves no room for KV "
                                 f"(weights + activations peak at {peak / 2**30:.1f} GiB)")
        else:
            num_pages = max(c.kv_cache_memory_mb * 2**20 // page_bytes, 1)
        shape = (mc.num_layers, 2, num_pages, c.page_size, mc.num_kv_heads, mc.head_dim)
        transport = c.kv_transport if c.kv_transport != "auto" else "cuda_ipc" if self.device.type == "cuda" else "shm"
        self.transport = make_transport(transport)
        self.pool = KVPool(self.transport.allocate(shape, self.dtype, self.device))
        # a write a sender started lands within its transfer timeout; 5 s more for clock slack between hosts
        self.cache = KVCache(self.pool, c.enable_prefix_caching, c.recv_lease_s, hold_s=c.transfer_timeout_s + 5.0)
        graphs = self._use_decode_graphs()
        self.max_model_len = min(c.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings,
                                 (num_pages - graphs) * c.page_size)  # graphs reserve a scratch page
        self.scheduler = Scheduler(self.cache, c.max_num_batched_tokens, c.max_num_seqs)
        self.runner = ModelRunner(self.model, self.pool, self.transport, self.device)
        if graphs:
            self.runner.decode_graphs = DecodeGraphRunner(self.model, self.pool, self.device, c.max_num_seqs,
                                                          self.max_model_len)
            self.runner.decode_graphs.capture()
        self.requests: dict[str, Request] = {}
        self._fenced: dict[str, Request] = {}  # sends whose fence must be open before each step writes
        self.stats = EngineStats()
        self._sent_since_flush = False
        self.layout = [mc.num_layers, mc.num_kv_heads, mc.head_dim, c.page_size, str(self.dtype).removeprefix("torch.")]

    def warmup(self, num_tokens: int) -> int:
        """One forward over `num_tokens` tokens with a scratch KV pool: takes the slow first passes
        out of the first request, and returns peak device memory (bytes; 0 on CPU) so the real
        pool can be sized to what is left."""
        mc, ps = self.model_config, self.config.page_size
        pages = -(-num_tokens // ps)
        scratch = torch.zeros(mc.num_layers, 2, pages, ps, mc.num_kv_heads, mc.head_dim, dtype=self.dtype,
                              device=self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        on = dict(device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, **on), query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, **on),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, **on),
            block_tables=torch.arange(pages, dtype=torch.int32, **on)[None], query_lens_cpu=[num_tokens],
            seq_lens_cpu=[num_tokens], num_decodes=int(num_tokens == 1), page_size=ps)
        ids = torch.randint(0, mc.vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(0)).to(self.device)
        self.model(ids, torch.arange(num_tokens, **on), ForwardContext(meta=meta, kv=scratch),
                   torch.tensor([num_tokens - 1], **on))
        if self.device.type != "cuda":
            return 0
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def _use_decode_graphs(self) -> bool:
        """Decode steps replay CUDA graphs on CUDA unless `enforce_eager`, and only where the Triton
        kernels run attention: the torch backend sizes its decode gather by the host-side lengths,
        which a graph fixes at the max context (correct, but it would gather that much every step)."""
        if self.device.type != "cuda" or self.config.enforce_eager:
            return False
        mc, backend = self.model_config, self.model.layers[0].self_attn.backend
        q = torch.empty(1, mc.num_heads, mc.head_dim, dtype=self.dtype, device=self.device)
        why = backend.unsupported(q, q) if backend.name == "triton" else f"attention backend {backend.name!r}"
        if why is not None:
            log.info("decode runs eagerly, without CUDA graphs: %s", why)
            return False
        return True

    # ---- plain generation ---------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Check a request; returns its params with max_tokens clamped to the context left (vLLM's
        rule, `fit_context`: a prompt that fits is served up to max_model_len, finish_reason "length")."""
        if not prompt_ids:
            raise RequestError("the prompt is empty", param="prompt")
        if any(not 0 <= t < self.model_config.vocab_size for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {self.model_config.vocab_size})", param="prompt")
        params.validate()
        max_tokens = fit_context(len(prompt_ids), params.max_tokens, self.max_model_len)
        return params if max_tokens == params.max_tokens else dataclasses.replace(params, max_tokens=max_tokens)

    def _new_request(self, rid: str, prompt_ids: list[int], params: SamplingParams, **kw) -> Request:
        if rid in self.requests:
            raise RequestError(f"request id {rid!r} is already running", 409, "conflict")
        req = Request(rid, list(prompt_ids), params, **kw)
        if params.seed is not None and not params.greedy:
            req.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        if self.tokenizer is not None and not req.send_only:
            req.detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids)
        return req

    def add_request(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> Request:
        params = self.validate(prompt_ids, params)
        req = self._new_request(rid, prompt_ids, params)
        self.requests[rid] = req
        self.scheduler.add(req)
        return req

    def abort(self, rid: str) -> bool:
        req = self.requests.get(rid)
        if req is None:
            return False
        self._finish(req, "abort")
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- microserving ---------------------------------------------------------------------------
    def match(self, prompt_ids: list[int]) -> int:
        """Cached prefix length, read-only, counting at most len-1 tokens (the last is always computed)."""
        return min(self.cache.peek(prompt_ids), max(len(prompt_ids) - 1, 0) // self.pool.page_size * self.pool.page_size)

    def prep_recv(self, rid: str, prompt_ids: list[int], end: int, params: SamplingParams,
                  fence_url: str | None = None) -> tuple[str, int]:
        """Reserve slots for prompt[matched:end); returns (kv_append_metadata, matched). The metadata
        names the reservation's fence and `fence_url`, where senders claim it."""
        params = self.validate(prompt_ids, params)
        end = _window_index(end, len(prompt_ids), "end")
        if not 0 <= end < len(prompt_ids):
            raise RequestError(f"prep_recv needs 0 <= end < prompt length ({len(prompt_ids)}), got end={end}", param="end")
        if rid in self.requests:
            raise RequestError(f"request id {rid!r} is already running", 409, "conflict")
        desc = self.transport.describe()  # before reserving: a transport that cannot receive leaks nothing
        res = self.cache.reserve_recv(rid, prompt_ids, end, payload=params)
        fence = {"id": res.fence, **({"url": fence_url} if fence_url else {})}
        return encode_kv_addr(self.transport.name, desc, self.layout, res.slots(self.pool.page_size), fence), res.matched

    def claim_fence(self, fence: str, renew: bool = False, done: bool = False) -> float | None:
        """A sender claims (or `renew`s) our reservation's fence: the wall-clock deadline for its
        writes; or says it is `done` writing (no quarantine needed on its account)."""
        if done:
            self.cache.settle(fence)
            return None
        return self.cache.claim(fence, renew)

    def check_send(self, prompt_ids: list[int], begin: int, end: int, kv_addr_info: str) -> tuple[dict, list[int]]:
        """Validate a remote_send without touching anything; returns kv_addr_info decoded, and its slots."""
        L = len(prompt_ids)
        if not prompt_ids:
            raise RequestError("the prompt is empty", param="prompt")
        begin, end = _window_index(begin, L, "begin"), _window_index(end, L, "end")
        if not 0 <= begin < end < L:
            raise RequestError(f"remote_send needs 0 <= begin < end < prompt length ({L}), got begin={begin}, end={end}",
                               param="begin")
        doc, dst = decode_kv_addr(kv_addr_info, max_slots=L)  # a window is shorter: the length check below says so
        if doc["transport"] != self.transport.name:
            raise TransferError(f"kv_addr_info is for transport {doc['transport']!r}, this engine uses "
                                f"{self.transport.name!r}", 400)
        if doc.get("layout") != self.layout:
            raise TransferError(f"kv_addr_info's KV layout {doc.get('layout')} does not match this engine's "
                                f"{self.layout} (a different model?)", 400)
        if len(dst) != end - begin:
            raise TransferError(f"end - begin = {end - begin} but the receiver reserved {len(dst)} slots", 400)
        return doc, dst

    def remote_send(self, rid: str, prompt_ids: list[int], begin: int, end: int, kv_addr_info: str,
                    fence: Fence | None = None) -> Request:
        """Compute prompt[:end] (what is not cached) and write the KV of [begin, end) into the
        receiver's slots, layer by layer. With a fence, no write starts once it is closed."""
        doc, dst = self.check_send(prompt_ids, begin, end, kv_addr_info)
        L = len(prompt_ids)
        begin, end = _window_index(begin, L, "begin"), _window_index(end, L, "end")
        remote = self.transport.connect(doc["peer"])
        if max(dst) >= remote.geom.slots:  # here, not at the first write: a flush error ends every send of its step
            raise TransferError(f"kv_addr_info names slots up to {max(dst)}, but the receiver's pool has "
                                f"{remote.geom.slots}", 400)
        send_rid = f"send-{rid}"
        req = self._new_request(send_rid, prompt_ids[:end], SamplingParams(max_tokens=1, temperature=0.0),
                                send_only=True, send=SendWindow(begin, end, dst, remote, fence))
        self.requests[send_rid] = req
        if fence is not None:
            self._fenced[send_rid] = req
        self.scheduler.add(req)
        return req

    def start_generate(self, rid: str, begin: int, prompt_ids: list[int] | None = None,
                       params: SamplingParams | None = None) -> Request:
        res = self.cache.reservations.get(rid)
        if res is None:
            self.cache.take(rid)  # raises the precise 404 / 409
        L = len(res.tokens)
        begin = _window_index(begin, L, "begin")
        if prompt_ids is not None and list(prompt_ids) != res.tokens:
            raise RequestError("start_generate's prompt differs from the one given to prep_recv", param="prompt")
        if not 0 <= begin < L:
            raise RequestError(f"start_generate needs 0 <= begin < prompt length ({L}), got begin={begin}", param="begin")
        if begin > res.end:
            raise RequestError(f"begin={begin} is past the received window's end ({res.end}): the KV of "
                               f"[{res.end}, {begin}) would be missing", param="begin")
        params = self.validate(res.tokens, params or res.payload)
        self._count_received(rid)
        self.cache.take(rid)
        self.cache.started(rid)
        req = self._new_request(rid, res.tokens, params)
        req.seq = res.seq
        # KV of [0, matched) is a cached prefix and [matched, end) was received: start at begin,
        # but never recompute into shared tree pages.
        req.num_computed = req.num_cached_tokens = max(begin, res.matched)
        self.requests[rid] = req
        self.scheduler.add(req)
        return req

    def window_bytes(self, tokens: int) -> int:
        """KV bytes of `tokens` positions, every layer, K and V: what a send window moves."""
        return tokens * self.pool.bytes_per_token_layer * self.pool.num_layers

    def _count_received(self, rid: str) -> None:
        res = self.cache.reservations.get(rid)
        if res is not None:
            self.stats.kv_received_bytes += self.window_bytes(res.end - res.matched)

    def commit(self, rid: str) -> int:
        self._count_received(rid)
        return self.cache.commit(rid)

    def abort_parked(self, rid: str) -> None:
        self.cache.abort(rid)

    def expire(self) -> list[str]:
        return self.cache.expire()

    # ---- the step -----------------------------------------------------------------------------
    def _close_fenced(self) -> list[RequestOutput]:
        """End the sends whose fence closed (deadline passed, or revoked) before this step writes."""
        outs = []
        for req in [r for r in self._fenced.values() if not r.send.fence.open()]:
            req.error = ("the receiver's reservation ended (aborted, expired or no longer renewed) before its KV "
                         "was sent; nothing more is written to it")
            req.error_status = 409
            outs.append(self._finish(req, "error"))
        return outs

    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = self._close_fenced() if self._fenced else []
        batch = self.scheduler.schedule()
        if self.trace_shapes:  # before the step moves num_computed on
            self.last_shape = batch_shape(batch)
        admitted = self.scheduler.admitted
        for req in admitted:
            if req.send is not None and self.runner.send_cached(req, req.num_computed):
                self._sent_since_flush = True
        done_sends = [r for r in admitted if r.send_only and r.num_remaining == 0]
        logits, sample_reqs = None, []
        if batch.requests:
            logits, sample_reqs, sent = self.runner.run(batch)
            self._sent_since_flush |= sent
            self.stats.steps += 1
            for req, n in zip(batch.requests, batch.num_tokens):
                req.num_computed += n
                if req.send_only and req.num_remaining == 0:
                    done_sends.append(req)
        elif self.scheduler.waiting and not self.scheduler.running:
            req = self.scheduler.waiting[0]  # it cannot fit even in an empty pool: fail it, never spin
            req.error = "not enough free KV cache pages for this request (parked reservations hold the rest)"
            outputs.append(self._finish(req, "error"))
        outputs += self._finish_sends(done_sends)
        if logits is not None:
            tokens = sample(logits, [r.params for r in sample_reqs], [r.generator for r in sample_reqs])
            for req, tok in zip(sample_reqs, tokens):
                outputs.append(self._append_token(req, tok))
        return outputs

    def _finish_sends(self, reqs: list[Request]) -> list[RequestOutput]:
        if not reqs and not self._sent_since_flush:
            return []
        outs = []
        error: TransferError | None = None
        if self._sent_since_flush:
            self._sent_since_flush = False
            try:
                st = self.transport.flush(self.config.transfer_timeout_s)
                self.stats.kv_sent_bytes += st.bytes
                self.stats.kv_transfer_s += st.transfer_s
                self.stats.kv_exposed_s += st.exposed_s
            except TransferError as e:
                error = e
                reqs = [r for r in self.requests.values() if r.send is not None]
        for req in reqs:
            if error is not None:
                req.error, req.error_status = str(error), error.status
            outs.append(self._finish(req, "error" if error else "sent"))
        return outs

    def _append_token(self, req: Request, tok: int) -> RequestOutput:
        req.token_ids.append(tok)
        p = req.params
        reason = None
        piece = ""
        if not p.ignore_eos and tok in self.eos_ids or tok in p.stop_token_ids:
            reason = "stop"
        elif req.detok is not None:
            piece = req.detok.push(tok)
        text = req.text + piece
        if p.stop and piece:
            hits = [i for i in (text.find(s, max(len(req.text) - len(s), 0)) for s in p.stop) if i >= 0]
            if hits:
                text, reason = text[:min(hits)], "stop"
        if reason is None and (req.num_output >= p.max_tokens or len(req.token_ids) >= self.max_model_len):
            reason = "length"
        # Hold back text that could still grow into a stop string, unless we are done.
        hold = 0 if reason or not p.stop else max(len(s) - 1 for s in p.stop)
        upto = max(len(text) - hold, req.emitted)
        new_text, req.text, req.emitted = text[req.emitted:upto], text, upto
        if reason:
            return self._finish(req, reason, [tok], new_text)
        return self._output(req, [tok], new_text, False, None)

    def _output(self, req, new_ids, text, finished, reason) -> RequestOutput:
        return RequestOutput(req.rid, new_ids, text, finished, reason, req.num_prompt, req.num_output,
                             req.num_cached_tokens, req.error, req.error_status)

    def _finish(self, req: Request, reason: str, new_ids: list[int] | None = None, text: str = "") -> RequestOutput:
        self.scheduler.remove(req)
        if req.seq is not None:
            self.cache.publish(req.seq, req.token_ids, req.num_computed)
            self.cache.release(req.seq)
            req.seq = None
        req.status, req.finish_reason = Status.FINISHED, reason
        self.requests.pop(req.rid, None)
        self._fenced.pop(req.rid, None)
        s = self.stats
        s.requests_finished[reason] = s.requests_finished.get(reason, 0) + 1
        if not req.send_only:
            s.prompt_tokens += req.num_prompt
            s.generation_tokens += req.num_output
            s.prefix_hit_tokens += req.num_cached_tokens
        return self._output(req, new_ids or [], text, True, reason)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an error (after a failed step: its state cannot be trusted)."""
        outs = []
        for req in list(self.requests.values()):
            req.error = message
            outs.append(self._finish(req, "error"))
        return outs

    def close(self) -> None:
        self.transport.close()


def _window_index(i: int, L: int, name: str) -> int:
    """Python-style negative indices count from the end of the prompt."""
    if not isinstance(i, int) or isinstance(i, bool):
        raise RequestError(f"{name} must be an integer", param=name)
    return i + L if i < 0 else i
