"""The microserving APIs across two real engine processes: prep_recv / remote_send / start_generate
(plus commit / abort / match), token identity for every split pattern, no leaked pages, bad input."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time

import aiohttp
import pytest

from conftest import AUTH, CLUSTER_TOKEN, STORIES, kv_accounting, make_hf_model

from microserve.cluster import sign, verify

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her"
MAX_TOKENS = 24


def run(coro):
    return asyncio.run(coro)


async def post(url: str, path: str, body: dict, timeout: float = 60, auth: bool = True) -> tuple[int, dict]:
    async with aiohttp.ClientSession(headers=AUTH if auth else None) as s:
        async with s.post(url + path, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return r.status, await r.json()


def body(rid: str, prompt, **kw) -> dict:
    return {"user": rid, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True, **kw}


async def single(url: str, prompt) -> list[int]:
    st, r = await post(url, "/v1/completions", {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                                                "return_token_ids": True})
    assert st == 200, r
    return r["choices"][0]["token_ids"]


async def tokenize(url: str, prompt: str) -> list[int]:
    """Token ids of a text prompt, as the engine sees them (echo of prompt via match is not enough)."""
    from microserve.tokenizer import Tokenizer
    return Tokenizer(STORIES).encode(prompt)


async def disaggregated(p_url: str, d_url: str, rid: str, prompt, end: int, begin_gen: int | None = None) -> dict:
    """The PD flow of the paper: prep_recv on D, remote_send from P of what D lacks, start_generate on D."""
    st, r = await post(d_url, "/microserving/prep_recv", body(rid, prompt, end=end))
    assert st == 200, r
    matched = r["prefix_matched_length"]
    L = len(prompt if isinstance(prompt, list) else await tokenize(d_url, prompt))
    if matched < (end if end >= 0 else L + end):  # negative windows count from the end, Python style
        st, s = await post(p_url, "/microserving/remote_send",
                           body(rid, prompt, begin=matched, end=end, kv_addr_info=r["kv_append_metadata"], recv_rank=1))
        assert st == 200 and set(s) == {"kv_bytes"} and s["kv_bytes"] > 0, s
    st, g = await post(d_url, "/microserving/start_generate", body(rid, prompt, begin=end if begin_gen is None else begin_gen))
    assert st == 200, g
    g["matched"] = matched
    return g


def assert_clean(*urls: str) -> None:
    """Every engine back to its resting state: no owned pages, nothing parked, free + cached == total."""
    for url in urls:
        deadline = time.monotonic() + 5
        while True:
            a = kv_accounting(url)
            if (a["owned"], a["parked"], a["live_seqs"]) == (0, 0, 0):
                break
            assert time.monotonic() < deadline, a
            time.sleep(0.05)
        assert a["free"] + a["cached"] == a["total"], a


@pytest.fixture(scope="module", params=["shm", "nixl"])
def pair(request, module_engines):
    if request.param == "nixl":
        pytest.importorskip("nixl")
    args = ["--kv-transport", request.param, "--page-size", "4", "--recv-lease-s", "3", "--transfer-timeout-s", "5"]
    return (module_engines.start(*args, name=f"P-{request.param}"), module_engines.start(*args, name=f"D-{request.param}"),
            module_engines.start(*args, name=f"S-{request.param}"))


def test_split_patterns_token_identical(pair):
    P, D, S = (p.url for p in pair)

    async def go():
        ids = await tokenize(S, PROMPT)
        ref = await single(S, ids)
        L = len(ids)
        for i, end in enumerate([L - 1, L - 2, L // 2, 5, 1]):  # plain PD split, then balanced splits
            g = await disaggregated(P, D, f"split-{i}-{time.monotonic_ns()}", ids, end)
            assert g["choices"][0]["token_ids"] == ref, f"end={end}"
            assert g["usage"]["completion_tokens"] == len(ref)
        # text prompts work too, and the result is the same
        g = await disaggregated(P, D, f"text-{time.monotonic_ns()}", PROMPT, -1)
        assert g["choices"][0]["token_ids"] == ref
    run(go())
    assert_clean(P, D, S)
    sent, received = metric(P, "microserve_kv_sent_bytes_total"), metric(D, "microserve_kv_received_bytes_total")
    assert sent > 0 and received > 0 and metric(P, "microserve_kv_transfer_seconds_total") > 0
    assert 0 <= metric(P, "microserve_kv_transfer_hidden_ratio") <= 1


def metric(url: str, name: str) -> float:
    import urllib.request
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or
               line.startswith(name + "{"))


def test_receiver_and_sender_prefix(pair):
    P, D, S = (p.url for p in pair)

    async def go():
        base = await tokenize(S, PROMPT)
        # receiver holds a prefix: D served the first part before; only the rest is sent
        shared = base[:20]
        await single(D, shared + [300, 301])
        ids = shared + base[20:]
        ref = await single(S, ids)
        g = await disaggregated(P, D, f"rp-{time.monotonic_ns()}", ids, len(ids) - 1)
        assert g["matched"] > 0 and g["choices"][0]["token_ids"] == ref
        # sender holds a prefix (and the window starts inside it): sent page to page, no recompute
        other = base[:12] + [400, 401, 402, 403, 404, 405, 406, 407, 408]
        await single(P, other + [5])
        ref2 = await single(S, other)
        g = await disaggregated(P, D, f"sp-{time.monotonic_ns()}", other, len(other) - 1)
        assert g["choices"][0]["token_ids"] == ref2
    run(go())
    assert_clean(P, D, S)


def test_migration_then_reuse(pair):
    """Move a context's KV to D with prep_recv + remote_send + commit, then a request reuses it on D."""
    P, D, S = (p.url for p in pair)

    async def go():
        ctx = [1] + list(range(100, 132))  # a context no other test has cached
        question = ctx + [411, 322, 265]
        ref = await single(S, question)
        await single(P, ctx + [7])  # P holds the context in its prefix cache
        rid = f"mig-{time.monotonic_ns()}"
        st, r = await post(D, "/microserving/prep_recv", body(rid, ctx + [7], end=len(ctx)))
        assert st == 200 and r["prefix_matched_length"] == 0
        st, s = await post(P, "/microserving/remote_send", body(rid, ctx + [7], begin=0, end=len(ctx),
                                                                kv_addr_info=r["kv_append_metadata"], recv_rank=1))
        assert st == 200, s
        st, c = await post(D, "/microserving/commit", {"user": rid})
        assert st == 200 and c["cached_tokens"] == len(ctx) // 4 * 4
        st, m = await post(D, "/microserving/match", {"prompt": question})
        assert m["prefix_matched_length"] == c["cached_tokens"]
        st, g = await post(D, "/v1/completions", {"prompt": question, "max_tokens": MAX_TOKENS, "temperature": 0,
                                                  "return_token_ids": True})
        assert g["usage"]["prompt_tokens_details"]["cached_tokens"] >= c["cached_tokens"]
        assert g["choices"][0]["token_ids"] == ref
    run(go())
    assert_clean(P, D, S)


