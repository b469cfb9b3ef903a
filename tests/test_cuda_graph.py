"""CUDA-graph decode (`microserve/engine/cuda_graph.py`).

Everything but the capture itself runs on CPU: `DecodeGraphRunner` before `capture()` fills the same
static buffers, pads the batch to the same bucket and slices out the same rows as a replay would.
These tests check that path against the plain eager step (logits, KV pool), and that steps a graph
cannot serve fall back. The capture is checked by the CUDA-only test at the end (skipped here).
The same runner on the Triton kernels, under TRITON_INTERPRET=1, is the "graph" group of
tests/triton_kernel_checks.py.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import STORIES
from microserve.config import EngineConfig
from microserve.engine.cuda_graph import DecodeGraphRunner, decode_buckets
from microserve.engine.engine import Engine
from microserve.engine.sampling import SamplingParams
from microserve.engine.scheduler import ScheduledBatch
from microserve.kv.cache import SendWindow

MAX_SEQS = 16  # buckets 1, 2, 4, 8, 16
PROMPTS = [[1] + [(37 * i + 11 * j) % 500 + 3 for j in range(5 + 9 * i)] for i in range(12)]  # 5..104 tokens


def _cpu_kernel_builds() -> bool:
    from microserve.kernels.build import kernel_error
    return kernel_error() is None


BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not _cpu_kernel_builds(),
                                                                  reason="CPU kernels do not build"))]


def make_engine(backend: str, **kw) -> Engine:
    kw.setdefault("num_pages", 400)
    return Engine(EngineConfig(model=STORIES, kv_transport="none", page_size=4, max_num_seqs=MAX_SEQS,
                               attention_backend=backend, **kw))


def attach(engine: Engine, **kw) -> DecodeGraphRunner:
    """What the engine does on CUDA, minus `capture()`."""
    g = DecodeGraphRunner(engine.model, engine.pool, engine.device, engine.config.max_num_seqs,
                          engine.max_model_len, **kw)
    engine.runner.decode_graphs = g
    return g


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request):
    e = make_engine(request.param)
    g = attach(e)
    yield e, g
    e.close()


def start_decoding(e: Engine, n: int) -> ScheduledBatch:
    """Admit n requests and step until each has its prompt computed and one token sampled: the next
    step of every one is a decode. Returns that decode-only batch (not yet run)."""
    for i in range(n):
        e.add_request(f"r{i}", PROMPTS[i], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    while any(r.num_remaining != 1 for r in e.requests.values()) or e.scheduler.waiting:
        e.step()
    reqs = list(e.scheduler.running)
    assert len(reqs) == n
    for r in reqs:  # what the scheduler does before a step: pages for the new token
        assert e.cache.allocate(r.seq, r.num_computed + 1)
    return ScheduledBatch(reqs, [1] * len(reqs))


def finish(e: Engine) -> None:
    for rid in list(e.requests):
        e.abort(rid)
    a = e.cache.check()
    assert a["owned"] == 0 and a["free"] + a["cached"] == a["total"], a


def new_slots(batch: ScheduledBatch, page_size: int) -> list[int]:
    return [r.seq.pages[r.num_computed // page_size] * page_size + r.num_computed % page_size for r in batch.requests]


def changed_slots(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    """Slots whose K or V differ in any layer. Pools are [layers, 2, pages, page_size, H, D]."""
    diff = (a.flatten(2, 3) != b.flatten(2, 3)).flatten(3).any(-1).any(1).any(0)
    return set(diff.nonzero().flatten().tolist())


# ---- buckets ------------------------------------------------------------------------------------------

def test_bucket_list():
    assert decode_buckets(128) == [1, 2, 4] + list(range(8, 129, 8))
    assert decode_buckets(1) == [1]
    assert decode_buckets(4) == [1, 2, 4]
    assert decode_buckets(5) == [1, 2, 4, 5]
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert decode_buckets(10_000)[-1] == 512  # bigger decode batches stay eager


def test_bucket_selection_and_limits(engine):
    e, g = engine
    assert g.buckets == [1, 2, 4, 8, 16]
    assert [g.bucket_for(n) for n in (1, 2, 3, 4, 5, 8, 9, 15, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 16, None]
    assert g.max_pages == -(-e.max_model_len // e.pool.page_size)
    assert g.fits(16, e.max_model_len, g.max_pages)
    assert not g.fits(17, 10, 3)  # more rows than the largest bucket
    assert not g.fits(1, e.max_model_len + 1, 3)  # longer than the grids were sized for
    assert not g.fits(1, 10, g.max_pages + 1)  # more pages than the static block table holds
    assert not g.fits(0, 0, 0)


def test_scratch_page_is_out_of_circulation(engine):
    """Padding writes into a page the allocator never hands out and the accounting leaves out."""
    e, g = engine
    a = e.cache.check()
    assert a["total"] == e.pool.num_pages - 1 and e.pool.reserved == [g.scratch_page]
    pages = e.pool.alloc(e.pool.num_free)
    assert g.scratch_page not in pages and e.pool.alloc(1) is None
    e.pool.free(pages)


# ---- the padded path equals the eager one ------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3, 6, 8, 11])
def test_padded_decode_equals_eager(engine, n):
    """One decode step of n sequences, eager and padded to its bucket, from the same pool: the
    same logits, the same new K/V, and no other slot of the pool written but the scratch page's."""
    e, g = engine
    batch = start_decoding(e, n)
    ps = e.pool.page_size
    e.pool.kv[:, :, g.scratch_page] = 0  # so that padding's stores show, step after step
    # and so that the real stores show even where a reused page already holds this very token's K/V
    e.pool.kv.flatten(2, 3)[:, :, new_slots(batch, ps)] = 1e4
    kv0 = e.pool.kv.clone()
    e.runner.decode_graphs = None
    ref, ref_reqs, _ = e.runner.run(batch)
    ref, kv_eager = ref.clone(), e.pool.kv.clone()

    e.pool.kv.copy_(kv0)
    e.runner.decode_graphs = g
    runs = g.num_runs
    got, reqs, sent = e.runner.run(batch)
    pad = g.bucket_for(n) - n
    assert g.num_runs == runs + 1 and pad == {1: 0, 3: 1, 6: 2, 8: 0, 11: 5}[n]
    assert reqs == ref_reqs and not sent and got.shape == ref.shape == (n, e.model_config.vocab_size)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    real = set(new_slots(batch, ps))
    scratch = set(range(g.scratch_page * ps, (g.scratch_page + 1) * ps))
    written = changed_slots(e.pool.kv, kv0)
    assert real <= written and written - real <= scratch, "padding wrote outside the scratch page"
    assert bool(written & scratch) == (pad > 0), "padding rows (and only they) store into the scratch page"
    keep = torch.ones(e.pool.num_pages * ps, dtype=torch.bool)
    keep[sorted(scratch)] = False
    torch.testing.assert_close(e.pool.kv.flatten(2, 3)[:, :, keep], kv_eager.flatten(2, 3)[:, :, keep],
                               rtol=1e-5, atol=1e-5)
    finish(e)


