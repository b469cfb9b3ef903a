"""The router's HTTP face: OpenAI endpoints in front of a strategy, /health, /metrics and the
token-protected admin API that swaps strategy, parameters and engines at run time.

    GET  /admin/state                     engines, strategy, parameters
    POST /admin/strategy  {"strategy": "pd:balance=0.2"}  or  {"name": "pd", "params": {"balance": 0.2}}
    POST /admin/engines   {"url": ..., "role": "prefill" | "decode" | "both"}      add an engine
    POST /admin/engines   {"role": "decode", "count": 2}      start 2 engines through the launcher
    POST /admin/engines/drain   {"url": ...}   no new requests; in-flight ones finish
    POST /admin/engines/remove  {"url": ...}  or  {"role": "decode"} (a launched one)

Engines that the router's launcher started (`microserve up`, local or on Ray) are stopped when
removed: first drained, then, once every request that began before the drain has ended, taken out
and stopped (on Ray: the actor goes). The launcher's restarted engines are swapped in by URL.

In-flight requests keep the strategy object they started with; a switch affects new requests only.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from microserve.launch import Engine, Launcher, StartupError
from microserve.router.client import ROLES, EngineClient, RouterRequest
from microserve.router.metrics import RouterMetrics
from microserve.router.router import EngineSet, Router
from microserve.router.strategies import UnknownStrategy, coerce_params, parse_spec, strategy_class, tunables
from microserve.tokenizer import Tokenizer
from microserve.openai_front import OpenAIFront, Piece, Prepared
from microserve.web import HTTPError, check_bearer, error_middleware, parse_body

log = logging.getLogger(__name__)

# Sampling fields forwarded to engines as they are (the router re-shapes the response itself).
FORWARD = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos")


class StrategyBody(BaseModel):
    strategy: str | None = None
    name: str | None = None
    params: dict[str, Any] = {}


class EngineBody(BaseModel):
    url: str | None = None
    role: str = "both"
    count: int | None = None  # without url: how many engines of `role` the launcher starts


class EngineRef(BaseModel):
    url: str | None = None
    role: str | None = None  # without url (remove only): a launched engine of this role, the least loaded
    drain_timeout_s: float = 300.0


class RouterService:
    def __init__(self, engine_urls: list[tuple[str, str]], strategy: str, tokenizer: Tokenizer | None,
                 model_name: str, admin_token: str | None, timeout_s: float = 60.0,
                 health_interval_s: float = 1.0, launcher: Launcher | None = None) -> None:
        self.metrics = RouterMetrics()
        self.timeout_s, self.health_interval_s = timeout_s, health_interval_s
        self.session: aiohttp.ClientSession | None = None
        self.engine_set = EngineSet([self._client(url, role, i) for i, (url, role) in enumerate(engine_urls)])
        self.tokenizer, self.model_name, self.admin_token = tokenizer, model_name, admin_token
        self.strategy_spec = strategy
        self.strategy = self.make_strategy(strategy)
        self._health_task: asyncio.Task | None = None
        # the launcher that started the engines (None: engines given by URL), and its handle per URL
        self.launcher = launcher
        self.launched: dict[str, Engine] = {e.url: e for e in launcher.engines} if launcher else {}
        self._seq, self._active = 0, set()  # requests begun, and those not finished yet (by number)
        # the served name, or a path to the model directory (the name, or where the tokenizer is)
        self.front = OpenAIFront("router", model_name, tokenizer, self.max_model_len,
                                 model_dirs=(model_name, *((tokenizer.path,) if tokenizer else ())))

    def _client(self, url: str, role: str, rank: int) -> EngineClient:
        return EngineClient(url, role, rank, self.session, self.timeout_s, self.metrics.observe_call,
                            on_kv_bytes=self.metrics.count_kv_bytes)

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
        """Take engines that stop answering out of rotation and put them back once they answer;
        swap in the launcher's engines that came back at another URL."""
        while True:
            if self.launcher:
                await self._follow_launcher()
            await asyncio.gather(*(self._check(e) for e in list(self.engine_set.engines)))
            await asyncio.sleep(self.health_interval_s)

    async def _follow_launcher(self) -> None:
        try:
            moved = await asyncio.to_thread(self.launcher.poll)
        except Exception as err:  # noqa: BLE001 - the next round asks again
            log.warning("could not ask the launcher about its engines: %s", err)
            return
        for handle, old in moved:
            c = self.engine_set.get(old)
            self.launched.pop(old, None)
            if c is None:  # removed meanwhile
                continue
            new = self._client(handle.url, c.role, c.rank)
            new.session, new.draining = self.session, c.draining
            self.engine_set.engines[self.engine_set.engines.index(c)] = new  # in-flight requests keep the old one
            self.launched[handle.url] = handle
            log.info("engine %s is back at %s (was %s)", handle.name, handle.url, old)

    # ---- engines through the launcher -------------------------------------------------------------
    async def add_launched(self, role: str, count: int) -> list[EngineClient]:
        """Start `count` engines of `role` through the launcher, healthy, then route to them."""
        handles = await asyncio.to_thread(self.launcher.add, role, count)
        clients = []
        for h in handles:
            self.launched[h.url] = h
            c = self._client(h.url, h.role, len(self.engine_set.engines))
            c.session = self.session
            self.engine_set.engines.append(c)
            clients.append(c)
            await self._check(c)
        log.info("started %d %s engine(s): %s", count, role, ", ".join(h.url for h in handles))
        return clients

    async def retire(self, e: EngineClient, drain_timeout_s: float) -> None:
        """Drain `e`, wait until every request begun before now has ended (at most drain_timeout_s),
        take it out of the engine set, and stop it if the launcher started it."""
        e.draining = True
        cut, deadline = self._seq, time.monotonic() + drain_timeout_s
        while any(s <= cut for s in self._active) or e.load.calls:
            if time.monotonic() > deadline:
                log.warning("engine %s still had requests after %.0fs of draining; stopping it anyway", e.url,
                            drain_timeout_s)
                break
            await asyncio.sleep(0.05)
        if e in self.engine_set.engines:
            self.engine_set.engines.remove(e)
        handle = self.launched.pop(e.url, None)
        if handle is not None:
            await asyncio.to_thread(self.launcher.remove, handle)
            log.info("stopped engine %s (%s)", handle.name, e.url)

    def engine_state(self, e: EngineClient) -> dict:
        """e.state(), and for an engine the launcher started, what the launcher knows of it ("launched":
        name, node, restarts, log; on Ray its actor)."""
        handle = self.launched.get(e.url)
        return {**e.state(), **({"launched": handle.describe()} if handle else {})}

    def request_began(self) -> int:
        self._seq += 1
        self._active.add(self._seq)
        return self._seq

    def request_ended(self, seq: int) -> None:
        self._active.discard(seq)

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
    def max_model_len(self) -> int | None:
        """The smallest context the engines report (any of them may get the request), None before
        any has answered a health check: the front applies the engines' context rule with it
        (`protocol.fit_context`) before any engine is called; while it is unknown, the engines do."""
        return min((e.info["max_model_len"] for e in self.engine_set.engines if e.info.get("max_model_len")),
                   default=None)


