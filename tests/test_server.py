"""The OpenAI face of a real engine process serving stories260K, over loopback HTTP: byte-identical
greedy text against transformers, streaming, usage, prefix-cache accounting, 32 concurrent streams
with clients walking away, OpenAI-style errors, chat, the official `openai` client."""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import time
import urllib.request

import aiohttp
import pytest

from conftest import STORIES, STORY_END, kv_accounting

NAME = "stories"
PROMPT = "Once upon a time"
PROMPTS = ["Once upon a time", "Tom had a red ball", "The sun was", "Lily and Ben went to the park. They saw",
           "One day, a little bird", "The cat", "Sue liked to draw. She drew a big house and", "Max was a dog",
           "There was a big tree", "Anna found a shiny stone", "The little boat", "Mom made a cake"]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def server(module_engines):
    return module_engines.start("--served-model-name", NAME, name="stories").url


@pytest.fixture(scope="module")
def hf():
    import torch
    import transformers
    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(STORIES)


async def post(url: str, body, path: str = "/v1/completions", timeout: float = 60) -> tuple[int, dict]:
    kw = {"data": body} if isinstance(body, (bytes, str)) else {"json": body}
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, timeout=aiohttp.ClientTimeout(total=timeout),
                          headers={"Content-Type": "application/json"}, **kw) as r:
            return r.status, await r.json(content_type=None)


async def stream(url: str, body: dict, path: str = "/v1/completions") -> list[dict]:
    """The data events of an SSE response, checking it ends with [DONE]."""
    events: list = []
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json={**body, "stream": True}, timeout=aiohttp.ClientTimeout(total=60)) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                line = line.strip()
                if line:
                    assert line.startswith(b"data: "), line
                    events.append(line[6:])
    assert events and events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]]


def stream_text(events: list[dict], chat: bool = False) -> str:
    return "".join((c["delta"].get("content") or "") if chat else c["text"] for e in events for c in e["choices"])


def greedy(prompt, max_tokens: int, **kw) -> dict:
    return {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}


def hf_greedy_text(hf, prompt: str, max_tokens: int) -> tuple[str, list[int]]:
    """transformers' greedy continuation (stopping on the checkpoint's eos ids, [1, 2]) as text:
    decode(prompt + output) minus decode(prompt), special tokens skipped."""
    import torch
    model, tok = hf
    ids = tok(prompt).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)[0].tolist()
    full = tok.decode(out, skip_special_tokens=True)
    head = tok.decode(ids, skip_special_tokens=True)
    assert full.startswith(head)
    return full[len(head):], out[len(ids):]


