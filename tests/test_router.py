"""The router over real engine processes: every strategy token-identical to a single engine
(non-streamed, streamed, through the openai client), reconfiguration under load, failures and
recovery, bad input, and the launcher leaving nothing behind."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest

from conftest import ROOT, STORIES, kv_accounting
from test_microserving import metric
from microserve.launch import EngineSpec, LocalLauncher, free_port
from microserve.tokenizer import Tokenizer

TOKEN = "test-admin-token"
STRATEGIES = ["round_robin", "least_loaded", "cache_aware", "pd", "balanced_pd", "pd:balance=0.3", "cache_aware_pd",
              "cache_aware_pd:bypass_tokens=0", "migration:min_tokens=16,imbalance=0", "adaptive:short_prompt=20",
              "examples.shortest_first_pd:LengthAwarePD"]
TOK = Tokenizer(STORIES)
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day"
PROMPTS = [STORY, STORY + " she saw a big red ball", STORY + " her mom said", "Tom and his dog", "The sun"]
MAX_TOKENS = 20


def greedy(prompt, **kw) -> dict:
    return {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True, **kw}


async def complete(url: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=60)) as r:
            return r.status, await r.json()


async def stream(url: str, body: dict) -> tuple[list[int], str, dict | None]:
    ids, text, err = [], "", None
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/completions", json={**body, "stream": True},
                          timeout=aiohttp.ClientTimeout(total=60)) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        err = chunk["error"]
                    elif chunk["choices"]:
                        ids += chunk["choices"][0].get("token_ids", [])
                        text += chunk["choices"][0]["text"]
    return ids, text, err


async def admin(url: str, path: str, body: dict | None = None, token: str = TOKEN) -> tuple[int, dict]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
        method = s.post if body is not None else s.get
        async with method(url + path, json=body) as r:
            return r.status, await r.json()


class Cluster:
    """Engines in `roles`, a reference engine, and a router process over the engines, all through
    one launcher."""

    def __init__(self, tmp, roles=("prefill", "decode", "decode"), engine_args=()):
        self.launcher = LocalLauncher(str(tmp), startup_timeout_s=90)
        args = ["--debug-api", "--page-size", "4"]
        *self.engines, self.ref = self.launcher.start(
            [EngineSpec(STORIES, role, [*args, "--recv-lease-s", "10", *engine_args], name=f"engine{i}")
             for i, role in enumerate(roles)] + [EngineSpec(STORIES, args=args, name="ref")])
        self.roles = list(roles)
        self.router = self.launcher.start_router(
            "least_loaded", STORIES, ["--admin-token", TOKEN, "--timeout-s", "10"], engines=self.engines,
            env={"PYTHONPATH": str(ROOT)})
        self.url = self.router.url

    def restart(self, i: int):
        self.launcher.restart(self.engines[i])  # same port, so the router finds it again

    def stop(self):
        self.launcher.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def reference(cluster):
    async def go():
        return [(await complete(cluster.ref.url, greedy(p)))[1]["choices"][0] for p in PROMPTS]
    return asyncio.run(go())


def assert_engines_clean(urls):
    for url in urls:
        deadline = time.monotonic() + 5
        while True:
            a = kv_accounting(url)
            if (a["owned"], a["parked"], a["live_seqs"]) == (0, 0, 0) and a["free"] + a["cached"] == a["total"]:
                break
            assert time.monotonic() < deadline, (url, a)
            time.sleep(0.05)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_token_identical(cluster, reference, strategy):
    async def go():
        st, r = await admin(cluster.url, "/admin/strategy", {"strategy": strategy})
        assert st == 200, r
        for _ in range(2):  # the second round hits prefix caches (and, for migration, moves contexts)
            outs = await asyncio.gather(*(complete(cluster.url, greedy(p)) for p in PROMPTS))
            for (st, r), ref in zip(outs, reference):
                assert st == 200, r
                assert r["choices"][0]["token_ids"] == ref["token_ids"], strategy
                assert r["choices"][0]["text"] == ref["text"]
                assert r["usage"]["completion_tokens"] == len(ref["token_ids"])
            for p, ref in zip(PROMPTS[:2], reference):
                ids, text, err = await stream(cluster.url, greedy(p))
                assert err is None and ids == ref["token_ids"] and text == ref["text"]
    asyncio.run(go())
    assert_engines_clean([e.url for e in cluster.engines])


def test_router_metrics(cluster):
    asyncio.run(admin(cluster.url, "/admin/strategy", {"strategy": "pd"}))
    assert asyncio.run(complete(cluster.url, greedy(PROMPTS[1])))[0] == 200
    text = urllib.request.urlopen(cluster.url + "/metrics").read().decode()  # at once: no health check between
    for needle in ('microserve_router_requests_total{outcome="ok",strategy="pd"}',
                   'microserve_router_time_to_first_token_seconds_count{strategy="pd"}',
                   'microserve_router_job_completion_seconds_count{strategy="pd"}',
                   'microserve_router_subrequest_seconds_count{call="remote_send"'):
        assert needle in text, needle
    moved = [l for l in text.splitlines() if l.startswith("microserve_router_kv_bytes_moved_total ")]
    sent = sum(metric(e.url, "microserve_kv_sent_bytes_total") for e in cluster.engines)
    assert moved and float(moved[0].split()[-1]) == sent > 0  # the engines' own counters, to the byte


def test_openai_client_and_chat_errors(cluster, reference):
    import openai
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="none")
    asyncio.run(admin(cluster.url, "/admin/strategy", {"strategy": "pd"}))
    r = client.completions.create(model=STORIES, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == reference[0]["text"] and r.usage.completion_tokens == len(reference[0]["token_ids"])
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=STORIES, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True) if c.choices)
    assert text == reference[0]["text"]
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model=STORIES, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    models = client.models.list()
    assert models.data[0].id == STORIES


def test_admin_bad_input(cluster):
    """The admin API's errors (the OpenAI endpoints' bad input: tests/test_bad_input.py, on the router
    and the engine alike)."""
    async def go():
        st, r = await admin(cluster.url, "/admin/strategy", {"strategy": "no_such_strategy"})
        assert st == 400 and r["error"]["code"] == "unknown_strategy"
        st, r = await admin(cluster.url, "/admin/strategy", {"name": "pd", "params": {"nope": 1}})
        assert st == 400 and "no parameter" in r["error"]["message"]
        st, r = await admin(cluster.url, "/admin/strategy", {"strategy": "pd"}, token="wrong")
        assert st == 401
        st, r = await admin(cluster.url, "/admin/state", token="wrong")
        assert st == 401
        st, r = await admin(cluster.url, "/admin/engines", {"url": "http://127.0.0.1:1", "role": "boss"})
        assert st == 400 and r["error"]["param"] == "role"
        st, r = await admin(cluster.url, "/admin/engines", {"role": "decode", "count": 2})
        assert st == 400 and r["error"]["param"] == "url"  # engines given by URL: no launcher to start more
        st, r = await admin(cluster.url, "/admin/engines/remove", {"role": "decode"})
        assert st == 400 and r["error"]["param"] == "url"
        st, r = await admin(cluster.url, "/admin/engines", {"url": "http://127.0.0.1:1", "role": "x" * 70_000})
        assert st == 413 and r["error"]["code"] == "request_too_large"  # control bodies: 64 KiB at most
        st, r = await admin(cluster.url, "/admin/strategy", {"strategy": "pd", "params": {"\ud800": 1}})
        assert st == 400 and r["error"]["code"] == "invalid_json"
    asyncio.run(go())
    assert_engines_clean([e.url for e in cluster.engines])


def test_reconfigure_under_load(cluster, reference):
    async def go():
        await admin(cluster.url, "/admin/strategy", {"strategy": "dp"})
        jobs = [asyncio.create_task(complete(cluster.url, greedy(PROMPTS[i % len(PROMPTS)]))) for i in range(30)]
        for spec in ("pd", "balanced_pd:balance=0.2", "cache_aware"):
            await asyncio.sleep(0.15)
            st, r = await admin(cluster.url, "/admin/strategy", {"strategy": spec})
            assert st == 200 and r["strategy"] == spec
            jobs += [asyncio.create_task(complete(cluster.url, greedy(PROMPTS[i % len(PROMPTS)]))) for i in range(10)]
        for i, (st, r) in enumerate(await asyncio.gather(*jobs)):
            assert st == 200, r
            assert r["choices"][0]["token_ids"] == reference[(i if i < 30 else (i - 30) % 10) % len(PROMPTS)]["token_ids"]
    asyncio.run(go())
    assert_engines_clean([e.url for e in cluster.engines])


def test_client_disconnect_aborts_both_legs(cluster):
    """Clients that hang up (mid-stream, or before anything came back) leave no running request,
    page or parked reservation on either engine."""
    async def hang_up(after_chunks: int, delay: float) -> None:
        body = {"prompt": STORY * 3, "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}
        async with aiohttp.ClientSession() as s:
            async with s.post(cluster.url + "/v1/completions", json=body) as r:
                if after_chunks == 0:
                    await asyncio.sleep(delay)
                    return
                seen = 0
                async for line in r.content:
                    seen += line.startswith(b"data: {")
                    if seen >= after_chunks:
                        return

    async def go():
        await admin(cluster.url, "/admin/strategy", {"strategy": "pd"})
        await asyncio.gather(*(hang_up(n, d) for n, d in ((3, 0), (1, 0), (0, 0.0), (0, 0.01), (0, 0.05))))
    asyncio.run(go())
    assert_engines_clean([e.url for e in cluster.engines])
    for e in cluster.engines:
        h = json.loads(urllib.request.urlopen(e.url + "/health").read())
        assert h["running"] == 0 and h["waiting"] == 0, h


def test_engines_admin_add_drain_remove(cluster, reference):
    async def go():
        await admin(cluster.url, "/admin/strategy", {"strategy": "round_robin"})
        url = cluster.engines[2].url
        st, r = await admin(cluster.url, "/admin/engines/drain", {"url": url})
        assert st == 200 and [e for e in r["engines"] if e["url"] == url][0]["draining"]
        st, r = await admin(cluster.url, "/admin/engines/remove", {"url": url})
        assert st == 200 and url not in [e["url"] for e in r["engines"]]
        for p, ref in zip(PROMPTS, reference):
            assert (await complete(cluster.url, greedy(p)))[1]["choices"][0]["token_ids"] == ref["token_ids"]
        st, r = await admin(cluster.url, "/admin/engines", {"url": url, "role": "decode"})
        assert st == 200 and url in [e["url"] for e in r["engines"]]
        st, r = await admin(cluster.url, "/admin/engines", {"url": url, "role": "decode"})
        assert st == 409
    asyncio.run(go())


@pytest.mark.parametrize("victim", [1, 0], ids=["kill-decode", "kill-prefill"])
def test_engine_killed_mid_request(tmp_path, victim):
    """Kill an engine while PD requests run: each affected request ends (retry or clear error)
    within the timeout; survivors hold no pages or reservations; the restarted engine rejoins."""
    c = Cluster(tmp_path, roles=("prefill", "decode"))
    try:
        async def go():
            await admin(c.url, "/admin/strategy", {"strategy": "pd"})
            body = {"prompt": STORY, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
            jobs = [asyncio.create_task(stream(c.url, body)) for _ in range(4)]
            jobs += [asyncio.create_task(complete(c.url, body)) for _ in range(4)]
            await asyncio.sleep(0.5)
            c.launcher.kill(c.engines[victim])
            t0 = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 30)
            assert time.monotonic() - t0 < 30
            for r in results:
                assert not isinstance(r, BaseException), r
                if isinstance(r[0], int):  # non-streamed: a completion (retried) or a clear 5xx error
                    st, b = r
                    assert st == 200 or (st >= 500 and "unavailable" in b["error"]["message"]), b
                else:  # streamed: complete, or an in-band error naming the failed engine
                    ids, text, err = r
                    assert err is None or "unavailable" in err["message"] or "engine" in err["message"], err
            survivor = c.engines[1 - victim]
            assert_engines_clean([survivor.url])
            # requests still work on the survivor while the victim is down
            st, r = await complete(c.url, greedy(PROMPTS[3]))
            assert st == 200, r
            c.restart(victim)
            deadline = time.monotonic() + 15
            while True:
                st, s = await admin(c.url, "/admin/state")
                if all(e["healthy"] for e in s["engines"]):
                    break
                assert time.monotonic() < deadline, s
                await asyncio.sleep(0.3)
            st, r = await complete(c.url, greedy(PROMPTS[4]))
            assert st == 200
            assert_engines_clean([e.url for e in c.engines])
        asyncio.run(go())
    finally:
        c.stop()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_up_scales_then_sigterm_leaves_nothing(tmp_path):
    before = set(os.listdir("/dev/shm"))
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "microserve.cli", "up", "--model", STORIES, "--engines", "2",
                          "--strategy", "pd", "--port", str(port), "--log-dir", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in p.stdout:
            lines.append(line)
            if line.startswith("admin token"):
                break
        engine_ports = [int(l.split()[1].rsplit(":", 1)[1]) for l in lines if l.startswith("engine ")]
        assert len(engine_ports) == 2, lines
        children = _children(p.pid)
        assert len(children) == 2
        url, token = f"http://127.0.0.1:{port}", lines[-1].split()[-1]
        st, r = asyncio.run(complete(url, greedy("Once upon a time")))
        assert st == 200 and r["choices"][0]["text"]
        # the admin API starts engines through `up`'s launcher, and stops the ones it removes
        st, s = asyncio.run(admin(url, "/admin/engines", {"role": "decode", "count": 1}, token=token))
        assert st == 200 and [e["role"] for e in s["engines"]] == ["prefill", "decode", "decode"], s
        added = s["engines"][2]
        assert added["healthy"] and added["launched"]["name"] == "engine2"
        children = _children(p.pid)
        assert len(children) == 3
        engine_ports.append(int(added["url"].rsplit(":", 1)[1]))
        st, s = asyncio.run(admin(url, "/admin/engines/remove", {"url": s["engines"][1]["url"]}, token=token))
        assert st == 200 and [e["url"] for e in s["engines"]][1:] == [added["url"]], s
        assert len(_children(p.pid)) == 2
        st, r = asyncio.run(complete(url, greedy("Once upon a time")))
        assert st == 200 and r["choices"][0]["text"]
        st, s = asyncio.run(admin(url, "/admin/engines", {"role": "decode", "count": 1}))  # not without the token
        assert st == 401
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    assert p.returncode == 0
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    for port_ in engine_ports + [port]:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port_}/health", timeout=1)
            raise AssertionError(f"port {port_} still answers")
        except OSError:
            pass
    assert set(os.listdir("/dev/shm")) - before == set()


def subrequests(url: str, call: str) -> float:
    """How many `call`s (prep_recv, remote_send, ...) the router has made to engines, all engines together."""
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return sum(float(l.split()[-1]) for l in text.splitlines()
               if l.startswith("microserve_router_subrequest_seconds_count{") and f'call="{call}"' in l)


def test_context_limit_through_pd(tmp_path):
    """vLLM's context rule through the router, over prep_recv / remote_send / start_generate: max_tokens
    past --max-model-len is served and stops at it (finish_reason "length"), token-identical to a single
    engine; a prompt that leaves no room is a 400 from the router itself, before any engine call."""
    limit = 64
    c = Cluster(tmp_path, roles=("prefill", "decode"), engine_args=["--max-model-len", str(limit)])
    try:
        async def go():
            fills = TOK.encode(STORY * 3, add_special_tokens=False)[:limit - 1]
            for strategy in ("pd", "balanced_pd:balance=0.3"):
                st, r = await admin(c.url, "/admin/strategy", {"strategy": strategy})
                assert st == 200, r
                for prompt in (PROMPTS[1], fills):
                    body = greedy(prompt, max_tokens=10_000, ignore_eos=True)
                    st, r = await complete(c.url, body)
                    assert st == 200, r
                    choice, usage = r["choices"][0], r["usage"]
                    room = limit - usage["prompt_tokens"]
                    assert room >= 1 and choice["finish_reason"] == "length", r
                    assert usage["completion_tokens"] == len(choice["token_ids"]) == room
                    assert usage["total_tokens"] == limit
                    # a single engine: asked for exactly the room left, and asked for too much
                    st, ref = await complete(c.ref.url, greedy(prompt, max_tokens=room, ignore_eos=True))
                    assert st == 200 and ref["choices"][0]["token_ids"] == choice["token_ids"], strategy
                    assert ref["choices"][0]["text"] == choice["text"]
                    st, one = await complete(c.engines[1].url, body)
                    assert st == 200 and one["choices"][0]["token_ids"] == choice["token_ids"]
                    assert one["choices"][0]["finish_reason"] == "length"
                    ids, text, err = await stream(c.url, body)
                    assert err is None and ids == choice["token_ids"] and text == choice["text"]
            before = subrequests(c.url, "prep_recv")
            for prompt in ([5] * limit, STORY * 3):
                st, r = await complete(c.url, greedy(prompt, max_tokens=1))
                assert st == 400, r
                assert set(r["error"]) == {"message", "type", "param", "code"}
                assert r["error"]["type"] == "invalid_request_error" and r["error"]["param"] == "prompt"
                assert r["error"]["code"] == "context_length_exceeded" and f"{limit} tokens" in r["error"]["message"]
            assert subrequests(c.url, "prep_recv") == before > 0  # refused by the router, no engine asked
        asyncio.run(go())
        assert_engines_clean([e.url for e in c.engines])
    finally:
        c.stop()
