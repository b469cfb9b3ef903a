"""Latency the router adds in data-parallel mode: the same short requests sent to one engine directly
and through `microserve router --strategy least_loaded` in front of it, interleaved.

    python benchmarks/router_overhead.py                       # concurrency 1,4,16,64; writes the doc
    python benchmarks/router_overhead.py --concurrency 1,4 --requests 100 --no-write
    python benchmarks/router_overhead.py --ray                 # the engine as a Ray actor (a local Ray)

Real processes: `microserve engine --model stories260K` and `microserve router --engine URL --model
stories260K --strategy least_loaded`. The client (this process, aiohttp, keep-alive) runs closed-loop
workers: at concurrency c, c workers each send their next request as soon as the previous one ends.
Blocks of requests alternate between the two targets (direct, router, direct, ...), so both see the
same machine load; each (mode, concurrency, target) cell gets about --requests requests.

Modes: non-streamed max_tokens 1 (end-to-end latency), non-streamed max_tokens 16 (end-to-end),
streamed max_tokens 16 (time to the first token chunk). Prompt: 8 tokens of text, greedy, ignore_eos.
Added latency = router statistic - direct statistic, per cell.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time

import aiohttp

from microserve.bench.harness import STORIES, loadavg, machine, median, percentile, publish

PROMPT = "Once upon a time there was a"
MODES = [("non-streamed, max_tokens 1 (E2E)", False, 1), ("non-streamed, max_tokens 16 (E2E)", False, 16),
         ("streamed, max_tokens 16", True, 16)]  # streamed: both TTFT and E2E of the same requests


async def one(s: aiohttp.ClientSession, url: str, stream: bool, max_tokens: int) -> tuple[float, float]:
    """(E2E, TTFT) in seconds; TTFT is the E2E for a non-streamed request."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    t0 = time.perf_counter()
    async with s.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {await r.text()}")
        if not stream:
            data = await r.json()
            assert data["usage"]["completion_tokens"] == max_tokens, data
            e2e = time.perf_counter() - t0
            return e2e, e2e
        ttft = None
        async for line in r.content:
            if ttft is None and line.startswith(b"data: {") and b'"choices":[{' in line:
                ttft = time.perf_counter() - t0
        return time.perf_counter() - t0, ttft


