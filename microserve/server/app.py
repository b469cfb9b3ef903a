"""The engine server: one AsyncEngine behind the OpenAI and microserving APIs, /health and /metrics."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from microserve.cluster import is_loopback
from microserve.config import EngineConfig
from microserve.engine.async_engine import AsyncEngine
from microserve.engine.engine import Engine
from microserve.server.metrics import EngineMetrics
from microserve.server.microserving_api import MicroservingAPI
from microserve.server.openai_api import OpenAIAPI
from microserve.server.process import freeze_startup_objects, keep_freed_memory
from microserve.web import check_bearer, error_middleware, run_app, serve_until_signal

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    engine: Engine
    aengine: AsyncEngine
    metrics: EngineMetrics
    started: float


def auth_middleware(cluster_token: str | None, api_key: str | None):
    """The microserving and debug calls need the cluster token, the OpenAI API the api key (if set);
    /health and /metrics stay open for probes and scrapers."""
    @web.middleware
    async def auth(request: web.Request, handler):
        path = request.path
        if cluster_token and path.startswith(("/microserving/", "/debug/")):
            check_bearer(request, cluster_token, "cluster token")
        elif api_key and path.startswith("/v1/"):
            check_bearer(request, api_key, "API key")
        return await handler(request)
    return auth


def build_app(engine: Engine, debug_api: bool = False, cluster_token: str | None = None,
              api_key: str | None = None, step_trace: str | None = None) -> web.Application:
    state = ServerState(engine, AsyncEngine(engine, step_trace=step_trace), EngineMetrics(engine), time.time())
    app = web.Application(middlewares=[error_middleware, auth_middleware(cluster_token, api_key)],
                          client_max_size=64 * 2**20)
    app["state"] = state
    openai = OpenAIAPI(state)
    microserving = MicroservingAPI(state, openai, cluster_token)
    app.add_routes(openai.routes() + microserving.routes())

    async def health(request: web.Request) -> web.Response:
        a = engine.cache.accounting()
        return web.json_response({"status": "ok", "model": engine.model_name, "transport": engine.transport.name,
                                  "running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting),
                                  "max_model_len": engine.max_model_len, "kv_sent_bytes": engine.stats.kv_sent_bytes,
                                  "kv": a})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(state.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.add_routes([web.get("/health", health), web.get("/metrics", metrics)])
    if debug_api:  # tests read engine internals through this; never on by default
        async def kv_accounting(request: web.Request) -> web.Response:
            return web.json_response(await state.aengine.call(engine.cache.check))
        app.add_routes([web.get("/debug/kv", kv_accounting)])

    async def on_startup(app):
        await state.aengine.start()

    async def on_cleanup(app):
        await microserving.fences.close()
        await state.aengine.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def serve(config: EngineConfig, host: str, port: int, debug_api: bool = False, cluster_token: str | None = None,
                api_key: str | None = None, insecure: bool = False) -> None:
    if not cluster_token and not insecure and not is_loopback(host):
        raise SystemExit(f"refusing to serve the microserving API on {host} without a cluster token: anyone who "
                         "reaches it could move KV. Give --cluster-token (or $MICROSERVE_CLUSTER_TOKEN), bind "
                         "127.0.0.1, or pass --insecure")
    trace = config.step_trace.replace("{port}", str(port)) if config.step_trace else None
    if trace:  # fail before the model loads, with the reason, not a traceback after it
        try:
            open(trace, "a").close()
        except OSError as e:
            raise SystemExit(f"--step-trace: cannot write {trace}: {e.strerror}") from None
    t0 = time.perf_counter()
    if config.num_threads is None:  # leave a core to the event loop (HTTP, streaming), as vLLM does
        config.num_threads = max(1, len(os.sched_getaffinity(0)) - 1)
    keep_freed_memory()
    engine = Engine(config)
    app = build_app(engine, debug_api, cluster_token, api_key, trace)
    freeze_startup_objects()
    runner = await run_app(app, host, port)
    a = engine.cache.accounting()
    log.info("engine ready in %.2fs: model %s (%s, %s on %s), %d KV pages x %d tokens, transport %s, "
             "http://%s:%d", time.perf_counter() - t0, engine.model_name, engine.model_config.architecture,
             str(engine.dtype).removeprefix("torch."), engine.device, a["total"], engine.pool.page_size,
             engine.transport.name, host, port)
    await serve_until_signal(runner)
