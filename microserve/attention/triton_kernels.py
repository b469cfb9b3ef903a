"""Triton kernels for paged attention: store K/V into slots, varlen prefill, split-KV decode.

Written against Triton 3.6's language (the GPU image) and checked on CPU under `TRITON_INTERPRET=1`
(CI runs Triton 3.9): only `tl.load/store` with masks, `tl.dot(input_precision=...)`, `tl.exp2`,
`tl.where`, `tl.maximum/minimum`, `tl.sum/max` and early `return`, which both versions share.

Layouts (see `microserve/attention/base.py` and `microserve/kv/pool.py`):

    q, out          [T, q_heads, D]          flat varlen tokens, decodes first
    k, v            [T, kv_heads, D]         this step's new rows
    kv_layer        [2, pages, page_size, kv_heads, D]    one layer of the pool
    block_tables    [B, max_pages] int32     page ids of each sequence, padded with 0

Page arithmetic, shared by every kernel: context position `pos` of sequence `i` lives at

    slot = block_tables[i, pos // page_size] * page_size + pos % page_size

    pos:    0 ... ps-1 | ps ... 2ps-1 | ...
    page:   bt[i, 0]   | bt[i, 1]     | ...
    offset: 0 ... ps-1 | 0 ... ps-1   | ...

and the row of that slot for kv head `h` starts at `slot * stride_slot + h * stride_head` in the K
(or V) half of the layer. Kernels resolve the page per position, so a key block need not line up with
pages: any page size works, and a block that crosses a page boundary just gathers from two pages.

Softmax is online (running max `m`, running sum `l`) in fp32 and in base 2: scores are scaled by
`scale * log2(e)` once so the inner loop uses `exp2`, the cheap instruction on GPUs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from microserve.attention.triton_backend import decode_partition

LOG2E = 1.4426950408889634


def head_dim_block(head_dim: int) -> int:
    """The padded head dim the kernels compute with: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs would silently run as tf32 on tensor cores (10-bit mantissa); ask for real fp32.
    return "ieee" if dtype == torch.float32 or _dot_f32(dtype) else "tf32"


def _dot_f32(dtype: torch.dtype) -> bool:
    """Whether tl.dot must see fp32 operands: only bf16 under the interpreter, whose dot multiplies
    bf16's raw uint16 storage as integers (Triton 3.9). On GPUs bf16 goes to the tensor cores."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---- (a) store new K/V rows into their slots ------------------------------------------------------

@triton.jit
def _store_kv_kernel(K, V, Cache, slot_mapping,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kind, stride_slot, stride_head,
                     NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per token: copy its [kv_heads, D] K row and V row to Cache[0|1, slot].
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    if slot < 0:  # a padding token: nothing to store
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM)
    t64 = t.to(tl.int64)
    k = tl.load(K + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = Cache + slot * stride_slot + offs_h[:, None] * stride_head + offs_d[None, :]
    tl.store(dst, k.to(Cache.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kind, v.to(Cache.dtype.element_ty), mask=mask)


def store_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write k[t], v[t] (`[T, kv_heads, D]`, any row stride, unit stride on D) to slot
    `slot_mapping[t]` of `kv_layer` (`[2, pages, page_size, kv_heads, D]`); slots < 0 are skipped."""
    T, H, D = k.shape
    if T == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kv_layer.stride(-1) == 1
    _store_kv_kernel[(T,)](
        k, v, kv_layer, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_layer.stride(0), kv_layer.stride(2), kv_layer.stride(3),
        NUM_HEADS=H, HEAD_DIM=D, BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D),
        num_warps=4)


# ---- (b) varlen prefill over paged K/V (cached prefix + chunk, lower-right causal) ---------------

