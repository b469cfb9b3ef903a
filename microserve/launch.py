"""Start and stop engine (and router) processes on one host.

Children run in their own process group and get SIGTERM, then SIGKILL after a grace period, so no
process outlives the launcher; KV pools live in unlinked shared memory, so none of that leaks either.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    url: str
    popen: subprocess.Popen
    argv: list[str] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the launcher dies, even by SIGKILL (Linux), so none is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(name: str, args: list[str], port: int, log_path: str | None = None, env: dict | None = None) -> Proc:
    """Run `python -m microserve.cli <args> --port port` in the background."""
    argv = [sys.executable, "-m", "microserve.cli", *args, "--port", str(port)]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, **(env or {})}, preexec_fn=_die_with_parent)
    return Proc(name, f"http://127.0.0.1:{port}", popen, argv)


def wait_healthy(procs: list[Proc], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        while True:
            if not p.alive:
                raise RuntimeError(f"{p.name} exited with code {p.popen.returncode} before it was healthy "
                                   f"(command: {' '.join(p.argv)})")
            try:
                with urllib.request.urlopen(p.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{p.name} at {p.url} was not healthy within {timeout:.0f}s")
            time.sleep(0.1)


def stop(procs: list[Proc], grace: float = 10.0) -> None:
    for p in procs:
        if p.alive:
            try:
                os.killpg(p.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.popen.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.popen.wait()
