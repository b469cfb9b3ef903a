"""Where an engine step's time goes, on the serving benchmark's shape, in process (no HTTP).

The workload of benchmarks/vs_vllm.py: stories260K-hd32, --requests prompts of --prompt-len random
token ids, --output-len tokens each, greedy, ignore_eos, all submitted at once, engine defaults
(prefix caching on, shm transport, 256 MiB KV) except the thread count. Prints per-round throughput
(each round uses new prompts, so the prefix tree fills up and eviction starts, as in a long-running
server), then a torch.profiler operator table and a cProfile (Python functions) of one more round.

    python benchmarks/profile_engine_step.py --threads 1
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from microserve.bench.harness import machine_line, shared_model
from microserve.bench.presets import DUMMY_SHAPES, model_dir
from microserve.config import EngineConfig
from microserve.engine.engine import Engine
from microserve.engine.sampling import SamplingParams
from microserve.server.process import keep_freed_memory


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=shared_model("stories260K-hd32"),
                    help="a local Hugging Face model directory (default: ../shared/models/stories260K-hd32)")
    ap.add_argument("--dummy", choices=sorted(DUMMY_SHAPES), default=None,
                    help="profile this model shape with dummy weights instead of --model")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="(default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--kv-cache-memory-mb", type=int, default=256)
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args()
    keep_freed_memory()  # as the engine server runs (server/app.py), so the profile is the served one's
    model = model_dir(DUMMY_SHAPES[a.dummy], f"vs-vllm-{a.dummy}") if a.dummy else a.model
    e = Engine(EngineConfig(model=model, load_format="dummy" if a.dummy else "auto", dtype=a.dtype,
                            num_threads=a.threads, kv_cache_memory_mb=a.kv_cache_memory_mb))
    vocab = e.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)
    counter = iter(range(10**9))

    def one_round() -> tuple[float, list[float], list[float]]:
        prompts = torch.randint(3, vocab, (a.requests, a.prompt_len), generator=g).tolist()
        t0 = time.perf_counter()
        for p in prompts:
            e.add_request(f"r{next(counter)}", p, params)
        prefill, decode = [], []
        while e.has_work():
            s0 = time.perf_counter()
            decoding = bool(e.scheduler.running) and not e.scheduler.waiting and all(
                r.num_remaining == 1 for r in e.scheduler.running)
            e.step()
            (decode if decoding else prefill).append(time.perf_counter() - s0)
        return time.perf_counter() - t0, prefill, decode

    print(f"# {a.dummy + ' (dummy weights)' if a.dummy else a.model} {a.dtype}: {a.requests} x {a.prompt_len} token ids, {a.output_len} out, threads {a.threads}, "
          f"KV {a.kv_cache_memory_mb} MiB ({e.pool.num_pages} pages), prefix caching on\n"
          f"# {machine_line()}", flush=True)
    for i in range(a.rounds):
        dt, pre, dec = one_round()
        print(f"round {i}: {a.requests * a.output_len / dt:7.0f} output tok/s, {len(pre)} prefill steps "
              f"(median {statistics.median(pre) * 1e3:.1f} ms), {len(dec)} decode steps (median "
              f"{statistics.median(dec) * 1e3:.1f} ms), free pages {e.pool.num_free}, "
              f"loadavg {os.getloadavg()[0]:.2f}", flush=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_round()
    print("\n## torch.profiler, one round, operators by self CPU time\n```")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))
    print("```")
    pr = cProfile.Profile()
    pr.enable()
    one_round()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(a.top)
    print("\n## cProfile, one round, by tottime\n```\n" + s.getvalue().strip() + "\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
