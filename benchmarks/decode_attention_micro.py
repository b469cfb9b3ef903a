"""Micro-benchmark of the decode-attention step of microserve's CPU backend, and alternatives.

Evidence for docs/bench_engine.md: per layer and step, TorchSDPABackend._decode gathers every
sequence's whole padded context out of the paged pool (`kv_layer[:, block_tables]`, a fresh
[2, B, pages*page_size, H, D] copy) and then runs SDPA with a boolean mask and enable_gqa. This times
that against variants that keep the same paged pool and the same results:

  current        kv_layer[:, block_tables[:, :n]] + SDPA(mask, enable_gqa)   (the torch backend)
  flat_idx       slot indices computed once per step, index_select on the flat [2, S, H, D] view
                 into a buffer allocated once (out=), + SDPA(mask, enable_gqa)
  flat_idx_math  same gather, attention as GQA-grouped matmuls (q [B,Hkv,G,D] @ k^T), masked softmax
  gather_only    the current gather alone (to split gather from attention)
  sdpa_contig    SDPA alone on K/V that are already contiguous per sequence (no gather at all)
  engine_kernel  the engine's CPU decode kernel (`--attention-backend cpu`, the CPU default since it
                 landed): reads K/V in place through the block table, no copy, no padding, GQA by
                 indexing (microserve/attention/csrc/paged_decode.cpp).

    python benchmarks/decode_attention_micro.py --threads 1
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from microserve.bench.harness import median_ms


def current(q, kv_layer, bt, lens, max_len, scale):
    ps = kv_layer.shape[2]
    n = (max_len + ps - 1) // ps
    rows = kv_layer[:, bt[:, :n]].flatten(2, 3)[:, :, :max_len].transpose(2, 3)
    mask = torch.arange(max_len)[None, :] < lens[:, None]
    return F.scaled_dot_product_attention(q.unsqueeze(2), rows[0], rows[1], attn_mask=mask[:, None, None, :],
                                          scale=scale, enable_gqa=True).squeeze(2)


def gather_only(q, kv_layer, bt, lens, max_len, scale):
    ps = kv_layer.shape[2]
    n = (max_len + ps - 1) // ps
    return kv_layer[:, bt[:, :n]]


def step_index(bt, lens, max_len, ps):
    """Once per step: flat slot of every (sequence, position < max_len), and the padding mask."""
    pos = torch.arange(max_len)
    slots = bt[:, pos // ps].long() * ps + pos % ps  # [B, max_len]
    mask = pos[None, :] < lens[:, None]
    return slots.reshape(-1), mask


def flat_gather(kv_layer, slots, buf):
    flat = kv_layer.flatten(1, 2)  # [2, S, H, D], a view
    torch.index_select(flat, 1, slots, out=buf)
    return buf


def flat_idx(q, kv_layer, slots, mask, max_len, scale, buf):
    B = q.shape[0]
    rows = flat_gather(kv_layer, slots, buf).view(2, B, max_len, *kv_layer.shape[-2:]).transpose(2, 3)
    return F.scaled_dot_product_attention(q.unsqueeze(2), rows[0], rows[1], attn_mask=mask[:, None, None, :],
                                          scale=scale, enable_gqa=True).squeeze(2)


def flat_idx_math(q, kv_layer, slots, mask, max_len, scale, buf):
    B, Hq, D = q.shape
    Hkv = kv_layer.shape[-2]
    G = Hq // Hkv
    rows = flat_gather(kv_layer, slots, buf).view(2, B, max_len, Hkv, D)
    k = rows[0].permute(0, 2, 3, 1)  # [B, Hkv, D, L]
    v = rows[1].transpose(1, 2)  # [B, Hkv, L, D]
    s = torch.matmul(q.view(B, Hkv, G, D) * scale, k)  # [B, Hkv, G, L]
    s.masked_fill_(~mask[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v).reshape(B, Hq, D)


def load_kernel():
    """The engine's own CPU decode kernel (microserve/attention/csrc/paged_decode.cpp), or None."""
    from microserve.kernels.build import kernel_error
    why = kernel_error()
    if why is not None:
        print(f"# engine kernel unavailable: {why}")
        return None
    return torch.ops.microserve.paged_decode_attention


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-kernel", action="store_true", help="skip the engine kernel (it needs a C++ compiler)")
    a = ap.parse_args()
    kernel = None if a.no_kernel else load_kernel()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"threads {a.threads}, loadavg {os.getloadavg()[0]:.2f}; median ms per layer call over {a.reps} reps")
    print("| case | B | ctx | Hq/Hkv | D | current | gather_only | flat_idx | flat_idx_math | sdpa_contig | engine_kernel "
          "| max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    cases = [("stories260K-hd32 rate inf", 64, 264, 8, 4, 32), ("stories260K batch 16", 16, 256, 8, 4, 8),
             ("dummy 58M batch 16", 16, 256, 8, 4, 64)]
    ps, num_pages = 16, 4096
    for name, B, L, Hq, Hkv, D in cases:
        kv = torch.randn(2, num_pages, ps, Hkv, D)
        n = (L + ps - 1) // ps
        bt = torch.stack([torch.randperm(num_pages)[:n] for _ in range(B)]).int()
        lens = torch.randint(L - 40, L + 1, (B,), dtype=torch.int32)
        lens[0] = L
        max_len = int(lens.max())
        q = torch.randn(B, Hq, D)
        scale = D ** -0.5
        buf = torch.empty(2, B * max_len, Hkv, D)
        out = torch.empty_like(q)

        def engine(q, kv, bt, lens, scale):
            kernel(q, kv, bt, lens, scale, out)
            return out
        ref = current(q, kv, bt, lens, max_len, scale)

        def fi():
            slots, mask = step_index(bt, lens, max_len, ps)  # once per step; counted here in full anyway
            return flat_idx(q, kv, slots, mask, max_len, scale, buf)

        def fm():
            slots, mask = step_index(bt, lens, max_len, ps)
            return flat_idx_math(q, kv, slots, mask, max_len, scale, buf)

        rows = kv[:, bt].flatten(2, 3)[:, :, :max_len].transpose(2, 3).contiguous()  # [2,B,H,L,D]
        mask = torch.arange(max_len)[None, :] < lens[:, None]

        def sc():
            return F.scaled_dot_product_attention(q.unsqueeze(2), rows[0], rows[1], attn_mask=mask[:, None, None, :],
                                                  scale=scale, enable_gqa=True).squeeze(2)

        outs = [fi(), fm(), sc()]
        if kernel is not None:
            outs.append(engine(q, kv, bt, lens, scale))
        diff = max((o - ref).abs().max().item() for o in outs)
        t = [median_ms(lambda: current(q, kv, bt, lens, max_len, scale), a.reps),
             median_ms(lambda: gather_only(q, kv, bt, lens, max_len, scale), a.reps), median_ms(fi, a.reps), median_ms(fm, a.reps),
             median_ms(sc, a.reps),
             median_ms(lambda: engine(q, kv, bt, lens, scale), a.reps) if kernel is not None else float("nan")]
        print(f"| {name} | {B} | {L} | {Hq}/{Hkv} | {D} | " + " | ".join(f"{x:.3f}" for x in t) + f" | {diff:.1e} |")


if __name__ == "__main__":
    main()
