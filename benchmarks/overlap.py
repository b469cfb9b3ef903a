"""Per-layer overlap of KV transfer with compute (the paper's overlap table), on two in-process engines.

    python benchmarks/overlap.py                       # lengths 1000..5000, 3 repeats, writes the doc
    python benchmarks/overlap.py --repeats 1 --lengths 1000,2000 --no-write

For each input length L the receiver reserves prompt[:L-1] (prep_recv) and the sender prefills
prompt[:L-1] in one step while its per-layer hook hands each layer's fresh K/V to the shm transport
(remote_send). Measured, without touching microserve's code:

- T_layer: from forward pre-hooks on every decoder layer (time from layer i's start to layer i+1's),
  during the sending prefill, and during a plain prefill of another prompt of the same length
  (no send), interleaved, so the cost of the copy thread competing for the cores shows;
- T_transfer per layer: each copy job the CopyWorker runs is timed (wrapped submit), and the
  engine's own totals (EngineStats.kv_transfer_s / layers) are reported beside it;
- hidden share = 1 - exposed / transfer, with `exposed` the time the step waited in flush for the
  copies (EngineStats.kv_exposed_s); and, closer to the paper's per-layer notion, the share of each
  layer's copy that finished before that same layer's compute ended;
- overlap ratio = T_transfer / T_layer, as the paper defines it (15.8% at 1000 tokens, 55.4% at 5000).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time

import torch

from microserve.bench.harness import loadavg, machine, median, model_desc, publish, spread, write_model
from microserve.config import EngineConfig
from microserve.engine.engine import Engine
from microserve.engine.sampling import SamplingParams

PAPER = {1000: (0.197, 1.247), 5000: (0.867, 1.564)}  # (T_transfer ms, T_layer ms) per layer, the paper
GREEDY = SamplingParams(max_tokens=1, temperature=0.0)


class Probe:
    """Timestamps of every decoder layer's start (pre-hooks) and of every copy job the sender's
    CopyWorker runs (wrapped transport.write / worker.submit)."""

    def __init__(self, engine: Engine) -> None:
        self.e = engine
        layers = engine.model.layers
        self.starts: list[float] = []
        self.end = 0.0
        for layer in layers:
            layer.register_forward_pre_hook(lambda m, a: self.starts.append(time.perf_counter()))
        layers[-1].register_forward_hook(lambda m, a, o: setattr(self, "end", time.perf_counter()))
        self.copies: list[tuple[int, float, float, float]] = []  # (layer, issued, started, finished)
        self.writes: list[tuple] = []  # the write() calls of the last run, to replay them alone
        self.hook_s = 0.0  # time the compute thread spent inside transport.write (slot runs, submit)
        tr = engine.transport
        self.orig_write = tr.write
        worker = tr._worker
        orig_write, orig_submit = tr.write, worker.submit
        cur = {"layer": -1, "issued": 0.0}

        def write(layer, src, dst, remote):
            cur["layer"], cur["issued"] = layer, time.perf_counter()
            self.writes.append((layer, src, dst, remote))
            orig_write(layer, src, dst, remote)
            self.hook_s += time.perf_counter() - cur["issued"]

        def submit(fn, nbytes):
            layer, issued = cur["layer"], cur["issued"]

            def timed():
                t = time.perf_counter()
                try:
                    fn()
                finally:
                    self.copies.append((layer, issued, t, time.perf_counter()))
            orig_submit(timed, nbytes)

        tr.write, worker.submit = write, submit

    def replay(self) -> float:
        """Issue the last run's copies again with no compute beside them; returns the wall time."""
        writes, self.writes = self.writes, []
        t0 = time.perf_counter()
        for w in writes:
            self.orig_write(*w)
        self.e.transport.flush(30)
        return time.perf_counter() - t0

    def reset(self) -> None:
        self.writes.clear()
        self.hook_s = 0.0
        self.starts.clear()
        self.copies.clear()
        self.end = 0.0

    def layer_times(self) -> list[float]:
        b = self.starts + [self.end]
        return [b[i + 1] - b[i] for i in range(len(self.starts))]

    def hidden_in_layer(self) -> float:
        """Share of copy time that ran before the end of the compute of the layer that issued it."""
        b = self.starts + [self.end]
        tot = hid = 0.0
        for layer, _, t0, t1 in self.copies:
            layer_end = b[layer + 1]
            tot += t1 - t0
            hid += max(0.0, min(t1, layer_end) - t0)
        return hid / tot if tot else float("nan")


