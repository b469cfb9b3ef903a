"""Attention backends: one interface (`AttentionBackend`), a torch SDPA backend for CPU and fallback,
and a Triton backend for CUDA."""
from microserve.attention.base import AttentionBackend, AttentionMetadata, ForwardContext, get_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "ForwardContext", "get_backend"]