def build_router_app(svc: RouterService) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    m = svc.metrics

    async def pieces(strategy: Router, req: RouterRequest) -> AsyncIterator[Piece]:
        """The strategy's chunks as reply pieces, observing TTFT, JCT and the outcome."""
        t0, first = time.perf_counter(), True
        seq = svc.request_began()
        try:
            async with aclosing(strategy.run(req)) as chunks:
                async for chunk in chunks:
                    if chunk.get("usage") and not chunk.get("choices"):
                        yield Piece(usage=chunk["usage"])
                        continue
                    if first:
                        m.ttft.labels(strategy.name).observe(time.perf_counter() - t0)
                        first = False
                    choice = chunk["choices"][0]
                    yield Piece(choice.get("text", ""), choice.get("token_ids", []), choice.get("finish_reason"))
        except (GeneratorExit, asyncio.CancelledError):  # the client left
            m.requests.labels(strategy.name, "disconnected").inc()
            raise
        except Exception:
            m.requests.labels(strategy.name, "error").inc()
            raise
        finally:
            svc.request_ended(seq)
        m.requests.labels(strategy.name, "ok").inc()
        m.jct.labels(strategy.name).observe(time.perf_counter() - t0)

    async def serve(request: web.Request, chat: bool) -> web.StreamResponse:
        p: Prepared = await svc.front.prepare(request, chat)
        strategy = svc.strategy  # in-flight requests keep the strategy they started with
        forward = {k: v for k, v in p.body.model_dump(exclude_unset=True).items() if k in FORWARD}
        forward["max_tokens"] = p.max_tokens  # as fit_context left it
        req = RouterRequest(p.rid.split("-", 1)[1], p.prompt, forward, stream=p.body.stream)
        return await svc.front.answer(request, p, pieces(strategy, req))

    async def completions(request: web.Request) -> web.StreamResponse:
        return await serve(request, chat=False)

    async def chat(request: web.Request) -> web.StreamResponse:
        return await serve(request, chat=True)

    async def models(request: web.Request) -> web.Response:
        return svc.front.models(0)

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
                                  "engines": [svc.engine_state(e) for e in svc.engine_set.engines]})

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
        if body.url is None:
            return await add_launched(request, body)
        if svc.engine_set.get(body.url):
            raise HTTPError(409, f"engine {body.url} is already known", "conflict", "url")
        e = svc._client(body.url, body.role, len(svc.engine_set.engines))
        svc.engine_set.engines.append(e)
        await svc._check(e)
        return await state(request)

    async def add_launched(request: web.Request, body: EngineBody) -> web.Response:
        if svc.launcher is None:
            raise HTTPError(400, "give 'url': this router did not start its engines, so it cannot start more "
                                 "(`microserve up` can)", "invalid_request", "url")
        count = 1 if body.count is None else body.count
        if not 1 <= count <= 64:
            raise HTTPError(400, "count must be from 1 to 64", "invalid_request", "count")
        try:
            await svc.add_launched(body.role, count)
        except StartupError as e:
            raise HTTPError(503, f"could not start {count} {body.role} engine(s): {e}", "engine_start_failed") from None
        except ValueError as e:
            raise HTTPError(400, str(e), "invalid_request", "role") from None
        return await state(request)

    def pick(body: EngineRef, by_role: bool = False) -> EngineClient:
        """The engine `body` names: by URL, or (`by_role`) the least loaded launched one of its role."""
        if body.url is not None:
            e = svc.engine_set.get(body.url)
            if e is None:
                raise HTTPError(404, f"no engine {body.url}", "not_found", "url")
            return e
        if not by_role or body.role not in ROLES or svc.launcher is None:
            raise HTTPError(400, "give 'url'" + (", or 'role' to remove one launched engine of that role"
                                                if by_role and svc.launcher else ""), "invalid_request", "url")
        mine = [e for e in svc.engine_set.engines if e.role == body.role and e.url in svc.launched]
        if not mine:
            raise HTTPError(404, f"no {body.role} engine that this router's launcher started", "not_found", "role")
        return min(mine, key=lambda e: (not e.draining, e.load.running + e.load.calls))

    async def drain(request: web.Request) -> web.Response:
        pick(await parse_body(request, EngineRef)).draining = True
        return await state(request)

    async def remove(request: web.Request) -> web.Response:
        body = await parse_body(request, EngineRef)
        e = pick(body, by_role=True)
        if e.url in svc.launched:  # drained, then stopped
            await svc.retire(e, body.drain_timeout_s)
        else:
            svc.engine_set.engines.remove(e)  # requests already on it hold their own reference
        return await state(request)

    app.add_routes([
        web.post("/v1/completions", completions), web.post("/v1/chat/completions", chat),
        web.get("/v1/models", models), web.get("/health", health), web.get("/metrics", metrics),
        web.get("/admin/state", admin(state)), web.post("/admin/strategy", admin(set_strategy)),
        web.post("/admin/engines", admin(add_engine)), web.post("/admin/engines/drain", admin(drain)),
        web.post("/admin/engines/remove", admin(remove)),
    ])

    async def on_startup(app):
        await svc.start()

    async def on_cleanup(app):
        await svc.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