def test_engine_generation_uses_graph_path_only_for_decode_steps(engine):
    """Greedy generation with staggered arrivals (so some steps mix prefill and decode): the same
    tokens and logits with and without the runner, which served exactly the decode-only steps."""
    e, g = engine

    def generate(graphs: DecodeGraphRunner | None) -> tuple[dict, dict, int]:
        e.runner.decode_graphs = graphs
        tokens: dict[str, list[int]] = {}
        logits: dict[str, list[torch.Tensor]] = {}
        decode_only = 0
        run = e.runner.run

        def recording(batch):
            nonlocal decode_only
            decode_only += all(n == 1 for n in batch.num_tokens)
            out = run(batch)
            for i, r in enumerate(out[1]):
                logits.setdefault(r.rid, []).append(out[0][i].clone())
            return out
        e.runner.run = recording
        try:
            added = 0
            for step in range(40):
                if step in (0, 2, 5):  # new requests join running decodes: mixed steps
                    for _ in range(3):
                        e.add_request(f"s{added}", PROMPTS[added], SamplingParams(max_tokens=8, temperature=0.0,
                                                                                  ignore_eos=True))
                        added += 1
                for o in e.step():
                    tokens.setdefault(o.rid, []).extend(o.new_token_ids)
        finally:
            del e.runner.run
        assert not e.has_work()
        return tokens, logits, decode_only

    runs = g.num_runs
    t_graph, l_graph, decode_steps = generate(g)
    served = g.num_runs - runs
    t_eager, l_eager, _ = generate(None)
    e.runner.decode_graphs = g
    assert t_graph == t_eager and len(t_graph) == 9
    assert served == decode_steps > 0
    # A padded batch changes every GEMM's row count, and BLAS may then sum a row in another order:
    # ~1.5e-5 on these logits, so the bound is transformers parity's 1e-4, not bitwise.
    for rid in l_eager:
        torch.testing.assert_close(torch.stack(l_graph[rid]), torch.stack(l_eager[rid]), rtol=1e-5, atol=1e-4)
    finish(e)


