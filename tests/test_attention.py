"""The CPU attention backends agree with fp32 SDPA over the same paged context:
- the torch backend's half-precision decode path (two matmuls, fp32 softmax);
- the compiled paged decode kernel (cpu backend), for several head dims, GQA ratios, page sizes and
  lengths, with every output element written, alone and in a batch that also has prefill chunks,
  and on bf16/fp16 pools."""
from __future__ import annotations

import pytest
import torch

from microserve.attention.base import AttentionMetadata, ForwardContext
from microserve.attention.cpu_backend import CPUPagedBackend, kernel_error
from microserve.attention.torch_backend import TorchSDPABackend

needs_kernel = pytest.mark.skipif(kernel_error() is not None, reason=f"CPU kernel unavailable: {kernel_error()}")


def decode_batch(lens, hq, hkv, d, ps, seed=0):
    """q/k/v for one decode token per sequence over a random paged pool, and its metadata."""
    g = torch.Generator().manual_seed(seed)
    b, width = len(lens), max(-(-n // ps) for n in lens)
    pages = b * width + 3
    kv = torch.randn(1, 2, pages, ps, hkv, d, generator=g)
    tables = torch.randperm(pages, generator=g)[:b * width].view(b, width).int()
    slots = torch.tensor([int(tables[i, (n - 1) // ps]) * ps + (n - 1) % ps for i, n in enumerate(lens)])
    q = torch.randn(b, hq, d, generator=g)
    k_new, v_new = (torch.randn(b, hkv, d, generator=g) for _ in range(2))
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.arange(b + 1, dtype=torch.int32),
                             seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=tables,
                             query_lens_cpu=[1] * b, seq_lens_cpu=list(lens), num_decodes=b, page_size=ps)
    return q, k_new, v_new, kv, meta


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
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("ps", [1, 16, 32])
def test_cpu_kernel_decode_matches_torch(d, hq, hkv, ps):
    q, k_new, v_new, kv, meta = decode_batch([1, 5, 37, 130, 64, ps, ps + 1], hq, hkv, d, ps)
    scale = d ** -0.5
    ref = TorchSDPABackend(hq, hkv, d, scale).forward(0, q, k_new, v_new, ForwardContext(meta, kv.clone()))
    pool = kv.clone()
    out = CPUPagedBackend(hq, hkv, d, scale).forward(0, q, k_new, v_new, ForwardContext(meta, pool))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Called directly into a NaN-poisoned buffer: every element is written.
    poisoned = torch.full_like(q, float("nan"))
    torch.ops.microserve.paged_decode_attention(q, pool[0], meta.block_tables, meta.seq_lens, scale, poisoned)
    torch.testing.assert_close(poisoned, ref, rtol=1e-5, atol=1e-5)


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


@needs_kernel
def test_cpu_backend_mixed_batch_matches_torch():
    """Decodes first, then a prefill chunk over a cached prefix and a fresh prompt, as the runner
    lays them out: only the decode rows go to the kernel, and all rows agree with the torch backend."""
    hq, hkv, d, ps = 8, 2, 32, 16
    g = torch.Generator().manual_seed(1)
    qlens, slens = [1, 1, 7, 12], [40, 3, 30, 12]
    width, b = 3, 4
    kv = torch.randn(1, 2, 16, ps, hkv, d, generator=g)
    tables = torch.randperm(16, generator=g)[:b * width].view(b, width).int()
    slots = torch.tensor([int(tables[i, t // ps]) * ps + t % ps
                          for i, (ql, sl) in enumerate(zip(qlens, slens)) for t in range(sl - ql, sl)])
    t = sum(qlens)
    q = torch.randn(t, hq, d, generator=g)
    k_new, v_new = (torch.randn(t, hkv, d, generator=g) for _ in range(2))
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.tensor([0, 1, 2, 9, 21], dtype=torch.int32),
                             seq_lens=torch.tensor(slens, dtype=torch.int32), block_tables=tables,
                             query_lens_cpu=qlens, seq_lens_cpu=slens, num_decodes=2, page_size=ps)
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
def test_cpu_kernel_build_survives_a_stale_lock(tmp_path):
    """A builder killed mid-build leaves cpp_extension's lock file behind; the next start must build
    anyway instead of waiting on it forever (this builds the kernel once more, in tmp_path)."""
    import os
    import subprocess
    import sys

    from microserve.attention.cpu_backend import _build_name

    (tmp_path / _build_name()).mkdir()
    (tmp_path / _build_name() / "lock").touch()
    code = "from microserve.attention.cpu_backend import kernel_error; print(kernel_error())"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)},
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr[-2000:]
