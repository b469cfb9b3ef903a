"""EngineClient: one engine as the router sees it — its microserving calls over aiohttp, its role,
health and live load.

Every call raises `EngineError` (the engine answered with an error: passed through to the client
as is) or `EngineUnavailable` (no answer: connection refused, reset or timed out — the router marks
the engine unhealthy and may retry elsewhere).
"""
from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import aiohttp

from microserve.cluster import auth_headers, resolve_token
from microserve.errors import ServeError

ROLES = ("prefill", "decode", "both")


class EngineError(ServeError):
    """The engine answered with an HTTP error."""


class EngineUnavailable(ServeError):
    """The engine did not answer (dead, unreachable or too slow)."""

    def __init__(self, url: str, why: str, status: int = 502) -> None:
        super().__init__(f"engine {url} is unavailable: {why}", status, "engine_unavailable")
        self.url = url


@dataclass
class Load:
    """What the router has in flight on an engine."""
    running: int = 0  # generate / start_generate streams
    prefill_tokens: int = 0  # prompt tokens sent for computing whose result has not come back yet
    calls: int = 0  # every sub-request in flight


@dataclass
class RouterRequest:
    """A user request, tokenized by the router. Every window is an index into `prompt`."""
    rid: str
    prompt: list[int]
    body: dict[str, Any]  # the OpenAI sampling fields forwarded to engines
    parked: dict[str, "EngineClient"] = field(default_factory=dict)  # url -> engine holding a prep_recv
    streamed: bool = False  # a token reached the client: retrying is no longer possible
    stream: bool = True  # the client wants a stream (engines are asked for one only then)

    def __len__(self) -> int:
        return len(self.prompt)


