"""The fused CPU layer ops (model/csrc/layer_ops.cpp) against transformers' own Llama pieces:
RMSNorm with and without the residual add, SiLU-and-mul, and RoPE in place on the q/k heads of a
fused qkv (strided), in fp32 and half precision; the two calls a decoder layer makes around its
attention against the same steps done one op at a time; and their shape checks. The model-level
agreement with transformers runs through these ops in test_model_parity.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from microserve.kernels.build import kernel_error
from microserve.model.layers import RMSNorm, RotaryEmbedding, silu_and_mul

pytestmark = pytest.mark.skipif(kernel_error() is not None, reason=f"CPU kernels unavailable: {kernel_error()}")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2),
       torch.float16: dict(rtol=1e-3, atol=1e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,hidden", [(1, 64), (16, 64), (300, 512), (7, 100)])
def test_rms_norm_matches_transformers(rows, hidden, dtype):
    g = torch.Generator().manual_seed(rows)
    x, res = torch.randn(rows, hidden, generator=g).to(dtype), torch.randn(rows, hidden, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    ours, theirs = RMSNorm(hidden, 1e-5).to(dtype), LlamaRMSNorm(hidden, 1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
        torch.testing.assert_close(ours(x), theirs(x), **TOL[dtype])
        # add-then-norm: the residual is updated in place to the sum, the sum is normalised
        stream = res.clone()
        normed, stream_out = ours(x, stream)
        assert stream_out.data_ptr() == stream.data_ptr()
        torch.testing.assert_close(stream, x + res, **TOL[dtype])
        torch.testing.assert_close(normed, theirs(x + res), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n", [(1, 172), (16, 172), (200, 1536)])
def test_silu_and_mul_matches_torch(rows, n, dtype):
    x = torch.randn(rows, 2 * n, generator=torch.Generator().manual_seed(n)).to(dtype)
    ref = F.silu(x[:, :n]) * x[:, n:]
    torch.testing.assert_close(silu_and_mul(x), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,nh,nkv", [(8, 8, 4), (32, 8, 4), (64, 4, 4), (128, 2, 1)])
def test_rope_in_place_on_fused_qkv_matches_transformers(d, nh, nkv, dtype):
    rope = RotaryEmbedding(d, 512, 10000.0, None)
    positions = torch.tensor([0, 1, 5, 77, 300, 511])
    t = len(positions)
    qkv = torch.randn(t, (nh + 2 * nkv) * d, generator=torch.Generator().manual_seed(d)).to(dtype)
    q = qkv[:, :nh * d].view(t, nh, d).transpose(0, 1)[None]  # transformers' [1, H, T, D]
    k = qkv[:, nh * d:(nh + nkv) * d].view(t, nkv, d).transpose(0, 1)[None]
    cos, sin = rope.cos[positions], -rope.sin_signed[positions, : d // 2].repeat(1, 2)
    q_ref, k_ref = apply_rotary_pos_emb(q.float(), k.float(), cos[None], sin[None])
    v_before = qkv[:, (nh + nkv) * d:].clone()
    view = qkv[:, :(nh + nkv) * d].view(t, nh + nkv, d)  # strided: a column block of qkv
    out = RotaryEmbedding.apply(view, *rope.table(positions, dtype))
    assert out.data_ptr() == qkv.data_ptr()  # rotated in place
    torch.testing.assert_close(out[:, :nh].float(), q_ref[0].transpose(0, 1), **TOL[dtype])
    torch.testing.assert_close(out[:, nh:].float(), k_ref[0].transpose(0, 1), **TOL[dtype])
    assert torch.equal(qkv[:, (nh + nkv) * d:], v_before)  # v untouched


def test_silu_and_mul_is_finite_at_extreme_inputs():
    """Large negative gates give ~0, not NaN (the kernel is built with -ffast-math, where an
    overflowing exp once made NaN of them), and large positive ones give the gate itself."""
    gate = torch.tensor([[-1e4, -100.0, -88.0, -20.0, 0.0, 20.0, 100.0, 1e4]])
    x = torch.cat([gate, torch.full_like(gate, 2.0)], dim=1)
    torch.testing.assert_close(silu_and_mul(x), F.silu(gate) * 2.0, rtol=1e-6, atol=1e-30)


def test_layer_ops_reject_bad_shapes():
    with pytest.raises(RuntimeError, match="rms_norm"):
        torch.ops.microserve.rms_norm(torch.randn(4, 8), None, torch.randn(7), 1e-5, torch.empty(4, 8))
    with pytest.raises(RuntimeError, match="residual must match"):
        torch.ops.microserve.rms_norm(torch.randn(4, 8), torch.randn(3, 8), torch.randn(8), 1e-5, torch.empty(4, 8))
    with pytest.raises(RuntimeError, match="silu_and_mul"):
        torch.ops.microserve.silu_and_mul(torch.randn(4, 9), torch.empty(4, 4))
    with pytest.raises(RuntimeError, match="rotary_embedding"):
        torch.ops.microserve.rotary_embedding(torch.randn(4, 2, 8), torch.randn(4, 6), torch.randn(4, 6))


def _weight(g: torch.Generator, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An nn.Linear-style weight [out, in] and its gemm_pack layout (what the fused ops take)."""
    w = torch.randn(n_out, n_in, generator=g) * n_in ** -0.5
    return w, torch.ops.microserve.gemm_pack(w)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("first_layer", [False, True])
