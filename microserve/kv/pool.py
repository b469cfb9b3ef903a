"""The paged KV pool: one tensor, layer-first, plus a free list of page ids.

    kv: [layers, 2 (K, V), num_pages, page_size, kv_heads, head_dim]

    slot = page * page_size + offset            (offset in [0, page_size))
    kv[layer, kind].view(num_pages * page_size, kv_heads, head_dim)[slot]   is one token's row

Layer-first keeps one layer's rows for any token range addressable on their own, so a sender can
ship layer l while layer l+1 computes. The tensor itself comes from the KV transport (shared
memory for `shm`, registered memory for `nixl`), so peers can write into it.
"""
from __future__ import annotations

import torch


class KVPool:
    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv
        self.num_layers, _, self.num_pages, self.page_size, self.num_kv_heads, self.head_dim = kv.shape
        self._free = list(range(self.num_pages - 1, -1, -1))  # a stack: low page ids go out first
        self.reserved: list[int] = []  # pages taken out of circulation for good (scratch for padding)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """n pages, or None (and nothing taken) if fewer are free."""
        if n > len(self._free):
            return None
        pages = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        return pages

    def free(self, pages) -> None:
        self._free.extend(pages)

    def reserve_page(self) -> int:
        """Take one free page out of circulation for good: `alloc` never hands it out again and the
        cache does not count it. CUDA-graph decode pads its batches with rows that write here."""
        pages = self.alloc(1)
        if pages is None:
            raise ValueError("no free KV page left to reserve")
        self.reserved += pages
        return pages[0]

    @property
    def num_usable(self) -> int:
        """Pages sequences can ever hold: all but the reserved ones."""
        return self.num_pages - len(self.reserved)

    def rows(self, layer: int) -> torch.Tensor:
        """Layer `layer` as [2, num_pages * page_size, kv_heads, head_dim]: index by slot."""
        return self.kv[layer].view(2, self.num_pages * self.page_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_token_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * self.kv.element_size()


def slots_for(pages: list[int], begin: int, end: int, page_size: int) -> list[int]:
    """Slots of positions [begin, end) of a sequence whose block table is `pages`."""
    return [pages[p // page_size] * page_size + p % page_size for p in range(begin, end)]


def compress_runs(slots: list[int]) -> list[int]:
    """[s, s+1, ..., t, u, ...] -> MLC's run format [n, begin1, len1, begin2, len2, ...]."""
    runs: list[int] = []
    for s in slots:
        if runs and runs[-2] + runs[-1] == s:
            runs[-1] += 1
        else:
            runs += [s, 1]
    return [len(runs) // 2] + runs


def expand_runs(runs: list[int], limit: int | None = None) -> list[int]:
    """Inverse of compress_runs; raises ValueError on a malformed list, or one of more than `limit`
    slots (checked before expanding: a run length from the wire must not size an allocation)."""
    if not runs or runs[0] < 0 or len(runs) != 1 + 2 * runs[0]:
        raise ValueError("slot runs must be [n, begin1, len1, ...] with n pairs")
    out: list[int] = []
    for i in range(runs[0]):
        begin, length = runs[1 + 2 * i], runs[2 + 2 * i]
        if begin < 0 or length <= 0:
            raise ValueError("slot runs must have begin >= 0 and len > 0")
        if limit is not None and len(out) + length > limit:
            raise ValueError(f"slot runs name more than {limit} slots")
        out.extend(range(begin, begin + length))
    return out
