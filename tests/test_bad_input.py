"""Bad input on both OpenAI fronts, a real engine process and a real router process in front of one:
every case gets the same exact status and OpenAI error body from both (they share openai_front.OpenAIFront),
and the front keeps serving. Also: /health answers within 100 ms while a 60 MB prompt is refused,
tokenizing never stalls the event loop, and a client that hangs up mid-stream is no ERROR in any log."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
import pytest

from conftest import STORIES, STORIES_HD32, kv_accounting
from test_server import post
from microserve.launch import EngineSpec, LocalLauncher, free_port

NAME = "stories"
PROMPT = "Once upon a time"
FRONTS = ["engine", "router"]
# stories260K plus a chat template that refuses tool messages (raise_exception, as real templates do)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
                 "{{ raise_exception('this template takes no tool messages') }}{% endif %}"
                 "{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}")
MIB = 2**20


@dataclass
class Pair:
    engine: Any  # launch.LocalEngine
    router: Any

    def url(self, front: str) -> str:
        return getattr(self, front).url


class Fronts:
    """Two engine + router pairs: stories260K as is (no chat template), and a copy with CHAT_TEMPLATE."""

    def __init__(self, tmp) -> None:
        chat_model = tmp / "stories-chat"
        chat_model.mkdir()
        for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "special_tokens_map.json"):
            shutil.copy(f"{STORIES}/{f}", chat_model / f)
        cfg = json.load(open(f"{STORIES}/tokenizer_config.json"))
        (chat_model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHAT_TEMPLATE}))
        self.launcher = LocalLauncher(str(tmp), startup_timeout_s=90)
        models = {"plain": STORIES, "chat": str(chat_model)}
        engines = dict(zip(models, self.launcher.start(
            [EngineSpec(model, args=["--debug-api", "--kv-cache-memory-mb", "32", "--served-model-name", NAME],
                        name=f"engine-{kind}") for kind, model in models.items()])))
        # healthy: an engine answered, so the context is known
        routers = {kind: self.launcher.start_router("least_loaded", model, ["--served-model-name", NAME],
                                                    engines=[engines[kind]], name=f"router-{kind}")
                   for kind, model in models.items()}
        self.pairs = {kind: Pair(engines[kind], routers[kind]) for kind in engines}

    def logs(self) -> dict[str, str]:
        return {p.name: open(p.log_path, errors="replace").read()
                for p in [*self.launcher.engines, *self.launcher.routers]}


@pytest.fixture(scope="module")
def fronts(tmp_path_factory):
    f = Fronts(tmp_path_factory.mktemp("fronts"))
    yield f
    f.launcher.stop()


def assert_openai_error(body: dict, status: int, param: str | None, code: str) -> None:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error"), err
    assert (err["param"], err["code"]) == (param, code), err


def wait_engine_clean(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        a = kv_accounting(url)
        if (a["owned"], a["parked"], a["live_seqs"]) == (0, 0, 0) and a["free"] + a["cached"] == a["total"]:
            return
        assert time.monotonic() < deadline, f"KV not released: {a}"
        time.sleep(0.05)


def nested(depth: int) -> bytes:
    return b'{"prompt": "hi", "stop": ' + b"[" * depth + b"]" * depth + b"}"


def big_body(n_bytes: int) -> bytes:
    return b'{"prompt": "' + b"the dog ran " * (n_bytes // 12) + b'"}'


CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": PROMPT}]


@dataclass
class Case:
    id: str
    body: dict | bytes | Callable[[], bytes]
    status: int
    param: str | None
    code: str
    path: str = "/v1/completions"
    pair: str = "plain"  # which model: stories260K ("plain") or the copy with a chat template ("chat")


CASES = [
    # ---- the body itself --------------------------------------------------------------------------
    Case("malformed json", b'{"prompt": "Once upon', 400, None, "invalid_json"),
    Case("json not an object", b'["Once"]', 400, None, "invalid_json"),
    Case("not utf-8", b'{"prompt": "Once \xff\xfe upon"}', 400, None, "invalid_json"),
    Case("lone surrogate in the prompt", b'{"prompt": "Once \\ud800 upon a time"}', 400, None, "invalid_json"),
    Case("lone surrogate in a stop string", b'{"prompt": "Once", "stop": ["\\udfff"]}', 400, None, "invalid_json"),
    Case("lone surrogate in a message", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, None,
         "invalid_json", CHAT, "chat"),
    Case("nested 10000 deep", lambda: nested(10_000), 400, None, "invalid_json"),
    Case("nested 100 deep", lambda: nested(100), 400, None, "invalid_json"),
    Case("integer of 5000 digits", b'{"prompt": "hi", "seed": ' + b"7" * 5000 + b"}", 400, None, "invalid_json"),
    Case("body over the endpoint's limit", lambda: big_body(2 * MIB), 413, None, "request_too_large"),
    Case("body over 64 MiB", lambda: big_body(65 * MIB), 413, None, "request_too_large"),
    # ---- the model and the prompt -------------------------------------------------------------------
    Case("unknown model", {"model": "gpt-17", "prompt": PROMPT}, 404, "model", "model_not_found"),
    Case("another model's directory", {"model": STORIES_HD32, "prompt": PROMPT}, 404, "model", "model_not_found"),
    Case("missing prompt", {"max_tokens": 4}, 400, "prompt", "invalid_request"),
    Case("empty prompt", {"prompt": ""}, 400, "prompt", "invalid_request"),
    Case("empty token prompt", {"prompt": []}, 400, "prompt", "invalid_request"),
    Case("two prompts", {"prompt": ["Once", "Twice"]}, 400, "prompt", "invalid_request"),
    Case("token id out of vocab", {"prompt": [1, 512]}, 400, "prompt", "invalid_request"),
    Case("prompt beyond context", {"prompt": "the dog ran " * 200, "max_tokens": 4}, 400, "prompt",
         "context_length_exceeded"),
    Case("prompt ids beyond context", {"prompt": [5] * 512, "max_tokens": 1}, 400, "prompt", "context_length_exceeded"),
    Case("text far too long to tokenize", {"prompt": "the dog ran " * 50_000}, 400, "prompt",
         "context_length_exceeded"),
    # ---- sampling fields ----------------------------------------------------------------------------
    Case("max_tokens 0", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens", "invalid_request"),
    Case("max_tokens negative", {"prompt": PROMPT, "max_tokens": -3}, 400, "max_tokens", "invalid_request"),
    Case("wrong type", {"prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens", "invalid_request"),
    Case("stream with bad max_tokens", {"prompt": PROMPT, "max_tokens": 0, "stream": True}, 400, "max_tokens",
         "invalid_request"),
    Case("negative temperature", {"prompt": PROMPT, "temperature": -0.1}, 400, "temperature", "invalid_request"),
    Case("temperature NaN", b'{"prompt": "Once upon a time", "temperature": NaN}', 400, "temperature",
         "invalid_request"),
    Case("temperature infinite", b'{"prompt": "Once upon a time", "temperature": Infinity}', 400, "temperature",
         "invalid_request"),
    Case("seed beyond 64 bits", {"prompt": PROMPT, "seed": 2**64}, 400, "seed", "invalid_request"),
    Case("top_p 0", {"prompt": PROMPT, "top_p": 0}, 400, "top_p", "invalid_request"),
    Case("top_p above 1", {"prompt": PROMPT, "top_p": 1.01}, 400, "top_p", "invalid_request"),
    Case("top_k below -1", {"prompt": PROMPT, "top_k": -2}, 400, "top_k", "invalid_request"),
    Case("echo", {"prompt": PROMPT, "echo": True}, 400, "echo", "unsupported"),
    Case("logprobs", {"prompt": PROMPT, "logprobs": 2}, 400, "logprobs", "unsupported"),
    Case("n above 1", {"prompt": PROMPT, "n": 2}, 400, "n", "unsupported"),
    Case("best_of 2", {"prompt": PROMPT, "best_of": 2}, 400, "best_of", "unsupported"),
    # ---- chat -------------------------------------------------------------------------------------------
    Case("chat without a template", {"messages": MSGS, "max_tokens": 4}, 400, "messages", "no_chat_template", CHAT),
    Case("chat messages not a list", {"messages": "hi"}, 400, "messages", "invalid_request", CHAT),
    Case("chat unknown model", {"model": "nope", "messages": MSGS}, 404, "model", "model_not_found", CHAT),
    Case("chat template raises", {"messages": [*MSGS, {"role": "tool", "content": "42"}]}, 400, "messages",
         "invalid_request", CHAT, "chat"),
    Case("chat content part text not a string", {"messages": [{"role": "user", "content": [{"type": "text",
                                                                                           "text": 5}]}]},
         400, "messages.0.content.0.text", "invalid_request", CHAT, "chat"),
    Case("chat beyond context", {"messages": [{"role": "user", "content": "the dog ran " * 200}]}, 400, "messages",
         "context_length_exceeded", CHAT, "chat"),
    Case("chat far too long to tokenize", {"messages": [{"role": "user", "content": "the dog ran " * 50_000}]}, 400,
         "messages", "context_length_exceeded", CHAT, "chat"),
    Case("chat max_completion_tokens 0", {"messages": MSGS, "max_completion_tokens": 0}, 400, "max_completion_tokens",
         "invalid_request", CHAT, "chat"),
    Case("chat best_of 2", {"messages": MSGS, "best_of": 2}, 400, "best_of", "unsupported", CHAT, "chat"),
    Case("unknown route", {}, 404, None, "not_found", "/v1/nothing"),
]


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_same_answer_on_both_fronts(fronts, case, front):
    pair = fronts.pairs[case.pair]
    url = pair.url(front)
    body = case.body() if callable(case.body) else case.body
    st, r = asyncio.run(post(url, body, case.path))
    assert st == case.status, r
    assert_openai_error(r, case.status, case.param, case.code)
    # and the front keeps serving
    ok_path, ok_body = (CHAT, {"messages": MSGS}) if case.pair == "chat" else ("/v1/completions", {"prompt": PROMPT})
    st, ok = asyncio.run(post(url, {**ok_body, "max_tokens": 3, "temperature": 0}, ok_path))
    assert st == 200 and ok["usage"]["completion_tokens"] == 3, ok
    wait_engine_clean(pair.engine.url)


@pytest.mark.parametrize("front", FRONTS)
def test_model_named_by_another_path_to_its_directory(fronts, front):
    """`vllm bench serve` sends the path of the served directory, spelled its own way."""
    st, r = asyncio.run(post(fronts.pairs["plain"].url(front), {"model": STORIES + "/", "prompt": PROMPT,
                                                                "max_tokens": 2}))
    assert st == 200, r


# ---- the event loop stays free --------------------------------------------------------------------------
def post_blocking(url: str, body: bytes, timeout: float = 120) -> tuple[int, dict]:
    """POST from this thread with the standard library (which sends with the GIL released)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("front", FRONTS)