async def block(s, url: str, c: int, k: int, stream: bool, max_tokens: int) -> list[tuple[float, float]]:
    async def worker():
        return [await one(s, url, stream, max_tokens) for _ in range(k)]
    return [x for xs in await asyncio.gather(*(worker() for _ in range(c))) for x in xs]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (and its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench(engine_url: str, router_url: str, concurrency: list[int], n_req: int, blocks: int,
                pids: dict[str, int]) -> dict:
    out = {}
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        for label, stream, mt in MODES:  # warm-up: connections, tokenizer, engine paths
            for url in (engine_url, router_url):
                await block(s, url, max(concurrency), 2, stream, mt)
        for c in concurrency:
            k = max(1, math.ceil(n_req / (blocks * c)))
            for label, stream, mt in MODES:
                lat = {"direct": [], "router": []}
                cpu = {"direct": {"engine": 0.0, "router": 0.0}, "router": {"engine": 0.0, "router": 0.0}}
                t0 = time.perf_counter()
                for b in range(2 * blocks):
                    target = ("direct", "router")[(b + (b // 2)) % 2]  # direct, router, router, direct, ...
                    c0 = {k_: cpu_s(p) for k_, p in pids.items()}
                    lat[target] += await block(s, engine_url if target == "direct" else router_url, c, k, stream, mt)
                    for k_, p in pids.items():
                        cpu[target][k_] += cpu_s(p) - c0[k_]
                lat["cpu"] = cpu
                out[(c, label)] = lat
                d, r = [x[1] for x in lat["direct"]], [x[1] for x in lat["router"]]
                print(f"c={c:3d} {label:34s} n={len(d)}/{len(r)}  direct p50 {median(d) * 1e3:7.2f} p99 "
                      f"{percentile(d, 99) * 1e3:7.2f} | router p50 {median(r) * 1e3:7.2f} p99 "
                      f"{percentile(r, 99) * 1e3:7.2f} | "
                      f"added p50 {(median(r) - median(d)) * 1e3:+.2f} ms  ({time.perf_counter() - t0:.1f} s, "
                      f"load {loadavg()})", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=400, help="about this many requests per (mode, concurrency, target)")
    ap.add_argument("--blocks", type=int, default=10, help="blocks per target, alternating with the other target")
    ap.add_argument("--model", default=STORIES,
                    help="a local Hugging Face model directory (default: stories260K in ../shared/models)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole sweep (fresh processes each time)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="launch the engine as a Ray actor (on the Ray cluster at ADDRESS, or a new local one), "
                         "as `microserve up --ray` does; the router stays a local process")
    a = ap.parse_args()
    from microserve.launch import EngineSpec, LocalLauncher, RayLauncher
    from microserve.tokenizer import Tokenizer
    n_tok = len(Tokenizer(a.model).encode(PROMPT))
    conc = [int(x) for x in a.concurrency.split(",")]
    m = machine()
    logs = tempfile.mkdtemp(prefix="microserve-bench-router-")
    results = []
    t_start = time.perf_counter()
    for rnd in range(a.rounds):
        launcher = LocalLauncher(logs) if a.ray is None else RayLauncher(
            a.ray or None, log_dir=logs, ray_init={} if a.ray else {"include_dashboard": False})
        try:
            eng = launcher.start([EngineSpec(a.model, name="engine")])[0]
            rtr = launcher.start_router("least_loaded", a.model, timeout=60)
            print(f"round {rnd}: engine {eng.url} ({launcher.kind} launch), router {rtr.url}; prompt {n_tok} tokens",
                  flush=True)
            results.append(asyncio.run(bench(eng.url, rtr.url, conc, a.requests, a.blocks,
                                             {"engine": eng.pid, "router": rtr.popen.pid})))
        finally:
            launcher.stop()
    elapsed = time.perf_counter() - t_start
    rows = []
    for c in conc:
        for label, stream, _ in MODES:
            for which, idx in ((["TTFT", 1], ["E2E", 0]) if stream else ([None, 0],)):
                name = f"{label} ({which})" if which else label

                def get(r, target):
                    return [x[idx] for x in r[(c, label)][target]]
                d = [x for r in results for x in get(r, "direct")]
                rr = [x for r in results for x in get(r, "router")]
                per_round = [(median(get(r, "router")) - median(get(r, "direct"))) * 1e3 for r in results]
                added = (median(rr) - median(d)) * 1e3
                n_d, n_r = len(d), len(rr)
                ecd = sum(r[(c, label)]["cpu"]["direct"]["engine"] for r in results) / n_d * 1e3
                ecr = sum(r[(c, label)]["cpu"]["router"]["engine"] for r in results) / n_r * 1e3
                rcr = sum(r[(c, label)]["cpu"]["router"]["router"] for r in results) / n_r * 1e3
                cpu_cells = [f"{ecd:.2f}", f"{ecr:.2f}", f"{rcr:.2f}"] if which != "TTFT" else ["same", "same", "same"]
                rows.append([c, name, f"{len(d)} / {len(rr)}", f"{median(d) * 1e3:.2f}", f"{median(rr) * 1e3:.2f}",
                             f"**{added:+.2f}**" + (f" (rounds {min(per_round):+.2f} to {max(per_round):+.2f})"
                                                    if len(results) > 1 else ""),
                             f"{percentile(d, 99) * 1e3:.2f}", f"{percentile(rr, 99) * 1e3:.2f}",
                             f"{(percentile(rr, 99) - percentile(d, 99)) * 1e3:+.2f}", *cpu_cells])
    header = ["concurrency", "request", "n direct / router", "direct p50, ms", "router p50, ms",
              "added p50, ms (goal <= 2)", "direct p99, ms", "router p99, ms", "added p99, ms",
              "engine CPU ms/request, direct", "engine CPU ms/request, via router", "router CPU ms/request"]
    setup = (
        f"- engine: `microserve engine --model stories260K` (defaults); router: `microserve router --engine URL "
        f"--model stories260K --strategy least_loaded`; client: this process, aiohttp keep-alive, all three on the "
        f"same {os.cpu_count()} cores\n"
        f"- prompt: {PROMPT!r} ({n_tok} tokens), greedy, ignore_eos; closed loop with c workers; {a.blocks} blocks "
        f"per target alternating direct/router; {a.rounds} round(s) of fresh processes; {elapsed:.0f} s in all\n")
    if a.ray is None:
        publish("router", "3. Router overhead, data parallel (least_loaded, one engine)", header, rows, m, setup, NOTES,
                a.no_write)
    else:  # the same, the engine a Ray actor's child (`microserve up --ray`): its own section
        publish("router_ray", "3b. Router overhead, the engine launched as a Ray actor", header, rows, m,
                setup.replace("- engine:", "- engine (a Ray actor's child process, `RayLauncher`):", 1), RAY_NOTES,
                a.no_write)
    return 0


NOTES = """
How to read it:

- "added" is router minus direct for the same kind of request, measured in alternating blocks. The
  pooled columns use every request of both rounds; "rounds" gives each round's own difference of
  medians (the two rounds can sit at different load levels, so the pooled value need not lie
  between them). p99 over a few hundred requests on a shared machine is mostly noise from other
  processes; read the medians.
- CPU columns: user+system CPU of the engine and router processes (from /proc) during the blocks of
  each target, divided by the requests; the engine's figure includes torch's worker threads (which
  spin between steps), so compare its two columns with each other only. TTFT rows share the
  requests (and CPU) of the streamed E2E rows.
- **Non-streamed requests pay for a stream they did not ask for.** `EngineClient._stream`
  (microserve/router/client.py, the body it posts sets `"stream": True`) always asks the engine to
  stream, even when the client wants one JSON body, so a non-streamed request through the router
  costs what a streamed one costs at the engine: compare "non-streamed, max_tokens 16 (E2E)" via
  the router with "streamed, max_tokens 16 (E2E)" direct. Streaming 16 chunks, each waking the
  reader on these 2 busy cores, is several ms slower than one body here, and that, not the router's
  own work, is most of the router's added latency for non-streamed multi-token requests at low
  concurrency. Fix: for a single-engine flow (data parallel, or the final start_generate) post the
  client's own `stream` value and, when false, turn the engine's one JSON response into one chunk
  plus usage.
- **At 16 and 64 concurrent requests the router is a CPU consumer on a 2-core machine** that also
  runs the engine, the client and other jobs: its ~0.3-3 ms of CPU per request (one
  asyncio thread: HTTP parse, tokenize, pydantic, one json.loads per SSE chunk and a json.dumps per
  chunk it forwards) competes with the engine, and the added latency grows with the request rate.
  On a machine with a core to spare for the router this part would shrink; in the same process
  budget, forwarding the engine's SSE bytes unparsed in data-parallel mode (the router only needs
  the usage chunk and the finish) and orjson/uvloop would cut it.
"""

RAY_NOTES = """
Read it against section 3, run just before it by the same command without `--ray`: the engine is
the same `microserve engine` process in both (here the child of its Ray actor on a local one-node
Ray, bound to the node's address rather than loopback) and the router the same local process, so
the router's added latency is the same within the spread of rounds and of the two runs; Ray sits
beside the request path, not on it.
"""

if __name__ == "__main__":
    sys.exit(main())
