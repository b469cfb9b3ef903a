"""Run the router: `microserve router` (engines given by URL) and `microserve up` (engines started
through the launcher, as child processes or Ray actors, then the router in this process; from
Python: `serve_cluster`)."""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
import time

from microserve.cluster import TOKEN_ENV, new_token, resolve_token
from microserve.launch import EngineSpec, Launcher, LocalLauncher, StartupError, engine_specs
from microserve.model_files import TOKENIZER_FILES, model_dir
from microserve.router.app import RouterService, build_router_app
from microserve.router.strategies import engine_roles, parse_spec
from microserve.tokenizer import Tokenizer
from microserve.web import run_app, serve_until_signal

log = logging.getLogger(__name__)



def load_tokenizer(model: str | None) -> Tokenizer | None:
    """`model`'s tokenizer (a local directory, `embedded`, or a hub id, of which only the tokenizer
    and config files are fetched), or None. Through model_files, never the model package."""
    if not model:
        return None
    path = model_dir(model, TOKENIZER_FILES)
    return Tokenizer(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None


async def start_router(engines: list[tuple[str, str]], strategy: str, model: str | None, served_name: str | None,
                       host: str, port: int, admin_token: str | None = None, timeout_s: float = 60.0,
                       launcher: Launcher | None = None):
    """Serve the router in this event loop; returns its aiohttp runner (call .cleanup() to stop).
    With the `launcher` that started the engines, the admin API can add engines by role and stop
    the ones it removes, and engines that a launcher restarts elsewhere are re-registered."""
    svc = RouterService(engines, strategy, load_tokenizer(model), served_name or model or "default", admin_token,
                        timeout_s, launcher=launcher)
    runner = await run_app(build_router_app(svc), host, port)
    log.info("router ready: http://%s:%d, strategy %s, engines %s", host, port, strategy,
             ", ".join(f"{u} ({r})" for u, r in engines))
    return runner


async def run_router(*args, **kw) -> None:
    """start_router, then serve until SIGINT or SIGTERM."""
    await serve_until_signal(await start_router(*args, **kw))


def share_cluster_token(explicit: str | None = None) -> str:
    """The cluster token for engines started from here and the router in this process: the given
    one, $MICROSERVE_CLUSTER_TOKEN, or a new one. Exported, so child engines inherit it (never on
    their command line, where `ps` would show it) and EngineClients send it."""
    token = resolve_token(explicit) or new_token()
    os.environ[TOKEN_ENV] = token
    return token


def make_launcher(ray: str | None = None, log_dir: str | None = None, startup_timeout_s: float = 120.0,
                  **ray_kw) -> Launcher:
    """A LocalLauncher, or with `ray` (an address; "" for $RAY_ADDRESS or a new local Ray) a RayLauncher."""
    if ray is None:
        return LocalLauncher(log_dir, startup_timeout_s=startup_timeout_s)
    from microserve.launch import RayLauncher
    return RayLauncher(ray or None, log_dir=log_dir, startup_timeout_s=startup_timeout_s, **ray_kw)


def serve_cluster(launcher: Launcher, specs: list[EngineSpec], strategy: str, model: str | None = None,
                  served_name: str | None = None, host: str = "127.0.0.1", port: int = 8080,
                  admin_token: str | None = None, timeout_s: float = 60.0) -> int:
    """`microserve up` as a Python call: start `specs` through `launcher` (local processes or Ray
    actors), serve the router in this process over them until SIGINT or SIGTERM, then stop every
    engine. The router's admin API adds and removes engines through the same launcher."""
    t0 = time.perf_counter()
    if launcher.token:
        share_cluster_token(launcher.token)  # the router's EngineClients send it
    try:
        try:
            engines = launcher.start(specs)
        except StartupError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for e in engines:
            where = f"  node={e.node}  actor={e.actor_name}" if launcher.kind == "ray" else ""
            print(f"engine  {e.url}  role={e.role}{where}  (log: {e.log_path})", flush=True)
        print(f"router  http://{host}:{port}  strategy={strategy}  (up in {time.perf_counter() - t0:.1f}s)")
        print(f"admin token: {admin_token}" if admin_token else "admin API off (no admin token)", flush=True)
        asyncio.run(run_router([(e.url, e.role) for e in engines], strategy, model, served_name, host, port,
                               admin_token, timeout_s, launcher=launcher))
    finally:
        launcher.stop()
        print("stopped all engines.", flush=True)
    return 0


def up(a, extra: list[str]) -> int:
    roles = engine_roles(a.engines, a.strategy, a.prefill)
    parse_spec(a.strategy)
    if a.ray is not None and a.pin_cores:
        raise SystemExit("--pin-cores is for one host; on Ray give each engine --ray-num-cpus")
    token = a.admin_token or os.environ.get("MICROSERVE_ADMIN_TOKEN") or secrets.token_urlsafe(16)
    share_cluster_token(a.cluster_token)
    os.makedirs(a.log_dir, exist_ok=True)
    ray_kw = {} if a.ray is None else dict(num_cpus=a.ray_num_cpus, num_gpus=a.ray_num_gpus,
                                           place_by_role=a.ray_place_by_role)
    try:
        launcher = make_launcher(a.ray, os.path.abspath(a.log_dir), a.startup_timeout_s, **ray_kw)
    except ImportError:
        raise SystemExit("--ray needs Ray: pip install 'microserve[ray]'") from None
    return serve_cluster(launcher, engine_specs(a.model, roles, extra, a.pin_cores), a.strategy, a.model,
                         a.served_model_name, a.host, a.port, token, a.timeout_s)
