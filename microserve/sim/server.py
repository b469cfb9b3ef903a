"""The HTTP boundary in virtual time: what the router's `EngineClient` talks to in a simulation.

The router's own `EngineClient` is used unchanged; only its `session` (an aiohttp ClientSession on
a real cluster) is `SimSession` here, which answers `post(url, json=...)` and `get(url)` from the
simulated engine at that URL. `SimServer` does what server/microserving_api.py and
server/openai_api.py do with a body (same paths, same replies, same SSE chunks and error shapes,
`[DONE]`), through `SimAsyncEngine` (the real AsyncEngine's call/stream code). So the client's
load accounting, error mapping and stream parsing, and the router's building blocks above it, run
exactly as against real engines.

Each call costs `rpc_s` of virtual time before the engine sees it (one round trip of the real
router's HTTP call, paid up front; 0 disables it). A remote_send claims the receiver's fence
first (one more round trip, as server/fencing.py does when a cluster token is set) and holds the
receiver's reservation until its KV has landed.
"""
from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from typing import Any, AsyncIterator

from microserve.engine.request import RequestOutput
from microserve.engine.sampling import SamplingParams
from microserve.errors import ServeError
from microserve.protocol import DEFAULT_MAX_TOKENS, completion_chunk, completion_response, error_body, usage_chunk, \
    usage_dict
from microserve.sim.engine import SIM_TOKEN, SimAsyncEngine, SimEngine


def sampling_params(body: dict[str, Any]) -> SamplingParams:
    """server/openai_api.sampling_params over a plain dict (the fields the router forwards)."""
    stop = body.get("stop")
    return SamplingParams(max_tokens=body.get("max_tokens") or DEFAULT_MAX_TOKENS,
                          temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
                          top_k=body.get("top_k", -1), seed=body.get("seed"),
                          stop=[stop] if isinstance(stop, str) else list(stop or []),
                          stop_token_ids=list(body.get("stop_token_ids") or []),
                          ignore_eos=bool(body.get("ignore_eos", False)))


class SimResponse:
    """The part of aiohttp.ClientResponse that EngineClient reads."""

    def __init__(self, status: int, doc: Any = None, content: AsyncIterator[bytes] | None = None) -> None:
        self.status, self._doc, self.content = status, doc, content

    async def json(self) -> Any:
        return self._doc

    async def text(self) -> str:
        return json.dumps(self._doc)

    def raise_for_status(self) -> None:
        if self.status >= 400:
            raise ServeError(f"HTTP {self.status}", self.status)

    async def close(self) -> None:
        if self.content is not None:
            await self.content.aclose()


def _error(e: ServeError) -> SimResponse:
    return SimResponse(e.status, error_body(str(e), e.status, e.code, e.param))


