"""Checks of the Triton attention kernels against the torch backend, on CPU under the interpreter.

Run as a script (tests/test_triton_kernels.py does, in a subprocess): TRITON_INTERPRET must be set
before triton is first imported, which a fresh process guarantees. Prints one JSON line per case:

    {"group": ..., "case": ..., "ok": bool, "rel_err": float, "detail": str}

    python tests/triton_kernel_checks.py [group ...]     # all groups when none is named

With MICROSERVE_TRITON_CHECK_DEVICE=cuda the same cases run compiled on a GPU instead.
"""
from __future__ import annotations

import os

DEVICE = os.environ.get("MICROSERVE_TRITON_CHECK_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

from microserve.attention.base import AttentionMetadata, ForwardContext  # noqa: E402
from microserve.attention.torch_backend import TorchSDPABackend  # noqa: E402
from microserve.attention.torch_backend import store_kv as torch_store_kv  # noqa: E402

FP32_TOL = 1e-4


def make_batch(specs: list[tuple[int, int]], page_size: int, hkv: int, group: int, head_dim: int,
               dtype: torch.dtype = torch.float32, seed: int = 0, spare_pages: int = 3):
    """A random pool and a flat batch: specs are (query_len, seq_len) per sequence, decodes first.

    Pages are handed out in a shuffled order so block tables are not contiguous, and the pool is
    random everywhere, so a kernel that reads a wrong slot gets garbage."""
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-sl // page_size) for _, sl in specs) + spare_pages
    kv = torch.randn((1, 2, need, page_size, hkv, head_dim), generator=g).to(dtype)
    order = torch.randperm(need, generator=g).tolist()
    tables, slots, i = [], [], 0
    for ql, sl in specs:
        n = -(-sl // page_size)
        tables.append(order[i:i + n])
        i += n
        #   positions [sl - ql, sl) are this step's new tokens; slot = page * page_size + offset
        slots += [tables[-1][p // page_size] * page_size + p % page_size for p in range(sl - ql, sl)]
    width = max(len(t) for t in tables)
    qlens, slens = [ql for ql, _ in specs], [sl for _, sl in specs]
    cu = [0]
    for ql in qlens:
        cu.append(cu[-1] + ql)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor(slens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        query_lens_cpu=qlens, seq_lens_cpu=slens,
        num_decodes=_leading_decodes(qlens), page_size=page_size)
    T, hq = cu[-1], hkv * group
    q = torch.randn((T, hq, head_dim), generator=g).to(dtype)
    k = torch.randn((T, hkv, head_dim), generator=g).to(dtype)
    v = torch.randn((T, hkv, head_dim), generator=g).to(dtype)
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        setattr(meta, name, getattr(meta, name).to(DEVICE))
    return kv.to(DEVICE), meta, q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def _leading_decodes(qlens: list[int]) -> int:
    n = 0
    while n < len(qlens) and qlens[n] == 1:
        n += 1
    return n


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def reference(kv, meta, q, k, v, hkv, scale):
    """The torch backend's output on a copy of the pool."""
    be = TorchSDPABackend(q.shape[1], hkv, q.shape[2], scale)
    return be.forward(0, q, k, v, ForwardContext(meta=meta, kv=kv.clone()))


# ---- the cases --------------------------------------------------------------------------------------

def case_store(ps: int, hkv: int, D: int) -> tuple[float, str]:
    from microserve.attention import triton_kernels as tk
    kv, meta, q, k, v = make_batch([(1, 40), (23, 23), (9, 50)], ps, hkv, 1, D)
    # v as a strided view, as the model hands it over (a slice of the fused qkv output)
    fused = torch.cat([k, v], dim=-1)
    v_view = fused[..., D:]
    ref = kv.clone()
    torch_store_kv(ref[0], k, v, meta.slot_mapping)
    got = kv.clone()
    tk.store_kv(got[0], k, v_view, meta.slot_mapping)
    ok = torch.equal(ref, got)
    # a negative slot (padding) must be skipped
    got2 = kv.clone()
    sm = meta.slot_mapping.clone()
    sm[0] = -1
    tk.store_kv(got2[0], k, v, sm)
    ref2 = kv.clone()
    torch_store_kv(ref2[0], k[1:], v[1:], meta.slot_mapping[1:])
    ok2 = torch.equal(ref2, got2)
    return (0.0 if ok and ok2 else float("inf")), f"exact={ok} padding_skipped={ok2}"


def case_prefill(ps: int, hkv: int, group: int, D: int, block: int | None) -> tuple[float, str]:
    """Kernel level: two decodes then prefills with a cached prefix, without, and a one-token chunk.
    Only prefill rows may be written: the decode rows must stay NaN."""
    from microserve.attention import triton_kernels as tk
    specs = [(1, 30), (1, 7), (37, 37), (21, 75), (1, 19), (5, 130)]
    kv, meta, q, k, v = make_batch(specs, ps, hkv, group, D, seed=ps + D + group)
    scale = D ** -0.5
    ref = reference(kv, meta, q, k, v, hkv, scale)
    torch_store_kv(kv[0], k, v, meta.slot_mapping)
    out = torch.full_like(q, float("nan"))
    nd = meta.num_decodes
    tk.prefill_attention(q, kv[0], out, meta.query_start_loc, meta.seq_lens, meta.block_tables, nd,
                         meta.num_seqs - nd, max(meta.query_lens_cpu[nd:]), scale, block_m=block, block_n=block)
    untouched = bool(torch.isnan(out[:nd]).all())
    return rel_err(out[nd:], ref[nd:]), f"decode rows untouched={untouched}" + ("" if untouched else " BAD")


def case_decode(ps: int, hkv: int, group: int, D: int, part_len: int | None, num_splits: int | None,
                block: int | None) -> tuple[float, str]:
    """Kernel level: decodes of very different lengths (some shorter than one partition), then a
    prefill whose rows must stay NaN."""
    from microserve.attention import triton_kernels as tk
    specs = [(1, 3), (1, 150), (1, 64), (1, 201), (1, 1), (12, 40)]
    kv, meta, q, k, v = make_batch(specs, ps, hkv, group, D, seed=7 * ps + D + group)
    scale = D ** -0.5
    ref = reference(kv, meta, q, k, v, hkv, scale)
    torch_store_kv(kv[0], k, v, meta.slot_mapping)
    out = torch.full_like(q, float("nan"))
    nd = meta.num_decodes
    n = tk.decode_attention(q, kv[0], out, meta.query_start_loc, meta.seq_lens, meta.block_tables, nd,
                            max(meta.seq_lens_cpu[:nd]), scale, num_splits=num_splits, part_len=part_len,
                            block_n=block)
    untouched = bool(torch.isnan(out[nd:]).all())
    want_split = (part_len is not None and part_len < 201) or (num_splits or 1) > 1
    ok = untouched and (n > 1) == want_split
    return (rel_err(out[:nd], ref[:nd]) if ok else float("inf")), f"splits={n} prefill rows untouched={untouched}"


def case_backend(ps: int, hkv: int, group: int, D: int, dtype: str = "float32") -> tuple[float, str]:
    """TritonBackend.forward on a mixed batch: same output and same pool as the torch backend; the
    layer hook runs after the store (it sees the new rows) and before attention."""
    from microserve.attention.triton_backend import TritonBackend
    dt = getattr(torch, dtype)
    specs = [(1, 90), (1, 33), (1, 160), (40, 40), (17, 81)]
    kv, meta, q, k, v = make_batch(specs, ps, hkv, group, D, dtype=dt, seed=3 * ps + D)
    scale = D ** -0.5
    kv_ref = kv.clone()
    ref = TorchSDPABackend(hkv * group, hkv, D, scale).forward(0, q, k, v, ForwardContext(meta=meta, kv=kv_ref))
    be = TritonBackend(hkv * group, hkv, D, scale, min_part_len=32)
    seen = []

    def hook(layer: int) -> None:
        rows = kv[layer].flatten(1, 2)[:, meta.slot_mapping]
        seen.append(bool(torch.equal(rows[0], k) and torch.equal(rows[1], v)))

    out = be.forward(0, q, k, v, ForwardContext(meta=meta, kv=kv, layer_hook=hook))
    pool_same = bool(torch.equal(kv, kv_ref))
    ok = seen == [True] and pool_same and be.last_num_splits > 1
    err = rel_err(out, ref)
    return (err if ok else float("inf")), (f"hook_after_store={seen} pool_same={pool_same} "
                                           f"splits={be.last_num_splits} dtype={dtype}")


def case_chunks(ps: int, hkv: int, group: int, D: int) -> tuple[float, str]:
    """One sequence prefilled in several chunks over a cached prefix, then decoded twice, with the
    triton backend and the torch backend each on its own copy of the pool: every step agrees."""
    from microserve.attention.triton_backend import TritonBackend
    L, prefix, chunks = 150, 32, [45, 1, 50, 22]  # 32 cached, then 45 + 1 + 50 + 22 = 150
    g = torch.Generator().manual_seed(ps + hkv + D)
    pages = -(-(L + 2) // ps)
    kv_t = torch.randn((1, 2, pages + 2, ps, hkv, D), generator=g).to(DEVICE)
    kv_r = kv_t.clone()
    table = torch.randperm(pages + 2, generator=g)[:pages].tolist()
    scale = D ** -0.5
    tb = TritonBackend(hkv * group, hkv, D, scale, min_part_len=16)
    rb = TorchSDPABackend(hkv * group, hkv, D, scale)
    done, worst, notes = prefix, 0.0, []
    for n in chunks + [1, 1]:
        specs = (done, done + n)
        slots = [table[p // ps] * ps + p % ps for p in range(*specs)]
        dev = {"device": DEVICE}
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, **dev), query_start_loc=torch.tensor([0, n], dtype=torch.int32, **dev),
            seq_lens=torch.tensor([done + n], dtype=torch.int32, **dev),
            block_tables=torch.tensor([table], dtype=torch.int32, **dev),
            query_lens_cpu=[n], seq_lens_cpu=[done + n], num_decodes=int(n == 1), page_size=ps)
        q = torch.randn((n, hkv * group, D), generator=g).to(DEVICE)
        k = torch.randn((n, hkv, D), generator=g).to(DEVICE)
        v = torch.randn((n, hkv, D), generator=g).to(DEVICE)
        a = tb.forward(0, q, k, v, ForwardContext(meta=meta, kv=kv_t))
        b = rb.forward(0, q, k, v, ForwardContext(meta=meta, kv=kv_r))
        worst = max(worst, rel_err(a, b))
        notes.append(f"{done}+{n}")
        done += n
    return worst, " ".join(notes)


def case_fallback() -> tuple[float, str]:
    """fp64 is not a kernel dtype: the backend must hand the call to torch and agree with it."""
    from microserve.attention.triton_backend import TritonBackend
    kv, meta, q, k, v = make_batch([(1, 20), (9, 30)], 16, 2, 2, 16, dtype=torch.float64)
    ref = TorchSDPABackend(4, 2, 16, 0.25).forward(0, q, k, v, ForwardContext(meta=meta, kv=kv.clone()))
    be = TritonBackend(4, 2, 16, 0.25)
    out = be.forward(0, q, k, v, ForwardContext(meta=meta, kv=kv))
    why = be.unsupported(q, kv)
    return rel_err(out, ref), f"fell back because: {why}"


def case_engine() -> tuple[float, str]:
    """The embedded tiny model (head_dim 16, GQA 2) end to end: greedy tokens from the triton engine
    equal the torch engine's, including a second request that hits the first one's prefix."""
    from microserve.config import EngineConfig
    from microserve.engine.engine import Engine
    from microserve.engine.sampling import SamplingParams

    used_kernels = []
    cached: dict[str, int] = {}

    def run(backend: str) -> list[list[int]]:
        eng = Engine(EngineConfig(model="embedded", attention_backend=backend, kv_transport="none", device=DEVICE,
                                  dtype="float32",
                                  page_size=16, num_pages=64, max_num_batched_tokens=40))
        vocab = eng.model_config.vocab_size
        prompt = [(7 * i + 3) % (vocab - 3) + 3 for i in range(45)]
        outs: dict[str, list[int]] = {}
        eng.add_request("a", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        while eng.has_work():
            for o in eng.step():
                outs.setdefault(o.rid, []).extend(o.new_token_ids)
        eng.add_request("b", prompt[:40] + [4, 5, 6], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        eng.add_request("c", prompt[:5], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        while eng.has_work():
            for o in eng.step():
                outs.setdefault(o.rid, []).extend(o.new_token_ids)
                if o.finished:
                    cached[o.rid] = o.num_cached_tokens
        be = eng.model.layers[0].self_attn.backend
        if backend == "triton":  # the kernels ran, not the torch fallback
            used_kernels.append(be.name == "triton" and be._kernels is not None and not be._warned)
        eng.close()
        return [outs[r] for r in sorted(outs)]

    a, b = run("triton"), run("torch")
    ok = a == b and used_kernels == [True] and cached.get("b", 0) > 0  # b reuses a's prefix
    return (0.0 if ok else float("inf")), f"triton={a} torch={b} kernels_used={used_kernels} cached={cached}"


def case_graph_grid(ps: int, hkv: int, group: int, D: int, part_len: int) -> tuple[float, str]:
    """What a captured decode launches: a split-KV grid sized for a max context (4096) far past
    every sequence, plus padding rows (seq_len 1) as the CUDA-graph runner adds them. Partitions
    past a sequence's end must change nothing: real rows equal the torch reference."""
    from microserve.attention import triton_kernels as tk
    specs = [(1, 3), (1, 150), (1, 64), (1, 201), (1, 1), (1, 1)]  # the last two: padding rows
    kv, meta, q, k, v = make_batch(specs, ps, hkv, group, D, seed=11 * ps + D + group)
    scale = D ** -0.5
    ref = reference(kv, meta, q, k, v, hkv, scale)
    torch_store_kv(kv[0], k, v, meta.slot_mapping)
    out = torch.full_like(q, float("nan"))
    n = tk.decode_attention(q, kv[0], out, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                            meta.num_decodes, 4096, scale, part_len=part_len)
    return rel_err(out[:4], ref[:4]), f"splits={n} (grid for 4096 tokens; longest sequence 201)"


def case_graph_engine() -> tuple[float, str]:
    """The embedded model on the triton backend: decode through DecodeGraphRunner without capture
    (static buffers, batches padded to buckets, grids sized for the max context) gives the eager
    engine's greedy tokens and logits."""
    from microserve.config import EngineConfig
    from microserve.engine.cuda_graph import DecodeGraphRunner
    from microserve.engine.engine import Engine
    from microserve.engine.sampling import SamplingParams

    runs: list[int] = []

    def run(graphs: bool) -> tuple[list[list[int]], list[torch.Tensor]]:
        eng = Engine(EngineConfig(model="embedded", attention_backend="triton", kv_transport="none", device=DEVICE,
                                  dtype="float32", page_size=16, num_pages=64, max_num_seqs=8))
        if graphs:
            eng.runner.decode_graphs = DecodeGraphRunner(eng.model, eng.pool, eng.device, 8, eng.max_model_len)
        vocab = eng.model_config.vocab_size
        logits: list[torch.Tensor] = []
        run_step = eng.runner.run

        def recording(batch):
            out = run_step(batch)
            if out[0] is not None:
                logits.append(out[0].clone())
            return out
        eng.runner.run = recording
        outs: dict[str, list[int]] = {}
        for i, L in enumerate([5, 30, 17]):  # 3 decodes: bucket 4, one padding row
            prompt = [(5 * j + i) % (vocab - 3) + 3 for j in range(L)]
            eng.add_request(str(i), prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        while eng.has_work():
            for o in eng.step():
                outs.setdefault(o.rid, []).extend(o.new_token_ids)
        if graphs:
            runs.append(eng.runner.decode_graphs.num_runs)
        eng.close()
        return [outs[r] for r in sorted(outs)], logits

    (a, la), (b, lb) = run(True), run(False)
    ok = a == b and runs and runs[0] > 0 and len(la) == len(lb)
    err = max(rel_err(x, y) for x, y in zip(la, lb)) if ok else float("inf")
    return err, f"graphs={a} eager={b} padded_steps={runs}"


GROUPS = {
    "store": [(f"store ps={ps} hkv={h} D={d}", case_store, (ps, h, d))
              for ps, h, d in [(16, 2, 64), (64, 1, 128), (256, 4, 16)]],
    "prefill": [(f"prefill ps={ps} gqa={g} D={d} block={b}", case_prefill, (ps, 2, g, d, b))
                for ps, g, d, b in [(16, 1, 64, None), (32, 2, 128, None), (64, 4, 64, 16), (128, 2, 128, 16),
                                    (256, 4, 64, None), (16, 4, 128, 32), (32, 2, 16, 16), (16, 1, 8, None),
                                    (64, 2, 32, None), (16, 2, 80, 16)]],
    "decode": [(f"decode ps={ps} gqa={g} D={d} part={p} splits={s} block={b}", case_decode, (ps, 2, g, d, p, s, b))
               for ps, g, d, p, s, b in [(16, 1, 64, 64, None, None), (32, 2, 128, 32, None, 16),
                                         (64, 4, 64, None, 4, 16), (128, 4, 128, 48, None, 16),
                                         (256, 2, 64, 256, None, None), (16, 2, 16, 32, None, 16),
                                         (16, 8, 32, None, 3, 16), (32, 1, 8, 64, None, 16)]],
    "backend": [(f"backend ps={ps} gqa={g} D={d} {dt}", case_backend, (ps, 2, g, d, dt))
                for ps, g, d, dt in [(16, 2, 64, "float32"), (64, 1, 128, "float32"), (32, 4, 128, "float32"),
                                     (16, 2, 64, "bfloat16"), (32, 4, 128, "float16")]],
    "chunks": [(f"chunks ps={ps} gqa={g} D={d}", case_chunks, (ps, 2, g, d))
               for ps, g, d in [(16, 2, 64), (32, 1, 128), (64, 4, 64)]],
    "fallback": [("fallback fp64", case_fallback, ())],
    "engine": [("engine embedded model triton == torch", case_engine, ())],
    "graph": [(f"graph grid ps={ps} gqa={g} D={d} part={p}", case_graph_grid, (ps, 2, g, d, p))
              for ps, g, d, p in [(16, 2, 64, 256), (32, 4, 128, 64), (16, 1, 16, 4096)]]
             + [("graph runner embedded model padded == eager", case_graph_engine, ())],
}
TOL = {"bfloat16": 2e-2, "float16": 5e-3}


def main(groups: list[str]) -> int:
    failed = 0
    for group in groups or list(GROUPS):
        for name, fn, args in GROUPS[group]:
            t0 = time.perf_counter()
            try:
                err, detail = fn(*args)
            except Exception:
                err, detail = float("inf"), traceback.format_exc(limit=6)
            tol = next((t for dt, t in TOL.items() if dt in name), FP32_TOL)
            ok = err < tol
            failed += not ok
            print(json.dumps({"group": group, "case": name, "ok": ok, "rel_err": err if err != float("inf") else None,
                              "tol": tol, "detail": detail, "seconds": round(time.perf_counter() - t0, 2)}),
                  flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
