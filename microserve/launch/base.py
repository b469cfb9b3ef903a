"""The launcher's interface: what to start (`EngineSpec`), what runs (`Engine`), and `Launcher`,
which starts, watches, grows, shrinks and stops a set of engines, wherever they run.

Implementations differ only in where an engine's process lives: `LocalLauncher` (local.py) starts
child processes of this one, `RayLauncher` (ray_launcher.py) one Ray actor per engine, each running
the same `microserve engine` process on its node. Either way every engine gets the cluster token in
its environment (never on its command line), its log goes to `<log_dir>/<name>.log`, and a router
finds the engines through `Launcher.engines` (URL and role each) and, for restarts, `poll()`.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

from microserve.cluster import TOKEN_ENV, resolve_token
from microserve.launch.process import Proc, free_port, spawn, wait_healthy

ROLES = ("prefill", "decode", "both")


@dataclass
class EngineSpec:
    """One engine to start: `microserve engine --model <model> <args>` in role `role`.

    `name` (default: engine<k>), `port` (default: a free one on its host), `host` (the address it
    binds; default loopback locally, the node's address on Ray) and `log_path` (default:
    `<log_dir>/<name>.log`) are filled in by the launcher when left None. `command` runs another
    server instead (its whole command line; "{port}" and "{host}" are filled in), for benchmarks that
    compare servers. `num_cpus`, `num_gpus` (None: one GPU where the cluster has GPUs) and
    `resources` (custom Ray resources) place it on a Ray cluster (None: the launcher's defaults); a
    local launcher ignores them."""
    model: str = "embedded"
    role: str = "both"
    args: list[str] = field(default_factory=list)
    name: str | None = None
    port: int | None = None
    host: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    log_path: str | None = None
    command: list[str] | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}")

    def cli_args(self) -> list[str]:
        """`microserve` arguments, without --host and --port (the launcher adds those)."""
        return ["engine", "--model", self.model, *self.args]

    def full_command(self, port: int, host: str) -> list[str] | None:
        return [a.replace("{port}", str(port)).replace("{host}", host) for a in self.command] if self.command else None


def engine_specs(model: str, roles: Sequence[str], args: Sequence[str] = (), pin_cores: bool = False,
                 **kw) -> list[EngineSpec]:
    """One spec per role, named engine0, engine1, ...; with `pin_cores` engine i is pinned to core i
    (modulo the cores there are) with one torch thread: the CPU miniature of one engine per GPU."""
    ncpu = os.cpu_count() or 1
    return [EngineSpec(model, role, [*args, *(["--cpu-affinity", str(i % ncpu), "--num-threads", "1"]
                                              if pin_cores else [])], name=f"engine{i}", **kw)
            for i, role in enumerate(roles)]


@dataclass(eq=False)
class Engine:
    """A started engine. `url` is where it answers now: on Ray a restarted actor may come back
    elsewhere, which `Launcher.poll` reports. `node` is its Ray node id (None locally)."""
    name: str
    role: str
    url: str
    spec: EngineSpec
    log_path: str | None = None
    node: str | None = None
    restarts: int = 0

    def log_tail(self, lines: int = 20) -> str:
        return ""

    def describe(self) -> dict:
        """What the router's /admin/state shows of a launched engine."""
        return {"name": self.name, "node": self.node, "restarts": self.restarts, "log": self.log_path}


class Launcher:
    """Starts and stops a set of engines (and routers in front of them).

        with LocalLauncher(log_dir) as L:               # or RayLauncher("auto", ...)
            engines = L.start([EngineSpec(model, "prefill"), EngineSpec(model, "decode")])
            router = L.start_router("pd", model)        # a `microserve router` process over them
            L.add("decode", 2); L.remove(engines[1])    # elasticity
        # every engine and router is stopped here

    `start` waits until every engine answers /health (StartupError with the log's last lines if
    one exits or stays silent for `startup_timeout_s`), unless wait=False (then `wait_healthy`).
    Subclasses implement `_launch`, `wait_healthy`, `_stop`, `kill` and, where engines come back by
    themselves, `poll`."""

    kind = "base"

    def __init__(self, log_dir: str | None = None, token: str | None = None, startup_timeout_s: float = 120.0,
                 progress: Callable[[str], None] | None = print) -> None:
        self.log_dir = log_dir
        self.token = resolve_token(token)
        self.startup_timeout_s, self.progress = startup_timeout_s, progress
        self.engines: list[Engine] = []
        self.routers: list[Proc] = []
        self._templates: dict[str, EngineSpec] = {}
        self._lock = threading.RLock()
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)

    # ---- the interface --------------------------------------------------------------------------
    def start(self, specs: Sequence[EngineSpec], wait: bool = True) -> list[Engine]:
        new: list[Engine] = []
        try:
            with self._lock:  # names are unique among this launcher's engines; launching does not block
                for s in specs:
                    s = self._complete(s)
                    self._templates.setdefault(s.role, s)
                    new.append(self._launch(s))
                    self.engines.append(new[-1])
            if wait:
                self.wait_healthy(new)
        except BaseException:
            self._forget(new)
            raise
        return new

    def add(self, role: str, n: int = 1, spec: EngineSpec | None = None) -> list[Engine]:
        """`n` more engines of `role`, like the first one of that role started (or `spec`), healthy."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        base = spec or self._templates.get(role) or next(iter(self._templates.values()), None)
        if base is None:
            raise ValueError("no engine was started yet: give a spec")
        return self.start([dataclasses.replace(base, role=role, name=None, port=None, log_path=None)
                           for _ in range(n)])

    def remove(self, engine: Engine, grace: float = 10.0) -> None:
        """Stop one engine (SIGTERM, then SIGKILL after `grace`) and forget it."""
        self._forget([engine], grace)

    def stop(self, grace: float = 10.0) -> None:
        """Stop every engine and router this launcher started."""
        from microserve.launch.process import stop
        with self._lock:
            routers, self.routers = self.routers, []
        stop(routers, grace)
        self._forget(list(self.engines), grace)

    def wait_healthy(self, engines: Sequence[Engine] | None = None, timeout: float | None = None) -> None:
        raise NotImplementedError

    def kill(self, engine: Engine) -> None:
        """Crash an engine at once (SIGKILL; on Ray the actor dies and is restarted): for tests."""
        raise NotImplementedError

    def restart(self, engine: Engine) -> Engine:
        """Start a stopped or killed engine again with the same spec; healthy when this returns."""
        raise NotImplementedError

    def poll(self) -> list[tuple[Engine, str]]:
        """(engine, its old URL) for each engine that came back somewhere else since the last call
        (a restarted Ray actor); never blocks. A router calls this to re-register engines."""
        return []

    def start_router(self, strategy: str, model: str | None = None, args: Sequence[str] = (),
                     engines: Sequence[Engine] | None = None, port: int | None = None, log_path: str | None = None,
                     env: dict | None = None, timeout: float = 30.0, name: str = "router") -> Proc:
        """A `microserve router` process on this host in front of `engines` (default: all), with the
        cluster token; healthy (an engine answered it) when this returns."""
        argv = ["router", "--strategy", strategy, *(["--model", model] if model else []), *args]
        for e in self.engines if engines is None else engines:
            argv += [f"--{'engine' if e.role == 'both' else e.role}", e.url]
        p = spawn(name, argv, port or free_port(), log_path or self._log_path(name),
                  env={**self.env(), **(env or {})})
        self.routers.append(p)
        wait_healthy([p], timeout, self.progress)
        return p

    def __enter__(self) -> "Launcher":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- shared by the implementations ---------------------------------------------------------
    def env(self, spec: EngineSpec | None = None) -> dict[str, str]:
        """An engine's environment on top of the launcher's: its spec's, and the cluster token."""
        return {**(spec.env if spec else {}), **({TOKEN_ENV: self.token} if self.token else {})}

    def _complete(self, s: EngineSpec) -> EngineSpec:
        taken = {e.name for e in self.engines}
        name = s.name or next(f"engine{k}" for k in range(len(taken) + 1) if f"engine{k}" not in taken)
        if name in taken:
            name = next(f"{name}-{k}" for k in range(1, len(taken) + 2) if f"{name}-{k}" not in taken)
        return dataclasses.replace(s, name=name, log_path=s.log_path or self._log_path(name))

    def _log_path(self, name: str) -> str | None:
        return os.path.join(self.log_dir, f"{name}.log") if self.log_dir else None

    def _forget(self, engines: Sequence[Engine], grace: float = 10.0) -> None:
        try:
            self._stop(list(engines), grace)
        finally:
            with self._lock:
                self.engines = [e for e in self.engines if e not in engines]

    def _launch(self, spec: EngineSpec) -> Engine:
        raise NotImplementedError

    def _stop(self, engines: list[Engine], grace: float) -> None:
        raise NotImplementedError