class SimServer:
    """One simulated engine's HTTP handlers (paths as server/app.py routes them)."""

    def __init__(self, url: str, aengine: SimAsyncEngine, cluster: "SimSession") -> None:
        self.url, self.aengine, self.session = url, aengine, cluster
        self.engine: SimEngine = aengine.engine

    async def handle(self, path: str, body: dict[str, Any]) -> SimResponse:
        handler = self.routes.get(path)
        if handler is None:
            return SimResponse(404, error_body(f"no route {path}", 404, "not_found"))
        try:
            return await handler(self, body)
        except ServeError as e:
            return _error(e)

    async def health(self) -> dict[str, Any]:
        e = self.engine
        return {"status": "ok", "max_model_len": e.max_model_len, "kv_sent_bytes": e.stats.kv_sent_bytes,
                "running": len(e.scheduler.running), "waiting": len(e.scheduler.waiting)}

    # ---- microserving ----------------------------------------------------------------------------
    async def prep_recv(self, body: dict) -> SimResponse:
        meta, matched = await self.aengine.call(self.engine.prep_recv, body["user"], body["prompt"], body["end"],
                                                sampling_params(body), self.url)
        return SimResponse(200, {"kv_append_metadata": meta, "prefix_matched_length": matched})

    async def remote_send(self, body: dict) -> SimResponse:
        ids, begin, end, info = body["prompt"], body["begin"], body["end"], body["kv_addr_info"]
        doc, _ = self.engine.check_send(ids, begin, end, info)  # bad input: 4xx before any claim
        receiver = self.engine.transport.connect(doc["peer"]).engine
        fence = (doc.get("fence") or {}).get("id")
        await self.session.rpc()  # the fence claim: one round trip to the receiver
        receiver.now = asyncio.get_running_loop().time()
        if fence and not receiver.hold(fence):
            raise ServeError("the reservation this kv_addr_info names has ended (started, committed, aborted or "
                             "expired): its slots may belong to someone else now", 409, "stale_reservation")
        try:
            sent = await self.aengine.remote_send(body["user"], ids, begin, end, info, None)
        finally:
            receiver.now = asyncio.get_running_loop().time()
            if fence:
                receiver.unhold(fence)
        return SimResponse(200, {"kv_bytes": sent})

    async def start_generate(self, body: dict) -> SimResponse:
        stream = self.aengine.start_generate(body["user"], body["begin"], body["prompt"], sampling_params(body))
        return await self._answer(body["user"], body, stream)

    async def commit(self, body: dict) -> SimResponse:
        return SimResponse(200, {"cached_tokens": await self.aengine.call(self.engine.commit, body["user"])})

    async def abort(self, body: dict) -> SimResponse:
        await self.aengine.call(self.engine.abort_parked, body["user"])
        return SimResponse(200, {})

    async def match(self, body: dict) -> SimResponse:
        return SimResponse(200, {"prefix_matched_length": await self.aengine.call(self.engine.match, body["prompt"])})

    async def completions(self, body: dict) -> SimResponse:
        rid = f"cmpl-{body.get('user') or id(body)}"
        return await self._answer(rid, body, self.aengine.generate(rid, body["prompt"], sampling_params(body)))

    routes = {"/microserving/prep_recv": prep_recv, "/microserving/remote_send": remote_send,
              "/microserving/start_generate": start_generate, "/microserving/commit": commit,
              "/microserving/abort": abort, "/microserving/match": match, "/v1/completions": completions}

    # ---- replies (web.answer's contract) -----------------------------------------------------------
    async def _answer(self, rid: str, body: dict, outputs: AsyncIterator[RequestOutput]) -> SimResponse:
        """Nothing goes out before the first output, so an error up to then is an HTTP error; after
        it, an in-band error event. Streams end with the usage chunk (when asked) and [DONE]."""
        try:
            first = await outputs.__anext__()
            if first.finished and first.finish_reason == "error" and first.error:
                raise ServeError(first.error, first.error_status, "engine_error")
        except ServeError as e:
            await outputs.aclose()
            return _error(e)
        if not body.get("stream"):
            return await self._collect(rid, body, first, outputs)
        return SimResponse(200, content=self._sse(rid, body, first, outputs))

    async def _collect(self, rid: str, body: dict, first: RequestOutput, outputs) -> SimResponse:
        ids, finish, usage = [], None, {}
        async with aclosing(outputs) as outs:
            out = first
            while True:
                if out.finish_reason == "error" and out.error:
                    return _error(ServeError(out.error, out.error_status, "engine_error"))
                ids += out.new_token_ids
                finish = out.finish_reason or finish
                if out.finished:
                    usage = usage_dict(out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens)
                    break
                out = await outs.__anext__()
        return SimResponse(200, completion_response(rid, self.engine.model_name, "", finish, usage,
                                                    ids if body.get("return_token_ids") else None))

    @staticmethod
    def _line(rid: str, model: str, text: str, finish: str | None, ids: list[int] | None) -> bytes:
        return b"data: " + json.dumps(completion_chunk(rid, model, text, finish, ids)).encode() + b"\n"

    async def _sse(self, rid: str, body: dict, first: RequestOutput, outputs) -> AsyncIterator[bytes]:
        model = self.engine.model_name
        with_ids = body.get("return_token_ids")
        usage = plain = None
        async with aclosing(outputs) as outs:
            out = first
            while True:
                if out.finish_reason == "error" and out.error:
                    err = error_body(out.error, out.error_status, "engine_error")
                    yield b"data: " + json.dumps(err).encode() + b"\n"
                    yield b"data: [DONE]\n"
                    return
                if out.finish_reason is None and not out.text and out.new_token_ids == [SIM_TOKEN]:
                    if plain is None:  # every simulated token's chunk is the same: encode it once
                        plain = self._line(rid, model, "", None, [SIM_TOKEN] if with_ids else None)
                    yield plain
                elif out.new_token_ids or out.text or out.finish_reason:
                    yield self._line(rid, model, out.text, out.finish_reason, out.new_token_ids if with_ids else None)
                if out.finished:
                    usage = usage_dict(out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens)
                    break
                out = await outs.__anext__()
        if usage and (body.get("stream_options") or {}).get("include_usage"):
            yield b"data: " + json.dumps(usage_chunk(rid, model, usage)).encode() + b"\n"
        yield b"data: [DONE]\n"


class _Call:
    """`async with session.post(...) as resp` for a simulated engine."""

    def __init__(self, session: "SimSession", url: str, body: dict | None, get: bool = False) -> None:
        self.session, self.url, self.body, self.get = session, url, body, get
        self.resp: SimResponse | None = None

    async def __aenter__(self) -> SimResponse:
        server, path = self.session.route(self.url)
        if self.get:
            self.resp = SimResponse(200, await server.health())
            return self.resp
        await self.session.rpc()
        self.resp = await server.handle(path, self.body or {})
        return self.resp

    async def __aexit__(self, *exc) -> None:
        if self.resp is not None:
            await self.resp.close()


class SimSession:
    """Stands in for the router's aiohttp.ClientSession: routes by URL to simulated engines."""

    def __init__(self, rpc_s: float = 0.0) -> None:
        self.rpc_s = rpc_s
        self.servers: dict[str, SimServer] = {}
        self.calls = 0

    def add(self, server: SimServer) -> None:
        self.servers[server.url] = server

    def route(self, url: str) -> tuple[SimServer, str]:
        for base, server in self.servers.items():
            if url.startswith(base + "/"):
                return server, url[len(base):]
        import aiohttp
        raise aiohttp.ClientConnectionError(f"no simulated engine at {url}")

    async def rpc(self) -> None:
        self.calls += 1
        if self.rpc_s > 0:
            await asyncio.sleep(self.rpc_s)

    def post(self, url: str, json: dict | None = None, timeout: Any = None, headers: Any = None) -> _Call:
        return _Call(self, url, json)

    def get(self, url: str, timeout: Any = None, headers: Any = None) -> _Call:
        return _Call(self, url, None, get=True)

    async def close(self) -> None:
        pass