def test_health_within_100ms_while_a_60mb_prompt_is_processed(fronts, front):
    """The 60 MB prompt is sent from a thread of its own, so that the probes measure the server's
    event loop, not this process's."""
    url = fronts.pairs["plain"].url(front)
    body = big_body(60 * 10**6)
    result: list = []

    def send() -> None:
        try:
            result.append(post_blocking(url + "/v1/completions", body))
        except Exception as e:  # noqa: BLE001 - reported below
            result.append(e)
    sender = threading.Thread(target=send)

    async def probe() -> list[float]:
        latencies: list[float] = []
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/health") as r:  # connected before the big one starts
                assert r.status == 200
            sender.start()
            while sender.is_alive() or len(latencies) < 20:
                t0 = time.perf_counter()
                async with s.get(url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    assert r.status == 200
                    await r.read()
                latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(0.01)
        return latencies
    latencies = asyncio.run(probe())
    sender.join()
    assert max(latencies) < 0.1, sorted(latencies)[-5:]
    assert not isinstance(result[0], Exception), result[0]
    st, r = result[0]
    assert st == 413, r  # the longest prompt that fits stories260K's 512 tokens is far shorter
    assert_openai_error(r, 413, None, "request_too_large")


def test_tokenization_runs_off_the_event_loop():
    """The shared front tokenizes (and templates) on a worker thread: with a tokenizer that takes
    0.5 s per call (in C, as `tokenizers` does with the GIL released), /health on the same server
    still answers at once, for completions and chat alike."""
    from aiohttp import web

    from microserve.openai_front import OpenAIFront
    from microserve.web import error_middleware, run_app

    class SlowTokenizer:
        path, max_token_chars = "/nonexistent", 8

        def encode_nogil(self, text: str, add_special_tokens: bool = True) -> list[int]:
            time.sleep(0.5)
            return [1, 2, 3]

        def encode_chat(self, messages: list[dict]) -> list[int]:
            time.sleep(0.5)
            return [1, 2]

    front = OpenAIFront("engine", "m", SlowTokenizer(), lambda: 512)

    async def prepare(request: web.Request) -> web.Response:
        p = await front.prepare(request, chat=request.path.endswith("chat/completions"))
        return web.json_response({"prompt": p.prompt, "max_tokens": p.max_tokens})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def go():
        app = web.Application(middlewares=[error_middleware])
        app.add_routes([web.post("/v1/completions", prepare), web.post(CHAT, prepare), web.get("/health", health)])
        port = free_port()
        runner = await run_app(app, "127.0.0.1", port)
        url = f"http://127.0.0.1:{port}"
        try:
            jobs = asyncio.gather(post(url, {"prompt": "Once upon a time"}), post(url, {"messages": MSGS}, CHAT))
            latencies = []
            async with aiohttp.ClientSession() as s:
                t_start = time.perf_counter()
                while time.perf_counter() - t_start < 0.4:
                    t0 = time.perf_counter()
                    async with s.get(url + "/health") as r:
                        assert r.status == 200
                    latencies.append(time.perf_counter() - t0)
                    await asyncio.sleep(0.01)
            return await jobs, latencies
        finally:
            await runner.cleanup()
    ((st1, r1), (st2, r2)), latencies = asyncio.run(go())
    assert (st1, r1) == (200, {"prompt": [1, 2, 3], "max_tokens": 16})
    assert (st2, r2) == (200, {"prompt": [1, 2], "max_tokens": 510})  # chat: the rest of the context
    assert len(latencies) >= 10 and max(latencies) < 0.1, latencies


def test_encode_nogil_releases_the_gil():
    """`Tokenizer.encode` holds the GIL throughout (a worker thread tokenizing would still stall the
    event loop); `encode_nogil` gives the same ids and lets other threads run meanwhile."""
    from microserve.tokenizer import Tokenizer
    tok = Tokenizer(STORIES)
    text = "Once upon a time, there was a little dog. " * 40_000  # ~0.5 s to tokenize
    assert tok.encode_nogil(text[:5000]) == tok.encode(text[:5000])
    assert tok.encode_nogil(text[:5000], False) == tok.encode(text[:5000], False)
    gaps: list[float] = []
    worker = threading.Thread(target=tok.encode_nogil, args=(text,))
    last = time.perf_counter()
    worker.start()
    while worker.is_alive():
        time.sleep(0.002)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    assert len(gaps) > 20 and max(gaps) < 0.1, (len(gaps), max(gaps))


# ---- clients that hang up -----------------------------------------------------------------------------
async def hang_up_mid_stream(url: str, path: str, body: dict, after_events: int = 3) -> int:
    """Stream a request over a raw socket, read `after_events` events, then reset the connection
    (SO_LINGER 0: an RST, as a client killed mid-read sends). Returns the events seen."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps({**body, "stream": True}).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()
    seen = 0
    while seen < after_events:
        line = await asyncio.wait_for(reader.readline(), 30)
        assert line, "the server closed the stream first"
        seen += line.startswith(b"data: {")
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    return seen


def metric_sum(url: str, name: str, label: str) -> float:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{") and label in line)


@pytest.mark.parametrize("front", FRONTS)
def test_client_hanging_up_mid_stream_is_no_error(fronts, front):
    """Clients that reset the connection in the middle of an SSE stream (completions and chat): each
    request is aborted and counted, and no log has an ERROR or a traceback ("Cannot write to
    closing transport" used to be logged with one: 578 times in 5 minutes on a router)."""
    before = {name: len(text) for name, text in fronts.logs().items()}
    aborted = {kind: metric_sum(p.engine.url, "microserve_requests_total", 'finish_reason="abort"')
               for kind, p in fronts.pairs.items()}
    left = {kind: metric_sum(p.router.url, "microserve_router_requests_total", 'outcome="disconnected"')
            for kind, p in fronts.pairs.items()}
    long = {"max_tokens": 300, "temperature": 0, "ignore_eos": True}
    kinds = ["chat" if i % 3 == 2 else "plain" for i in range(12)]

    async def go():
        jobs = []
        for i, kind in enumerate(kinds):
            path, body = (CHAT, {"messages": MSGS}) if kind == "chat" else ("/v1/completions", {"prompt": PROMPT})
            jobs.append(hang_up_mid_stream(fronts.pairs[kind].url(front), path, {**body, **long}, 1 + i % 4))
        return await asyncio.gather(*jobs)
    assert all(n >= 1 for n in asyncio.run(go()))
    for kind, pair in fronts.pairs.items():
        wait_engine_clean(pair.engine.url)
        h = json.loads(urllib.request.urlopen(pair.engine.url + "/health").read())
        assert h["running"] == 0 and h["waiting"] == 0, h
        n = kinds.count(kind)
        assert metric_sum(pair.engine.url, "microserve_requests_total", 'finish_reason="abort"') - aborted[kind] == n
        if front == "router":
            assert metric_sum(pair.router.url, "microserve_router_requests_total",
                              'outcome="disconnected"') - left[kind] == n
    time.sleep(0.3)  # let the last log lines land
    for name, text in fronts.logs().items():
        new = text[before[name]:]
        assert " ERROR " not in new and "Traceback" not in new, f"{name}:\n{new[-3000:]}"


def test_write_to_a_reset_client_is_one_info_line(caplog):
    """The race behind those tracebacks, made certain: two chunks written in one go (as a router
    writes the chunks it read together from an engine) to a client that reset the connection. The
    first write finds the reset and closes the transport; the second raised "Cannot write to
    closing transport", which error_middleware logged as an unhandled error. Now: one INFO line."""
    from aiohttp import web

    from microserve.protocol import CompletionRequest
    from microserve.openai_front import Piece, answer
    from microserve.web import error_middleware, run_app

    async def go():
        ended = asyncio.Event()

        async def pieces():
            try:
                while True:
                    yield Piece("a" * 50, [1])
                    yield Piece("b" * 50, [2])
                    await asyncio.sleep(0)
            finally:
                ended.set()

        async def stream(request: web.Request) -> web.StreamResponse:
            return await answer(request, "cmpl-1", "m", CompletionRequest(prompt="x", stream=True), pieces(), False)

        app = web.Application(middlewares=[error_middleware])
        app.add_routes([web.post("/v1/completions", stream)])
        port = free_port()
        runner = await run_app(app, "127.0.0.1", port)
        try:
            for after in (1, 3, 5):
                ended.clear()
                await hang_up_mid_stream(f"http://127.0.0.1:{port}", "/v1/completions", {}, after)
                await asyncio.wait_for(ended.wait(), 5)  # the generator was closed: the request ends
            await asyncio.sleep(0.05)
        finally:
            await runner.cleanup()
    with caplog.at_level("INFO", logger="microserve"):
        asyncio.run(go())
    assert [r for r in caplog.records if r.levelno >= 40] == []
    went_away = [r for r in caplog.records if "client went away" in r.getMessage()]
    assert went_away and all(r.levelname == "INFO" and not r.exc_info for r in went_away)
