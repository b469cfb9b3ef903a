"""KV transport bandwidth between two processes, as a share of a plain in-process copy.

    python benchmarks/transport_bandwidth.py                # 1, 16, 256 MiB; shm and nixl; writes the doc
    python benchmarks/transport_bandwidth.py --sizes 1,16 --repeats 3 --no-write

A receiver process allocates a pool through each transport and publishes describe(); this process
is the sender, with its own pool of random data. One "window" is what remote_send moves for a
prompt span: for every layer, write(layer, src_slots, dst_slots) of K and V, then one flush.
Layout: Llama-3.2-1B-like, 16 layers x 8 KV heads x head_dim 64, bf16, 16-token pages (a page is
16 KiB per layer and kind; 512 KiB over all layers), pools of 1280 pages on each side. Page lists:
  contiguous - both sides' pages are consecutive: one run per layer and kind;
  scattered  - random pages on both sides: one 16 KiB run per page, layer and kind.
Baseline: `dst.copy_(src)` of one contiguous buffer of the window's size in this process, timed
right beside each transport run (same repeat, same machine state). Ratio = memcpy time / transport
time for that repeat; the table shows medians over the repeats. Small windows repeat the whole
window inside one sample (>= 32 MiB per sample) so the timer resolution does not matter.
Reference: "paged copy, in-process" moves the same page lists between two pools of this process,
one memmove per run and kind, addresses precomputed: what the paged layout itself costs, with no
transport (and no per-layer bookkeeping) involved.
Every (transport, pattern, size) is checked byte for byte on sampled rows before it is timed.
Both processes run torch with one thread: the baseline is one core's copy, like the transports'
copy threads (an engine's other cores are busy computing).
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import multiprocessing as mp
import random
import statistics
import sys
import time

import torch

from microserve.bench.harness import ROOT, loadavg, machine, run_header
from microserve.transfer import make_transport
from microserve.transfer.base import slot_runs_array

DOC = ROOT / "docs" / "bench_transport.md"
LAYERS, KV_HEADS, HEAD_DIM, PAGE, PAGES, DTYPE = 16, 8, 64, 16, 1280, torch.bfloat16
SHAPE = (LAYERS, 2, PAGES, PAGE, KV_HEADS, HEAD_DIM)
PAGE_BYTES = LAYERS * 2 * PAGE * KV_HEADS * HEAD_DIM * 2  # all layers, K and V
MiB = 1 << 20


def _receiver(names: list[str], conn) -> None:
    """Own one pool per transport; publish descriptions; answer row queries until 'exit'."""
    torch.set_num_threads(1)
    ts = {n: make_transport(n) for n in names}
    pools = {n: t.allocate(SHAPE, DTYPE, torch.device("cpu")) for n, t in ts.items()}
    for kv in pools.values():
        kv.view(torch.uint8).fill_(7)  # fault every page in now, not during the first timed write
    conn.send(json.dumps({n: t.describe() for n, t in ts.items()}))
    while (msg := conn.recv()) != "exit":
        name, layer, slots = msg
        conn.send(pools[name][layer].flatten(1, 2)[:, slots].clone())
    for t in ts.values():
        t.close()


def _slots(pages: list[int]) -> list[int]:
    return [p * PAGE + i for p in pages for i in range(PAGE)]


def _window(t, remote, src: list[int], dst: list[int], iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        for layer in range(LAYERS):
            t.write(layer, src, dst, remote)
        t.flush(120.0)
    return (time.perf_counter() - t0) / iters


def _paged(a: torch.Tensor, b: torch.Tensor, src: list[int], dst: list[int], iters: int) -> float:
    """The same rows as a window, pool to pool inside this process, addresses worked out beforehand:
    only the copies (one memmove per run and kind) are timed."""
    row, slots = KV_HEADS * HEAD_DIM * DTYPE.itemsize, PAGES * PAGE  # a and b may be byte views
    r = slot_runs_array(src, dst) * row
    moves = [list(zip((r[:, 1] + b.data_ptr() + plane).tolist(), (r[:, 0] + a.data_ptr() + plane).tolist(),
                      r[:, 2].tolist()))
             for plane in range(0, 2 * LAYERS * slots * row, slots * row)]
    move = ctypes.memmove
    t0 = time.perf_counter()
    for _ in range(iters):
        for plane in moves:
            for d, s, n in plane:
                move(d, s, n)
    return (time.perf_counter() - t0) / iters


def _memcpy(a: torch.Tensor, b: torch.Tensor, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        b.copy_(a)
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,16,256", help="window sizes in MiB (multiples of 0.5)")
    ap.add_argument("--transports", default="shm,nixl")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-write", action="store_true", help=f"do not write {DOC.relative_to(ROOT)}")
    args = ap.parse_args()
    names = args.transports.split(",")
    if "nixl" in names and importlib.util.find_spec("nixl") is None:
        print("nixl is not installed: measuring shm only", file=sys.stderr)
        names.remove("nixl")
    sizes = [float(s) for s in args.sizes.split(",")]
    torch.set_num_threads(1)
    m = machine()

    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(names, child), daemon=True)
    proc.start()
    senders = {n: make_transport(n) for n in names}
    local = {n: t.allocate(SHAPE, DTYPE, torch.device("cpu")) for n, t in senders.items()}
    for kv in local.values():
        kv.view(torch.uint8).copy_(torch.randint(0, 256, kv.view(torch.uint8).shape, dtype=torch.uint8))
    ref_src = torch.randint(0, 256, (SHAPE[0] * SHAPE[1] * PAGES * PAGE * KV_HEADS * HEAD_DIM * 2,), dtype=torch.uint8)
    ref_dst = torch.full_like(ref_src, 7)  # both faulted in
    descs = json.loads(conn.recv())
    remotes = {n: senders[n].connect(descs[n]) for n in names}

    rng = random.Random(0)
    results: dict[tuple[str, str, float], list[float]] = {}  # -> ratios
    rates: dict[tuple[str, str, float], list[float]] = {}  # -> GiB/s
    memrates: dict[float, list[float]] = {}
    paged: dict[tuple[str, float], list[float]] = {}  # (pattern, size) -> GiB/s
    for size in sizes:
        n = round(size * MiB / PAGE_BYTES)
        nbytes = n * PAGE_BYTES
        iters = max(1, (32 * MiB) // nbytes)
        pats = {"contiguous": (list(range(n)), list(range(PAGES - n, PAGES))),
                "scattered": (rng.sample(range(PAGES), n), rng.sample(range(PAGES), n))}
        a = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        b = torch.zeros(nbytes, dtype=torch.uint8)
        _memcpy(a, b, 2)  # warm: b is freshly allocated
        for name in names:  # correctness, and warm the sender's mapping of the receiver's pages
            for pat, (sp, dp) in pats.items():
                src, dst = _slots(sp), _slots(dp)
                _window(senders[name], remotes[name], src, dst, 1)
                probe = sorted(rng.sample(range(len(src)), min(64, len(src))))
                for layer in (0, LAYERS - 1):
                    conn.send((name, layer, [dst[i] for i in probe]))
                    got = conn.recv()
                    want = local[name][layer].flatten(1, 2)[:, [src[i] for i in probe]]
                    if not torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
                        sys.exit(f"{name} {pat} {size} MiB: the receiver's rows differ from the sender's")
        for _ in range(args.repeats):
            for pat, (sp, dp) in pats.items():
                paged.setdefault((pat, size), []).append(
                    nbytes / _paged(ref_src, ref_dst, _slots(sp), _slots(dp), iters) / 2**30)
            for name in names:
                for pat, (sp, dp) in pats.items():
                    src, dst = _slots(sp), _slots(dp)
                    tm = _memcpy(a, b, iters)
                    tt = _window(senders[name], remotes[name], src, dst, iters)
                    results.setdefault((name, pat, size), []).append(tm / tt)
                    rates.setdefault((name, pat, size), []).append(nbytes / tt / 2**30)
                    memrates.setdefault(size, []).append(nbytes / tm / 2**30)
        print(f"{size:g} MiB done", file=sys.stderr)
    conn.send("exit")
    proc.join(30)
    for t in senders.values():
        t.close()

    def cell(vals: list[float], fmt: str) -> str:
        return f"{format(statistics.median(vals), fmt)} ({format(min(vals), fmt)}-{format(max(vals), fmt)})"

    head = "| transport | page list | " + " | ".join(f"{s:g} MiB" for s in sizes) + " |"
    lines = [head, "|" + "---|" * (2 + len(sizes))]
    lines.append("| torch copy, in-process (GiB/s) | one buffer | "
                 + " | ".join(cell(memrates[s], ".2f") for s in sizes) + " |")
    for pat in ("contiguous", "scattered"):
        lines.append(f"| paged copy, in-process (GiB/s) | {pat} | "
                     + " | ".join(cell(paged[(pat, s)], ".2f") for s in sizes) + " |")
    for name in names:
        for pat in ("contiguous", "scattered"):
            lines.append(f"| {name} (GiB/s) | {pat} | " + " | ".join(cell(rates[(name, pat, s)], ".2f") for s in sizes) + " |")
    for name in names:
        for pat in ("contiguous", "scattered"):
            lines.append(f"| {name} / torch copy | {pat} | "
                         + " | ".join(cell([100 * r for r in results[(name, pat, s)]], ".0f") + "%" for s in sizes) + " |")
    table = "\n".join(lines)
    note = (f"Median (min-max) of {args.repeats} repeats; KV layout {LAYERS} layers x {KV_HEADS} KV heads x "
            f"head_dim {HEAD_DIM}, bf16, {PAGE}-token pages; the CPU cores are shared with other jobs.")
    print(table)
    print(note)
    if not args.no_write:
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(f"# KV transport bandwidth\n\n{run_header(m, loadavg())}\n{table}\n\n{note}\n")
        print(f"wrote {DOC.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