def test_streamed_start_generate(pair):
    P, D, S = (p.url for p in pair)

    async def go():
        ids = await tokenize(S, PROMPT)
        ref = await single(S, ids)
        rid = f"stream-{time.monotonic_ns()}"
        st, r = await post(D, "/microserving/prep_recv", body(rid, ids, end=len(ids) - 1))
        m = r["prefix_matched_length"]
        if m < len(ids) - 1:
            st, s = await post(P, "/microserving/remote_send", body(rid, ids, begin=m, end=len(ids) - 1,
                                                                    kv_addr_info=r["kv_append_metadata"]))
            assert st == 200, s
        toks, done = [], False
        async with aiohttp.ClientSession(headers=AUTH) as sess:
            async with sess.post(D + "/microserving/start_generate",
                                 json=body(rid, ids, begin=len(ids) - 1, stream=True)) as resp:
                assert resp.status == 200 and resp.content_type == "text/event-stream"
                async for line in resp.content:
                    if line.startswith(b"data: [DONE]"):
                        done = True
                    elif line.startswith(b"data: "):
                        toks += json.loads(line[6:])["choices"][0].get("token_ids", [])
        assert done and toks == ref
    run(go())
    assert_clean(P, D, S)


def test_bad_input(pair):
    P, D, S = (p.url for p in pair)

    async def go():
        ids = await tokenize(S, PROMPT)
        L = len(ids)
        for end in (L, L + 3, -L - 1):  # prep_recv window rules: 0 <= end < L
            st, r = await post(D, "/microserving/prep_recv", body("w", ids, end=end))
            assert st == 400 and r["error"]["param"] == "end", r
        st, r = await post(D, "/microserving/prep_recv", body("w", ids))
        assert st == 400 and "end" in r["error"]["message"]
        rid = f"bad-{time.monotonic_ns()}"
        st, r = await post(D, "/microserving/prep_recv", body(rid, ids, end=L - 1))
        meta = r["kv_append_metadata"]
        st, r2 = await post(D, "/microserving/prep_recv", body(rid, ids, end=L - 1))  # same id twice
        assert st == 409, r2
        for b, e in ((0, L), (5, 5), (6, 2), (-1, 3)):  # remote_send window rules: 0 <= begin < end < L
            st, r2 = await post(P, "/microserving/remote_send", body(rid, ids, begin=b, end=e, kv_addr_info=meta))
            assert st == 400, (b, e, r2)
        st, r2 = await post(P, "/microserving/remote_send", body(rid, ids, begin=1, end=L - 1, kv_addr_info=meta))
        assert st == 400 and "reserved" in r2["error"]["message"]  # end - begin != reserved length
        for garbled in ("not base64!", base64.b64encode(b"{}").decode(), base64.b64encode(b"[1, 2]").decode()):
            st, r2 = await post(P, "/microserving/remote_send", body(rid, ids, begin=0, end=L - 1, kv_addr_info=garbled))
            assert st == 403 and r2["error"]["code"] == "forbidden", r2  # unsigned: nothing in it is read
            signed = sign(garbled, CLUSTER_TOKEN)  # as if a cluster member had garbled it
            st, r2 = await post(P, "/microserving/remote_send", body(rid, ids, begin=0, end=L - 1, kv_addr_info=signed))
            assert st == 400 and r2["error"]["code"] == "invalid_kv_addr_info", r2
        doc = json.loads(base64.b64decode(verify(meta, CLUSTER_TOKEN)))
        doc["layout"][1] += 1  # a foreign engine: different KV layout
        foreign = base64.b64encode(json.dumps(doc).encode()).decode()
        st, r2 = await post(P, "/microserving/remote_send", body(rid, ids, begin=0, end=L - 1, kv_addr_info=foreign))
        assert st == 403, r2  # edited: the signature no longer holds
        st, r2 = await post(P, "/microserving/remote_send", body(rid, ids, begin=0, end=L - 1,
                                                               kv_addr_info=sign(foreign, CLUSTER_TOKEN)))
        assert st == 400 and "layout" in r2["error"]["message"]
        st, r2 = await post(D, "/microserving/start_generate", body(rid, ids, begin=L))  # begin out of range
        assert st == 400, r2
        st, r2 = await post(D, "/microserving/abort", {"user": rid})
        assert st == 200
        for path in ("/microserving/start_generate", "/microserving/commit", "/microserving/abort"):
            st, r2 = await post(D, path, body(rid, ids, begin=L - 1))  # already ended
            assert st == 409 and "aborted" in r2["error"]["message"], r2
            st, r2 = await post(D, path, body("never-seen", ids, begin=L - 1))  # unknown
            assert st == 404 and r2["error"]["type"] == "not_found_error", r2
        # a finished request cannot be started again
        g = await disaggregated(P, D, rid2 := f"fin-{time.monotonic_ns()}", ids, L - 1)
        st, r2 = await post(D, "/microserving/start_generate", body(rid2, ids, begin=L - 1))
        assert st == 409 and "started" in r2["error"]["message"]
        # lease expiry (--recv-lease-s 3)
        rid3 = f"lease-{time.monotonic_ns()}"
        st, r = await post(D, "/microserving/prep_recv", body(rid3, ids, end=L - 1))
        await asyncio.sleep(4)
        st, r2 = await post(D, "/microserving/start_generate", body(rid3, ids, begin=L - 1))
        assert st == 409 and "expired" in r2["error"]["message"], r2
        st, r2 = await post(D, "/microserving/prep_recv", {"prompt": ids, "end": 3})  # no user id
        assert st == 400 and r2["error"]["param"] == "user"
        # still serving
        assert await single(D, ids) == await single(S, ids)
    run(go())
    assert_clean(P, D, S)