# ---- fallbacks ----------------------------------------------------------------------------------------

def test_mixed_step_falls_back(engine):
    """A batch with a multi-token chunk runs eagerly."""
    e, g = engine
    batch = start_decoding(e, 2)
    e.add_request("late", PROMPTS[5], SamplingParams(max_tokens=2, temperature=0.0))
    runs = g.num_runs
    e.step()  # 2 decodes + a 50-token prefill
    assert g.num_runs == runs
    e.step()  # 3 decodes
    assert g.num_runs == runs + 1 and len(batch.requests) == 2
    finish(e)


def test_send_hook_falls_back(engine, monkeypatch):
    """A decode whose new token is in a send window needs the per-layer hook: eager, and the hook
    hands every layer's row to the transport."""
    e, g = engine
    batch = start_decoding(e, 3)
    req = batch.requests[1]
    writes = []
    monkeypatch.setattr(e.runner.transport, "write", lambda layer, src, dst, remote: writes.append((layer, src, dst)))
    pos = req.num_computed
    req.send = SendWindow(pos, pos + 1, [7], remote=None)
    runs = g.num_runs
    logits, _, sent = e.runner.run(batch)
    assert g.num_runs == runs and sent and logits.shape[0] == 3
    slot = new_slots(batch, e.pool.page_size)[1]
    assert writes == [(layer, [slot], [7]) for layer in range(e.model_config.num_layers)]
    req.send = None
    e.runner.run(batch)
    assert g.num_runs == runs + 1
    finish(e)


def test_batch_beyond_largest_bucket_falls_back():
    e = make_engine("torch")
    g = attach(e, buckets=[1, 2])
    batch = start_decoding(e, 3)
    runs = g.num_runs
    logits, _, _ = e.runner.run(batch)
    assert g.num_runs == runs and logits.shape[0] == 3
    e.runner.run(ScheduledBatch(batch.requests[:2], [1, 1]))
    assert g.num_runs == runs + 1
    finish(e)
    e.close()


def test_cpu_engine_never_builds_graphs():
    e = make_engine("torch", num_pages=16)
    assert e.runner.decode_graphs is None and e.pool.reserved == []
    e.close()


# ---- on a GPU: captured graphs give the eager engine's tokens -------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="graphs need the triton backend")
def test_cuda_graphs_match_enforce_eager():
    def generate(enforce_eager: bool) -> tuple[list[list[int]], int]:
        e = Engine(EngineConfig(model=STORIES, device="cuda", dtype="float32", kv_transport="none", page_size=16,
                                num_pages=256, max_num_seqs=MAX_SEQS, enforce_eager=enforce_eager))
        g = e.runner.decode_graphs
        assert (g is None) == enforce_eager
        if g is not None:
            assert sorted(g.graphs) == g.buckets
        outs: dict[str, list[int]] = {}
        for i in range(11):  # 11 decodes: bucket 16, 5 padding rows; fewer as requests end
            e.add_request(str(i), PROMPTS[i], SamplingParams(max_tokens=24 - i, temperature=0.0, ignore_eos=True))
        while e.has_work():
            for o in e.step():
                outs.setdefault(o.rid, []).extend(o.new_token_ids)
        e.cache.check()
        runs = g.num_runs if g is not None else 0
        e.close()
        return [outs[str(i)] for i in range(11)], runs

    graphed, runs = generate(False)
    eager, _ = generate(True)
    assert runs > 0
    assert graphed == eager