def drain(e: Engine) -> int:
    steps = 0
    while e.has_work():
        for o in e.step():
            assert o.error is None, o.error
        steps += 1
    return steps


def served_hidden(cfg: dict, lengths: list[int], n: int, rng: random.Random) -> dict[int, float]:
    """The same model served by two engine processes: n PD requests per length (prep_recv on D,
    remote_send from P, start_generate on D); the hidden share P's /metrics counters give."""
    import asyncio
    import urllib.request

    import aiohttp

    from microserve.cluster import auth_headers, new_token
    from microserve.launch import EngineSpec, LocalLauncher

    token = new_token()
    args = ["--load-format", "dummy", "--kv-cache-memory-mb",
            str(cfg["kv_cache_memory_mb"]), "--max-num-batched-tokens", str(cfg["max_num_batched_tokens"]),
            "--page-size", str(cfg["page_size"])] + (["--num-threads", str(cfg["num_threads"])] if cfg["num_threads"] else [])
    launcher = LocalLauncher(token=token, startup_timeout_s=300)
    P, D = launcher.start([EngineSpec(cfg["model"], "prefill", args, name="P"),
                           EngineSpec(cfg["model"], "decode", args + ["--seed", "1"], name="D")], wait=False)

    def counters() -> tuple[float, float]:
        text = urllib.request.urlopen(P.url + "/metrics").read().decode()
        value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
        return value["microserve_kv_transfer_seconds_total"], value["microserve_kv_transfer_exposed_seconds_total"]

    async def one(s: aiohttp.ClientSession, L: int, rid: str) -> None:
        body = {"user": rid, "prompt": [rng.randrange(3, 8000) for _ in range(L)], "max_tokens": 1, "temperature": 0}
        async with s.post(D.url + "/microserving/prep_recv", json={**body, "end": L - 1}) as r:
            meta = (await r.json())["kv_append_metadata"]
        for url, extra in ((P.url + "/microserving/remote_send", {"begin": 0, "end": L - 1, "kv_addr_info": meta}),
                           (D.url + "/microserving/start_generate", {"begin": L - 1})):
            async with s.post(url, json={**body, **extra}) as r:
                assert r.status == 200, await r.text()

    async def run() -> dict[int, float]:
        out = {}
        async with aiohttp.ClientSession(headers=auth_headers(token)) as s:
            await one(s, min(lengths), "warm-up")
            for L in lengths:
                t0 = counters()
                for i in range(n):
                    await one(s, L, f"served-{L}-{i}")
                t1 = counters()
                out[L] = 1 - (t1[1] - t0[1]) / (t1[0] - t0[0])
                print(f"served L={L}: hidden {out[L] * 100:.1f} % over {n} requests", flush=True)
        return out
    try:
        launcher.wait_healthy()
        return asyncio.run(run())
    finally:
        launcher.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1000,2000,3000,4000,5000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/bench_microserving.md")
    ap.add_argument("--served", type=int, default=0, metavar="N",
                    help="also serve the same model from two engine processes and send N PD requests per length "
                         "through the microserving API; report the hidden share their /metrics give")
    ap.add_argument("--json", default=None, help="write the per-length hidden shares (in process, served) here")
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    m = machine()
    model_dir = write_model(a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads, max_pos=max(8192, max(lengths) + 16))
    cfg = dict(model=model_dir, load_format="dummy", kv_transport="shm", page_size=a.page_size,
               max_num_batched_tokens=max(lengths) + 16, kv_cache_memory_mb=1024, num_threads=a.threads)
    S, R = Engine(EngineConfig(**cfg)), Engine(EngineConfig(**cfg, seed=1))
    probe = Probe(S)
    rng = random.Random(0)
    vocab = S.model_config.vocab_size
    layers = S.model_config.num_layers
    threads = torch.get_num_threads()
    n = 0

    def prompt(L):
        return [rng.randrange(3, vocab) for _ in range(L)]

    def send_run(L: int) -> dict:
        nonlocal n
        n += 1
        ids, rid = prompt(L), f"ov-{n}"
        meta, matched = R.prep_recv(rid, ids, L - 1, GREEDY)
        assert matched == 0
        st0 = (S.stats.kv_sent_bytes, S.stats.kv_transfer_s, S.stats.kv_exposed_s)
        S.remote_send(rid, ids, 0, L - 1, meta)
        probe.reset()
        t0 = time.perf_counter()
        steps = drain(S)
        wall = time.perf_counter() - t0
        lt = probe.layer_times()
        cp = [c[3] - c[2] for c in probe.copies]
        queue = [c[2] - c[1] for c in probe.copies]
        hidden_layer = probe.hidden_in_layer()
        hook = probe.hook_s / layers
        alone = probe.replay() / layers  # the same copies into the same slots, nothing else running
        R.abort_parked(rid)
        sent = S.stats.kv_sent_bytes - st0[0]
        transfer, exposed = S.stats.kv_transfer_s - st0[1], S.stats.kv_exposed_s - st0[2]
        assert steps == 1 and len(lt) == layers and len(cp) == layers, (steps, len(lt), len(cp))
        return {"t_layer": median(lt), "t_layer_wall": wall / layers, "t_copy": median(cp), "transfer": transfer / layers,
                "exposed": exposed, "hidden": 1 - exposed / transfer, "hidden_layer": hidden_layer,
                "bytes_layer": sent / layers, "queue": median(queue), "wall": wall, "alone": alone, "hook": hook}

    def plain_run(L: int) -> dict:
        nonlocal n
        n += 1
        S.add_request(f"plain-{n}", prompt(L - 1), GREEDY)
        probe.reset()
        drain(S)
        return {"t_layer": median(probe.layer_times())}

    print(f"model: {model_desc(a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads, vocab)}; torch threads {threads}",
          flush=True)
    t_start = time.perf_counter()
    for L in (min(lengths), min(lengths)):  # warm-up: both paths, allocator and thread pools
        send_run(L)
        plain_run(L)
    res: dict[int, dict[str, list]] = {L: {} for L in lengths}
    for rep in range(a.repeats):
        for L in (lengths if rep % 2 == 0 else lengths[::-1]):
            runs = [("send", send_run), ("plain", plain_run)]
            if (rep + L // 1000) % 2:
                runs.reverse()
            for kind, fn in runs:
                r = fn(L)
                for k, v in r.items():
                    res[L].setdefault(f"{kind}.{k}", []).append(v)
                gc.collect()
            d = res[L]
            print(f"rep {rep} L={L}: T_layer {d['send.t_layer'][-1] * 1e3:.1f} ms (plain {d['plain.t_layer'][-1] * 1e3:.1f}),"
                  f" copy {d['send.transfer'][-1] * 1e3:.3f} ms/layer (alone {d['send.alone'][-1] * 1e3:.3f}),"
                  f" queue {d['send.queue'][-1] * 1e3:.3f} ms, hook {d['send.hook'][-1] * 1e3:.3f} ms, exposed {d['send.exposed'][-1] * 1e3:.3f} ms,"
                  f" load {loadavg()}", flush=True)
    S.close()
    R.close()
    served = served_hidden(cfg, lengths, a.served, rng) if a.served else {}
    elapsed = time.perf_counter() - t_start
    if a.json:
        with open(a.json, "w") as f:
            json.dump({L: {"in_process": median(res[L]["send.hidden"]), "served": served.get(L)} for L in lengths}, f)

    rows = []
    for L in lengths:
        d = res[L]
        ratio = [c / t for c, t in zip(d["send.transfer"], d["send.t_layer"])]
        ratio_alone = [c / t for c, t in zip(d["send.alone"], d["plain.t_layer"])]
        slow = [s / p - 1 for s, p in zip(d["send.t_layer"], d["plain.t_layer"])]
        gbps = [b / c / 1e9 for b, c in zip(d["send.bytes_layer"], d["send.transfer"])]
        gbps_alone = [b / c / 1e9 for b, c in zip(d["send.bytes_layer"], d["send.alone"])]
        paper = f"{PAPER[L][0] / PAPER[L][1] * 100:.1f}% ({PAPER[L][0]} / {PAPER[L][1]} ms)" if L in PAPER else "-"
        rows.append([L, spread(d["send.t_layer"], 1e3), spread(d["plain.t_layer"], 1e3),
                     spread(slow, 100, "{:+.1f}") + " %", f"{median(d['send.bytes_layer']) / 2**20:.2f}",
                     spread(d["send.transfer"], 1e3, "{:.3f}") + f" ({median(gbps):.2f} GB/s)",
                     spread(d["send.alone"], 1e3, "{:.3f}") + f" ({median(gbps_alone):.2f} GB/s)",
                     spread(ratio, 100, "{:.2f}") + " %", spread(ratio_alone, 100, "{:.2f}") + " %", paper,
                     spread(d["send.hidden"], 100) + " %", spread(d["send.hidden_layer"], 100) + " %",
                     spread(d["send.exposed"], 1e3, "{:.3f}"), spread(d["send.hook"], 1e3, "{:.2f}")]
                    + ([f"{served[L] * 100:.1f} %"] if served else []))
    header = ["input tokens", "T_layer with send, ms", "T_layer plain prefill, ms", "compute slowdown from the send",
              "KV per layer, MiB", "T_transfer per layer during compute, ms", "T_transfer per layer alone, ms",
              "overlap ratio T_transfer/T_layer", "same, copy alone / plain layer", "paper (Llama-70B, H100)",
              "hidden share 1 - exposed/transfer", "copy done within its own layer", "exposed wait per prefill, ms",
              "hook time on the compute thread per layer, ms"] + (["served: /metrics hidden ratio"] if served else [])
    setup = (
        f"- model: {model_desc(a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads, vocab)}; page size "
        f"{a.page_size}; torch threads {threads} (+ the CopyWorker thread)\n"
        f"- two in-process engines, `kv_transport=\"shm\"`; for each length the receiver prep_recvs "
        f"prompt[:L-1] and the sender remote_sends it, prefilled in one step (max_num_batched_tokens "
        f"{max(lengths) + 16}); after 2 warm-up rounds, {a.repeats} repeats per length, each paired with a "
        f"plain prefill of the same length (no send), order alternated; {elapsed:.0f} s in all\n"
        f"- cells: median (min-max) over the repeats. T_layer is from forward pre-hooks on the decoder layers "
        f"(median layer of the step); T_transfer is EngineStats.kv_transfer_s / layers (the CopyWorker's timed "
        f"copies); exposed is EngineStats.kv_exposed_s (the wait in flush after the last layer)\n")
    publish("overlap", "1. Per-layer KV transfer vs compute (overlap ratio)", header, rows, m, setup, OVERLAP_NOTES,
            a.no_write)
    return 0


OVERLAP_NOTES = """
How to read it:

- **The overlap ratio is 2-3 orders of magnitude below the paper's.** The paper's 15.8%-55.4% come
  from an H100, where one layer of Llama-70B (TP4) computes 1000 tokens in ~1.2 ms, so moving that
  layer's KV is a visible fraction of it. On this CPU a layer of a 90M-parameter model takes hundreds
  of milliseconds for the same tokens, while its KV (2 MiB per 1000 tokens) copies in about a
  millisecond: compute is ~1000x slower relative to memory bandwidth than on the GPU. The ratio also
  does not grow with length here: on the H100 the layer time barely grows (1.25 -> 1.56 ms for 5x
  the tokens) while the transfer grows linearly; on a CPU both grow at least linearly (attention
  quadratically), so the ratio stays flat.
- **The transfer is fully hidden**: `1 - exposed/transfer` is ~100%, and every layer's copy
  finishes while that same layer is still computing. What is left exposed is the bookkeeping of the
  final flush (microseconds).
- **2 cores, 3 busy threads.** torch computes on 2 threads and the CopyWorker copies on a third, so
  the copy steals CPU time (and memory bandwidth) from compute. The "compute slowdown" column is that
  price as measured, but on this shared machine the run-to-run spread of the layer time (tens of
  percent either way, see min-max) is far larger than the copy time itself (well under 1% of a
  layer), so no slowdown can be resolved; it is bounded above by the copy time plus a thread wake-up
  per layer. Copy bandwidth during compute vs alone also moves with the machine's load.
- "hook time on the compute thread" is what the per-layer hook costs the compute thread itself
  (`transport.write`: pairing slots into runs, queuing the job); it is not overlapped. Here it is
  larger than the copy it hands off, though the same `write` call takes ~0.03-0.06 ms in isolation:
  in the forward pass this Python runs against torch's OpenMP worker, which spin-waits on the
  other core between ops (with 1 torch thread, or OMP_WAIT_POLICY=PASSIVE, it drops to ~0.3 ms in a
  side experiment). It is negligible next to a CPU layer, but on a GPU, where a layer takes ~1 ms,
  the per-layer Python must stay in the tens of microseconds.
"""

if __name__ == "__main__":
    sys.exit(main())
