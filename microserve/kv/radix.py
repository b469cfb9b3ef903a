"""A prefix tree over *full* pages of tokens, with lock counts and LRU eviction.

Each node holds one page: the KV of `page_size` tokens that follow its parent's tokens. A path from
the root spells a cached prefix whose length is a multiple of page_size:

    root ── [t0..t15] ── [t16..t31] ── [t32..t47]      (page_size 16: 48 tokens cached)
                     └── [u16..u31]                    (a sibling continuation)

`lock(node)` pins node and all its ancestors (a running request uses them); only nodes with lock
count 0 are evictable, and eviction takes least-recently-used *leaves* first, so a prefix is never
freed while something that extends it is cached.

Eviction runs often in a full cache (every few decode steps, as sequences cross a page), so the
evictable leaves sit in a heap that is kept as they change instead of being rebuilt per call (a
rebuild costs ~0.2 ms at 800 cached sequences). Entries go stale when their node is touched, locked
or evicted; stale ones are skipped when popped, and the heap is rebuilt when they outnumber the
leaves.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field


@dataclass(eq=False)
class Node:
    key: tuple[int, ...]
    page: int
    parent: "Node | None"
    children: dict[tuple[int, ...], "Node"] = field(default_factory=dict)
    lock: int = 0
    last_access: float = 0.0


class PrefixTree:
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.root = Node(key=(), page=-1, parent=None, lock=1)  # the root is never evicted
        self.num_nodes = 0
        self.num_evictable = 0
        self._clock = itertools.count()
        self._leaves: set[Node] = set()  # kept up to date, so eviction never walks the whole tree
        # (last_access, id, push number, node) for every evictable leaf, plus stale entries (see the
        # module doc); the push number keeps a node's duplicate entries from being compared as nodes
        self._heap: list[tuple[float, int, int, Node]] = []
        self._pushes = itertools.count()

    def _offer(self, node: Node) -> None:
        """Queue node for eviction if it is now an evictable leaf (call after any change that can
        make it one: created, unlocked, touched, or its last child evicted)."""
        if node.lock == 0 and node in self._leaves:
            heapq.heappush(self._heap, (node.last_access, id(node), next(self._pushes), node))

    def _live(self, entry: tuple[float, int, int, Node]) -> bool:
        last_access, _, _, node = entry
        return node.lock == 0 and node in self._leaves and node.last_access == last_access

    def _rebuild_heap(self) -> None:
        self._heap = [(n.last_access, id(n), next(self._pushes), n) for n in self._leaves if n.lock == 0]
        heapq.heapify(self._heap)

    def _chunks(self, tokens) -> list[tuple[int, ...]]:
        ps = self.page_size
        return [tuple(tokens[i:i + ps]) for i in range(0, len(tokens) - ps + 1, ps)]

    def peek(self, tokens) -> int:
        """Length of the longest cached prefix of `tokens`. Read-only: no LRU touch, no lock."""
        node, n = self.root, 0
        for key in self._chunks(tokens):
            node = node.children.get(key)
            if node is None:
                break
            n += self.page_size
        return n

    def match(self, tokens) -> list[Node]:
        """Nodes of the longest cached prefix of `tokens`, touched for LRU."""
        path, node, now = [], self.root, next(self._clock)
        for key in self._chunks(tokens):
            node = node.children.get(key)
            if node is None:
                break
            node.last_access = now
            path.append(node)
        if path:
            self._offer(path[-1])  # only the last node can be a leaf
        return path

    def insert(self, tokens, pages: list[int]) -> tuple[list[Node], list[int]]:
        """Cache the full pages of `tokens` (whose KV sits in `pages`).

        Returns the path of nodes now spelling those pages and the pages of ours that the tree
        already held under another page id (duplicates: still owned by the caller)."""
        path, dups, node, now = [], [], self.root, next(self._clock)
        for key, page in zip(self._chunks(tokens), pages):
            child = node.children.get(key)
            if child is None:
                child = Node(key=key, page=page, parent=node)
                node.children[key] = child
                self._leaves.discard(node)
                self._leaves.add(child)
                self.num_nodes += 1
                self.num_evictable += 1
            elif child.page != page:
                dups.append(page)
            child.last_access = now
            path.append(child)
            node = child
        if path:
            self._offer(path[-1])
        return path, dups

    def lock(self, node: Node | None) -> None:
        while node is not None and node is not self.root:
            if node.lock == 0:
                self.num_evictable -= 1
            node.lock += 1
            node = node.parent

    def unlock(self, node: Node | None) -> None:
        while node is not None and node is not self.root:
            node.lock -= 1
            assert node.lock >= 0, "unbalanced unlock"
            if node.lock == 0:
                self.num_evictable += 1
                self._offer(node)
            node = node.parent

    def evict(self, n_pages: int) -> list[int]:
        """Free up to n_pages from unlocked leaves, least recently used first."""
        if len(self._heap) > 2 * len(self._leaves) + 64:
            self._rebuild_heap()  # mostly stale entries: drop them
        freed: list[int] = []
        while self._heap and len(freed) < n_pages:
            entry = heapq.heappop(self._heap)
            if not self._live(entry):
                continue
            freed.append(entry[3].page)
            parent = self._remove_leaf(entry[3])
            if parent is not None:
                self._offer(parent)
        return freed

    def _remove_leaf(self, leaf: Node) -> Node | None:
        """Take an unlocked leaf out of the tree. Returns its parent if that has become a leaf."""
        parent = leaf.parent
        del parent.children[leaf.key]
        self._leaves.discard(leaf)
        self.num_nodes -= 1
        self.num_evictable -= 1
        if parent is not self.root and not parent.children:
            self._leaves.add(parent)
            return parent
        return None

    def pages(self) -> set[int]:
        out, stack = set(), [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is not self.root:
                out.add(node.page)
        return out


def evict_by_scan(tree: PrefixTree, n_pages: int) -> list[int]:
    """Eviction by its definition, as it was first written: a heap of every unlocked leaf, built
    afresh on each call. `PrefixTree.evict` must free the same pages in the same order
    (tests/test_engine.py); benchmarks/full_cache_evict.py measures what this cost a full cache."""
    heap = [(n.last_access, id(n), n) for n in tree._leaves if n.lock == 0]
    heapq.heapify(heap)
    freed: list[int] = []
    while heap and len(freed) < n_pages:
        leaf = heapq.heappop(heap)[2]
        freed.append(leaf.page)
        parent = tree._remove_leaf(leaf)
        if parent is not None and parent.lock == 0:
            heapq.heappush(heap, (parent.last_access, id(parent), parent))
    return freed
