"""KV transports between two real processes, byte for byte: shm and nixl (no mocks).

The receiver is a separate process that allocates its pool through the transport, fills it with a
known pattern and publishes describe(); this test process is the sender with its own pool.
Receivers come from a forkserver: a clean, single-threaded process that imported torch once, so each
receiver starts in a fraction of a second instead of re-importing torch (seconds on a busy host),
and nothing forks this multi-threaded test process."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import pytest
import torch

from microserve.transfer import TransferError, make_transport

DTYPE = torch.bfloat16
RECV_SHAPE = (3, 2, 8, 4, 2, 8)  # [layers, K/V, pages, page_size, kv_heads, head_dim]
SEND_SHAPE = (3, 2, 11, 4, 2, 8)  # another pool size: addresses must use the receiver's slot count
TRANSPORTS = ["shm", pytest.param("nixl", marks=pytest.mark.nixl)]

_ctx = mp.get_context("forkserver")
_ctx.set_forkserver_preload(["torch", "microserve.transfer.shm", "microserve.transfer.nixl"])


def _pattern(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(DTYPE)


def _receiver(name: str, conn, device: str = "cpu", shape: tuple[int, ...] = RECV_SHAPE) -> None:
    """Own a pool, publish its description, answer 'dump' with its bytes, until 'exit'."""
    t = make_transport(name)
    kv = t.allocate(shape, DTYPE, torch.device(device))
    kv.copy_(_pattern(shape, seed=1))
    conn.send(json.dumps(t.describe()))
    while (cmd := conn.recv()) != "exit":
        if cmd == "dump":
            conn.send(kv.cpu().clone())
    t.close()


class Receiver:
    def __init__(self, name: str, device: str = "cpu", shape: tuple[int, ...] = RECV_SHAPE) -> None:
        self.conn, child = _ctx.Pipe()
        self.proc = _ctx.Process(target=_receiver, args=(name, child, device, shape), daemon=True)
        self.proc.start()
        self._desc: dict | None = None

    @property
    def desc(self) -> dict:
        if self._desc is None:
            if not self.conn.poll(60):
                raise RuntimeError("receiver did not publish its description")
            self._desc = json.loads(self.conn.recv())  # through JSON, as it travels in kv_append_metadata
        return self._desc

    def dump(self) -> torch.Tensor:
        self.conn.send("dump")
        return self.conn.recv()

    def kill(self) -> None:
        self.desc  # it has published (and so allocated and registered) before it dies
        self.proc.kill()
        self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send("exit")
            except OSError:
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.kill()


@pytest.fixture
def receiver(request):
    made: list[Receiver] = []

    def start(name: str, n: int = 1) -> Receiver | list[Receiver]:
        if name == "nixl":
            pytest.importorskip("nixl")
        new = [Receiver(name) for _ in range(n)]  # several start side by side
        made.extend(new)
        return new[0] if n == 1 else new
    yield start
    for r in made:
        r.close()


@pytest.fixture
def sender(request):
    made = []

    def start(name: str):
        if name == "nixl":
            pytest.importorskip("nixl")
        t = make_transport(name)
        kv = t.allocate(SEND_SHAPE, DTYPE, torch.device("cpu"))
        kv.copy_(_pattern(SEND_SHAPE, seed=2))
        made.append(t)
        return t, kv
    yield start
    for t in made:
        t.close()


def _rows(kv: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer `layer` as [2, slots, heads, dim], viewed as raw bytes."""
    L, _, P, S, H, D = kv.shape
    return kv[layer].reshape(2, P * S, H, D).view(torch.uint8)


# (layer, src slots in the sender, dst slots in the receiver): whole pages, a page-crossing run,
# scattered single slots, and a mix of runs broken on either side
WRITES = [
    (0, list(range(8, 16)), list(range(4, 12))),
    (1, list(range(8, 16)), list(range(4, 12))),
    (2, list(range(8, 16)), list(range(4, 12))),
    (0, [40, 3, 17, 29, 30], [31, 0, 13, 20, 26]),
    (2, [1, 2, 3, 4, 5, 6, 20, 21, 22, 43], [14, 15, 16, 17, 18, 19, 28, 29, 30, 27]),
    (1, [41, 42, 43, 0, 1], [16, 17, 18, 13, 14]),
]