def metric(url: str, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(url + "/metrics") as r:
        text = r.read().decode()
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_clean(url: str, timeout: float = 10.0) -> dict:
    """KV back at rest: nothing owned, no live sequence, free + cached == total (aborts are async)."""
    deadline = time.monotonic() + timeout
    while True:
        a = kv_accounting(url)
        if a["owned"] == 0 and a["live_seqs"] == 0 and a["parked"] == 0:
            break
        assert time.monotonic() < deadline, f"KV not released: {a}"
        time.sleep(0.05)
    assert a["free"] + a["cached"] == a["total"], a
    return a


# ---- correctness against transformers -------------------------------------------------------------
@pytest.mark.parametrize("prompt,max_tokens", [(PROMPT, 64), (STORY_END, 100)])
def test_greedy_text_matches_transformers(server, hf, prompt, max_tokens):
    ref_text, ref_ids = hf_greedy_text(hf, prompt, max_tokens)
    st, r = run(post(server, greedy(prompt, max_tokens, return_token_ids=True)))
    assert st == 200, r
    choice = r["choices"][0]
    assert choice["text"].encode() == ref_text.encode()
    assert choice["token_ids"] == ref_ids
    if prompt == STORY_END:  # the model ends the story itself: transformers stops on 1 too
        assert ref_ids[-1] == 1 and len(ref_ids) < max_tokens and choice["finish_reason"] == "stop"
    else:
        assert len(ref_ids) == max_tokens and choice["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == len(ref_ids)
    assert r["usage"]["prompt_tokens"] == len(hf[1](prompt).input_ids)
    wait_clean(server)


def test_streaming_equals_non_streaming_with_usage(server):
    body = greedy(PROMPT, 40)
    st, whole = run(post(server, body))
    assert st == 200, whole
    assert whole["object"] == "text_completion" and whole["model"] == NAME
    events = run(stream(server, {**body, "stream_options": {"include_usage": True}}))
    *chunks, last = events
    assert stream_text(chunks) == whole["choices"][0]["text"]
    assert all(e["object"] == "text_completion" and e["id"] == chunks[0]["id"] for e in events)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert last["choices"] == [] and last["usage"] == whole["usage"]
    assert whole["usage"]["prompt_tokens"] == 5 and whole["usage"]["completion_tokens"] == 40
    assert whole["usage"]["total_tokens"] == 45
    # without include_usage no usage chunk is sent
    plain = run(stream(server, body))
    assert stream_text(plain) == whole["choices"][0]["text"]
    assert all(e["choices"] and "usage" not in e for e in plain)
    # a stop string spanning tokens cuts both the same way, and is never streamed
    cut = {**body, "stop": ["named Lily", "zzz"]}
    st, r = run(post(server, cut))
    assert st == 200 and r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"] == ", there was a little girl "
    events = run(stream(server, cut))
    assert stream_text(events) == r["choices"][0]["text"] and events[-1]["choices"][0]["finish_reason"] == "stop"
    wait_clean(server)


def test_prefix_cache_hit_is_reported(server):
    shared = "Zed the zebra lived in a zoo with a very tall giraffe and a small grey mouse named"
    before = metric(server, "microserve_prefix_cache_hit_tokens_total")
    st, first = run(post(server, greedy(shared + " Pip.", 8)))
    assert st == 200 and first["usage"]["prompt_tokens"] >= 20, first
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    st, second = run(post(server, greedy(shared + " Max. One day", 8)))
    assert st == 200, second
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 16 and cached % 16 == 0 and cached < second["usage"]["prompt_tokens"]
    after = metric(server, "microserve_prefix_cache_hit_tokens_total")
    assert after - before >= cached > 0
    # streamed usage reports it too
    events = run(stream(server, {**greedy(shared + " Sam.", 8), "stream_options": {"include_usage": True}}))
    assert events[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    wait_clean(server)


# ---- concurrency and disconnects ------------------------------------------------------------------
def test_32_concurrent_streams_with_disconnects(server):
    """32 clients at once, mixed lengths; 6 leave a stream after 3 chunks and 2 hang up on a
    non-streaming request while it runs. Everyone else gets exactly what they would get alone."""
    rng = random.Random(7)
    cases = []
    for i in range(32):
        kind = "hangup" if i % 16 == 15 else "leave" if i % 4 == 3 else "complete"
        body = greedy(PROMPTS[i % len(PROMPTS)], rng.randint(2, 48) if kind == "complete" else 480,
                      ignore_eos=kind != "complete")
        cases.append((body, kind))
    aborted_before = metric(server, "microserve_requests_total", '{finish_reason="abort"}')

    async def go():
        singles = {}
        for i, (body, kind) in enumerate(cases):
            if kind == "complete":
                st, r = await post(server, body)
                assert st == 200, r
                singles[i] = r["choices"][0]["text"]

        async def one(session: aiohttp.ClientSession, i: int):
            body, kind = cases[i]
            await asyncio.sleep(0.002 * i)
            text, done = [], False
            if kind == "hangup":  # cancelling the call closes the connection before any reply
                # 0.15 s: long enough for the request to be admitted, far too short for 480 tokens
                # (>= 0.5 ms a step even alone on this model, and 30 other streams share the steps)
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(session.post(server + "/v1/completions", json=body), 0.15)
                return i, "", False
            async with session.post(server + "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status == 200
                n = 0
                async for line in r.content:
                    line = line.strip()
                    if not line:
                        continue
                    if line == b"data: [DONE]":
                        done = True
                        break
                    text.append(json.loads(line[6:])["choices"][0]["text"])
                    n += 1
                    if kind == "leave" and n == 3:
                        break  # leaving the block with the body unread closes the connection
            return i, "".join(text), done

        conn = aiohttp.TCPConnector(limit=64, force_close=True)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
            results = await asyncio.gather(*(one(s, i) for i in range(32)))
        for i, text, done in results:
            if cases[i][1] == "complete":
                assert done and text == singles[i], f"stream {i} differs from its single-request result"
            else:
                assert not done
    run(go())
    wait_clean(server)
    h = json.loads(urllib.request.urlopen(server + "/health").read())
    assert h["running"] == 0 and h["waiting"] == 0
    aborted = metric(server, "microserve_requests_total", '{finish_reason="abort"}') - aborted_before
    assert aborted == 8, "every client that left had its request aborted (none ran to its 480 tokens)"


# ---- errors (bad input: tests/test_bad_input.py, on the engine and the router alike) ---------------------
def assert_openai_error(body: dict, status: int, param: str | None = None) -> None:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert isinstance(err["code"], str) and err["code"]
    if param is not None:
        assert err["param"] == param, err


# ---- chat on a model that has a template ----------------------------------------------------------
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
                 "{% endfor %}")


@pytest.fixture(scope="module")
def chat_server(module_engines, tmp_path_factory):
    """stories260K plus a chat template, in a temporary copy."""
    path = tmp_path_factory.mktemp("stories-chat")
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "special_tokens_map.json"):
        shutil.copy(f"{STORIES}/{f}", path / f)
    cfg = json.load(open(f"{STORIES}/tokenizer_config.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHAT_TEMPLATE}))
    return module_engines.start("--served-model-name", "stories-chat", model=str(path), name="chat").url, str(path)


def test_chat_with_template(chat_server):
    url, path = chat_server
    msgs = [{"role": "system", "content": "ignored by this template"}, {"role": "user", "content": "Once upon a time"}]
    body = {"model": "stories-chat", "messages": msgs, "max_tokens": 30, "temperature": 0}
    st, r = run(post(url, body, "/v1/chat/completions"))
    assert st == 200, r
    assert r["object"] == "chat.completion"
    msg = r["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"]
    # the template rendered "<s>Once upon a time": the same text a completion of that prompt gives
    st, c = run(post(url, {"model": "stories-chat", "prompt": PROMPT, "max_tokens": 30, "temperature": 0}))
    assert st == 200 and msg["content"] == c["choices"][0]["text"]
    assert r["usage"]["prompt_tokens"] == c["usage"]["prompt_tokens"] == 5
    events = run(stream(url, {**body, "stream_options": {"include_usage": True}}, "/v1/chat/completions"))
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert stream_text(events[:-1], chat=True) == msg["content"]
    assert events[-1]["usage"] == r["usage"]
    # content parts are accepted too
    parts = [{"role": "user", "content": [{"type": "text", "text": "Once upon a time"}]}]
    st, r2 = run(post(url, {**body, "messages": parts}, "/v1/chat/completions"))
    assert st == 200 and r2["choices"][0]["message"]["content"] == msg["content"]
    wait_clean(url)


# ---- the official client and the small endpoints --------------------------------------------------
def test_openai_client(server, chat_server):
    import openai
    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    st, ref = run(post(server, greedy(PROMPT, 32)))
    ref_text = ref["choices"][0]["text"]
    c = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=32, temperature=0)
    assert c.choices[0].text == ref_text and c.choices[0].finish_reason == "length"
    assert c.usage.prompt_tokens == 5 and c.usage.completion_tokens == 32
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=32, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref_text
    assert chunks[-1].usage.completion_tokens == 32
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=0)
    assert ei.value.status_code == 400 and ei.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-17", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert [m.id for m in client.models.list().data] == [NAME]

    chat_url, _ = chat_server
    chat = openai.OpenAI(base_url=chat_url + "/v1", api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": PROMPT}]
    r = chat.chat.completions.create(model="stories-chat", messages=msgs, max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    parts = list(chat.chat.completions.create(model="stories-chat", messages=msgs, max_tokens=20, temperature=0,
                                              stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == r.choices[0].message.content
    wait_clean(server)
    wait_clean(chat_url)


def test_models_and_health(server):
    models = json.loads(urllib.request.urlopen(server + "/v1/models").read())
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    assert models["data"][0]["max_model_len"] == 512
    h = json.loads(urllib.request.urlopen(server + "/health").read())
    assert h["status"] == "ok" and h["model"] == NAME
    a = h["kv"]
    assert a["free"] + a["cached"] + a["owned"] == a["total"]
    assert metric(server, "microserve_kv_pages_total") == a["total"]


def test_keep_freed_memory_respects_user_malloc_settings(monkeypatch):
    """The server tunes glibc malloc (process.keep_freed_memory) unless the user already did."""
    import platform

    from microserve.server.process import keep_freed_memory
    for k in [k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(k)
    if platform.libc_ver()[0] != "glibc":
        assert keep_freed_memory() is False
        return
    assert keep_freed_memory() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory() is False


# ---- the context limit, as vLLM: max_tokens past it is served, a prompt past it is a 400 ------------
SHORT_LEN = 64


@pytest.fixture(scope="module")
def short_server(module_engines):
    url = module_engines.start("--served-model-name", NAME, "--max-model-len", str(SHORT_LEN), "--page-size", "4",
                               name="short").url
    assert json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"][0]["max_model_len"] == SHORT_LEN
    return url


@pytest.mark.parametrize("prompt", [PROMPT, [5] * (SHORT_LEN - 1)], ids=["text", "one-token-left"])
def test_max_tokens_beyond_context_stops_at_max_model_len(short_server, prompt):
    body = greedy(prompt, 10_000, ignore_eos=True, return_token_ids=True)
    st, r = run(post(short_server, body))
    assert st == 200, r
    choice, usage = r["choices"][0], r["usage"]
    room = SHORT_LEN - usage["prompt_tokens"]
    assert choice["finish_reason"] == "length"
    assert usage["completion_tokens"] == len(choice["token_ids"]) == room
    assert usage["total_tokens"] == SHORT_LEN
    events = run(stream(short_server, {**body, "stream_options": {"include_usage": True}}))
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "length"
    assert [t for e in events[:-1] for t in e["choices"][0]["token_ids"]] == choice["token_ids"]
    assert stream_text(events[:-1]) == choice["text"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached_tokens: the first run is cached now
    assert [events[-1]["usage"][k] for k in counts] == [usage[k] for k in counts]
    # the same tokens as asking for exactly the room left
    st, exact = run(post(short_server, greedy(prompt, room, ignore_eos=True, return_token_ids=True)))
    assert st == 200 and exact["choices"][0]["token_ids"] == choice["token_ids"]
    wait_clean(short_server)


@pytest.mark.parametrize("stream_it", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("prompt", [[5] * SHORT_LEN, "the dog ran " * 30], ids=["ids", "text"])
def test_prompt_beyond_context_is_400(short_server, prompt, stream_it):
    st, r = run(post(short_server, greedy(prompt, 1, stream=stream_it)))
    assert st == 400, r
    assert_openai_error(r, 400, "prompt")
    assert r["error"]["code"] == "context_length_exceeded" and f"{SHORT_LEN} tokens" in r["error"]["message"]
    wait_clean(short_server)


def test_chat_beyond_context_is_400_on_messages(chat_server):
    url, _ = chat_server
    msgs = [{"role": "user", "content": "the dog ran " * 200}]
    st, r = run(post(url, {"model": "stories-chat", "messages": msgs, "max_tokens": 4}, "/v1/chat/completions"))
    assert st == 400, r
    assert_openai_error(r, 400, "messages")
    assert r["error"]["code"] == "context_length_exceeded"
