"""The torch attention backend: its half-precision decode path (two matmuls, fp32 softmax) agrees
with fp32 SDPA on the same paged context, for GQA and several lengths per batch."""
from __future__ import annotations

import pytest
import torch

from microserve.attention.base import AttentionMetadata, ForwardContext
from microserve.attention.torch_backend import TorchSDPABackend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_half_decode_matches_fp32(dtype, hq, hkv):
    g = torch.Generator().manual_seed(0)
    d, ps, pages = 64, 16, 40
    lens = [5, 37, 130, 64]
    b = len(lens)
    kv = torch.randn(1, 2, pages, ps, hkv, d, generator=g)
    tables = torch.randperm(pages, generator=g)[:b * 9].view(b, 9).int()
    slots = torch.tensor([int(tables[i, (n - 1) // ps]) * ps + (n - 1) % ps for i, n in enumerate(lens)])
    q = torch.randn(b, hq, d, generator=g)
    k_new, v_new = (torch.randn(b, hkv, d, generator=g) for _ in range(2))
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.arange(b + 1, dtype=torch.int32),
                             seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=tables,
                             query_lens_cpu=[1] * b, seq_lens_cpu=lens, num_decodes=b, page_size=ps)
    backend = TorchSDPABackend(num_heads=hq, num_kv_heads=hkv, head_dim=d, scale=d ** -0.5)
    ref = backend.forward(0, q, k_new, v_new, ForwardContext(meta, kv.clone()))
    out = backend.forward(0, q.to(dtype), k_new.to(dtype), v_new.to(dtype), ForwardContext(meta, kv.to(dtype)))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert (out.float() - ref).abs().max() < 0.05  # a wrong mask or head grouping is off by ~1
