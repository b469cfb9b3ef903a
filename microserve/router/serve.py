"""Run the router: `microserve router` (engines given by URL) and `microserve up` (engines started
here as child processes, then the router in this process)."""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
import time

from microserve.cluster import TOKEN_ENV, new_token, resolve_token
from microserve.launch import Proc, StartupError, free_port, spawn, stop, wait_healthy
from microserve.model_files import TOKENIZER_FILES, model_dir
from microserve.router.app import RouterService, build_router_app
from microserve.router.strategies import parse_spec
from microserve.tokenizer import Tokenizer
from microserve.web import run_app, serve_until_signal

log = logging.getLogger(__name__)

PD_STRATEGIES = ("pd", "balanced_pd", "cache_aware_pd")


def load_tokenizer(model: str | None) -> Tokenizer | None:
    """`model`'s tokenizer (a local directory, `embedded`, or a hub id, of which only the tokenizer
    and config files are fetched), or None. Through model_files, never the model package."""
    if not model:
        return None
    path = model_dir(model, TOKENIZER_FILES)
    return Tokenizer(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None


async def start_router(engines: list[tuple[str, str]], strategy: str, model: str | None, served_name: str | None,
                       host: str, port: int, admin_token: str | None = None, timeout_s: float = 60.0):
    """Serve the router in this event loop; returns its aiohttp runner (call .cleanup() to stop)."""
    svc = RouterService(engines, strategy, load_tokenizer(model), served_name or model or "default", admin_token,
                        timeout_s)
    runner = await run_app(build_router_app(svc), host, port)
    log.info("router ready: http://%s:%d, strategy %s, engines %s", host, port, strategy,
             ", ".join(f"{u} ({r})" for u, r in engines))
    return runner


async def run_router(*args, **kw) -> None:
    """start_router, then serve until SIGINT or SIGTERM."""
    await serve_until_signal(await start_router(*args, **kw))


def engine_roles(n: int, strategy: str, prefill: int | None) -> list[str]:
    """First `prefill` engines prefill, the rest decode; by default 1 prefill engine for PD
    strategies and role "both" for everything else."""
    if prefill is None:
        prefill = 1 if parse_spec(strategy)[0] in PD_STRATEGIES and n > 1 else 0
    if prefill >= n and prefill:
        raise ValueError(f"--prefill {prefill} leaves no decode engine out of {n}")
    return ["both"] * n if prefill == 0 else ["prefill"] * prefill + ["decode"] * (n - prefill)


def start_engines(model: str, n: int, extra: list[str], pin_cores: bool = False,
                  log_dir: str | None = None) -> list[Proc]:
    procs = []
    ncpu = os.cpu_count() or 1
    for i in range(n):
        args = ["engine", "--model", model, *extra]
        if pin_cores:  # the CPU miniature: one engine per core, one thread each
            args += ["--cpu-affinity", str(i % ncpu), "--num-threads", "1"]
        port = free_port()
        procs.append(spawn(f"engine{i}", args, port, os.path.join(log_dir, f"engine{i}.log") if log_dir else None))
    return procs


def share_cluster_token(explicit: str | None = None) -> str:
    """The cluster token for engines started from here and the router in this process: the given
    one, $MICROSERVE_CLUSTER_TOKEN, or a new one. Exported, so child engines inherit it (never on
    their command line, where `ps` would show it) and EngineClients send it."""
    token = resolve_token(explicit) or new_token()
    os.environ[TOKEN_ENV] = token
    return token


def up(a, extra: list[str]) -> int:
    roles = engine_roles(a.engines, a.strategy, a.prefill)
    parse_spec(a.strategy)
    token = a.admin_token or os.environ.get("MICROSERVE_ADMIN_TOKEN") or secrets.token_urlsafe(16)
    share_cluster_token(a.cluster_token)
    os.makedirs(a.log_dir, exist_ok=True)
    t0 = time.perf_counter()
    procs = start_engines(a.model, a.engines, extra, a.pin_cores, a.log_dir)
    try:
        try:
            wait_healthy(procs, timeout=a.startup_timeout_s)
        except StartupError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for p, role in zip(procs, roles):
            print(f"engine  {p.url}  role={role}  (log: {a.log_dir}/{p.name}.log)", flush=True)
        print(f"router  http://{a.host}:{a.port}  strategy={a.strategy}  (up in {time.perf_counter() - t0:.1f}s)")
        print(f"admin token: {token}", flush=True)
        asyncio.run(run_router([(p.url, r) for p, r in zip(procs, roles)], a.strategy, a.model, a.served_model_name,
                               a.host, a.port, token, a.timeout_s))
    finally:
        stop(procs)
        print("stopped all engines.", flush=True)
    return 0
