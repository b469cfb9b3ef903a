"""A long-running server's full prefix cache: eviction by a kept heap (the engine's PrefixTree) vs a
heap rebuilt from every leaf on each call (how it was first written), side by side in one process.

The serving benchmark's load (stories260K-hd32, 64 prompts of 200 random token ids, 64 tokens out,
greedy, ignore_eos) is sent round after round, new prompts each round, to two engines that differ
only in PrefixTree.evict; rounds alternate between them. Finished sequences stay cached, so once
the pool is full (after ~12 rounds at 1 GiB) every few decode steps evict: that is where the two
differ. Printed per round: output tok/s of each, and the time spent in evict.

    python benchmarks/full_cache_evict.py --rounds 24
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from microserve.bench.harness import md_table, shared_model
from microserve.config import EngineConfig
from microserve.engine.engine import Engine
from microserve.engine.sampling import SamplingParams
from microserve.kv.radix import PrefixTree, evict_by_scan
from microserve.server.process import keep_freed_memory


def timed(tree: PrefixTree, fn, spent: list[float]):
    def evict(n_pages: int) -> list[int]:
        t0 = time.perf_counter()
        out = fn(n_pages)
        spent.append(time.perf_counter() - t0)
        return out
    tree.evict = evict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=shared_model("stories260K-hd32"),
                    help="a local Hugging Face model directory (default: ../shared/models/stories260K-hd32)")
    ap.add_argument("--rounds", type=int, default=24, help="rounds per engine (default 24)")
    ap.add_argument("--kv-cache-memory-mb", type=int, default=1024, help="per engine (default 1024, as served)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    keep_freed_memory()
    engines, spent = {}, {}
    for name in ("full scan", "kept heap"):
        e = Engine(EngineConfig(model=a.model, num_threads=a.threads, kv_cache_memory_mb=a.kv_cache_memory_mb,
                                kv_transport="none"))
        spent[name] = []
        tree = e.cache.tree
        timed(tree, (lambda n, t=tree: evict_by_scan(t, n)) if name == "full scan" else tree.evict, spent[name])
        engines[name] = e
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    vocab = engines["kept heap"].model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(a.rounds):
        prompts = torch.randint(3, vocab, (64, 200), generator=g).tolist()  # the same prompts for both
        row = [i]
        for name, e in engines.items():
            before = len(spent[name]), sum(spent[name])
            t0 = time.perf_counter()
            for j, p in enumerate(prompts):
                e.add_request(f"r{i}-{j}", p, params)
            while e.has_work():
                e.step()
            dt = time.perf_counter() - t0
            row += [f"{64 * 64 / dt:.0f}", f"{len(spent[name]) - before[0]} / {(sum(spent[name]) - before[1]) * 1e3:.1f} ms",
                    e.cache.tree.num_nodes]
        rows.append(row)
        print(" | ".join(str(x) for x in row), f"| load {os.getloadavg()[0]:.2f}", flush=True)
    late = [r for r in rows if r[2] != "0 / 0.0 ms"]
    print(f"\n# {a.model}, {a.kv_cache_memory_mb} MiB KV per engine, threads {a.threads}, rounds alternate")
    print(md_table(["round", "full scan tok/s", "evict calls / time", "cached pages", "kept heap tok/s",
                    "evict calls / time", "cached pages"], rows))
    if late:
        ratio = statistics.median(float(r[4]) / float(r[1]) for r in late)
        print(f"\nrounds that evicted: {len(late)}; median kept heap / full scan throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
