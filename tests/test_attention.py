"""The CPU attention backends agree with fp32 SDPA over the same paged context:
- the torch backend's half-precision decode path (two matmuls, fp32 softmax);
- the compiled paged decode and prefill kernels (cpu backend), for several head dims, GQA ratios,
  page sizes and lengths (prefill: fresh prompts around the kernel's block edges and chunks over a
  cached prefix), with every output element written, together in one mixed batch, on bf16/fp16
  pools, and refusing inputs that would read out of bounds."""
from __future__ import annotations

import pytest
import torch

from microserve.attention.base import AttentionMetadata, ForwardContext
from microserve.attention.cpu_backend import CPUPagedBackend
from microserve.kernels.build import kernel_error
from microserve.attention.torch_backend import TorchSDPABackend

needs_kernel = pytest.mark.skipif(kernel_error() is not None, reason=f"CPU kernel unavailable: {kernel_error()}")


def varlen_batch(qlens, slens, hq, hkv, d, ps, seed=0, num_decodes=0):
    """q/k/v for query_lens[i] new tokens at the end of each sequence's slens[i]-token context, over
    a random paged pool whose page order is shuffled, and the runner-style metadata."""
    g = torch.Generator().manual_seed(seed)
    b, width = len(slens), max(-(-n // ps) for n in slens)
    pages = b * width + 3
    kv = torch.randn(1, 2, pages, ps, hkv, d, generator=g)
    tables = torch.randperm(pages, generator=g)[:b * width].view(b, width).int()
    slots = torch.tensor([int(tables[i, t // ps]) * ps + t % ps
                          for i, (ql, sl) in enumerate(zip(qlens, slens)) for t in range(sl - ql, sl)])
    t = sum(qlens)
    q = torch.randn(t, hq, d, generator=g)
    k_new, v_new = (torch.randn(t, hkv, d, generator=g) for _ in range(2))
    starts = [0]
    for ql in qlens:
        starts.append(starts[-1] + ql)
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.tensor(starts, dtype=torch.int32),
                             seq_lens=torch.tensor(slens, dtype=torch.int32), block_tables=tables,
                             query_lens_cpu=list(qlens), seq_lens_cpu=list(slens), num_decodes=num_decodes,
                             page_size=ps)
    return q, k_new, v_new, kv, meta


def decode_batch(lens, hq, hkv, d, ps, seed=0):
    return varlen_batch([1] * len(lens), lens, hq, hkv, d, ps, seed, num_decodes=len(lens))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_half_decode_matches_fp32(dtype, hq, hkv):
    q, k_new, v_new, kv, meta = decode_batch([5, 37, 130, 64], hq, hkv, 64, 16)
    backend = TorchSDPABackend(num_heads=hq, num_kv_heads=hkv, head_dim=64, scale=64 ** -0.5)
    ref = backend.forward(0, q, k_new, v_new, ForwardContext(meta, kv.clone()))
    out = backend.forward(0, q.to(dtype), k_new.to(dtype), v_new.to(dtype), ForwardContext(meta, kv.to(dtype)))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert (out.float() - ref).abs().max() < 0.05  # a wrong mask or head grouping is off by ~1


@needs_kernel
@pytest.mark.parametrize("d", [8, 24, 32, 64, 128])  # 24 takes the generic loop, the rest are specialised
# 12/2 and 32/8: more query heads per work item than one 8-head score vector, padded or not
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1), (12, 2), (32, 8)])
@pytest.mark.parametrize("ps", [1, 16, 32])
def test_cpu_kernel_decode_matches_torch(d, hq, hkv, ps):
    q, k_new, v_new, kv, meta = decode_batch([1, 5, 37, 130, 64, ps, ps + 1], hq, hkv, d, ps)
    scale = d ** -0.5
    ref = TorchSDPABackend(hq, hkv, d, scale).forward(0, q, k_new, v_new, ForwardContext(meta, kv.clone()))
    pool = kv.clone()
    out = CPUPagedBackend(hq, hkv, d, scale).forward(0, q, k_new, v_new, ForwardContext(meta, pool))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Called directly into a NaN-poisoned buffer, with q a strided view as the model passes it (the
    # q heads of a fused qkv): every element is written, from the right q elements.
    poisoned = torch.full_like(q, float("nan"))
    fused = torch.cat([q, torch.full((q.shape[0], hkv, d), float("nan"))], dim=1)
    torch.ops.microserve.paged_decode_attention(fused[:, :hq], pool[0], meta.block_tables, meta.seq_lens, scale,
                                                poisoned)
    torch.testing.assert_close(poisoned, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernel_decode_one_sequence_split_by_kv_head(threads):
    """With fewer sequences than threads, a work item is one kv head (its G query heads)."""
    q, k_new, v_new, kv, meta = decode_batch([300], 8, 4, 32, 16)
    ref = TorchSDPABackend(8, 4, 32, 32 ** -0.5).forward(0, q, k_new, v_new, ForwardContext(meta, kv.clone()))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = CPUPagedBackend(8, 4, 32, 32 ** -0.5).forward(0, q, k_new, v_new, ForwardContext(meta, kv.clone()))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,hq,hkv", [(32, 8, 4), (64, 4, 4), (24, 8, 2)])
def test_cpu_kernel_half_decode_matches_fp32(dtype, d, hq, hkv):
    """Half-precision pools: K/V widened to fp32 as read, so the result is the fp32 one rounded
    (against the torch backend's fp32 SDPA on the same rounded inputs)."""
    q, k_new, v_new, kv, meta = decode_batch([1, 5, 37, 130, 64], hq, hkv, d, 16)
    q, k_new, v_new, kv = (t.to(dtype) for t in (q, k_new, v_new, kv))
    ref = TorchSDPABackend(hq, hkv, d, d ** -0.5).forward(
        0, q.float(), k_new.float(), v_new.float(), ForwardContext(meta, kv.float()))
    out = CPUPagedBackend(hq, hkv, d, d ** -0.5).forward(0, q, k_new, v_new, ForwardContext(meta, kv.clone()))
    assert out.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # one rounding of outputs of magnitude < 4
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


# Fresh prompts on and around the kernel's 64-token blocks, and chunks over a cached prefix.
PREFILL_QLENS, PREFILL_SLENS = [1, 63, 64, 65, 200, 5, 64, 1, 30], [1, 63, 64, 65, 200, 130, 96, 37, 30]


@needs_kernel
@pytest.mark.parametrize("d", [8, 24, 32, 64, 128])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("ps", [1, 16, 32])
def test_cpu_kernel_prefill_matches_torch(d, hq, hkv, ps):
    q, k_new, v_new, kv, meta = varlen_batch(PREFILL_QLENS, PREFILL_SLENS, hq, hkv, d, ps)
    scale = d ** -0.5
    ref = TorchSDPABackend(hq, hkv, d, scale).forward(0, q, k_new, v_new, ForwardContext(meta, kv.clone()))
    pool = kv.clone()
    out = CPUPagedBackend(hq, hkv, d, scale).forward(0, q, k_new, v_new, ForwardContext(meta, pool))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Called directly, into a NaN-poisoned buffer, with q a strided view as the model passes it
    # (the q heads of a fused qkv): every row is written, from the right q elements.
    fused = torch.cat([q, torch.full((q.shape[0], hkv, d), float("nan"))], dim=1)
    poisoned = torch.full_like(q, float("nan"))
    torch.ops.microserve.paged_prefill_attention(fused[:, :hq], pool[0], meta.block_tables, meta.query_start_loc,
                                                 meta.seq_lens, scale, poisoned)
    torch.testing.assert_close(poisoned, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("seed", range(12))
def test_cpu_kernels_random_mixed_batches_match_torch(seed):
    """Random runner-shaped batches (decodes, fresh prompts, chunks over cached prefixes) with
    random page sizes, head dims and GQA ratios: both kernels against the torch backend."""
    import random
    rnd = random.Random(seed)
    ps, d = rnd.choice([1, 4, 16, 32]), rnd.choice([8, 32, 64])
    hkv = rnd.choice([1, 2, 4])
    hq = hkv * rnd.choice([1, 2, 4])
    nd = rnd.randint(0, 4)
    slens = [rnd.randint(1, 300) for _ in range(nd + rnd.randint(1, 4))]
    qlens = [1] * nd + [rnd.randint(1, sl) for sl in slens[nd:]]
    q, k_new, v_new, kv, meta = varlen_batch(qlens, slens, hq, hkv, d, ps, seed=seed, num_decodes=nd)
    ref = TorchSDPABackend(hq, hkv, d, d ** -0.5).forward(0, q, k_new, v_new, ForwardContext(meta, kv.clone()))
    out = CPUPagedBackend(hq, hkv, d, d ** -0.5).forward(0, q, k_new, v_new, ForwardContext(meta, kv.clone()))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,hq,hkv", [(32, 8, 4), (24, 8, 2)])
def test_cpu_kernel_half_prefill_matches_fp32(dtype, d, hq, hkv):
    q, k_new, v_new, kv, meta = varlen_batch(PREFILL_QLENS, PREFILL_SLENS, hq, hkv, d, 16)
    q, k_new, v_new, kv = (t.to(dtype) for t in (q, k_new, v_new, kv))
    ref = TorchSDPABackend(hq, hkv, d, d ** -0.5).forward(
        0, q.float(), k_new.float(), v_new.float(), ForwardContext(meta, kv.float()))
    out = CPUPagedBackend(hq, hkv, d, d ** -0.5).forward(0, q, k_new, v_new, ForwardContext(meta, kv.clone()))
    assert out.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@needs_kernel
def test_cpu_backend_mixed_batch_matches_torch():
    """Decodes first, then a prefill chunk over a cached prefix and a fresh prompt, as the runner
    lays them out: the decode rows go to one kernel, the rest to the other, and all rows agree
    with the torch backend."""
    hq, hkv, d = 8, 2, 32
    q, k_new, v_new, kv, meta = varlen_batch([1, 1, 7, 12], [40, 3, 30, 12], hq, hkv, d, 16, seed=1, num_decodes=2)
    ref = TorchSDPABackend(hq, hkv, d, d ** -0.5).forward(0, q, k_new, v_new, ForwardContext(meta, kv.clone()))
    out = CPUPagedBackend(hq, hkv, d, d ** -0.5).forward(0, q, k_new, v_new, ForwardContext(meta, kv.clone()))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_cpu_kernel_rejects_bad_input():
    q, _, _, kv, meta = decode_batch([5, 20], 4, 2, 32, 16)
    out = torch.empty_like(q)
    op = torch.ops.microserve.paged_decode_attention
    with pytest.raises(RuntimeError, match="outside"):  # a length beyond the block table would read past it
        op(q, kv[0], meta.block_tables, torch.tensor([5, 33], dtype=torch.int32), 1.0, out)
    with pytest.raises(RuntimeError, match="share one dtype"):
        op(q.bfloat16(), kv[0], meta.block_tables, meta.seq_lens, 1.0, out)
    with pytest.raises(RuntimeError, match="supports fp32, bf16 and fp16"):
        op(q.double(), kv[0].double(), meta.block_tables, meta.seq_lens, 1.0, out.double())
    with pytest.raises(RuntimeError, match="int32"):
        op(q, kv[0], meta.block_tables.long(), meta.seq_lens, 1.0, out)


@needs_kernel
def test_cpu_prefill_kernel_rejects_bad_input():
    q, _, _, kv, meta = varlen_batch([5, 20], [5, 30], 4, 2, 32, 16)
    out = torch.empty_like(q)
    op = torch.ops.microserve.paged_prefill_attention
    tables, qsl, lens = meta.block_tables, meta.query_start_loc, meta.seq_lens
    with pytest.raises(RuntimeError, match="outside"):  # beyond the block table
        op(q, kv[0], tables, qsl, torch.tensor([5, 33], dtype=torch.int32), 1.0, out)
    with pytest.raises(RuntimeError, match="outside"):  # fewer context tokens than new ones
        op(q, kv[0], tables, qsl, torch.tensor([4, 30], dtype=torch.int32), 1.0, out)
    with pytest.raises(RuntimeError, match="must rise"):
        op(q, kv[0], tables, torch.tensor([0, 5, 5], dtype=torch.int32), lens, 1.0, out)
    with pytest.raises(RuntimeError, match="must rise"):  # past the end of q
        op(q, kv[0], tables, torch.tensor([0, 5, 26], dtype=torch.int32), lens, 1.0, out)
    with pytest.raises(RuntimeError, match="share one dtype"):
        op(q.bfloat16(), kv[0], tables, qsl, lens, 1.0, out)
    with pytest.raises(RuntimeError, match="batch mismatch"):
        op(q, kv[0], tables, qsl[:2], lens, 1.0, out)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_store_kv_matches_index_copy(dtype):
    """The kernel's K/V store (one call) writes exactly what torch's two index_copy_ calls write,
    from k and v given as column blocks of a fused qkv, and refuses a slot outside the pool."""
    from microserve.attention.torch_backend import store_kv
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(2, 12, 4, 2, 8, generator=g).to(dtype)  # [2, pages, page_size, Hkv, D]
    qkv = torch.randn(5, (4 + 2 + 2) * 8, generator=g).to(dtype)
    k, v = qkv[:, 32:48].view(5, 2, 8), qkv[:, 48:].view(5, 2, 8)
    slots = torch.tensor([0, 7, 13, 46, 47])
    ref = pool.clone()
    store_kv(ref, k, v, slots)
    torch.ops.microserve.store_kv(pool, k, v, slots)
    assert torch.equal(pool, ref)
    with pytest.raises(RuntimeError, match="slot 48 is outside"):
        torch.ops.microserve.store_kv(pool, k, v, torch.tensor([0, 1, 2, 3, 48]))
    with pytest.raises(RuntimeError, match="like the pool's rows"):
        torch.ops.microserve.store_kv(pool, k[:, :1], v[:, :1], slots)
