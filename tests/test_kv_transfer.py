"""KV bytes: after prep_recv + remote_send, the receiver's reserved slots hold exactly the K/V the
sender computed (tensors compared, every layer, K and V), whether the sender computed them in this
call or sent them page to page from its prefix cache."""
from __future__ import annotations

import pytest
import torch

from conftest import STORIES
from microserve.config import EngineConfig
from microserve.engine.engine import Engine
from microserve.engine.sampling import SamplingParams
from microserve.kv.pool import slots_for
from microserve.transfer.base import decode_kv_addr

PS = 4
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def make(transport: str = "shm", **kw) -> Engine:
    return Engine(EngineConfig(model=STORIES, num_pages=128, page_size=PS, kv_transport=transport, **kw))


def drain(e: Engine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while e.has_work():
        for o in e.step():
            assert o.error is None, o.error
            out.setdefault(o.rid, []).extend(o.new_token_ids)
    return out


def rows(e: Engine, slots: list[int]) -> torch.Tensor:
    """[layers, 2, len(slots), H, D] rows of e's pool."""
    kv = e.pool.kv
    return kv.flatten(2, 3)[:, :, slots]


@pytest.fixture(scope="module", params=["shm", "nixl"])
def trio(request):
    if request.param == "nixl":
        pytest.importorskip("nixl")
    engines = [make(request.param) for _ in range(3)]
    yield engines
    for e in engines:
        e.close()


@pytest.mark.parametrize("warm_sender", [False, True])
def test_received_rows_equal_sent_rows(trio, warm_sender):
    P, D, _ = trio
    ids = D.tokenizer.encode("Once upon a time, there was a little girl named Lily. She loved to play")
    ids = ids + [300 + warm_sender] * (-len(ids) % PS)  # a page-aligned window: every page ends up in P's tree
    end = len(ids) - PS if len(ids) % PS == 0 else len(ids) // PS * PS
    if warm_sender:  # P already holds the prompt: the window goes page to page, no recompute
        P.add_request("warm", ids + [5], GREEDY)
        drain(P)
        assert P.cache.peek(ids) >= end
    rid = f"bytes-{warm_sender}"
    meta, matched = D.prep_recv(rid, ids, end, GREEDY)
    doc, dst = decode_kv_addr(meta)
    assert len(dst) == end - matched and doc["transport"] == P.transport.name
    steps_before = P.stats.steps
    P.remote_send(rid, ids, matched, end, meta)
    drain(P)
    if warm_sender:
        assert P.stats.steps == steps_before, "a fully cached window must not be recomputed"
    src_pages = [n.page for n in P.cache.tree.match(ids[:end])]
    src = slots_for(src_pages, matched, end, PS)
    sent, got = rows(P, src), rows(D, dst)
    assert sent.abs().sum() > 0
    assert torch.equal(sent, got)  # bit-exact, all layers, K and V
    assert P.stats.kv_sent_bytes >= sent.numel() * sent.element_size()
    D.abort_parked(rid)
    for e in (P, D):
        a = e.cache.check()
        assert a["owned"] == 0 and a["parked"] == 0


def test_received_kv_equals_local_prefill(trio):
    """The KV a receiver gets equals the KV it would have computed itself."""
    P, D, S = trio
    ids = [1] + list(range(200, 231))  # 32 tokens, 8 full pages
    end = 28
    meta, matched = D.prep_recv("local", ids, end, GREEDY)
    P.remote_send("local", ids, matched, end, meta)
    drain(P)
    S.add_request("ref", ids, GREEDY)
    drain(S)
    ref_pages = [n.page for n in S.cache.tree.match(ids[:end])]
    _, dst = decode_kv_addr(meta)
    torch.testing.assert_close(rows(D, dst), rows(S, slots_for(ref_pages, matched, end, PS)), rtol=0, atol=1e-5)
    D.abort_parked("local")
