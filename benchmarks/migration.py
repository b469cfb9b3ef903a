"""Context-cache migration vs recompute: how soon can engine B answer a request whose 1000-token
context is cached on engine A?

    python benchmarks/migration.py                    # both model sizes, HTTP + in-process, writes the doc
    python benchmarks/migration.py --repeats 3 --models small --no-write

Per repeat, with fresh random contexts (so nothing is cached by accident):

- (a) migrate: prep_recv on B (end = the context's full pages), remote_send on A (A holds the context
  in its prefix cache, so the window goes page to page, no recompute), commit on B, then the request
  (context + 8 new tokens, max_tokens 1, streamed) on B, which hits the committed prefix. Time: from
  the first call to the first token, with each call's share recorded.
- (b) recompute: the same kind of request on B for a context B has never seen. Time to first token.
- (c) reference: the request on A itself, which already caches the context (the floor: no transfer).
- (d) after (a), the same kind of request on B again (same context, another tail): tells a slow B
  from a slow first read of the migrated pages.

(a) and (b) are interleaved, their order alternating. Over real HTTP: two `microserve engine`
processes (microserve.launch.LocalLauncher), each pinned to its own core with one torch thread (the CPU
miniature); in process: two Engine objects in this process, one torch thread. The paper reports
migration 1.7x faster than recompute at 1000 tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time

import aiohttp

from microserve.bench.harness import loadavg, machine, median, model_desc, publish, spread, write_model

MODELS = {  # name: (hidden, intermediate, layers, heads, kv_heads)
    "large": (1024, 2816, 8, 16, 4),
    "small": (512, 1024, 4, 8, 2),
}
TAIL = 8


def kv_bytes(spec, tokens: int) -> int:
    h, _, layers, heads, kvh = spec
    return tokens * layers * 2 * kvh * (h // heads) * 4


# ---- over HTTP -------------------------------------------------------------------------------------
async def post(s: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with s.post(url, json=body) as r:
        data = await r.json()
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {data}")
        return data


async def first_token(s: aiohttp.ClientSession, url: str, prompt: list[int]) -> tuple[float, dict]:
    """Stream a 1-token completion; returns (seconds to the first token chunk, usage)."""
    t0 = time.perf_counter()
    ttft, usage = None, {}
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with s.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
    return ttft, usage


def cached_tokens(usage: dict) -> int:
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens", -1)


async def http_bench(spec, model_dir: str, repeats: int, ctx_len: int, page: int, rng: random.Random,
                     log_dir: str) -> dict:
    from microserve.launch import LocalLauncher, engine_specs
    common = ["--load-format", "dummy", "--kv-transport", "shm", "--page-size", str(page), "--kv-cache-memory-mb", "512",
              "--max-num-batched-tokens", "2048"]
    launcher = LocalLauncher(log_dir, startup_timeout_s=180)
    vocab = 8192
    res: dict[str, list] = {}
    try:  # A on core 0, B on core 1, one torch thread each
        A, B = launcher.start(engine_specs(model_dir, ["both", "both"], common, pin_cores=True))
        end = ctx_len // page * page  # what A's prefix cache holds: full pages (a router would ask /match)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            async def migrate_once(i: int, record: bool) -> None:
                ctx = [rng.randrange(3, vocab) for _ in range(ctx_len)]
                prompt = ctx + [rng.randrange(3, vocab) for _ in range(TAIL)]
                await first_token(s, A.url, ctx)  # A caches the context (not timed)
                if record:  # (c) the floor: the request where the context already is
                    ttft_c, u = await first_token(s, A.url, prompt)
                    res.setdefault("local", []).append(ttft_c)
                rid = f"mig-{i}-{time.monotonic_ns()}"
                body = {"user": rid, "prompt": prompt, "max_tokens": 1, "temperature": 0}
                t0 = time.perf_counter()
                r = await post(s, B.url + "/microserving/prep_recv", {**body, "end": end})
                t1 = time.perf_counter()
                await post(s, A.url + "/microserving/remote_send",
                           {**body, "begin": r["prefix_matched_length"], "end": end,
                            "kv_addr_info": r["kv_append_metadata"], "recv_rank": 1})
                t2 = time.perf_counter()
                c = await post(s, B.url + "/microserving/commit", {"user": rid})
                t3 = time.perf_counter()
                ttft, usage = await first_token(s, B.url, prompt)
                t4 = t3 + ttft
                assert c["cached_tokens"] == end and cached_tokens(usage) == end, (c, usage)
                # (d) the same work on B again (same prefix, another tail): is B slow, or only its first
                # read of the migrated pages?
                again, u2 = await first_token(s, B.url, ctx + [rng.randrange(3, vocab) for _ in range(TAIL)])
                assert cached_tokens(u2) == end, u2
                if record:
                    res.setdefault("again_on_B", []).append(again)
                    for k, v in (("migrate", t4 - t0), ("prep_recv", t1 - t0), ("remote_send", t2 - t1),
                                 ("commit", t3 - t2), ("request_on_B", ttft)):
                        res.setdefault(k, []).append(v)

            async def recompute_once(record: bool) -> None:
                prompt = [rng.randrange(3, vocab) for _ in range(ctx_len + TAIL)]
                ttft, usage = await first_token(s, B.url, prompt)
                assert cached_tokens(usage) == 0, usage
                if record:
                    res.setdefault("recompute", []).append(ttft)

            for w in range(2):  # warm-up: both paths, both engines
                await migrate_once(-1 - w, False)
                await recompute_once(False)
            for i in range(repeats):
                if i % 2:
                    await migrate_once(i, True)
                    await recompute_once(True)
                else:
                    await recompute_once(True)
                    await migrate_once(i, True)
                print(f"  http rep {i}: recompute {res['recompute'][-1] * 1e3:.1f} ms, migrate "
                      f"{res['migrate'][-1] * 1e3:.1f} ms (prep_recv {res['prep_recv'][-1] * 1e3:.1f}, remote_send "
                      f"{res['remote_send'][-1] * 1e3:.1f}, commit {res['commit'][-1] * 1e3:.1f}, request "
                      f"{res['request_on_B'][-1] * 1e3:.1f}), local hit on A {res['local'][-1] * 1e3:.1f} ms, on B again "
                      f"{res['again_on_B'][-1] * 1e3:.1f} ms, load {loadavg()}", flush=True)
    finally:
        launcher.stop()
    return res


# ---- in process ------------------------------------------------------------------------------------
def inproc_bench(spec, model_dir: str, repeats: int, ctx_len: int, page: int, rng: random.Random) -> dict:
    import torch

    from microserve.config import EngineConfig
    from microserve.engine.engine import Engine
    from microserve.engine.sampling import SamplingParams
    torch.set_num_threads(1)
    cfg = dict(model=model_dir, load_format="dummy", kv_transport="shm", page_size=page, kv_cache_memory_mb=512,
               max_num_batched_tokens=2048, num_threads=1)
    A, B = Engine(EngineConfig(**cfg)), Engine(EngineConfig(**cfg))
    write_s = [0.0]
    orig_write = A.transport.write

    def timed_write(*args):  # profile: time the sender's engine thread spends in transport.write
        t = time.perf_counter()
        try:
            return orig_write(*args)
        finally:
            write_s[0] += time.perf_counter() - t
    A.transport.write = timed_write
    one = SamplingParams(max_tokens=1, temperature=0.0)
    vocab = A.model_config.vocab_size
    end = ctx_len // page * page
    res: dict[str, list] = {}
    n = [0]

    def until_first(e: Engine, rid: str) -> None:
        while e.has_work():
            for o in e.step():
                assert o.error is None, o.error
                if o.rid == rid and o.new_token_ids:
                    return

    def drain(e: Engine) -> None:
        while e.has_work():
            for o in e.step():
                assert o.error is None, o.error

    def request(e: Engine, prompt) -> tuple[float, int]:
        n[0] += 1
        rid = f"r{n[0]}"
        t0 = time.perf_counter()
        req = e.add_request(rid, prompt, one)
        until_first(e, rid)
        drain(e)
        return time.perf_counter() - t0, req.num_cached_tokens

    def migrate_once(record: bool) -> None:
        ctx = [rng.randrange(3, vocab) for _ in range(ctx_len)]
        prompt = ctx + [rng.randrange(3, vocab) for _ in range(TAIL)]
        request(A, ctx)
        n[0] += 1
        rid = f"m{n[0]}"
        t0 = time.perf_counter()
        meta, matched = B.prep_recv(rid, prompt, end, one)
        t1 = time.perf_counter()
        st = (A.stats.kv_transfer_s, A.stats.kv_exposed_s)
        write_s[0] = 0.0
        A.remote_send(rid, prompt, matched, end, meta)
        drain(A)
        t2 = time.perf_counter()
        prof = {"p_write": write_s[0], "p_copy": A.stats.kv_transfer_s - st[0], "p_exposed": A.stats.kv_exposed_s - st[1]}
        B.commit(rid)
        t3 = time.perf_counter()
        ttft, cached = request(B, prompt)
        assert cached == end, cached
        again, cached2 = request(B, ctx + [rng.randrange(3, vocab) for _ in range(TAIL)])
        assert cached2 == end, cached2
        if record:
            res.setdefault("again_on_B", []).append(again)
            for k, v in (("migrate", t3 + ttft - t0), ("prep_recv", t1 - t0), ("remote_send", t2 - t1),
                         ("commit", t3 - t2), ("request_on_B", ttft), *prof.items()):
                res.setdefault(k, []).append(v)
            res.setdefault("local", []).append(request(A, prompt)[0])

    def recompute_once(record: bool) -> None:
        ttft, cached = request(B, [rng.randrange(3, vocab) for _ in range(ctx_len + TAIL)])
        assert cached == 0
        if record:
            res.setdefault("recompute", []).append(ttft)

    for _ in range(2):
        migrate_once(False)
        recompute_once(False)
    for i in range(repeats):
        for fn in ((migrate_once, recompute_once) if i % 2 else (recompute_once, migrate_once)):
            fn(True)
        print(f"  in-process rep {i}: recompute {res['recompute'][-1] * 1e3:.1f} ms, migrate "
              f"{res['migrate'][-1] * 1e3:.1f} ms (remote_send {res['remote_send'][-1] * 1e3:.1f}: write() "
              f"{res['p_write'][-1] * 1e3:.1f}, copies {res['p_copy'][-1] * 1e3:.1f}, flush wait "
              f"{res['p_exposed'][-1] * 1e3:.1f}; request "
              f"{res['request_on_B'][-1] * 1e3:.1f}), local hit {res['local'][-1] * 1e3:.1f} ms, load {loadavg()}",
              flush=True)
    A.close()
    B.close()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="large,small", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--modes", default="http,inproc")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    m = machine()
    rng = random.Random(0)
    log_dir = tempfile.mkdtemp(prefix="microserve-bench-mig-")
    rows, descs = [], []
    t_start = time.perf_counter()
    for name in a.models.split(","):
        spec = MODELS[name]
        model_dir = write_model(*spec)
        descs.append(f"  - {name}: {model_desc(*spec)}; KV of the migrated window "
                     f"{kv_bytes(spec, a.context // a.page_size * a.page_size) / 2**20:.1f} MiB")
        for mode in a.modes.split(","):
            print(f"{name} / {mode}: {model_desc(*spec)}", flush=True)
            if mode == "http":
                r = asyncio.run(http_bench(spec, model_dir, a.repeats, a.context, a.page_size, rng, log_dir))
            else:
                r = inproc_bench(spec, model_dir, a.repeats, a.context, a.page_size, rng)
            speed = [rc / mg for rc, mg in zip(r["recompute"], r["migrate"])]
            rows.append([name, "HTTP, 2 processes" if mode == "http" else "in process", spread(r["recompute"], 1e3),
                         spread(r["migrate"], 1e3), f"**{median(r['recompute']) / median(r['migrate']):.1f}x** "
                         f"(per pair {min(speed):.1f}-{max(speed):.1f}x)",
                         spread(r["prep_recv"], 1e3), spread(r["remote_send"], 1e3), spread(r["commit"], 1e3),
                         spread(r["request_on_B"], 1e3), spread(r["local"], 1e3), spread(r["again_on_B"], 1e3),
                         (f"{median(r['p_write']) * 1e3:.1f} / {median(r['p_copy']) * 1e3:.1f} / "
                          f"{median(r['p_exposed']) * 1e3:.1f}" if "p_write" in r else "-")])
        shutil.rmtree(model_dir, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    header = ["model", "engines", "(b) recompute on B: TTFT, ms", "(a) migrate from A, then request on B, ms",
              "speed-up (b)/(a) (paper: 1.7x)", "of (a): prep_recv, ms", "remote_send, ms", "commit, ms",
              "request on B (prefix hit), ms", "(c) request on A (local hit), ms",
              "(d) request on B again (its own hit), ms",
              "in-process remote_send profile: write() calls / copies / flush wait, ms"]
    setup = (
        f"- context {a.context} tokens (random ids) + {TAIL} new tokens, max_tokens 1; migrated window: the "
        f"context's full pages ({a.context // a.page_size * a.page_size} tokens, page size {a.page_size}), as the "
        f"`migration` strategy does (A's prefix cache holds full pages only)\n"
        f"- models:\n" + "\n".join(descs) + "\n"
        f"- engines pinned one per core, 1 torch thread each (HTTP: `microserve engine ... --num-threads 1 "
        f"--cpu-affinity 0|1`, kv_transport shm); in process: both Engine objects in this process, 1 thread\n"
        f"- {a.repeats} repeats per row after 2 warm-up rounds, (a) and (b) interleaved with alternating order, "
        f"fresh random contexts every time; cells: median (min-max); {elapsed:.0f} s in all\n")
    publish("migration", "2. Context-cache migration vs recompute (1000-token context)", header, rows, m, setup, NOTES,
            a.no_write)
    return 0


NOTES = """
How to read it:

