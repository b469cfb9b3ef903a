"""CPU linears through oneDNN's packed weights (model/packed_linear.py): the same products as
F.linear, the small-product path exactly F.linear, and an engine's model packed throughout with
its parameters (names, the tied lm_head) unchanged. The model-level agreement with transformers
runs through the packed path in test_model_parity.py."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from microserve.config import EngineConfig
from microserve.engine.engine import Engine
from microserve.model.packed_linear import MIN_PACKED_MACS, PackedLinear, packing_error

STORIES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "stories260K")
needs_onednn = pytest.mark.skipif(packing_error(torch.float32) is not None,
                                  reason=f"oneDNN packing unavailable: {packing_error(torch.float32)}")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 64, 300, 2048])
def test_packed_linear_matches_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    linear = nn.Linear(96, 200, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(200, 96, generator=g))
        if bias:
            linear.bias.copy_(torch.randn(200, generator=g))
    x = torch.randn(rows, 96, generator=g)
    ref = F.linear(x, linear.weight, linear.bias)
    out = PackedLinear(linear)(x)
    if x.numel() * 200 < MIN_PACKED_MACS:
        assert torch.equal(out, ref)  # small products take F.linear itself
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(packing_error(torch.bfloat16) is not None, reason="oneDNN bf16 unavailable")
def test_packed_linear_bf16():
    linear = nn.Linear(256, 512, bias=False).bfloat16()
    x = torch.randn(64, 256).bfloat16()
    out = PackedLinear(linear)(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x, linear.weight).float(), rtol=2e-2, atol=2e-2)


@needs_onednn
def test_engine_model_is_packed_with_its_parameters_unchanged():
    e = Engine(EngineConfig(model=STORIES, kv_transport="none", kv_cache_memory_mb=16))
    try:
        m = e.model
        assert not [n for n, mod in m.named_modules() if type(mod) is nn.Linear]
        packed = [n for n, mod in m.named_modules() if isinstance(mod, PackedLinear)]
        assert len(packed) == 4 * m.cfg.num_layers + 1  # qkv, o, gate_up, down per layer, lm_head
        assert m.lm_head.weight is m.embed_tokens.weight  # still tied
        names = {n for n, _ in m.named_parameters()}
        assert "layers.0.self_attn.qkv_proj.weight" in names and "embed_tokens.weight" in names
    finally:
        e.close()
