"""Decode steps replayed from CUDA graphs, one graph per padded batch size ("bucket").

A decode step launches a few kernels per layer on a handful of tokens, so at small batches the GPU
waits on the CPU launching them. `DecodeGraphRunner` captures the whole model forward of a decode
step once per bucket at start-up and replays it, which costs one launch per step.

A graph replays fixed kernels on fixed addresses, so everything a step varies lives in static
buffers that are allocated once and refilled before each replay:

    row:            0 ......... n-1 | n ........... bucket-1
                    real decodes    | padding
    input_ids       token           | 0
    positions       pos             | 0
    slot_mapping    its new slot    | scratch slot (a page the allocator never hands out)
    seq_lens        context length  | 1
    block_tables    its pages       | stale (read at most at index 0; outputs are dropped)

and the host-side metadata of a bucket is fixed too: `seq_lens_cpu` is `[max_seq_len] * bucket`, an
upper bound, so the split-KV decode grid (and the torch backend's gather) is sized for the longest
context once; kernels take true lengths from the `seq_lens` tensor and skip partitions past them.

Until `capture()` is called (the engine calls it on CUDA only), `run` executes the same buffers,
padding and slicing eagerly, which is how CPU tests check this path; on CPU the engine never builds one.
"""
from __future__ import annotations

import bisect
import logging
import time

import torch

from microserve.attention.base import AttentionMetadata, ForwardContext
from microserve.kv.pool import KVPool

log = logging.getLogger(__name__)

MAX_CAPTURE_BATCH = 512  # larger decode batches run eagerly: launch overhead is amortised there anyway


def decode_buckets(max_num_seqs: int, max_capture_batch: int = MAX_CAPTURE_BATCH) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, every multiple of 8 below the cap, and the cap itself,
    where the cap is min(max_num_seqs, max_capture_batch) (vLLM's list). A step of n sequences runs
    in the smallest bucket >= n, so at most 7 rows are padding."""
    cap = max(1, min(max_num_seqs, max_capture_batch))
    return [b for b in (1, 2, 4) if b < cap] + list(range(8, cap, 8)) + [cap]


class DecodeGraphRunner:
    """Runs decode-only steps of `model` on a batch padded to a bucket size, from static buffers.

    Contract:
    - `fits(num_seqs, max_seq_len, width)` says whether a decode-only step can run here; the caller
      (ModelRunner) also checks that every sequence has exactly one new token and that no per-layer
      send hook is active (a graph cannot call back into Python between layers).
    - `run(...)` takes the step's host lists, returns fp32 logits for `sample_rows`. When those are
      all rows (the usual decode), the result is a view of a static buffer, valid until the next
      `run`; the engine samples from it before that.
    - Padded rows store their K/V into a scratch page reserved from `pool` at construction, so no
      page a sequence owns is ever written by padding; they read one key (seq_len 1).
    - `capture()` (CUDA only) records one graph per bucket; until then `run` executes the same
      padded forward eagerly.
    """

    def __init__(self, model: torch.nn.Module, pool: KVPool, device: torch.device, max_num_seqs: int,
                 max_seq_len: int, buckets: list[int] | None = None) -> None:
        self.model, self.pool, self.device = model, pool, device
        self.buckets = buckets or decode_buckets(max_num_seqs)
        self.max_batch = self.buckets[-1]
        self.max_seq_len = max_seq_len
        ps = pool.page_size
        self.max_pages = -(-max_seq_len // ps)
        # Padding must write somewhere: a page nobody can own. (Slot -1 would do for the Triton store
        # kernel, which skips it, but not for the torch backend's index_copy_.)
        self.scratch_page = pool.reserve_page()
        self.scratch_slot = self.scratch_page * ps
        on = dict(device=device)
        B = self.max_batch
        self.tokens = torch.zeros(3, B, dtype=torch.int64, **on)  # rows: input ids, positions, slots
        self.input_ids, self.positions, self.slot_mapping = self.tokens.unbind(0)
        self.seq_lens = torch.ones(B, dtype=torch.int32, **on)
        self.block_tables = torch.full((B, self.max_pages), self.scratch_page, dtype=torch.int32, **on)
        self.query_start_loc = torch.arange(B + 1, dtype=torch.int32, **on)  # one query token per row
        self.contexts = {b: self._context(b) for b in self.buckets}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # the logits each graph writes, [bucket, vocab]
        self.num_runs = 0  # steps served here (tests check the engine used this path)

    def _context(self, b: int) -> ForwardContext:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[:b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b],
            # fixed per bucket: what a captured kernel was launched with must hold for every replay
            query_lens_cpu=[1] * b, seq_lens_cpu=[self.max_seq_len] * b, num_decodes=b,
            page_size=self.pool.page_size)
        return ForwardContext(meta=meta, kv=self.pool.kv)

    def bucket_for(self, num_seqs: int) -> int | None:
        """The smallest bucket holding num_seqs rows, or None if none does."""
        i = bisect.bisect_left(self.buckets, num_seqs)
        return self.buckets[i] if i < len(self.buckets) else None

    def fits(self, num_seqs: int, max_seq_len: int, width: int) -> bool:
        """Whether a decode-only step of num_seqs sequences, the longest max_seq_len tokens with
        `width` pages, fits the buffers and the grids sized at construction."""
        return 0 < num_seqs <= self.max_batch and max_seq_len <= self.max_seq_len and width <= self.max_pages

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            tables: list[list[int]], sample_rows: list[int]) -> torch.Tensor:
        """One decode step (row i = sequence i, one token each): fill the static buffers, replay
        (or run) the bucket's forward, return the logits of `sample_rows`."""
        n = len(input_ids)
        b = self.bucket_for(n)
        pad = b - n
        width = max(len(t) for t in tables)
        host = torch.tensor([input_ids + [0] * pad, positions + [0] * pad, slots + [self.scratch_slot] * pad])
        self.tokens[:, :b].copy_(host, non_blocking=True)
        self.seq_lens[:b].copy_(torch.tensor(seq_lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        # Entries past a row's pages stay stale from earlier steps: kernels stop at seq_lens, and the
        # torch gather masks them (they name pages of this pool, so they read finite values).
        self.block_tables[:n, :width].copy_(
            torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32), non_blocking=True)
        graph = self.graphs.get(b)
        if graph is not None:
            graph.replay()
            logits = self.outputs[b]
        else:
            logits = self._forward(b)
        self.num_runs += 1
        if len(sample_rows) == n:  # rows are appended in order, so these are exactly 0..n-1
            return logits[:n]
        return logits[torch.tensor(sample_rows, device=self.device)]

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.input_ids[:b], self.positions[:b], self.contexts[b], None)

    def capture(self, warmup_iters: int = 2) -> None:
        """Capture one CUDA graph per bucket, largest first, all in one memory pool: they never run
        at once, so the smaller ones reuse the largest one's activation memory."""
        assert self.device.type == "cuda", "CUDA graphs need a CUDA device"
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        mempool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        # every row is padding while capturing: seq_len 1, the scratch slot, page 0 of the scratch
        self.slot_mapping.fill_(self.scratch_slot)
        for b in reversed(self.buckets):
            # Warm up off the capture stream first: Triton compiles its kernels, cuBLAS picks and
            # allocates its workspaces, the caching allocator settles; none of that may be captured.
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(warmup_iters):
                    self._forward(b)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                self.outputs[b] = self._forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for %d batch sizes (%s) in %.1fs", len(self.buckets),
                 ",".join(map(str, self.buckets)), time.perf_counter() - t0)