@pytest.mark.parametrize("rows", [1, 16, 100])
def test_fused_layer_ops_match_the_separate_ops(rows, first_layer, bias):
    """norm_qkv_rope and oproj_norm_mlp against RMSNorm, F.linear, RoPE and SiLU-and-mul one at a
    time (the layer's unfused path), with and without a residual stream (layer 0 has none) and
    biases (Qwen2's qkv)."""
    g = torch.Generator().manual_seed(rows)
    hidden, nh, nkv, d, inter = 64, 8, 4, 8, 172
    nqkv = (nh + 2 * nkv) * d
    x, res = torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g)
    ln1, ln2 = RMSNorm(hidden, 1e-5), RMSNorm(hidden, 1e-6)
    with torch.no_grad():
        ln1.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=g))
        ln2.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=g))
    (w_qkv, p_qkv), (w_o, p_o), (w_gu, p_gu), (w_d, p_d) = (
        _weight(g, hidden, nqkv), _weight(g, nh * d, hidden), _weight(g, hidden, 2 * inter), _weight(g, inter, hidden))
    b = (lambda n: torch.randn(n, generator=g)) if bias else (lambda n: None)
    b_qkv, b_o, b_gu, b_d = b(nqkv), b(hidden), b(2 * inter), b(hidden)
    rope = RotaryEmbedding(d, 512, 10000.0, None)
    cos, sin = rope.table(torch.randint(0, 512, (rows,), generator=g), torch.float32)

    with torch.no_grad():
        stream = None if first_layer else res.clone()
        qkv = torch.ops.microserve.norm_qkv_rope(x, stream, ln1.weight, ln1.eps, p_qkv, b_qkv, cos, sin, nh + nkv, d)
        ref_stream = x.clone() if first_layer else res + x
        ref_qkv = F.linear(ln1(ref_stream), w_qkv, b_qkv)
        RotaryEmbedding.apply(ref_qkv[:, :(nh + nkv) * d].view(rows, nh + nkv, d), cos, sin)
        torch.testing.assert_close(qkv, ref_qkv, rtol=1e-5, atol=1e-5)
        if not first_layer:
            torch.testing.assert_close(stream, ref_stream, rtol=0, atol=0)

        attn = torch.randn(rows, nh * d, generator=g)
        stream = ref_stream.clone()
        out = torch.ops.microserve.oproj_norm_mlp(attn, stream, p_o, b_o, ln2.weight, ln2.eps, p_gu, b_gu, p_d, b_d)
        h, ref_stream = ln2(F.linear(attn, w_o, b_o), ref_stream.clone())
        ref = F.linear(silu_and_mul(F.linear(h, w_gu, b_gu)), w_d, b_d)
        torch.testing.assert_close(stream, ref_stream, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fused_layer_ops_reject_bad_shapes():
    x, w = torch.randn(4, 64), torch.randn(64, 128)
    cos = sin = torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match="gemm_pack's \\[64, N\\]"):
        torch.ops.microserve.norm_qkv_rope(x, None, torch.ones(64), 1e-5, torch.randn(63, 128), None, cos, sin, 12, 8)
    with pytest.raises(RuntimeError, match="residual must match x"):
        torch.ops.microserve.norm_qkv_rope(x, torch.randn(3, 64), torch.ones(64), 1e-5, w, None, cos, sin, 12, 8)
    with pytest.raises(RuntimeError, match="exceeds qkv"):
        torch.ops.microserve.norm_qkv_rope(x, None, torch.ones(64), 1e-5, w, None, cos, sin, 17, 8)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.microserve.norm_qkv_rope(x, None, torch.ones(64), 1e-5, w, torch.randn(127), cos, sin, 12, 8)
    with pytest.raises(RuntimeError, match="down_proj"):
        torch.ops.microserve.oproj_norm_mlp(x, x.clone(), torch.randn(64, 64), None, torch.ones(64), 1e-5,
                                            torch.randn(64, 344), None, torch.randn(170, 64), None)
