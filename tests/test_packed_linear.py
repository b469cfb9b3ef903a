"""CPU linears on laid-out weights (model/packed_linear.py): on both routes (the kernel library's
brgemm GEMM for fp32, oneDNN's packed weights otherwise) the same products as F.linear, the
oneDNN route's small products exactly F.linear, and an engine's model laid out throughout with its
parameters (names, the tied lm_head) unchanged. The model-level agreement with transformers runs
through the default route (brgemm, with the fused layer ops) in test_model_parity.py."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from microserve.config import EngineConfig
from microserve.engine.engine import Engine
from microserve.kernels.build import kernel_error
from microserve.model import packed_linear
from microserve.model.packed_linear import MIN_PACKED_MACS, PackedLinear, packing_error

STORIES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "stories260K")
needs_onednn = pytest.mark.skipif(packing_error(torch.float32) is not None,
                                  reason=f"oneDNN packing unavailable: {packing_error(torch.float32)}")


needs_kernels = pytest.mark.skipif(kernel_error() is not None, reason=f"no CPU kernels: {kernel_error()}")


def _linear(rows: int, bias: bool, in_features: int = 96, out_features: int = 200):
    g = torch.Generator().manual_seed(rows)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g))
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=g))
    return linear, torch.randn(rows, in_features, generator=g)


@needs_kernels
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 16, 64, 65, 300, 2048])
@pytest.mark.parametrize("in_features", [96, 1100])
def test_brgemm_route_matches_f_linear(rows, bias, in_features):
    # 600 outputs: two full 256-column blocks and an edge; rows cross the 64-row tiles; 1100 inputs
    # take three 512-wide K slices, the last one short
    linear, x = _linear(rows, bias, in_features, out_features=600)
    packed = PackedLinear(linear)
    assert packed.weight_t is not None and packed.packed is None
    tol = dict(rtol=1e-5, atol=1e-4 * (in_features / 96) ** 0.5)  # sums of ~in_features unit products
    torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), **tol)
    wide = torch.randn(rows, 3 * in_features)[:, in_features:2 * in_features]  # rows of a wider tensor
    torch.testing.assert_close(packed(wide), F.linear(wide, linear.weight, linear.bias), **tol)
    assert packed(x.view(1, rows, in_features)).shape == (1, rows, 600)  # and a 3-d input


@needs_kernels
def test_brgemm_linear_rejects_bad_inputs():
    w_t = torch.ops.microserve.gemm_pack(torch.randn(200, 96))
    with pytest.raises(RuntimeError, match="w_packed"):
        torch.ops.microserve.linear(torch.randn(4, 95), w_t, None)
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.microserve.linear(torch.randn(4, 96).double(), w_t, None)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.microserve.linear(torch.randn(4, 96), w_t, torch.randn(199))


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 64, 300, 2048])
def test_onednn_route_matches_f_linear(rows, bias, monkeypatch):
    monkeypatch.setattr(packed_linear, "kernels_loaded", lambda: False)  # as under --attention-backend torch
    linear, x = _linear(rows, bias)
    ref = F.linear(x, linear.weight, linear.bias)
    packed = PackedLinear(linear)
    assert packed.weight_t is None
    out = packed(x)
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
@pytest.mark.parametrize("backend", ["auto", "kernel", "torch"])
def test_engine_model_is_packed_with_its_parameters_unchanged(backend):
    if backend == "kernel" and kernel_error() is not None:
        with pytest.raises(ValueError, match="linear-backend kernel needs"):
            Engine(EngineConfig(model=STORIES, kv_transport="none", kv_cache_memory_mb=16, linear_backend=backend))
        return
    e = Engine(EngineConfig(model=STORIES, kv_transport="none", kv_cache_memory_mb=16, linear_backend=backend))
    try:
        m = e.model
        assert not [n for n, mod in m.named_modules() if type(mod) is nn.Linear]
        packed = [n for n, mod in m.named_modules() if isinstance(mod, PackedLinear)]
        assert len(packed) == 4 * m.cfg.num_layers + 1  # qkv, o, gate_up, down per layer, lm_head
        routes = {n: m.get_submodule(n).weight_t is not None for n in packed}
        if backend == "kernel":  # forced: every fp32 weight laid out for the library's GEMM
            assert all(routes.values())
        elif backend == "torch":
            assert not any(routes.values())
        # auto decides for the decoder layers together (their fused ops need every weight laid out)
        layer_routes = {v for n, v in routes.items() if n.startswith("layers.")}
        assert len(layer_routes) == 1
        assert all((layer.fused is not None) == layer_routes.pop() for layer in m.layers[:1])
        assert all((layer.fused is not None) == routes["layers.0.mlp.down_proj"] for layer in m.layers)
        assert m.lm_head.weight is m.embed_tokens.weight  # still tied
        names = {n for n, _ in m.named_parameters()}
        assert "layers.0.self_attn.qkv_proj.weight" in names and "embed_tokens.weight" in names
    finally:
        e.close()
