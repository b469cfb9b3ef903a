"""Fencing and credentials: a late or stale remote_send changes nothing anyone reads, quarantined
pages are never reused while a write may land, and the microserving API needs the cluster token."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import torch

from conftest import AUTH, STORIES, kv_accounting
from test_microserving import assert_clean, body, post, single

from microserve.kv.cache import KVCache, KVCacheError
from microserve.kv.pool import KVPool
from microserve.tokenizer import Tokenizer

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun"
VICTIM = "The little dog ran to the park. He saw a big red ball and wanted to play with it all day"


@pytest.fixture(scope="module")
def pd(module_engines):
    args = ["--page-size", "4", "--recv-lease-s", "1", "--transfer-timeout-s", "2"]
    return module_engines.start(*args, name="P").url, module_engines.start(*args, name="D").url


@pytest.mark.parametrize("how", ["abort", "lease expiry"])
def test_stale_remote_send_changes_nothing(pd, how):
    """Free a reservation (abort, or let its 1 s lease run out), cache a victim prompt on its pages
    (the pool hands freed pages out first), then send the late remote_send: it gets a 409, and the
    victim's greedy output (now served from its cached prefix) is unchanged."""
    P, D = pd
    ids = Tokenizer(STORIES).encode(PROMPT)
    victim = Tokenizer(STORIES).encode(VICTIM)

    async def go():
        rid = f"stale-{how}-{time.monotonic_ns()}"
        st, r = await post(D, "/microserving/prep_recv", body(rid, ids, end=len(ids) - 1))
        assert st == 200 and r["prefix_matched_length"] == 0, r
        if how == "abort":
            assert (await post(D, "/microserving/abort", {"user": rid}))[0] == 200
        else:
            await asyncio.sleep(2.0)  # lease 1 s, swept every 0.5 s
        before = await single(D, victim)  # computes the victim's KV onto the freed pages, and caches it
        st, s = await post(P, "/microserving/remote_send",
                           body(rid, ids, begin=0, end=len(ids) - 1, kv_addr_info=r["kv_append_metadata"]))
        assert st == 409 and s["error"]["code"] == "stale_reservation", s
        after = await single(D, victim)  # a prefix hit on the pages the late write targeted
        assert after == before
        assert kv_accounting(D)["cached"] > 0
    asyncio.run(go())
    assert_clean(P, D)


def test_quarantine_holds_pages_until_the_sender_is_done():
    """A claimed reservation that is aborted keeps its pages out of use until the granted deadline
    plus hold_s, or until the sender settles; a claim after the end is refused."""
    pool = KVPool(torch.zeros(1, 2, 8, 4, 1, 4))  # [layers, K/V, pages, page_size, kv heads, head dim]
    cache = KVCache(pool, recv_lease_s=1.0, hold_s=2.0)
    total = cache.accounting()["total"]
    for settle in (False, True):
        res = cache.reserve_recv(f"r{settle}", list(range(10)), 9)
        pages = set(res.seq.private)
        assert cache.claim(res.fence) > time.time()
        assert cache.claim(res.fence, renew=True) > time.time()  # the same sender, later
        if settle:
            cache.claim(res.fence)  # a second sender
        cache.abort(f"r{settle}")
        with pytest.raises(KVCacheError) as e:
            cache.claim(res.fence)
        assert e.value.status == 409 and e.value.code == "stale_reservation"
        a = cache.check()
        assert a["quarantined"] == len(pages) and a["free"] == total - len(pages)
        other = cache.match([], 0)
        assert cache.allocate(other, (total - len(pages)) * 4) and not pages & other.private  # never handed out
        assert not cache.allocate(cache.match([], 0), 4)
        cache.release(other)
        if settle:
            cache.settle(res.fence)  # one sender done, the other may still write
            assert cache.accounting()["quarantined"] == len(pages)
            cache.settle(res.fence)
        else:
            cache.expire(now=time.monotonic() + 1.0)  # before the granted deadline + hold: still held
            assert cache.accounting()["quarantined"] == len(pages)
            cache.expire(now=time.monotonic() + 3.5)
        a = cache.check()
        assert (a["quarantined"], a["owned"], a["free"]) == (0, 0, total)
    res = cache.reserve_recv("never-claimed", list(range(10)), 9)
    cache.abort("never-claimed")  # no sender claimed it: nothing can land, freed at once
    assert cache.check()["free"] == total


def test_microserving_calls_need_the_cluster_token(pd):
    """Without the token every microserving and debug call is a 401 (with the OpenAI error body);
    with it, the call works; the OpenAI API, /health and /metrics stay open."""
    P, D = pd
    ids = Tokenizer(STORIES).encode(PROMPT)

    async def go():
        async with aiohttp.ClientSession() as s:
            for path, payload in (("/microserving/prep_recv", body("x", ids, end=3)), ("/microserving/match", {"prompt": ids}),
                                  ("/microserving/abort", {"user": "x"}), ("/microserving/fence", {"fence": "f"})):
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": AUTH["Authorization"][7:]}):
                    async with s.post(D + path, json=payload, headers=headers) as r:
                        err = (await r.json())["error"]
                        assert r.status == 401 and err["code"] == "unauthorized" and "cluster token" in err["message"]
            async with s.get(D + "/debug/kv") as r:
                assert r.status == 401
            async with s.post(D + "/microserving/match", json={"prompt": ids}, headers=AUTH) as r:
                assert r.status == 200
            async with s.post(D + "/v1/completions", json={"prompt": ids, "max_tokens": 2}) as r:
                assert r.status == 200
            for path in ("/health", "/metrics"):
                async with s.get(D + path) as r:
                    assert r.status == 200
    asyncio.run(go())


