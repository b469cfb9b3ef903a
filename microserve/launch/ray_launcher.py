"""`RayLauncher`: the launcher's engines as Ray actors across a Ray cluster.

Each engine is one actor (`EngineActor`) that runs the very same `microserve engine` process as a
local launch, as its child on the actor's node, bound to the node's address, with the cluster token
in its environment; the actor reports the engine's URL. So an engine under Ray is byte for byte
the engine of a local launch, and a router reaches it over HTTP as ever.

- **Resources.** An actor reserves `num_cpus` (default 1) and `num_gpus` (default: 1 where the
  cluster has GPUs, else 0; Ray sets CUDA_VISIBLE_DEVICES, which the engine inherits).
- **Placement by role.** With `place_by_role`, an engine of role r also needs one unit of the
  custom resource r, so it lands only on nodes started with e.g. `--resources '{"decode": 4}'`
  (at most 4 decode engines there). Engines are spread over the nodes that fit (SPREAD).
- **Failure.** Actors restart (`max_restarts`, default unlimited): when the engine process exits
  after it was healthy, its actor exits too, and Ray starts a new one, which starts a new engine,
  on a new port or node. `poll()` reports each engine whose URL moved, and the router swaps it in
  (router/app.py). A start that fails (bad flags, a crash before /health) is not retried: the
  launcher raises StartupError with the engine's last log lines.
- **Logs** are written on the engine's node, to `<log_dir>/<name>.log` (default: the node's temp
  directory, microserve-ray-logs/); `Engine.log_tail()` reads them through the actor.

Ray is imported when a RayLauncher is made, never by `import microserve`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from microserve.cluster import new_token
from microserve.launch.base import Engine, EngineSpec, Launcher
from microserve.launch.process import StartupError, free_port, spawn, stop, wait_healthy

log = logging.getLogger(__name__)


class EngineActor:
    """The body of one engine's actor (wrapped with ray.remote by RayLauncher): starts the engine
    process on this node in __init__, and exits when that process dies after being healthy, so that
    Ray restarts both. Its methods run one at a time on the actor's main thread, the thread that
    started the engine (which gets SIGTERM when that thread's process dies: no orphan)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: str | None,
                 startup_timeout_s: float, command: list[str] | None = None, port: int | None = None) -> None:
        import ray
        self.node = ray.get_runtime_context().get_node_id()
        self.host = ray.util.get_node_ip_address()
        self.timeout, self.healthy, self.stopping = startup_timeout_s, False, False
        log_dir = log_dir or os.path.join(tempfile.gettempdir(), "microserve-ray-logs")
        os.makedirs(log_dir, exist_ok=True)
        port = port or free_port()
        command = [a.replace("{port}", str(port)).replace("{host}", self.host) for a in command] if command else None
        self.proc = spawn(name, args, port, os.path.join(log_dir, f"{name}.log"), env, self.host, command)
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        self.proc.popen.wait()
        if self.healthy and not self.stopping:
            os._exit(1)  # the engine died: the actor goes too, and Ray restarts it with a new engine

    def placed(self) -> dict[str, Any]:
        """Returns as soon as the actor exists: it was placed and its engine process started."""
        return self.info()

    def ready(self) -> dict[str, Any]:
        """Waits until the engine answers /health (StartupError with its last log lines if it exits
        or stays silent for the startup timeout); then its info."""
        if not self.healthy:
            try:
                wait_healthy([self.proc], self.timeout, progress=print)
            except StartupError:
                self.stopping = True
                stop([self.proc])
                raise
            self.healthy = True
        return self.info()

    def info(self) -> dict[str, Any]:
        return {"url": self.proc.url, "pid": self.proc.popen.pid, "node": self.node, "log_path": self.proc.log_path,
                "healthy": self.healthy}

    def log_tail(self, lines: int = 20) -> str:
        return self.proc.log_tail(lines)

    def stop(self, grace: float = 10.0) -> None:
        self.stopping = True
        stop([self.proc], grace)


@dataclass(eq=False)
class RayEngine(Engine):
    actor: Any = None
    actor_name: str = ""
    pid: int | None = None
    failed: str | None = None  # a restart that did not come up
    _probe: Any = None

    def describe(self) -> dict:
        return {**super().describe(), "actor": self.actor_name, **({"failed": self.failed} if self.failed else {})}

    def log_tail(self, lines: int = 20) -> str:
        import ray
        try:
            return ray.get(self.actor.log_tail.remote(lines), timeout=10)
        except Exception:  # noqa: BLE001 - a dead actor has no log to give
            return ""


