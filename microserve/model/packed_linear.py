"""CPU linear layers on weights laid out once, at load, for a faster GEMM than torch's F.linear.

torch's CPU `F.linear` goes to the BLAS it was built with, which on this project's machines (AMD
EPYC, AVX-512) reaches 50-100 GFLOP/s on one core. Two faster routes, picked once per model:

- fp32 with the CPU kernel library loaded (the default CPU path): `torch.ops.microserve.linear`,
  oneDNN's brgemm micro-kernels over output tiles (model/csrc/gemm.cpp) on the weight stored
  transposed in column blocks, ~200 GFLOP/s from 16 rows up at ~1 us per call. The fused layer ops
  (model/csrc/layer_ops.cpp) use the same GEMM and the same `weight_t`.
- otherwise (bf16/fp16, or `--attention-backend torch`, which builds nothing): oneDNN's matmul on
  a weight reordered into its blocked layout, 150-230 GFLOP/s, but ~12 us of fixed cost per call,
  so tiny products (a handful of rows through a small layer) stay on `F.linear`.

The plain weight stays a Parameter (checkpoint names, tied embeddings and exports see an ordinary
Linear); the laid-out copy is an extra, unregistered tensor, so CPU linear weights take twice
their size in memory. Weights must not change after `pack_linears` (loading happens before it).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from microserve.kernels.build import kernels_loaded

log = logging.getLogger(__name__)

# Products with fewer multiply-adds than this (rows * in * out) run on F.linear: below it oneDNN's
# fixed cost outweighs its faster kernel (crossover measured at ~1M on one core).
MIN_PACKED_MACS = 1 << 20


class PackedLinear(nn.Module):
    """Drop-in for an `nn.Linear` on CPU: same parameters, forward through the laid-out weight.
    `weight_t` is set on the brgemm route, else None: the weight transposed, [in, out], with its
    elements in the GEMM's block order (model/csrc/gemm.h), so not usable as a plain matrix."""

    def __init__(self, linear: nn.Linear, kernel: bool | None = None) -> None:
        """kernel: take the brgemm route (needs fp32 and the kernel library); None: wherever it can."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters (ties survive)
        w = self.weight.detach()
        if kernel is None:
            kernel = brgemm_route(w.dtype)
        self.weight_t = torch.ops.microserve.gemm_pack(w) if kernel and brgemm_route(w.dtype) else None
        self.packed = None if self.weight_t is not None else torch.ops.mkldnn._reorder_linear_weight(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_t is not None:
            out = torch.ops.microserve.linear(x.reshape(-1, self.in_features), self.weight_t, self.bias)
            return out.view(*x.shape[:-1], self.out_features)
        if x.numel() * self.out_features < MIN_PACKED_MACS:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def brgemm_route(dtype: torch.dtype) -> bool:
    """Whether fp32 linears of this process go through `torch.ops.microserve.linear`."""
    return dtype == torch.float32 and kernels_loaded()


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


def pack_linears(model: nn.Module, backend: str = "auto") -> dict:
    """Replace every nn.Linear in a CPU model by a PackedLinear. `backend` picks the route of fp32
    linears when the kernel library is loaded: `kernel` (brgemm, and with it the fused layer ops),
    `torch` (oneDNN matmul / F.linear), or `auto`: brgemm only where it measures at least as fast
    as the torch route here (kernels/selection.py), decided for the decoder layers' linears together
    and for each other weight shape (lm_head) alone. Returns the choices by group, for the log
    (empty where oneDNN cannot take the dtype and F.linear stays)."""
    from microserve.kernels.selection import Choice, choose_layer, choose_linear
    if backend not in ("auto", "kernel", "torch"):
        raise ValueError(f"unknown linear backend {backend!r} (choose auto, kernel or torch)")
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if not linears:
        return {}
    dtype = linears[0][1].weight.dtype
    if backend == "kernel" and not brgemm_route(dtype):
        raise ValueError(f"--linear-backend kernel needs fp32 weights and the CPU kernel library "
                         f"(dtype {str(dtype).removeprefix('torch.')}, kernels loaded: {kernels_loaded()})")
    why = None if brgemm_route(dtype) else packing_error(dtype)
    if why is not None:
        log.warning("linear layers stay on F.linear (oneDNN packing unavailable: %s)", why)
        return {}
    group = lambda name: "layers" if name.startswith("layers.") else name  # noqa: E731
    choices: dict[str, Choice] = {}
    for name, m in linears:
        g = group(name)
        if g in choices:
            continue
        if not brgemm_route(dtype):
            choices[g] = Choice(False, how="unavailable")
        elif backend != "auto":
            choices[g] = Choice(backend == "kernel", how="forced")
        elif g == "layers":  # a whole decoder layer: the brgemm route also turns on the fused layer ops
            choices[g] = choose_layer(model.layers[0], model.rotary, dtype)
        else:
            choices[g] = choose_linear((m.in_features, m.out_features, m.bias is not None), dtype)
    pack_module(model, lambda name: choices[group(name)].use)
    return choices


def pack_module(module: nn.Module, kernel: Callable[[str], bool]) -> None:
    """Replace each nn.Linear under `module` by a PackedLinear, on the brgemm route where kernel(its name)."""
    for name, m in [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear]:
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, PackedLinear(m, kernel=kernel(name)))
