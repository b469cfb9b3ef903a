"""The CPU default: compiled attention kernels that read the paged pool in place, one for decode
(csrc/paged_decode.cpp) and one for prefill chunks (csrc/paged_prefill.cpp), and one call that
stores a step's new K/V (csrc/store_kv.cpp).

They are part of the CPU kernel library, built on first use and cached per machine
(microserve/kernels/build.py). Where it cannot be built, `auto` falls back to the pure torch
backend, which gives the same results more slowly.
"""
from __future__ import annotations

import torch

from microserve.attention.base import AttentionMetadata
from microserve.attention.torch_backend import TorchSDPABackend
from microserve.kernels.build import kernel_error

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CPUPagedBackend(TorchSDPABackend):
    """TorchSDPABackend with both phases served by compiled kernels that read the paged pool in
    place (no gather, no padding, GQA by indexing): `torch.ops.microserve.paged_decode_attention`
    for decodes and `paged_prefill_attention` for prefill chunks, cached prefixes included.
    fp32, bf16 and fp16 (math in fp32); a pool whose dtype differs from q's takes the torch path."""

    name = "cpu"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 use_decode: bool = True, use_prefill: bool = True) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        # Per phase, whether its kernel runs or the torch path does: `--attention-backend auto` sets
        # them from a start-up measurement on this machine (kernels/selection.py).
        self.use_decode, self.use_prefill = use_decode, use_prefill
        why = kernel_error()
        if why is not None:
            raise RuntimeError(f"the CPU attention kernels could not be built ({why}); use --attention-backend torch")

    @staticmethod
    def _fits(q: torch.Tensor, kv_layer: torch.Tensor) -> bool:
        return q.dtype in _KERNEL_DTYPES and kv_layer.dtype == q.dtype and q.device.type == "cpu"

    def _store(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        if not self._fits(k, kv_layer) or k.stride(-1) != 1 or k.stride(1) != k.shape[2] or v.stride(1) != v.shape[2]:
            super()._store(kv_layer, k, v, meta)
            return
        torch.ops.microserve.store_kv(kv_layer, k, v, meta.slot_mapping)

    def _decode(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, out: torch.Tensor) -> None:
        if not self.use_decode or not self._fits(q, kv_layer) or q.stride(-1) != 1:
            super()._decode(q, kv_layer, meta, out)
            return
        # the kernel reads the first len(q) rows of the tables and lengths: the decodes' (no slicing)
        torch.ops.microserve.paged_decode_attention(q, kv_layer, meta.block_tables, meta.seq_lens, self.scale, out)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                 meta: AttentionMetadata, out: torch.Tensor) -> None:
        if not self.use_prefill or not self._fits(q, kv_layer) or q.stride(-1) != 1 or not out.is_contiguous():
            super()._prefill(q, k, v, kv_layer, meta, out)
            return
        nd = meta.num_decodes  # query_start_loc holds absolute rows of q, so its tail needs no rebasing
        torch.ops.microserve.paged_prefill_attention(q, kv_layer, meta.block_tables[nd:],
                                                     meta.query_start_loc[nd:], meta.seq_lens[nd:], self.scale, out)
