"""One launcher for every set of engines: `microserve up`, `demo`, `bench sweep`, the tests and the
benchmarks start engines (and routers) through it.

- `process.py`: the primitives on one host (`spawn`, `wait_healthy` with log relaying and
  `StartupError`, `stop`, `free_port`).
- `base.py`: `EngineSpec` (what to run, its role and where), `Engine` (a running one: name, role,
  URL, log) and `Launcher`, the interface: start(specs) -> engines, wait_healthy, add(role, n),
  remove, kill, restart, poll, stop, start_router.
- `local.py`: `LocalLauncher`, engines as child processes of this one.
- `ray_launcher.py`: `RayLauncher`, engines as Ray actors across a Ray cluster (Ray is imported only
  when one is made: `import microserve` never imports it).
"""
from microserve.launch.base import Engine, EngineSpec, Launcher, engine_specs
from microserve.launch.local import LocalEngine, LocalLauncher
from microserve.launch.process import Proc, StartupError, free_port, spawn, stop, wait_healthy
from microserve.launch.ray_launcher import RayLauncher  # imports ray only when a RayLauncher is made


__all__ = ["Engine", "EngineSpec", "Launcher", "LocalEngine", "LocalLauncher", "Proc", "RayLauncher", "StartupError",
           "engine_specs", "free_port", "spawn", "stop", "wait_healthy"]
