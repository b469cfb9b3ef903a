"""ModelRunner: turns a scheduled batch into flat varlen tensors, runs the model, returns logits.

It also installs the per-layer send hook: for every sequence with a send window, the slots of this
step's new tokens that fall inside the window are handed to the transport right after each layer
stores its K/V, so the copy runs while the rest of that layer (and the next ones) compute.

On CUDA, decode-only steps without a send hook go to `decode_graphs` (a `DecodeGraphRunner`), which
replays a captured CUDA graph instead of launching the model's kernels one by one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from microserve.attention.base import AttentionMetadata, ForwardContext
from microserve.engine.request import Request
from microserve.engine.scheduler import ScheduledBatch
from microserve.kv.pool import KVPool, slots_for
from microserve.model.llama import LlamaForCausalLM
from microserve.transfer.base import KVTransport

if TYPE_CHECKING:
    from microserve.engine.cuda_graph import DecodeGraphRunner


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: KVPool, transport: KVTransport, device: torch.device,
                 decode_graphs: DecodeGraphRunner | None = None) -> None:
        self.model, self.pool, self.transport, self.device = model, pool, transport, device
        self.decode_graphs = decode_graphs

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        return t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)

    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[Request], bool]:
        """Compute one step. Returns (logits of the rows to sample, their requests, whether any KV
        was handed to the transport)."""
        ps = self.pool.page_size
        ids, pos, slots, qlens, slens, tables, sample_rows, sample_reqs = [], [], [], [], [], [], [], []
        sends: list[tuple[list[int], list[int], object]] = []
        num_decodes = 0
        for req, n in zip(batch.requests, batch.num_tokens):
            start, stop = req.num_computed, req.num_computed + n
            req_slots = slots_for(req.seq.pages, start, stop, ps)
            ids += req.token_ids[start:stop]
            pos += range(start, stop)
            slots += req_slots
            qlens.append(n)
            slens.append(stop)
            tables.append(req.seq.pages)
            num_decodes += n == 1
            if stop == len(req.token_ids) and not req.send_only:
                sample_rows.append(len(ids) - 1)
                sample_reqs.append(req)
            w = req.send
            if w is not None and start < w.end and stop > w.begin:
                lo, hi = max(start, w.begin), min(stop, w.end)
                sends.append((req_slots[lo - start:hi - start], w.dst_slots[lo - w.begin:hi - w.begin], w.remote))
        width = max(len(t) for t in tables)
        graphs = self.decode_graphs
        # A graph cannot call the send hook between layers, and it is captured for one token per row.
        if (graphs is not None and not sends and num_decodes == len(qlens)
                and graphs.fits(len(qlens), max(slens), width)):
            logits = graphs.run(ids, pos, slots, slens, tables, sample_rows)
            return (logits if sample_rows else None), sample_reqs, False
        ids_t, pos_t, slots_t = self._tensor([ids, pos, slots])  # one conversion for the three [T] rows
        meta = AttentionMetadata(
            slot_mapping=slots_t,
            query_start_loc=self._tensor([0] + list(_cumsum(qlens)), torch.int32),
            seq_lens=self._tensor(slens, torch.int32),
            block_tables=self._tensor([t + [0] * (width - len(t)) for t in tables], torch.int32),
            query_lens_cpu=qlens, seq_lens_cpu=slens, num_decodes=num_decodes, page_size=ps)
        ctx = ForwardContext(meta=meta, kv=self.pool.kv, layer_hook=self._send_hook(sends) if sends else None)
        # every row sampled (a decode step): rows are appended in order, so they are all of them
        rows = None if len(sample_rows) == len(ids) else self._tensor(sample_rows)
        logits = self.model(ids_t, pos_t, ctx, rows)
        return (logits if sample_rows else None), sample_reqs, bool(sends)

    def _send_hook(self, sends: list[tuple[list[int], list[int], object]]):
        def hook(layer: int) -> None:
            for src, dst, remote in sends:
                self.transport.write(layer, src, dst, remote)
        return hook

    def send_cached(self, req: Request, upto: int) -> bool:
        """Send window positions that are already in KV (a prefix hit on the sender), page to page,
        all layers, without recomputing them. Returns whether anything was sent."""
        w = req.send
        lo, hi = w.begin, min(upto, w.end)
        if hi <= lo:
            return False
        src = slots_for(req.seq.pages, lo, hi, self.pool.page_size)
        dst = w.dst_slots[:hi - lo]
        for layer in range(self.pool.num_layers):
            self.transport.write(layer, src, dst, w.remote)
        return True


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total
