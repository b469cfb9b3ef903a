"""The launcher's primitives: start, wait for and stop engine (and router) processes on one host.

Children run in their own process group and get SIGTERM, then SIGKILL after a grace period, so no
process outlives the launcher; KV pools live in unlinked shared memory, so none of that leaks either.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Callable


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
    log_path: str | None = None
    temp_log: bool = False  # spawn made log_path; stop() removes it

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the process's log, for error messages."""
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 64 * 1024))
                return b"".join(f.read().splitlines(keepends=True)[-lines:]).decode(errors="replace")
        except OSError:
            return ""


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the launcher dies, even by SIGKILL (Linux), so none is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(name: str, args: list[str], port: int, log_path: str | None = None, env: dict | None = None,
          host: str | None = None, command: list[str] | None = None) -> Proc:
    """Run `python -m microserve.cli <args> [--host host] --port port` in the background, its output
    appended to log_path (a new temporary file when None: wait_healthy reads it). `command`, when
    given, is the whole command line instead (another server, e.g. vLLM's; `args` is ignored)."""
    argv = list(command) if command else \
        [sys.executable, "-m", "microserve.cli", *args, *(["--host", host] if host else []), "--port", str(port)]
    temp_log = log_path is None
    if temp_log:
        fd, log_path = tempfile.mkstemp(prefix=f"microserve-{name}-", suffix=".log")
        os.close(fd)
    with open(log_path, "ab") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, **(env or {})}, preexec_fn=_die_with_parent)
    reach = "127.0.0.1" if host in (None, "", "0.0.0.0", "::") else f"[{host}]" if ":" in host else host
    return Proc(name, f"http://{reach}:{port}", popen, argv, log_path, temp_log)


class StartupError(RuntimeError):
    """A process exited, or went silent for too long, before it was healthy."""


# Log lines relayed to the launcher's terminal while it waits: the kernel build's progress.
_PROGRESS = re.compile(r" (?:INFO|WARNING|ERROR) microserve\.kernels[\w.]*: (.*)$")


def wait_healthy(procs: list[Proc], timeout: float = 60.0, progress: Callable[[str], None] | None = print) -> None:
    """Wait until every process answers GET /health with 200.

    `timeout` bounds a *silent* start: while a process keeps writing to its log (a kernel build
    logs a heartbeat every 10 s) it is alive and working, so the wait goes on; a process that says
    nothing for `timeout` seconds fails. A process that exits fails at once. Either way the error
    carries the log's last lines. The kernel build's lines are passed to `progress` as they come."""
    offsets = {id(p): 0 for p in procs}
    quiet_since = {id(p): time.monotonic() for p in procs}
    pending = list(procs)
    while pending:
        for p in list(pending):
            for line in _new_lines(p, offsets):
                quiet_since[id(p)] = time.monotonic()
                m = _PROGRESS.search(line)
                if m and progress is not None:
                    progress(f"[{p.name}] {m.group(1)}")
            if not p.alive:
                raise StartupError(f"{p.name} exited with code {p.popen.returncode} before it was healthy "
                                   f"(command: {' '.join(p.argv)}; log: {p.log_path}); its last lines:\n"
                                   f"{p.log_tail()}")
            if _healthy(p.url):
                pending.remove(p)
            elif time.monotonic() - quiet_since[id(p)] > timeout:
                raise StartupError(f"{p.name} at {p.url} was not healthy and logged nothing for {timeout:.0f}s "
                                   f"(log: {p.log_path}); its last lines:\n{p.log_tail()}")
        if pending:
            time.sleep(0.1)


def _new_lines(p: Proc, offsets: dict[int, int]) -> list[str]:
    if not p.log_path:
        return []
    try:
        with open(p.log_path, "rb") as f:
            f.seek(offsets[id(p)])
            data = f.read()
    except OSError:
        return []
    whole = data[:data.rfind(b"\n") + 1]  # complete lines only; the rest is read next time
    offsets[id(p)] += len(whole)
    return whole.decode(errors="replace").splitlines()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    """Whether a process group has a member that is not a zombie (one nobody reaps, e.g. under a
    container's init, must not hold stop() up)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _clear_group(pgid: int, deadline: float) -> None:
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            _signal_group(pgid, signal.SIGKILL)
            return
        time.sleep(0.05)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop(procs: list[Proc], grace: float = 10.0) -> None:
    for p in procs:
        if p.alive:
            _signal_group(p.popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.popen.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            _signal_group(p.popen.pid, signal.SIGKILL)
            p.popen.wait()
    for p in procs:  # what a leader left in its group (a server's own workers, which had the SIGTERM too)
        _clear_group(p.popen.pid, deadline=time.monotonic() + 2.0)
    for p in procs:
        if p.temp_log and p.log_path:
            with contextlib.suppress(OSError):
                os.remove(p.log_path)