def test_short_leases_hold_under_a_backlog(tmp_path):
    """1 s leases, 160 concurrent requests through pd on 1 prefill + 1 decode engine: the prefill
    engine's queue is longer than a lease, so senders renew the fences they hold while queued, and
    no client gets an error. Outputs match a single engine's; pages go back to the pool."""
    from test_router import TOK, Cluster, admin, complete

    # a 16-token step budget and ~390-token prompts: the prefill engine's queue takes several seconds to drain
    c = Cluster(tmp_path, roles=("prefill", "decode"), engine_args=["--recv-lease-s", "1", "--max-num-batched-tokens", "16"])
    try:
        story = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park "
                 "with her friends and her dog, and every day they ran and jumped and laughed together. ")
        prompts = [TOK.encode(f"Day {i}: {story * 6}") for i in range(160)]  # no shared prefix

        async def go():
            assert (await admin(c.url, "/admin/strategy", {"strategy": "pd"}))[0] == 200
            return await asyncio.gather(*(complete(c.url, {"prompt": p, "max_tokens": 4, "temperature": 0,
                                                           "return_token_ids": True}) for p in prompts))
        results = asyncio.run(go())
        assert [st for st, _ in results] == [200] * len(prompts), [r for st, r in results if st != 200][:3]
        assert "expired" not in (tmp_path / "engine1.log").read_text()  # no lease ran out (no retry hid one)

        async def refs():
            return [await complete(c.ref.url, {"prompt": p, "max_tokens": 4, "temperature": 0, "return_token_ids": True})
                    for p in prompts[::40]]
        for (_, got), (_, want) in zip(results[::40], asyncio.run(refs())):
            assert got["choices"][0]["token_ids"] == want["choices"][0]["token_ids"]
        assert_clean(*(e.url for e in c.engines))
    finally:
        c.stop()


def test_forged_kv_addr_info_over_http(pd, tmp_path):
    """A remote_send with a description edited to point elsewhere: signed by another cluster (403),
    or even by this one (as an insider would: the transport's own checks give 400): another
    process's fd, a file's fd, a path field, slots past the pool, a run of 10**12 slots. Nothing
    is created or touched, and both engines go on serving."""
    import base64
    import json
    import os

    from conftest import CLUSTER_TOKEN
    from microserve.cluster import sign, verify
    from microserve.transfer.plan import process_start_time

    P, D = pd
    ids = Tokenizer(STORIES).encode(PROMPT)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"x" * 4096)
    before = (victim.stat().st_mtime_ns, victim.read_bytes())
    target = tmp_path / "created-by-forgery"

    def forge(meta: str, **change) -> str:
        doc = json.loads(base64.b64decode(verify(meta, CLUSTER_TOKEN)))
        runs = change.pop("runs", None)
        doc["peer"].update(change)
        if runs is not None:
            doc["runs"] = runs
        return base64.b64encode(json.dumps(doc).encode()).decode()

    async def go():
        rid = f"forge-{time.monotonic_ns()}"
        st, r = await post(D, "/microserving/prep_recv", body(rid, ids, end=len(ids) - 1))
        meta, m, n = r["kv_append_metadata"], r["prefix_matched_length"], len(ids) - 1
        fd = os.open(victim, os.O_RDWR)  # this test process's fd on a file: not an engine's pool
        try:
            cases = [(sign(forge(meta), "another-cluster"), 403),
                     (sign(forge(meta, pid=os.getpid(), fd=fd, start=process_start_time(os.getpid())),
                           CLUSTER_TOKEN), 400),
                     (sign(forge(meta, path=str(target)), CLUSTER_TOKEN), None),  # a path field is ignored
                     (sign(forge(meta, fd=10_000), CLUSTER_TOKEN), 400),
                     (sign(forge(meta, runs=[1, 10**9, n - m]), CLUSTER_TOKEN), 400),
                     (sign(forge(meta, runs=[1, 0, 10**12]), CLUSTER_TOKEN), 400)]
            for kv, want in cases:
                st, s = await post(P, "/microserving/remote_send", body(rid, ids, begin=m, end=n, kv_addr_info=kv))
                if want is None:
                    assert st in (200, 409), s
                else:
                    assert st == want and set(s["error"]) == {"message", "type", "param", "code"}, (want, s)
        finally:
            os.close(fd)
        st, g = await post(D, "/microserving/start_generate", body(rid, ids, begin=n))  # the one good send landed
        assert st == 200 and g["choices"][0]["token_ids"] == await single(D, ids), g
        for url in (P, D):  # both still serve
            assert len(await single(url, ids[:8])) > 0
    asyncio.run(go())
    assert not target.exists()
    assert (victim.stat().st_mtime_ns, victim.read_bytes()) == before
    assert_clean(P, D)


def test_bearer_credentials_are_exact():
    """The admin token and the cluster token are accepted only as `Authorization: Bearer <token>`."""
    from aiohttp.test_utils import make_mocked_request

    from microserve.web import HTTPError, check_bearer

    def check(header: str | None) -> int:
        req = make_mocked_request("GET", "/admin/state", headers={"Authorization": header} if header else {})
        try:
            check_bearer(req, "s3cret", "admin token")
            return 200
        except HTTPError as e:
            return e.status
    assert check("Bearer s3cret") == 200
    assert [check(h) for h in (None, "s3cret", "bearer s3cret", "Bearer  s3cret", "Bearer s3cret ", "Basic s3cret",
                               "Bearer wrong", "Bearers3cret")] == [401] * 8
