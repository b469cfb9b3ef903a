"""`LocalLauncher`: engines as child processes on this host (process.py's spawn / wait_healthy /
stop), each in its own process group, gone when the launcher stops or dies."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Sequence

from microserve.launch.base import Engine, EngineSpec, Launcher
from microserve.launch.process import Proc, free_port, spawn, stop, wait_healthy


@dataclass(eq=False)
class LocalEngine(Engine):
    proc: Proc | None = None

    @property
    def popen(self):
        return self.proc.popen

    @property
    def pid(self) -> int:
        return self.proc.popen.pid

    @property
    def alive(self) -> bool:
        return self.proc.alive

    def log_tail(self, lines: int = 20) -> str:
        return self.proc.log_tail(lines)


class LocalLauncher(Launcher):
    kind = "local"

    def _launch(self, spec: EngineSpec) -> LocalEngine:
        port = spec.port or free_port()
        host = spec.host or ""
        proc = spawn(spec.name, spec.cli_args(), port, spec.log_path, self.env(spec), host or None,
                     spec.full_command(port, host or "127.0.0.1"))
        # a restart reuses the port: the engine comes back at the same URL
        return LocalEngine(spec.name, spec.role, proc.url, _with_port(spec, port), proc.log_path, proc=proc)

    def wait_healthy(self, engines: Sequence[Engine] | None = None, timeout: float | None = None) -> None:
        wait_healthy([e.proc for e in (self.engines if engines is None else engines)],
                     self.startup_timeout_s if timeout is None else timeout, self.progress)

    def _stop(self, engines: list[Engine], grace: float) -> None:
        stop([e.proc for e in engines], grace)

    def kill(self, engine: LocalEngine) -> None:
        try:
            os.killpg(engine.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        engine.popen.wait()

    def restart(self, engine: LocalEngine) -> LocalEngine:
        if engine.alive:
            stop([engine.proc])
        new = self._launch(engine.spec)
        engine.proc, engine.url = new.proc, new.url
        engine.restarts += 1
        self.wait_healthy([engine])
        return engine


def _with_port(spec: EngineSpec, port: int) -> EngineSpec:
    import dataclasses
    return dataclasses.replace(spec, port=port)
