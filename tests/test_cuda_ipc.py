"""The cuda_ipc KV transport. Its argument checks run anywhere; the copies need CUDA and skip without."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from microserve.transfer.base import TransferError, make_transport
from microserve.transfer.cuda_ipc import CudaIpcTransport

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SHAPE = (3, 2, 8, 16, 2, 32)  # layers, K/V, pages, page_size, kv_heads, head_dim


def test_made_by_name_without_touching_cuda():
    t = make_transport("cuda_ipc")
    assert isinstance(t, CudaIpcTransport) and t.name == "cuda_ipc"


def test_refuses_a_cpu_pool():
    with pytest.raises(ValueError, match="GPU memory"):
        CudaIpcTransport().allocate(SHAPE, torch.float32, torch.device("cpu"))


def test_rejects_unusable_peer_descriptions():
    t = CudaIpcTransport()
    with pytest.raises(TransferError) as e:
        t.connect({"host": socket.gethostname()})
    assert e.value.status == 400
    peer = {"host": "some-other-host", "pid": 1, "start": "1", "gpu_uuid": "GPU-x", "shape": list(SHAPE),
            "stride": [1] * 6, "offset": 0, "dtype": "float32", "handle": "AAAA", "size_bytes": 4, "offset_bytes": 0,
            "ref_counter_handle": "AAAA", "ref_counter_offset": 0, "event_handle": None, "event_sync_required": False}
    with pytest.raises(TransferError, match="this host only") as e:
        t.connect(peer)
    assert e.value.status == 400
    with pytest.raises(TransferError) as e:
        t.connect(dict(peer, handle="not base64!"))
    assert e.value.status == 400


def _fill(kv: torch.Tensor) -> None:
    kv.copy_(torch.arange(kv.numel(), dtype=torch.float32, device=kv.device).view(kv.shape))


@needs_cuda
def test_loopback_write_lands_and_reports():
    """Our own pool as the peer (CUDA cannot open a process's own handle: connect must notice)."""
    t = CudaIpcTransport()
    kv = t.allocate(SHAPE, torch.float32, torch.device("cuda"))
    _fill(kv)
    before = kv.clone()
    peer = t.connect(t.describe())
    flat = before.flatten(2, 3)  # [layers, 2, slots, H, D]
    src, dst = list(range(0, 20)), list(range(64, 84))  # few runs: memcpy path
    scattered_src, scattered_dst = list(range(1, 40, 2)), list(range(100, 120))[::-1]  # many runs: index path
    t.write(1, src, dst, peer)
    t.write(2, scattered_src, scattered_dst, peer)
    stats = t.flush(10.0)
    got = kv.flatten(2, 3)
    assert torch.equal(got[1][:, dst], flat[1][:, src])
    assert torch.equal(got[2][:, scattered_dst], flat[2][:, scattered_src])
    assert torch.equal(got[0], flat[0])  # other layers untouched
    assert stats.bytes == 40 * 2 * 2 * 32 * 4 and stats.transfer_s > 0
    t.close()


RECEIVER = textwrap.dedent("""
    import json, sys, torch
    from microserve.transfer.cuda_ipc import CudaIpcTransport
    t = CudaIpcTransport()
    kv = t.allocate(%r, torch.float32, torch.device("cuda"))
    torch.cuda.synchronize()
    print(json.dumps(t.describe()), flush=True)
    sys.stdin.readline()  # the sender is done
    flat = kv.flatten(2, 3)
    print(json.dumps(flat[1][:, 40:60].sum().item()), flush=True)
""") % (SHAPE,)


@needs_cuda
def test_write_into_another_process():
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        desc = json.loads(proc.stdout.readline())
        t = CudaIpcTransport()
        kv = t.allocate(SHAPE, torch.float32, torch.device("cuda"))
        _fill(kv)
        peer = t.connect(desc)
        assert t.connect(desc) is peer  # mapped once
        src = list(range(5, 25))
        t.write(1, src, list(range(40, 60)), peer)
        t.flush(10.0)
        want = kv.flatten(2, 3)[1][:, src].sum().item()
        proc.stdin.write("done\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == want
    finally:
        proc.kill()
        proc.wait()


def _cpu_stand_in() -> tuple[CudaIpcTransport, dict]:
    """A cuda_ipc transport whose pool is a CPU tensor (no CUDA here), and a description of it: enough
    for everything that must happen before any CUDA call (the planner's checks)."""
    from microserve.transfer.plan import Planner, process_start_time
    t = CudaIpcTransport()
    t.local = torch.zeros(SHAPE, dtype=torch.float32)
    t.planner = Planner(t.local)
    strides = list(t.local.stride())
    pid = os.getpid()
    desc = {"host": socket.gethostname(), "pid": pid, "start": process_start_time(pid), "gpu_uuid": "GPU-x",
            "shape": list(SHAPE), "stride": strides, "offset": 0, "dtype": "float32", "handle": "AAAA",
            "size_bytes": t.local.numel() * 4, "offset_bytes": 0, "ref_counter_handle": "AAAA",
            "ref_counter_offset": 0, "event_handle": None, "event_sync_required": False}
    return t, desc


def test_description_must_be_one_contiguous_pool():
    t, desc = _cpu_stand_in()
    slots = SHAPE[2] * SHAPE[3]
    for bad in (dict(desc, stride=[1] * 6), dict(desc, offset=8), dict(desc, size_bytes=desc["size_bytes"] * 2),
                dict(desc, shape=[SHAPE[0], 2, SHAPE[2] * 2, *SHAPE[3:]]), dict(desc, handle="not base64!"),
                dict(desc, pid=str(os.getpid())), dict(desc, start="1"), dict(desc, dtype="bfloat16")):
        with pytest.raises(TransferError) as e:
            t.connect(bad)
        assert e.value.status == (502 if bad["start"] == "1" else 400), (bad, e.value)
    peer = t.connect(desc)  # ourselves: our own pool, no IPC handle opened
    assert peer.kv is t.local and peer.geom.slots == slots


def test_bad_slots_never_reach_the_device():
    """Slots from the wire are checked against both pools before anything is queued: a garbled
    kv_addr_info fails its flush with 400 (it used to reach index_copy_, a device assert, or raise
    from inside the engine's layer hook), and write() itself never raises for it."""
    t, desc = _cpu_stand_in()
    peer = t.connect(desc)
    slots = SHAPE[2] * SHAPE[3]
    for src, dst in (([0, 1], [slots - 1, slots]), ([0], [-1]), ([0, 1, 2], [0, 1]), (list(range(100)), [slots] * 100)):
        t.write(1, src, dst, peer)  # nothing queued on any stream: no CUDA call happens
        with pytest.raises(TransferError) as e:
            t.flush(1.0)
        assert e.value.status == 400, e.value
    assert t.flush(1.0).bytes == 0