- **Migration beats recompute by far more than the paper's 1.7x, because CPU prefill is slow and
  copies are not.** Recomputing the 1000-token context costs a full prefill (hundreds of ms to
  seconds on one core); migrating costs two short HTTP calls (prep_recv, commit), one remote_send
  whose window A already caches (so it is sent page to page, no compute), and then the request on B,
  which computes only the tail. On an H100 the 1000-token prefill takes tens of milliseconds, so the
  fixed costs (4 HTTP round trips, the transfer) weigh much more; the paper's 1.7x is that regime.
- **Where the migration time goes** (the columns after the speed-up): almost all of it is the request
  on B itself, which computes the 8 context tokens past the last full page plus the 8 new ones, and
  that is as slow as the same request on B again once B caches the context itself (column (d)), so
  reading migrated pages costs nothing extra. (Over HTTP, B, pinned to core 1, is slower than A on
  core 0 for the same work (column (c)): core 1 is busier on this shared machine; (a) and (b) both
  run on B, so their ratio is fair.) The
  migration machinery proper (prep_recv + remote_send + commit) is the difference, dominated by
  remote_send, i.e. copying the window's KV (large: 15.5 MiB, small: 3.9 MiB) through shared memory
  plus one HTTP round trip. The in-process profile splits remote_send into the engine thread's time in
  `transport.write` (pairing slots into runs, queuing), the copy itself (CopyWorker time) and the wait
  in flush. A window that is already cached on the sender has no compute to hide its copy behind, so
  the whole copy is exposed (flush wait ~= copy time): remote_send is memcpy-bound, at the
  shared-memory copy bandwidth this loaded 2-core machine gives (a few GB/s).
- Engines are pinned one per core, but the machine is shared, so the recompute times swing by 2x
  between repeats; the speed-up per interleaved pair is given with its range.
"""

if __name__ == "__main__":
    sys.exit(main())