class RayLauncher(Launcher):
    """Engines as Ray actors. `address`: a Ray cluster's address ("auto": the one running on this
    machine; "ray://head:10001": through Ray Client; None: $RAY_ADDRESS, else a new local Ray), used
    when Ray is not initialized yet in this process. Actors are named
    `microserve-<deployment>-<engine name>` in namespace `namespace`."""

    kind = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: float = 1.0, num_gpus: float | None = None,
                 place_by_role: bool = False, max_restarts: int = -1, namespace: str = "microserve",
                 ray_init: dict | None = None, **kw) -> None:
        super().__init__(**kw)
        # engines bind their node's address, not loopback, which an engine does only with a token
        self.token = self.token or new_token()
        import ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address or None, namespace=namespace, **(ray_init or {}))
        self.namespace, self.num_cpus, self.place_by_role, self.max_restarts = \
            namespace, num_cpus, place_by_role, max_restarts
        self.num_gpus = num_gpus if num_gpus is not None else (1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0)
        self.deployment = secrets.token_hex(3)
        self._actor_cls = ray.remote(EngineActor)

    def resources(self, spec: EngineSpec) -> dict[str, Any]:
        """The actor's resource request for `spec`."""
        custom = {**({spec.role: 1} if self.place_by_role else {}), **spec.resources}
        return {"num_cpus": self.num_cpus if spec.num_cpus is None else spec.num_cpus,
                "num_gpus": self.num_gpus if spec.num_gpus is None else spec.num_gpus,
                **({"resources": custom} if custom else {})}

    def _launch(self, spec: EngineSpec) -> RayEngine:
        name = f"microserve-{self.deployment}-{spec.name}"
        actor = self._actor_cls.options(
            name=name, namespace=self.namespace, max_restarts=self.max_restarts, max_task_retries=-1,
            scheduling_strategy="SPREAD", **self.resources(spec),
        ).remote(spec.name, spec.cli_args(), self.env(spec), self.log_dir, self.startup_timeout_s, spec.command,
                 spec.port)
        e = RayEngine(spec.name, spec.role, "", spec, actor=actor, actor_name=name)
        e._probe = actor.placed.remote()
        return e

    def wait_healthy(self, engines: Sequence[Engine] | None = None, timeout: float | None = None) -> None:
        """Two stages per engine: placed on a node (within `timeout`, default the startup timeout:
        else StartupError naming the resources nobody had free), then healthy (the actor's own
        wait, with the local launcher's rules: a start fails once it exits or is silent too long)."""
        import ray
        engines = list(self.engines if engines is None else engines)
        timeout = self.startup_timeout_s if timeout is None else timeout
        placing = {e._probe: e for e in engines if not e.url and e._probe is not None}
        deadline = time.monotonic() + timeout
        while placing:
            done, _ = ray.wait(list(placing), num_returns=1, timeout=max(deadline - time.monotonic(), 0))
            if not done:
                names = ", ".join(f"{e.name} ({self.resources(e.spec)})" for e in placing.values())
                raise StartupError(f"no Ray node took {names} within {timeout:.0f}s; free now: "
                                   f"{ray.available_resources()}")
            e = placing.pop(done[0])
            self._update(e, self._get(e, done[0]))
            e._probe = e.actor.ready.remote()
        starting = {e._probe: e for e in engines if e._probe is not None}
        while starting:
            done, _ = ray.wait(list(starting), num_returns=1)
            e = starting.pop(done[0])
            self._update(e, self._get(e, done[0]))
            e._probe = None

    def _get(self, e: RayEngine, ref) -> dict:
        import ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as err:
            cause = getattr(err, "cause", None) or err
            raise StartupError(f"{e.name} (Ray actor {e.actor_name}) did not start: {cause}") from None

    def _update(self, e: RayEngine, info: dict) -> None:
        if e.pid is not None and info["pid"] != e.pid:
            e.restarts += 1
        e.url, e.node, e.log_path, e.pid = info["url"], info["node"], info["log_path"], info["pid"]

    def poll(self) -> list[tuple[Engine, str]]:
        import ray
        moved = []
        for e in list(self.engines):
            if not e.url or e.failed:
                continue
            if e._probe is None:  # resolves at once, or after a restart once the new engine is healthy
                e._probe = e.actor.ready.remote()
                continue
            done, _ = ray.wait([e._probe], timeout=0)
            if not done:
                continue
            ref, e._probe = e._probe, None
            try:
                info = ray.get(ref)
            except ray.exceptions.ActorDiedError as err:
                e.failed = str(err)
                log.error("engine %s (Ray actor %s) is dead for good: %s", e.name, e.actor_name, err)
                continue
            except ray.exceptions.RayError as err:  # a restart that did not come up
                log.warning("engine %s (Ray actor %s): %s", e.name, e.actor_name, err)
                continue
            old = e.url
            self._update(e, info)
            if e.url != old:
                log.info("engine %s restarted (Ray actor %s): now at %s", e.name, e.actor_name, e.url)
                moved.append((e, old))
        return moved

    def kill(self, engine: RayEngine) -> None:
        import ray
        ray.kill(engine.actor, no_restart=False)

    def restart(self, engine: RayEngine) -> RayEngine:
        import ray
        pid = engine.pid
        self.kill(engine)
        deadline = time.monotonic() + self.startup_timeout_s
        while engine.pid == pid:  # a call may still reach the old actor before it goes
            engine._probe = None
            self._update(engine, ray.get(engine.actor.ready.remote(), timeout=max(deadline - time.monotonic(), 1)))
        return engine

    def _stop(self, engines: list[Engine], grace: float) -> None:
        import ray
        refs = []
        for e in engines:
            with contextlib.suppress(Exception):
                refs.append(e.actor.stop.remote(grace))
        if refs:
            with contextlib.suppress(Exception):
                ray.wait(refs, num_returns=len(refs), timeout=grace + 5)
        for e in engines:
            with contextlib.suppress(Exception):
                ray.kill(e.actor, no_restart=True)  # its engine, if still there, gets SIGTERM as the actor goes

    def stop(self, grace: float = 10.0) -> None:
        super().stop(grace)
        if self._owns_ray:
            import ray
            ray.shutdown()