def test_dead_receiver_fails_fast(engines):
    P = engines.start("--transfer-timeout-s", "3", name="P")
    D = engines.start(name="D")

    async def go():
        ids = list(range(3, 60))
        st, r = await post(D.url, "/microserving/prep_recv", body("dead", ids, end=len(ids) - 1))
        assert st == 200
        os.killpg(D.popen.pid, signal.SIGKILL)
        D.popen.wait()
        t0 = time.monotonic()
        st, r2 = await post(P.url, "/microserving/remote_send",
                            body("dead", ids, begin=0, end=len(ids) - 1, kv_addr_info=r["kv_append_metadata"]))
        assert 500 <= st < 600 and r2["error"]["code"] == "transfer_error", r2
        assert time.monotonic() - t0 < 10
        assert await single(P.url, ids)  # still serving
    run(go())
    assert_clean(P.url)


def test_tiny_random_config(engines, tmp_path):
    """The same flow on a tiny random checkpoint (a different shape from stories260K)."""
    path = make_hf_model(tmp_path / "tiny", "llama", head_dim=32, num_attention_heads=2, num_key_value_heads=1)
    P, D, S = (engines.start("--page-size", "8", model=path, name=n).url for n in "PDS")

    async def go():
        ids = list(range(5, 47))
        ref = await single(S, ids)
        for end in (len(ids) - 1, 17):
            g = await disaggregated(P, D, f"tiny-{end}", ids, end)
            assert g["choices"][0]["token_ids"] == ref
    run(go())
    assert_clean(P, D, S)
