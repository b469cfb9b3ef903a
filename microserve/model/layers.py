"""Building blocks shared by the Llama family. Numerics follow transformers so fp32 logits agree.

On the CPU, RMSNorm (with its residual add), SiLU-and-mul and RoPE go to fused kernels
(model/csrc/layer_ops.cpp, one library with the attention kernels) once that library is loaded,
which the cpu attention backend does (the CPU default; `--attention-backend torch` does not): at
serving batch sizes of a small model each torch op costs its dispatch, not its arithmetic.
Elsewhere (CUDA, the torch backend, no compiler) the same functions run as torch ops.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from microserve.kernels.build import kernels_loaded


def _cpu_kernels(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and kernels_loaded()


class RMSNorm(nn.Module):
    """x -> weight * x / rms(x). With `residual`, adds x into it first (in place on the CPU path) and
    normalises the sum: `(normed, residual)` is returned, the pre-norm block's "add, then norm"."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if _cpu_kernels(x):
            out = torch.empty_like(x)
            torch.ops.microserve.rms_norm(x, residual, self.weight, self.eps, out)
            return out if residual is None else (out, residual)
        if residual is not None:
            residual = x = x + residual
        dtype = x.dtype
        h = x.float()
        h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return h if residual is None else (h, residual)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if _cpu_kernels(gate_up):
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
        torch.ops.microserve.silu_and_mul(gate_up, out)
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return nn.functional.silu(gate) * up


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies, with llama3's piecewise rescaling of long wavelengths when asked."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate-half) RoPE with a precomputed cos/sin table indexed by position.

    `table(positions)` looks the rows up once per forward; `apply` then rotates q and k of every layer
    with three elementwise ops: rotate_half(x) * sin == roll(x, D/2) * [-sin, sin] (the sign moved
    from x to sin is exact), so the torch path is bit-identical to transformers' formula (the CPU
    kernel computes the same expression, to rounding)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", torch.cat([freqs, freqs], dim=-1).cos(), persistent=False)
        self.register_buffer("sin_signed", torch.cat([-freqs.sin(), freqs.sin()], dim=-1), persistent=False)

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin rows for `positions` ([T]), shaped for `apply`: [T, D] fp32 for the
        CPU kernel, else [T, 1, D] in `dtype` (cast once per forward, not per layer)."""
        cos, sin_signed = self.cos[positions], self.sin_signed[positions]
        if _cpu_kernels(positions):
            return cos, sin_signed
        return cos.unsqueeze(1).to(dtype), sin_signed.unsqueeze(1).to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D] (any row/head strides), cos/sin_signed from `table` -> x rotated: in
        place on the CPU kernel path (x is returned), a rotated copy otherwise."""
        if _cpu_kernels(x):
            torch.ops.microserve.rotary_embedding(x, cos, sin_signed)
            return x
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed
