"""CPU linear layers through oneDNN with weights reordered once into its blocked layout.

torch's CPU `F.linear` goes to the BLAS it was built with, which on this project's machines (AMD
EPYC, AVX-512) reaches 50-100 GFLOP/s on one core; oneDNN's matmul on a pre-packed weight reaches
150-230 (benchmarks/cpu_ops_micro.py). Each oneDNN call costs ~12 us of fixed overhead, so tiny
products (a handful of rows through a small layer) stay on `F.linear`; the choice is per call, by
the size of the product.

The plain weight stays a Parameter (checkpoint names, tied embeddings and exports see an ordinary
Linear); the packed copy is an extra, unregistered tensor, so CPU linear weights take twice
their size in memory. Weights must not change after `pack_linears` (loading happens before it).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# Products with fewer multiply-adds than this (rows * in * out) run on F.linear: below it oneDNN's
# fixed cost outweighs its faster kernel (crossover measured at ~1M on one core).
MIN_PACKED_MACS = 1 << 20


class PackedLinear(nn.Module):
    """Drop-in for an `nn.Linear` on CPU: same parameters, forward through the packed weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters (ties survive)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() * self.out_features < MIN_PACKED_MACS:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packing_error(dtype: torch.dtype) -> str | None:
    """None when oneDNN can pack and multiply `dtype` weights on this machine, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN"
    try:
        w = torch.ones(8, 8, dtype=dtype)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=dtype),
                                                 torch.ops.mkldnn._reorder_linear_weight(w), None, "none", [], "")
        if not torch.equal(out.float(), torch.full((2, 8), 8.0)):
            return "oneDNN gave a wrong product"
        return None
    except RuntimeError as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear in a CPU model by a PackedLinear; returns how many were replaced
    (0 where oneDNN cannot take the model's dtype, which then keeps plain F.linear)."""
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if not linears:
        return 0
    why = packing_error(linears[0][1].weight.dtype)
    if why is not None:
        log.warning("linear layers stay on F.linear (oneDNN packing unavailable: %s)", why)
        return 0
    for name, m in linears:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, PackedLinear(m))
    return len(linears)