@triton.jit
def _prefill_kernel(Q, Cache, Out, block_tables, query_start_loc, seq_lens, seq_offset,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_kind, stride_slot, stride_head, stride_bt,
                    scale_log2, page_size,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                    DOT_F32: tl.constexpr):
    # Program (i, mb, h): query rows [mb*BLOCK_M, (mb+1)*BLOCK_M) of sequence seq_offset+i, q head h.
    seq = tl.program_id(0) + seq_offset
    mb = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // GROUP
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    if mb * BLOCK_M >= q_len:  # grid is sized for the longest chunk; shorter ones stop here
        return
    seq_len = tl.load(seq_lens + seq)
    cached = seq_len - q_len
    #   context:  0 ........ cached ........................ seq_len
    #             |<- in KV ->|<- this chunk's q_len rows ->|
    # query row j sits at position cached + j and sees keys 0 ..= cached + j (lower-right causal).
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    d_valid = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    q_pos = cached + offs_m
    # keys past the last row of this block are masked for every row: skip them
    kv_end = tl.minimum(seq_len, cached + (mb + 1) * BLOCK_M)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite, so rows with no key yet give exp2(0)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt = block_tables + seq.to(tl.int64) * stride_bt
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_valid = pos < kv_end
        page = tl.load(bt + pos // page_size, mask=n_valid, other=0).to(tl.int64)
        slot = page * page_size + pos % page_size
        row = slot[:, None] * stride_slot + kvh * stride_head + offs_d[None, :]
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(Cache + row, mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        keep = (pos[None, :] <= q_pos[:, None]) & n_valid[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(Cache + stride_kind + row, mask=kv_mask, other=0.0)
        if DOT_F32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_rows = (q_start + offs_m).to(tl.int64)
    tl.store(Out + o_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def prefill_blocks(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for the prefill kernel: 64x64 tiles, smaller where shared memory runs short."""
    big = head_dim_block(head_dim) * (4 if dtype == torch.float32 else 2)
    if big >= 512:  # fp32 at D=128, or D=256: 64-row K and V tiles would not fit two stages
        return 32, 32
    return 64, 64


def prefill_attention(q: torch.Tensor, kv_layer: torch.Tensor, out: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                      first_seq: int, num_seqs: int, max_query_len: int, scale: float,
                      block_m: int | None = None, block_n: int | None = None) -> None:
    """Attention for sequences [first_seq, first_seq + num_seqs) of the batch, each a chunk of
    `query_lens` new tokens at the end of `seq_lens` context tokens, whose K/V (the new ones too) are
    already in `kv_layer`. Writes `out` rows of those sequences only.

    q, out: [T, Hq, D]; kv_layer: [2, pages, page_size, Hkv, D]; query_start_loc: [B+1] int32;
    seq_lens: [B] int32; block_tables: [B, max_pages] int32. `max_query_len` sizes the grid."""
    if num_seqs == 0 or max_query_len == 0:
        return
    _, _, page_size, hkv, D = kv_layer.shape
    hq = q.shape[1]
    bm, bn = prefill_blocks(D, q.dtype)
    bm, bn = block_m or bm, block_n or bn
    grid = (num_seqs, triton.cdiv(max_query_len, bm), hq)
    _prefill_kernel[grid](
        q, kv_layer, out, block_tables, query_start_loc, seq_lens, first_seq,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_layer.stride(0), kv_layer.stride(2), kv_layer.stride(3), block_tables.stride(0),
        scale * LOG2E, page_size,
        GROUP=hq // hkv, HEAD_DIM=D, BLOCK_D=head_dim_block(D), BLOCK_M=bm, BLOCK_N=bn,
        PRECISION=_precision(q.dtype), DOT_F32=_dot_f32(q.dtype), num_warps=4, num_stages=2)


# ---- (c) decode with split-KV: partitions of the context in parallel, then a reduce ---------------

@triton.jit
def _decode_split_kernel(Q, Cache, Out, MidO, MidLse, block_tables, query_start_loc, seq_lens,
                         stride_qt, stride_qh, stride_ot, stride_oh,
                         stride_kind, stride_slot, stride_head, stride_bt,
                         stride_mt, stride_mh, stride_ms, stride_lt, stride_lh,
                         scale_log2, page_size, part_len,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                         DIRECT: tl.constexpr, DOT_F32: tl.constexpr):
    # Program (i, kvh, s): decode sequence i, the GROUP q heads sharing kv head kvh, context
    # partition s. The q heads of a group ride in the rows of one tile so K/V are read once for all.
    #   context: | part 0 | part 1 | ... | part s: [s*part_len, min((s+1)*part_len, seq_len)) |
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + seq)
    start = split * part_len
    if start >= seq_len:  # a partition past this sequence's end; the reduce never reads it
        return
    end = tl.minimum(start + part_len, seq_len)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_valid = offs_g < GROUP
    d_valid = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    row_q = tl.load(query_start_loc + seq).to(tl.int64)
    q = tl.load(Q + row_q * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_valid[:, None] & d_valid[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt = block_tables + seq.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        n_valid = pos < end
        page = tl.load(bt + pos // page_size, mask=n_valid, other=0).to(tl.int64)
        slot = page * page_size + pos % page_size
        row = slot[:, None] * stride_slot + kvh * stride_head + offs_d[None, :]
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(Cache + row, mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(Cache + stride_kind + row, mask=kv_mask, other=0.0)
        if DOT_F32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]  # every partition that runs has at least one key, so l_i > 0
    mask = g_valid[:, None] & d_valid[None, :]
    if DIRECT:  # one partition: this is the answer
        tl.store(Out + row_q * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=mask)
    else:  # a partial answer and its log2-sum-exp2, merged by the reduce kernel
        base = seq.to(tl.int64) * stride_mt + split * stride_ms
        tl.store(MidO + base + heads[:, None] * stride_mh + offs_d[None, :], out, mask=mask)
        tl.store(MidLse + seq.to(tl.int64) * stride_lt + heads * stride_lh + split, m_i + tl.log2(l_i),
                 mask=g_valid)


@triton.jit
def _decode_reduce_kernel(MidO, MidLse, Out, query_start_loc, seq_lens,
                          stride_mt, stride_mh, stride_ms, stride_lt, stride_lh,
                          stride_ot, stride_oh, part_len,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    # Program (i, h): out = sum_s w_s * o_s / sum_s w_s with w_s = 2^(lse_s - max lse), over the
    # partitions that hold at least one key of sequence i.
    seq = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens + seq)
    n_parts = (seq_len + part_len - 1) // part_len
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_valid = offs_s < n_parts
    d_valid = offs_d < HEAD_DIM
    lse = tl.load(MidLse + seq.to(tl.int64) * stride_lt + h * stride_lh + offs_s, mask=s_valid,
                  other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    w = tl.where(s_valid, w, 0.0)
    o = tl.load(MidO + seq.to(tl.int64) * stride_mt + h * stride_mh + offs_s[:, None] * stride_ms
                + offs_d[None, :], mask=s_valid[:, None] & d_valid[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    row = tl.load(query_start_loc + seq).to(tl.int64)
    tl.store(Out + row * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_valid)


def decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, out: torch.Tensor,
                     query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                     num_seqs: int, max_seq_len: int, scale: float, num_splits: int | None = None,
                     part_len: int | None = None, num_sms: int | None = None, min_part_len: int = 256,
                     max_splits: int = 32, block_n: int | None = None) -> int:
    """Attention for the first `num_seqs` sequences of the batch, each one query token (row
    `query_start_loc[i]`) over its `seq_lens[i]` context tokens in `kv_layer`. Writes those rows of
    `out` only. Splits each context into partitions processed in parallel (see `decode_partition`;
    pass `num_splits`/`part_len` to force them) and merges them with a reduce kernel.
    Returns the number of splits used."""
    if num_seqs == 0:
        return 0
    _, _, page_size, hkv, D = kv_layer.shape
    hq = q.shape[1]
    group = hq // hkv
    bn = block_n or (32 if head_dim_block(D) >= 256 else 64)
    if part_len is None:
        if num_splits is None:
            if num_sms is None:
                num_sms = (torch.cuda.get_device_properties(q.device).multi_processor_count
                           if q.is_cuda else 8)
            num_splits, part_len = decode_partition(max_seq_len, num_seqs, hkv, num_sms, min_part_len,
                                                    max_splits, bn)
        else:
            part_len = -(-max_seq_len // num_splits)
    part_len = max(1, part_len)
    num_splits = -(-max_seq_len // part_len)
    BLOCK_D = head_dim_block(D)
    direct = num_splits == 1
    if direct:  # placeholders: the kernel does not touch them when DIRECT
        mid_o = mid_lse = out
        mstrides = (0, 0, 0, 0, 0)
    else:
        mid_o = torch.empty((num_seqs, hq, num_splits, BLOCK_D), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((num_seqs, hq, num_splits), dtype=torch.float32, device=q.device)
        mstrides = (mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1))
    _decode_split_kernel[(num_seqs, hkv, num_splits)](
        q, kv_layer, out, mid_o, mid_lse, block_tables, query_start_loc, seq_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_layer.stride(0), kv_layer.stride(2), kv_layer.stride(3), block_tables.stride(0),
        *mstrides, scale * LOG2E, page_size, part_len,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, BLOCK_D=BLOCK_D,
        BLOCK_N=bn, PRECISION=_precision(q.dtype), DIRECT=direct, DOT_F32=_dot_f32(q.dtype),
        num_warps=4, num_stages=2)
    if not direct:
        _decode_reduce_kernel[(num_seqs, hq)](
            mid_o, mid_lse, out, query_start_loc, seq_lens, *mstrides, out.stride(0), out.stride(1),
            part_len, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4)
    return num_splits


__all__ = ["store_kv", "prefill_attention", "decode_attention", "decode_partition", "head_dim_block",
           "prefill_blocks"]
