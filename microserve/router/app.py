"""The router's HTTP face: OpenAI endpoints in front of a strategy, /health, /metrics and the
token-protected admin API that swaps strategy, parameters and engines at run time.

    GET  /admin/state                     engines, strategy, parameters
    POST /admin/strategy  {"strategy": "pd:balance=0.2"}  or  {"name": "pd", "params": {"balance": 0.2}}
    POST /admin/engines   {"url": ..., "role": "prefill" | "decode" | "both"}      add an engine
    POST /admin/engines/drain   {"url": ...}   no new requests; in-flight ones finish
    POST /admin/engines/remove  {"url": ...}

In-flight requests keep the strategy object they started with; a switch affects new requests only.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import aclosing
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from microserve.config import same_model_dir
from microserve.protocol import (DEFAULT_MAX_TOKENS, ChatCompletionRequest, CompletionRequest, SamplingFields,
                                 completion_chunk, completion_response, error_body, fit_context, usage_chunk)
from microserve.router.client import ROLES, EngineClient, RouterRequest
from microserve.router.metrics import RouterMetrics
from microserve.router.router import EngineSet, Router
from microserve.router.strategies import UnknownStrategy, coerce_params, parse_spec, strategy_class, tunables
from microserve.tokenizer import NoChatTemplate, Tokenizer
from microserve.web import HTTPError, SSEWriter, check_bearer, error_middleware, parse_body

log = logging.getLogger(__name__)

# Sampling fields forwarded to engines as they are (the router re-shapes the response itself).
FORWARD = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos")


class StrategyBody(BaseModel):
    strategy: str | None = None
    name: str | None = None
    params: dict[str, Any] = {}


class EngineBody(BaseModel):
    url: str
    role: str = "both"


class RouterService:
    def __init__(self, engine_urls: list[tuple[str, str]], strategy: str, tokenizer: Tokenizer | None,
                 model_name: str, admin_token: str | None, timeout_s: float = 60.0,
                 health_interval_s: float = 1.0) -> None:
        self.metrics = RouterMetrics()
        self.timeout_s, self.health_interval_s = timeout_s, health_interval_s
        self.session: aiohttp.ClientSession | None = None
        self.engine_set = EngineSet([self._client(url, role, i) for i, (url, role) in enumerate(engine_urls)])
        self.tokenizer, self.model_name, self.admin_token = tokenizer, model_name, admin_token
        self.strategy_spec = strategy
        self.strategy = self.make_strategy(strategy)
        self._health_task: asyncio.Task | None = None
        self.metrics.kv_bytes_source = lambda: sum(e.info.get("kv_sent_bytes", 0) for e in self.engine_set.engines)

    def _client(self, url: str, role: str, rank: int) -> EngineClient:
        return EngineClient(url, role, rank, self.session, self.timeout_s, self.metrics.observe_call)

    def make_strategy(self, spec: str, params: dict[str, Any] | None = None) -> Router:
        name, spec_params = parse_spec(spec)
        cls = strategy_class(name)
        values = coerce_params(cls, {**spec_params, **(params or {})})
        strategy = cls(self.engine_set)
        for k, v in values.items():
            setattr(strategy, k, v)
        return strategy

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        for e in self.engine_set.engines:
            e.session = self.session
        self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self) -> None:
        if self._health_task:
            self._health_task.cancel()
        if self.session:
            await self.session.close()

    async def _health_loop(self) -> None:
        """Take engines that stop answering out of rotation and put them back once they answer."""
        while True:
            await asyncio.gather(*(self._check(e) for e in list(self.engine_set.engines)))
            await asyncio.sleep(self.health_interval_s)

    async def _check(self, e: EngineClient) -> None:
        try:
            e.info = await e.health(timeout=max(self.health_interval_s * 2, 1.0))
            if not e.healthy:
                log.info("engine %s is healthy again", e.url)
            e.healthy, e.last_error = True, None
        except Exception as err:  # noqa: BLE001 - any failure means out of rotation
            if e.healthy:
                log.warning("engine %s is unhealthy: %s", e.url, err)
            e.healthy, e.last_error = False, f"health check failed: {type(err).__name__}"

    # ---- requests ------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        """The served name, or a path to the same model directory."""
        if model is not None and model != self.model_name and not same_model_dir(model, self.model_name):
            raise HTTPError(404, f"the model {model!r} does not exist; this router serves {self.model_name!r}",
                            "model_not_found", "model")

    def max_model_len(self) -> int | None:
        """The smallest context the engines report (any of them may get the request), None before
        any has answered a health check."""
        return min((e.info["max_model_len"] for e in self.engine_set.engines if e.info.get("max_model_len")),
                   default=None)

    def fit_context(self, prompt_len: int, max_tokens: int | None, param: str) -> int | None:
        """The engines' context rule (`protocol.fit_context`), applied before any engine is called:
        a too-long prompt is a 400 here, max_tokens is clamped to the context left. Unknown
        context (no engine has reported yet): max_tokens as given, the engines apply the rule."""
        limit = self.max_model_len()
        return max_tokens if limit is None else fit_context(prompt_len, max_tokens, limit, param)


def build_router_app(svc: RouterService) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    m = svc.metrics

    async def serve(request: web.Request, body: SamplingFields, prompt: list[int], chat: bool) -> web.StreamResponse:
        strategy = svc.strategy  # in-flight requests keep the strategy they started with
        forward = {k: v for k, v in body.model_dump(exclude_unset=True).items() if k in FORWARD}
        forward["max_tokens"] = body.max_tokens  # as fit_context left it
        req = RouterRequest(uuid.uuid4().hex, prompt, forward, stream=body.stream)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{req.rid}"
        t0 = time.perf_counter()
        writer, parts, token_ids, finish, usage, first = None, [], [], None, None, True
        try:
            async with aclosing(strategy.run(req)) as chunks:
                async for chunk in chunks:
                    if chunk.get("usage") and not chunk.get("choices"):
                        usage = chunk["usage"]
                        continue
                    choice = chunk["choices"][0]
                    if first:
                        m.ttft.labels(strategy.name).observe(time.perf_counter() - t0)
                        if body.stream:
                            writer = SSEWriter(request)
                            await writer.start()
                    text, ids, finish = choice.get("text", ""), choice.get("token_ids", []), choice.get("finish_reason")
                    parts.append(text)
                    token_ids += ids
                    if writer:
                        await writer.send(completion_chunk(rid, svc.model_name, text, finish,
                                                           ids if body.return_token_ids else None, chat, first))
                    first = False
        except Exception as e:
            m.requests.labels(strategy.name, "error").inc()
            if writer is None:
                raise
            log.warning("request %s failed mid-stream: %s", rid, e)  # headers are out: report in-band
            status = getattr(e, "status", 500)
            await writer.send(error_body(str(e), status, getattr(e, "code", None)))
            return await writer.done()
        m.requests.labels(strategy.name, "ok").inc()
        m.jct.labels(strategy.name).observe(time.perf_counter() - t0)
        if writer:
            if body.include_usage and usage:
                await writer.send(usage_chunk(rid, svc.model_name, usage, chat))
            return await writer.done()
        return web.json_response(completion_response(rid, svc.model_name, "".join(parts), finish, usage or {},
                                                     token_ids if body.return_token_ids else None, chat))

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await parse_body(request, CompletionRequest)
        svc.check_model(body.model)
        prompt = body.prompt_ids(svc.tokenizer)
        max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_MAX_TOKENS
        body.max_tokens = svc.fit_context(len(prompt), max_tokens, "prompt")
        return await serve(request, body, prompt, chat=False)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await parse_body(request, ChatCompletionRequest)
        svc.check_model(body.model)
        if svc.tokenizer is None:
            raise HTTPError(400, "the router has no tokenizer, so it cannot chat", "invalid_request")
        try:
            prompt = svc.tokenizer.encode_chat([msg.text() for msg in body.messages])
        except NoChatTemplate as e:
            raise HTTPError(400, str(e), "no_chat_template", "messages") from None
        # None: OpenAI's chat default, as much as the context allows (256 while it is unknown)
        max_tokens = svc.fit_context(len(prompt), body.max_completion_tokens or body.max_tokens, "messages")
        body.max_tokens = max_tokens if max_tokens is not None else 256
        return await serve(request, body, prompt, chat=True)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": svc.model_name, "object": "model", "created": 0, "owned_by": "microserve"}]})

    async def health(request: web.Request) -> web.Response:
        engines = [e.state() for e in svc.engine_set.engines]
        ok = any(e["healthy"] and not e["draining"] for e in engines)
        return web.json_response({"status": "ok" if ok else "unavailable", "strategy": svc.strategy_spec,
                                  "engines": engines}, status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- admin ---------------------------------------------------------------------------------
    def admin(handler):
        async def checked(request: web.Request) -> web.StreamResponse:
            if not svc.admin_token:
                raise HTTPError(403, "the admin API is off: start the router with --admin-token", "forbidden")
            check_bearer(request, svc.admin_token, "admin token")
            return await handler(request)
        return checked

    async def state(request: web.Request) -> web.Response:
        s = svc.strategy
        return web.json_response({"strategy": svc.strategy_spec, "name": s.name,
                                  "params": {k: getattr(s, k) for k in tunables(type(s))},
                                  "engines": [e.state() for e in svc.engine_set.engines]})

    async def set_strategy(request: web.Request) -> web.Response:
        body = await parse_body(request, StrategyBody)
        spec = body.strategy or body.name
        if not spec:
            raise HTTPError(400, "give 'strategy' (e.g. \"pd:balance=0.2\") or 'name' and 'params'", "invalid_request")
        try:
            svc.strategy = svc.make_strategy(spec, body.params)
        except UnknownStrategy as e:
            raise HTTPError(400, str(e), "unknown_strategy", "strategy") from None
        svc.strategy_spec = spec
        log.info("strategy is now %s %s", spec, body.params or "")
        return await state(request)

    async def add_engine(request: web.Request) -> web.Response:
        body = await parse_body(request, EngineBody)
        if body.role not in ROLES:
            raise HTTPError(400, f"role must be one of {', '.join(ROLES)}", "invalid_request", "role")
        if svc.engine_set.get(body.url):
            raise HTTPError(409, f"engine {body.url} is already known", "conflict", "url")
        e = svc._client(body.url, body.role, len(svc.engine_set.engines))
        svc.engine_set.engines.append(e)
        await svc._check(e)
        return await state(request)

    def engine_op(op):
        async def handler(request: web.Request) -> web.Response:
            body = await parse_body(request, EngineBody)
            e = svc.engine_set.get(body.url)
            if e is None:
                raise HTTPError(404, f"no engine {body.url}", "not_found", "url")
            op(e)
            return await state(request)
        return handler

    def drain(e: EngineClient) -> None:
        e.draining = True

    def remove(e: EngineClient) -> None:
        svc.engine_set.engines.remove(e)  # requests already on it hold their own reference

    app.add_routes([
        web.post("/v1/completions", completions), web.post("/v1/chat/completions", chat),
        web.get("/v1/models", models), web.get("/health", health), web.get("/metrics", metrics),
        web.get("/admin/state", admin(state)), web.post("/admin/strategy", admin(set_strategy)),
        web.post("/admin/engines", admin(add_engine)), web.post("/admin/engines/drain", admin(engine_op(drain))),
        web.post("/admin/engines/remove", admin(engine_op(remove))),
    ])

    async def on_startup(app):
        await svc.start()

    async def on_cleanup(app):
        await svc.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
