"""Attention with Triton kernels over the paged pool: the GPU fast path.

Same contract as the torch backend (`AttentionBackend`): store the new K/V, call the layer hook, then
attention. Decodes (the first `num_decodes` sequences, one token each) go to the split-KV decode
kernel; prefill chunks (with or without a cached prefix) go to the varlen prefill kernel.

Where the kernels cannot run, the backend falls back to the torch SDPA backend for that call, so
the engine never fails for lack of a kernel: on CPU tensors (unless `TRITON_INTERPRET=1`, which is
how CI checks the kernels), for dtypes other than fp32/bf16/fp16, head dims above 256, a pool whose
dtype differs from q's, or when triton is not importable. Triton is imported lazily, on the first
call that can use it, so building this backend on a CPU-only machine never touches triton.
"""
from __future__ import annotations

import logging
import os

import torch

from microserve.attention.base import AttentionBackend, AttentionMetadata, ForwardContext
from microserve.attention.torch_backend import TorchSDPABackend

log = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_HEAD_DIM = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def decode_partition(max_seq_len: int, num_seqs: int, num_kv_heads: int, num_sms: int,
                     min_part_len: int = 256, max_splits: int = 32, block_n: int = 64) -> tuple[int, int]:
    """(num_splits, part_len) for a decode batch: split each context just enough that
    `num_seqs * num_kv_heads * num_splits` programs fill about two waves of `num_sms`, never into
    partitions shorter than `min_part_len` (a partial result costs a write and a read of D floats).
    part_len is a multiple of block_n and num_splits * part_len >= max_seq_len."""
    want = max(1, -(-2 * num_sms // max(1, num_seqs * num_kv_heads)))
    splits = max(1, min(want, max_splits, max_seq_len // max(1, min_part_len)))
    part = -(-max_seq_len // splits)
    part = -(-part // block_n) * block_n
    return -(-max_seq_len // part), part


class TritonBackend(AttentionBackend):
    """Triton paged attention. `min_part_len` and `max_splits` tune the decode split-KV policy
    (see `decode_partition`); tests lower `min_part_len` to force several partitions
    on tiny contexts."""

    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 min_part_len: int = 256, max_splits: int = 32) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        self.min_part_len, self.max_splits = min_part_len, max_splits
        self.fallback = TorchSDPABackend(num_heads, num_kv_heads, head_dim, scale)
        self._kernels = None
        self._warned: set[str] = set()
        self._num_sms: dict[int, int] = {}
        self.last_num_splits = 0  # how many partitions the last decode used (tests check split-KV ran)

    def unsupported(self, q: torch.Tensor, kv: torch.Tensor) -> str | None:
        """Why the kernels cannot take this call, or None if they can."""
        if not (q.is_cuda or (q.device.type == "cpu" and _interpreting())):
            return f"tensors on {q.device.type} (triton runs on CUDA, or on CPU with TRITON_INTERPRET=1)"
        if q.dtype not in _SUPPORTED_DTYPES:
            return f"dtype {q.dtype}"
        if kv.dtype != q.dtype:
            return f"KV pool dtype {kv.dtype} differs from q's {q.dtype}"
        if self.head_dim > _MAX_HEAD_DIM:
            return f"head_dim {self.head_dim} > {_MAX_HEAD_DIM}"
        if self.num_heads % self.num_kv_heads:
            return f"{self.num_heads} q heads are not a multiple of {self.num_kv_heads} kv heads"
        if self._kernels is None:
            try:
                from microserve.attention import triton_kernels
            except ImportError as e:
                return f"triton is not importable ({e})"
            self._kernels = triton_kernels
        return None

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        why = self.unsupported(q, ctx.kv)
        if why is not None:
            if why not in self._warned:
                self._warned.add(why)
                log.info("triton attention falls back to torch SDPA: %s", why)
            return self.fallback.forward(layer, q, k, v, ctx)
        kern, meta, kv_layer = self._kernels, ctx.meta, ctx.kv[layer]
        kern.store_kv(kv_layer, k, v, meta.slot_mapping)
        if ctx.layer_hook is not None:
            ctx.layer_hook(layer)
        out = torch.empty_like(q)
        nd, B = meta.num_decodes, meta.num_seqs
        if nd:
            self.last_num_splits = kern.decode_attention(
                q, kv_layer, out, meta.query_start_loc, meta.seq_lens, meta.block_tables, nd,
                max(meta.seq_lens_cpu[:nd]), self.scale, num_sms=self._sms(q.device),
                min_part_len=self.min_part_len, max_splits=self.max_splits)
        if nd < B:
            kern.prefill_attention(q, kv_layer, out, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                   nd, B - nd, max(meta.query_lens_cpu[nd:]), self.scale)
        return out

    def _sms(self, device: torch.device) -> int:
        if device.type != "cuda":
            return 8  # the interpreter: any number works; 8 keeps split-KV exercised on small batches
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self._num_sms:
            self._num_sms[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        return self._num_sms[idx]


__all__ = ["TritonBackend", "AttentionMetadata"]