@pytest.mark.parametrize("name", TRANSPORTS)
def test_write_lands_byte_for_byte(name, receiver, sender):
    r = receiver(name)
    t, kv = sender(name)
    remote = t.connect(r.desc)
    assert t.connect(r.desc) is remote  # cached: one connection per receiver

    expected = _pattern(RECV_SHAPE, seed=1)
    total = 0
    for layer, src, dst in WRITES[:3]:
        t.write(layer, src, dst, remote)
        _rows(expected, layer)[:, dst] = _rows(kv, layer)[:, src]
        total += 2 * len(src) * kv[0, 0, 0, 0].numel() * kv.element_size()
    stats = t.flush(10.0)
    assert stats.bytes == total
    assert torch.equal(r.dump().view(torch.uint8), expected.view(torch.uint8))

    # a second round through the same connection, with scattered slots, counted afresh
    total = 0
    for layer, src, dst in WRITES[3:]:
        t.write(layer, src, dst, remote)
        _rows(expected, layer)[:, dst] = _rows(kv, layer)[:, src]
        total += 2 * len(src) * kv[0, 0, 0, 0].numel() * kv.element_size()
    stats = t.flush(10.0)
    assert stats.bytes == total and stats.transfer_s >= 0 and stats.exposed_s >= 0
    got = r.dump()
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    # the rows nobody wrote kept the receiver's own pattern (the check above covers them; make it explicit)
    untouched = torch.ones(RECV_SHAPE[0], 2, RECV_SHAPE[2] * RECV_SHAPE[3], dtype=torch.bool)
    for layer, _, dst in WRITES:
        untouched[layer, :, dst] = False
    mine = _pattern(RECV_SHAPE, seed=1)
    assert untouched.sum() > 0
    for layer in range(RECV_SHAPE[0]):
        keep = untouched[layer, 0]
        assert torch.equal(_rows(got, layer)[:, keep], _rows(mine, layer)[:, keep])

    assert t.flush(1.0).bytes == 0  # nothing outstanding: an empty, immediate flush


@pytest.mark.parametrize("name", TRANSPORTS)
def test_garbled_peer_is_400(name, receiver, sender):
    r = receiver(name)
    t, kv = sender(name)
    remote = t.connect(r.desc)
    foreign = {"host": "h", "pid": 1, "start": "1", "path": "/dev/null", "shape": [1], "dtype": "x"} \
        if name == "nixl" else {"agent": "a", "meta": "AAAA", "addr": 1, "shape": [1], "dtype": "x"}
    cases = [{}, {"agent": None}, {"shape": "nope"}, foreign,
             dict(r.desc, shape=[3, 2, 8, 4, 2, 16]), dict(r.desc, dtype="float32")]
    if name == "nixl":
        cases += [dict(r.desc, meta="!!not base64!!"),
                  dict(r.desc, meta="bm90IG5peGwgbWV0YWRhdGE="),  # valid base64, not NIXL metadata
                  dict(r.desc, agent="someone-else")]  # the metadata of another agent
    for peer in cases:
        with pytest.raises(TransferError) as e:
            t.connect(peer)
        assert e.value.status == 400, (peer, e.value)
    # none of that disturbed the connection we already had
    t.write(1, [5, 6], [9, 10], remote)
    t.flush(10.0)
    got = _rows(r.dump(), 1)[:, [9, 10]]
    assert torch.equal(got, _rows(kv, 1)[:, [5, 6]])


@pytest.mark.parametrize("name", TRANSPORTS)
def test_dead_receiver_fails_fast(name, receiver, sender):
    t, _ = sender(name)
    r, r2, r3 = receiver(name, 3)
    # dies after we connected: the next write + flush fails, well within the timeout
    remote = t.connect(r.desc)
    t.write(0, [0, 1, 2, 3], [0, 1, 2, 3], remote)
    t.flush(10.0)
    r.kill()
    t0 = time.monotonic()
    with pytest.raises(TransferError) as e:
        t.write(1, [4, 5, 6, 7], [4, 5, 6, 7], remote)
        t.flush(30.0)
    assert e.value.status == 502 and time.monotonic() - t0 < 5
    # dies before we connect
    r2.kill()
    t0 = time.monotonic()
    with pytest.raises(TransferError) as e:
        t.connect(r2.desc)
    assert e.value.status == 502 and time.monotonic() - t0 < 5
    # and the transport still works for a live receiver afterwards
    remote = t.connect(r3.desc)
    t.write(0, [0, 1], [6, 7], remote)
    assert t.flush(10.0).bytes > 0


