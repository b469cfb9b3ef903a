"""Attention with torch SDPA over the paged pool. Runs anywhere torch does; the CPU default."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from microserve.attention.base import AttentionBackend, AttentionMetadata, ForwardContext


def store_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write new K/V rows into their slots. kv_layer: [2, pages, page_size, H, D]."""
    _, pages, page_size, h, d = kv_layer.shape
    flat = kv_layer.view(2, pages * page_size, h, d)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def gather_kv(kv_layer: torch.Tensor, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of context positions [0, length) of one sequence, as [H, length, D] each."""
    page_size = kv_layer.shape[2]
    n_pages = (length + page_size - 1) // page_size
    rows = kv_layer[:, block_table[:n_pages]].flatten(1, 2)[:, :length]  # [2, length, H, D]
    rows = rows.transpose(1, 2)
    return rows[0], rows[1]


class TorchSDPABackend(AttentionBackend):
    name = "torch"

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        meta, kv_layer = ctx.meta, ctx.kv[layer]
        self._store(kv_layer, k, v, meta)
        if ctx.layer_hook is not None:
            ctx.layer_hook(layer)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd == len(q):  # decodes only (the common serving step): no row slicing
            self._decode(q, kv_layer, meta, out)
        elif nd:
            self._decode(q[:nd], kv_layer, meta, out[:nd])
        if nd < meta.num_seqs:
            self._prefill(q, k, v, kv_layer, meta, out)
        return out

    def _store(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        store_kv(kv_layer, k, v, meta.slot_mapping)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                 meta: AttentionMetadata, out: torch.Tensor) -> None:
        """Writes out's rows of the prefill sequences (num_decodes .. num_seqs-1), one SDPA call each."""
        start = meta.num_decodes
        for i in range(meta.num_decodes, meta.num_seqs):
            ql, sl = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
            qi = q[start:start + ql].transpose(0, 1).unsqueeze(0)  # [1, Hq, ql, D]
            if ql == sl:  # no cached prefix: the new K/V are the whole context, top-left == lower-right
                ki = k[start:start + ql].transpose(0, 1).unsqueeze(0)
                vi = v[start:start + ql].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=self.scale,
                                                   enable_gqa=True)
            else:
                ki, vi = gather_kv(kv_layer, meta.block_tables[i], sl)
                mask = torch.ones(ql, sl, dtype=torch.bool, device=q.device).tril_(sl - ql)
                o = F.scaled_dot_product_attention(qi, ki.unsqueeze(0), vi.unsqueeze(0), attn_mask=mask,
                                                   scale=self.scale, enable_gqa=True)
            out[start:start + ql] = o[0].transpose(0, 1)
            start += ql

    def _decode(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, out: torch.Tensor) -> None:
        """Writes out ([num_decodes, Hq, D], contiguous) for the decodes, all in one padded call: each
        sees its own context, masked to its length."""
        nd = meta.num_decodes
        lens = meta.seq_lens[:nd]
        max_len = max(meta.seq_lens_cpu[:nd])
        page_size = kv_layer.shape[2]
        n_pages = (max_len + page_size - 1) // page_size
        rows = kv_layer[:, meta.block_tables[:nd, :n_pages]].flatten(2, 3)[:, :, :max_len]  # [2, B, T, H, D]
        valid = torch.arange(max_len, device=q.device)[None, :] < lens[:, None]  # [B, T]
        if q.dtype == torch.float32:
            o = F.scaled_dot_product_attention(q.unsqueeze(2), rows[0].transpose(1, 2), rows[1].transpose(1, 2),
                                               attn_mask=valid[:, None, None, :], scale=self.scale, enable_gqa=True)
            out.copy_(o.squeeze(2))
            return
        # Half precision: CPU SDPA's masked bf16 path is ~4x slower than two batched matmuls with an
        # fp32 softmax (measured, benchmarks/decode_attention_micro.py). The q heads of one KV head
        # share its K/V, so they go in as one [group, D] block.
        b, hkv, d = nd, rows.shape[3], rows.shape[4]
        qg = q.view(b, hkv, -1, d)
        scores = torch.matmul(qg, rows[0].permute(0, 2, 3, 1)).float() * self.scale  # [B, Hkv, G, T]
        scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out.copy_(torch.matmul(probs, rows[1].transpose(1, 2)).reshape(b, -1, d))