class EngineClient:
    def __init__(self, url: str, role: str = "both", rank: int = 0, session: aiohttp.ClientSession | None = None,
                 timeout_s: float = 60.0, observe=None, cluster_token: str | None = None, on_kv_bytes=None) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.url, self.role, self.rank = url.rstrip("/"), role, rank
        self.session = session
        self.headers = auth_headers(cluster_token or resolve_token())  # the microserving calls need it
        self.on_kv_bytes = on_kv_bytes  # callable(bytes) for each remote_send's reported KV bytes
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=timeout_s)
        self.healthy, self.draining = True, False
        self.load = Load()
        self.last_error: str | None = None
        self.info: dict = {}  # the engine's last /health answer (max_model_len, kv_sent_bytes, ...)
        self.observe = observe  # callable(call, url, seconds) for latency metrics

    def __repr__(self) -> str:
        return f"EngineClient({self.url}, {self.role})"

    # ---- plumbing -------------------------------------------------------------------------------
    def _body(self, req: RouterRequest, **extra) -> dict:
        return {**req.body, "prompt": req.prompt, "user": req.rid, **extra}

    @asynccontextmanager
    async def _call(self, name: str, path: str, body: dict, running: bool = False, prefill_tokens: int = 0):
        """POST and yield the response; tracks load and latency, maps failures to our errors."""
        load = self.load
        load.calls += 1
        load.prefill_tokens += prefill_tokens
        load.running += running
        t0 = time.perf_counter()
        try:
            async with self.session.post(self.url + path, json=body, timeout=self.timeout, headers=self.headers) as resp:
                if resp.status >= 400:
                    raise await _engine_error(resp)
                yield resp
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as e:
            self.healthy, self.last_error = False, f"{type(e).__name__}: {e}"
            raise EngineUnavailable(self.url, self.last_error, 504 if isinstance(e, TimeoutError) else 502) from None
        finally:
            load.calls -= 1
            load.prefill_tokens -= prefill_tokens
            load.running -= running
            if self.observe:
                self.observe(name, self.url, time.perf_counter() - t0)

    async def _json(self, name: str, path: str, body: dict, prefill_tokens: int = 0) -> dict:
        async with self._call(name, path, body, prefill_tokens=prefill_tokens) as resp:
            return await resp.json()

    async def _stream(self, name: str, path: str, body: dict, prefill_tokens: int,
                      stream: bool = True) -> AsyncIterator[dict]:
        """Completion chunks as dicts, the usage last. Load counts the prompt as pending prefill
        until the first chunk. stream=False asks the engine for one JSON reply (cheaper when the
        client wants no stream either) and yields it as one chunk plus the usage."""
        body = {**body, "stream": stream, "return_token_ids": True,
                **({"stream_options": {"include_usage": True}} if stream else {})}
        if not stream:
            async with self._call(name, path, body, running=True, prefill_tokens=prefill_tokens) as resp:
                reply = await resp.json()
            yield {"choices": reply["choices"]}
            yield {"choices": [], "usage": reply["usage"]}
            return
        async with self._call(name, path, body, running=True) as resp:
            self.load.prefill_tokens += prefill_tokens
            pending = prefill_tokens
            try:
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    if line.startswith(b"data: [DONE]"):
                        return
                    self.load.prefill_tokens -= pending
                    pending = 0
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        e = chunk["error"]
                        raise EngineError(e.get("message", "engine error"), 502, e.get("code") or "engine_error")
                    yield chunk
            finally:
                self.load.prefill_tokens -= pending
        raise EngineUnavailable(self.url, "the stream ended without [DONE]")

    # ---- the microserving API -------------------------------------------------------------------
    async def prep_recv(self, req: RouterRequest, end: int) -> tuple[str, int]:
        r = await self._json("prep_recv", "/microserving/prep_recv", self._body(req, end=end))
        req.parked[self.url] = self
        return r["kv_append_metadata"], r["prefix_matched_length"]

    async def remote_send(self, req: RouterRequest, begin: int, end: int, kv_addr_info: str, recv_rank: int = 0) -> None:
        r = await self._json("remote_send", "/microserving/remote_send",
                             self._body(req, begin=begin, end=end, kv_addr_info=kv_addr_info, recv_rank=recv_rank),
                             prefill_tokens=end - begin)
        if self.on_kv_bytes:
            self.on_kv_bytes(r.get("kv_bytes", 0))

    def start_generate(self, req: RouterRequest, begin: int) -> AsyncIterator[dict]:
        req.parked.pop(self.url, None)  # from here on the engine owns the request
        return self._stream("start_generate", "/microserving/start_generate", self._body(req, begin=begin),
                            len(req) - begin, req.stream)

    async def commit(self, req: RouterRequest) -> int:
        req.parked.pop(self.url, None)
        return (await self._json("commit", "/microserving/commit", {"user": req.rid}))["cached_tokens"]

    async def abort(self, req: RouterRequest) -> None:
        req.parked.pop(self.url, None)
        await self._json("abort", "/microserving/abort", {"user": req.rid})

    async def match(self, req: RouterRequest) -> int:
        return (await self._json("match", "/microserving/match", {"prompt": req.prompt}))["prefix_matched_length"]

    def generate(self, req: RouterRequest) -> AsyncIterator[dict]:
        """A whole request on this engine alone (/v1/completions)."""
        return self._stream("generate", "/v1/completions", self._body(req), len(req), req.stream)

    async def health(self, timeout: float = 2.0) -> dict:
        async with self.session.get(self.url + "/health", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            r.raise_for_status()
            return await r.json()

    def state(self) -> dict:
        return {"url": self.url, "role": self.role, "rank": self.rank, "healthy": self.healthy,
                "draining": self.draining, "running": self.load.running, "prefill_tokens": self.load.prefill_tokens,
                "calls": self.load.calls, "last_error": self.last_error}


async def _engine_error(resp: aiohttp.ClientResponse) -> EngineError:
    try:
        err = (await resp.json())["error"]
        return EngineError(err["message"], resp.status, err.get("code") or "engine_error", err.get("param"))
    except Exception:
        return EngineError(f"engine answered HTTP {resp.status}: {(await resp.text())[:200]}", resp.status, "engine_error")
