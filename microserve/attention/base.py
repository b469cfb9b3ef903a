"""The attention interface shared by every backend.

A batch is *flat and varlen*: the new tokens of all sequences are concatenated into one `[T]` stream,
decodes first, then prefill chunks. For sequence i:

    new tokens        q_start[i] ............ q_start[i+1]        (query_lens[i] of them)
    context           0 ..................................... seq_lens[i]
                      |<-- already in KV cache -->|<-- new -->|

Query j of sequence i sits at absolute position `seq_lens[i] - query_lens[i] + j` and may attend
to keys `0 ..= that position` (a *lower-right* aligned causal mask, which prefix hits and chunked
prefill need; SDPA's `is_causal=True` is top-left aligned and only right when there is no prefix).

KV lives in a paged pool, layer-first: `kv[layer]` is `[2, num_pages, page_size, kv_heads, head_dim]`.
Token t of sequence i is stored at slot `block_tables[i, t // page_size] * page_size + t % page_size`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, destination slot of each new token
    query_start_loc: torch.Tensor  # [B+1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32, context length including the new tokens
    block_tables: torch.Tensor  # [B, max_pages] int32, padded with 0
    query_lens_cpu: list[int]  # host copies, so backends need no device sync
    # For decode rows, backends use seq_lens_cpu only to size launches (grids, gathers), never as the
    # true lengths, which come from seq_lens: CUDA-graph decode passes an upper bound (the max
    # context) here, so one captured launch fits every replay.
    seq_lens_cpu: list[int]
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    page_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


@dataclass
class ForwardContext:
    """Everything a forward pass needs besides the tokens.

    `layer_hook(layer)` is called right after layer `layer` has stored its new K/V and before its
    attention runs, so a KV sender can start copying that layer while the rest of it computes.
    """

    meta: AttentionMetadata
    kv: torch.Tensor  # the whole pool: [layers, 2, pages, page_size, kv_heads, head_dim]
    layer_hook: Callable[[int], None] | None = None
    extra: dict = field(default_factory=dict)


class AttentionBackend:
    """Contract: `forward(layer, q, k, v, ctx)` stores k/v (`[T, kv_heads, D]`) at
    `ctx.meta.slot_mapping` in `ctx.kv[layer]`, calls `ctx.layer_hook(layer)`, and returns the
    attention output `[T, q_heads, D]` for q (`[T, q_heads, D]`) over each sequence's whole context."""

    name = "base"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        raise NotImplementedError


def get_backend(name: str, device: torch.device, **kw) -> AttentionBackend:
    """`auto` picks Triton on CUDA when it is importable; on CPU the compiled paged kernels
    when they build, else torch SDPA."""
    if name == "auto":
        name = "torch"
        if device.type == "cuda":
            try:
                import triton  # noqa: F401
                name = "triton"
            except ImportError:
                pass
        elif device.type == "cpu":
            from microserve.kernels.build import kernel_error
            if kernel_error() is None:  # else it has warned, and torch SDPA runs
                name = "cpu"
    if name == "torch":
        from microserve.attention.torch_backend import TorchSDPABackend
        return TorchSDPABackend(**kw)
    if name == "cpu":
        from microserve.attention.cpu_backend import CPUPagedBackend
        return CPUPagedBackend(**kw)
    if name == "triton":
        from microserve.attention.triton_backend import TritonBackend
        return TritonBackend(**kw)
    raise ValueError(f"unknown attention backend {name!r} (choose auto, cpu, torch or triton)")
