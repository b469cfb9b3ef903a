"""KV memory: a paged pool, a prefix tree over full pages, and the unified KV cache interface."""
from microserve.kv.cache import KVCache, Reservation, SeqKV
from microserve.kv.pool import KVPool
from microserve.kv.radix import PrefixTree

__all__ = ["KVCache", "KVPool", "PrefixTree", "Reservation", "SeqKV"]
