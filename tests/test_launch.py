"""The launcher's wait for engines: it waits as long as a starting process keeps working (the
kernel build's heartbeat), relays the build's progress, and fails at once, with the log's last
lines, when a process dies or goes silent."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from microserve.launch import Proc, StartupError, free_port, spawn, stop, wait_healthy

# A stand-in for an engine's first start: logs like the kernel build for `build_s`, then serves /health.
SLOW_STARTER = """
import http.server, sys, time
port, build_s, beat_s = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
log = lambda m: print(time.strftime('%Y-%m-%d %H:%M:%S,000') + ' INFO microserve.kernels.build: ' + m, flush=True)
log('building CPU kernels for this machine (once), about 1 s')
t0 = time.monotonic()
while time.monotonic() - t0 < build_s:
    time.sleep(beat_s)
    log('still building CPU kernels')
log('built CPU kernels in 2.0 s')
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b'{}')
    def log_message(self, *a): pass
http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()
"""


def start(tmp_path, build_s: float, beat_s: float) -> Proc:
    port = free_port()
    log = tmp_path / f"starter-{port}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen([sys.executable, "-c", SLOW_STARTER, str(port), str(build_s), str(beat_s)],
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Proc("engine0", f"http://127.0.0.1:{port}", popen, [], str(log))


def test_waits_past_the_timeout_while_the_build_logs_progress(tmp_path):
    p = start(tmp_path, build_s=2.5, beat_s=0.3)
    seen: list[str] = []
    try:
        t0 = time.monotonic()
        wait_healthy([p], timeout=1.0, progress=seen.append)
        assert time.monotonic() - t0 > 2.5
    finally:
        stop([p])
    assert seen[0] == "[engine0] building CPU kernels for this machine (once), about 1 s"
    assert seen[-1] == "[engine0] built CPU kernels in 2.0 s" and len(seen) >= 5


def test_a_silent_start_times_out_with_the_log(tmp_path):
    p = start(tmp_path, build_s=30, beat_s=30)  # one line, then silence
    try:
        with pytest.raises(StartupError, match="logged nothing for 1s") as e:
            wait_healthy([p], timeout=1.0, progress=None)
        assert "building CPU kernels" in str(e.value)
    finally:
        stop([p])


def test_an_engine_that_dies_fails_at_once_with_its_last_log_lines(tmp_path):
    p = spawn("engine0", ["engine", "--model", str(tmp_path / "no-such-model")], free_port())
    try:
        t0 = time.monotonic()
        with pytest.raises(StartupError, match="engine0 exited with code") as e:
            wait_healthy([p], timeout=600)
        assert time.monotonic() - t0 < 60
        assert "no-such-model" in str(e.value)  # the engine's own error, from its log
    finally:
        stop([p])