def test_nixl_dead_receiver_without_pid(receiver, sender):
    """Across hosts there is no pid to check: UCX itself must notice the receiver is gone."""
    t, _ = sender("nixl")
    r, r2 = receiver("nixl", 2)
    desc = {k: v for k, v in r.desc.items() if k not in ("host", "pid", "start")}
    remote = t.connect(desc)
    t.write(0, [0, 1, 2, 3], [0, 1, 2, 3], remote)
    t.flush(10.0)
    r.kill()
    t0 = time.monotonic()
    with pytest.raises(TransferError) as e:
        for layer in range(3):
            t.write(layer, [4, 5, 6, 7], [4, 5, 6, 7], remote)
        t.flush(3.0)
    assert e.value.status in (502, 504) and time.monotonic() - t0 < 5
    r2.kill()
    t0 = time.monotonic()
    with pytest.raises(TransferError) as e:
        t.connect({k: v for k, v in r2.desc.items() if k not in ("host", "pid", "start")})
    assert e.value.status == 502 and time.monotonic() - t0 < 5


def test_nixl_slots_outside_receiver_pool_is_400(receiver, sender):
    t, _ = sender("nixl")
    r = receiver("nixl")
    remote = t.connect(r.desc)
    t.write(0, [0, 1], [RECV_SHAPE[2] * RECV_SHAPE[3] - 1, RECV_SHAPE[2] * RECV_SHAPE[3]], remote)
    with pytest.raises(TransferError) as e:
        t.flush(5.0)
    assert e.value.status == 400
    t.write(0, [0, 1], [2, 3], remote)  # the error was reported once; the next round is clean
    assert t.flush(5.0).bytes > 0


def test_import_microserve_does_not_import_nixl():
    import subprocess
    import sys
    code = "import sys, microserve, microserve.transfer, microserve.transfer.nixl; print('nixl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd(), check=True)
    assert out.stdout.strip() == "False"


def test_slot_runs_match_the_plain_loop():
    """The vectorized run finder (and its one-entry cache) against the obvious loop."""
    import random

    from microserve.transfer.base import RunCache, slot_runs, slot_runs_array

    def plain(src, dst):
        runs = []
        for s, d in zip(src, dst):
            if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
                runs[-1][2] += 1
            else:
                runs.append([s, d, 1])
        return [tuple(r) for r in runs]

    rng, cache = random.Random(0), RunCache()
    for _ in range(300):
        n = rng.choice([0, 1, 2, 5, 64, 65, 300])
        src = [rng.choice([i, rng.randrange(1000)]) for i in range(n)]
        dst = [rng.choice([i + 7, rng.randrange(1000)]) for i in range(n)]
        want = plain(src, dst)
        assert slot_runs(src, dst) == want
        assert [tuple(r) for r in slot_runs_array(src, dst).tolist()] == want
        assert [tuple(r) for r in cache(src, dst).tolist()] == want
        src[n // 2:] = [s + 1 for s in src[n // 2:]]  # the same list object, changed: no stale answer
        assert [tuple(r) for r in cache(src, dst).tolist()] == plain(src, dst)


def _rss_shmem_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssShmem:"))


def test_shm_pool_is_resident_and_zero_when_allocated():
    """The shm pool is populated when mapped (as torch.zeros pools are), so no step pays a page
    fault on its first K/V write into a fresh page; its contents start as zeros."""
    t = make_transport("shm")
    try:
        before = _rss_shmem_kib()
        pool = t.allocate((2, 2, 256, 16, 4, 64), torch.float32, torch.device("cpu"))
        kib = pool.numel() * pool.element_size() // 1024
        assert kib == 16 * 1024
        grown = _rss_shmem_kib() - before
        assert grown >= kib - 64, f"only {grown} KiB of the {kib} KiB pool is resident"
        assert not pool.any()
    finally:
        t.close()
