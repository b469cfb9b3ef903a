"""Every KV transport through the same cases, bad ones included: the same fault gets the same status
on every transport (plan.py's table), nothing a description names is created or touched, and the
transport still makes a good write afterwards.

The receiver is a separate process (test_transport.Receiver: a forkserver child that owns a pool
filled with a known pattern); this process is the sender. A forged description is the receiver's
real one with one thing changed, as someone writing kv_addr_info by hand would."""
from __future__ import annotations

import base64
import mmap
import os
import subprocess
import time

import numpy as np
import pytest
import torch

from microserve.transfer import TransferError, make_transport
from microserve.transfer.plan import process_start_time
from test_transport import DTYPE, Receiver, _pattern, _rows

TRANSPORTS = ["shm", pytest.param("nixl", marks=pytest.mark.nixl),
              pytest.param("cuda_ipc", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
DEVICE = {"shm": "cpu", "nixl": "cpu", "cuda_ipc": "cuda"}
LOCATOR = {"shm": "fd", "nixl": "addr", "cuda_ipc": "handle"}  # the field that says where the pool is
RECV_SHAPE = (3, 2, 40, 4, 2, 8)  # [layers, K/V, pages, page_size, kv_heads, head_dim]: 160 slots
SEND_SHAPE = (3, 2, 30, 4, 2, 8)  # another pool size: addresses must use the receiver's slot count
RECV_SLOTS = RECV_SHAPE[2] * RECV_SHAPE[3]


class Env:
    """The sender and everything a forged description may point at."""

    def __init__(self, name: str, tmp_path) -> None:
        if name == "nixl":
            pytest.importorskip("nixl")
        self.name = name
        self.receiver = Receiver(name, DEVICE[name], RECV_SHAPE)
        self.t = make_transport(name)
        self.kv = self.t.allocate(SEND_SHAPE, DTYPE, torch.device(DEVICE[name]))
        self.kv.copy_(_pattern(SEND_SHAPE, seed=2))
        # a file the sender has open (and mapped): what a forged fd / address may name
        self.file = tmp_path / "victim.bin"
        self.file.write_bytes(bytes(range(256)) * 64)
        os.utime(self.file, (1_000_000_000, 1_000_000_000))
        self.file_fd = os.open(self.file, os.O_RDONLY)
        self.file_map = mmap.mmap(self.file_fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        self.missing = tmp_path / "must-not-exist"
        # a live process that is no engine, and a dead one
        self.other = subprocess.Popen(["sleep", "600"])
        dead = subprocess.Popen(["sleep", "600"])
        while process_start_time(dead.pid) is None:
            time.sleep(0.01)
        self.dead = (dead.pid, process_start_time(dead.pid))
        dead.kill()
        dead.wait()
        self.remote = self.t.connect(self.receiver.desc)

    def file_state(self):
        st = os.stat(self.file)
        return st.st_size, st.st_mtime_ns, self.file.read_bytes()

    def close(self) -> None:
        self.t.close()
        self.receiver.close()
        self.other.kill()
        self.other.wait()
        self.file_map.close()
        os.close(self.file_fd)


@pytest.fixture(scope="module", params=TRANSPORTS)
def env(request, tmp_path_factory):
    e = Env(request.param, tmp_path_factory.mktemp(request.param))
    yield e
    e.close()


def good_write(e: Env, layer: int = 1, src=(5, 6, 7), dst=(9, 10, 11)) -> None:
    """A write through a fresh connect lands byte for byte."""
    remote = e.t.connect(e.receiver.desc)
    e.t.write(layer, list(src), list(dst), remote)
    assert e.t.flush(10.0).bytes > 0
    assert torch.equal(_rows(e.receiver.dump(), layer)[:, list(dst)], _rows(e.kv.cpu(), layer)[:, list(src)])


def _forge(case: str, e: Env):
    d = dict(e.receiver.desc)
    name, me = e.name, os.getpid()
    if case == "not_an_object":
        return ["not", "a", "dict"]
    if case == "empty":
        return {}
    if case == "path_instead_of_locator":  # the old shm description: a path the sender would open
        d.pop(LOCATOR[name])
        return dict(d, path=str(e.missing))
    if case == "other_file":  # where the pool is, pointed at some other file
        if name == "shm":  # a live process (this one) whose fd is that file
            return dict(d, pid=me, start=process_start_time(me), fd=e.file_fd)
        if name == "nixl":  # this engine's own agent, at the address the file is mapped at
            own = e.t.describe()
            return dict(d, agent=own["agent"], meta=own["meta"], pid=me, start=process_start_time(me),
                        addr=int(np.frombuffer(e.file_map, dtype=np.uint8).ctypes.data))
        return dict(d, handle=base64.b64encode(e.file.read_bytes()[:64]).decode())
    if case == "closed_fd":
        return dict(d, fd=987654) if name == "shm" else dict(d, **{LOCATOR[name]: None})
    if case == "wrong_pid":  # a live process that is no engine, with its true start time
        return dict(d, pid=e.other.pid, start=process_start_time(e.other.pid))
    if case == "dead_pid":
        return dict(d, pid=e.dead[0], start=e.dead[1])
    if case == "reused_pid":  # the receiver's pid, but another process's start time
        return dict(d, start=str(int(d["start"]) + 1))
    if case == "pid_is_a_path":
        return dict(d, pid="self/../../etc")
    if case == "other_host":
        return dict(d, host="elsewhere.invalid")
    if case == "wrong_layout":
        return dict(d, shape=[*RECV_SHAPE[:5], RECV_SHAPE[5] * 2])
    if case == "wrong_dtype":
        return dict(d, dtype="float32")
    if case == "not_a_dtype":
        return dict(d, dtype="__class__")
    if case == "bigger_pool_than_held":  # more pages than the receiver has: would write past its end
        return dict(d, shape=[RECV_SHAPE[0], 2, RECV_SHAPE[2] * 4, *RECV_SHAPE[3:]])
    raise AssertionError(case)


# the same status for the same fault, whatever the transport
DESCRIPTION_CASES = {
    "not_an_object": 400, "empty": 400, "path_instead_of_locator": 400, "other_file": 400, "closed_fd": 400,
    "wrong_pid": 400, "dead_pid": 502, "reused_pid": 502, "pid_is_a_path": 400, "other_host": 400,
    "wrong_layout": 400, "wrong_dtype": 400, "not_a_dtype": 400, "bigger_pool_than_held": 400,
}


@pytest.mark.parametrize("case", list(DESCRIPTION_CASES))
def test_forged_description_is_refused(env, case):
    if env.name == "cuda_ipc" and case == "wrong_pid":
        pytest.xfail("a CUDA IPC handle does not say which process owns it: only liveness is checked")
    before, file_before = env.receiver.dump(), env.file_state()
    with pytest.raises(TransferError) as e:
        env.t.connect(_forge(case, env))
    assert e.value.status == DESCRIPTION_CASES[case], e.value
    assert not env.missing.exists()
    assert env.file_state() == file_before
    assert torch.equal(env.receiver.dump().view(torch.uint8), before.view(torch.uint8))
    good_write(env)


def test_a_path_in_a_description_is_never_opened(env):
    """A path beside a good description is ignored: the write lands in the receiver's pool, the file
    it names is untouched and a missing one is not created."""
    before = env.file_state()
    for path in (env.file, env.missing):
        remote = env.t.connect(dict(env.receiver.desc, path=str(path)))
        env.t.write(2, [1, 2], [3, 4], remote)
        env.t.flush(10.0)
        assert torch.equal(_rows(env.receiver.dump(), 2)[:, [3, 4]], _rows(env.kv.cpu(), 2)[:, [1, 2]])
    assert env.file_state() == before and not env.missing.exists()


# (src, dst) of a write whose fault is the receiver's slots: refused before anything is copied
WRITE_CASES = {
    "dst_past_the_pool": ([0, 1], [RECV_SLOTS - 1, RECV_SLOTS]),
    "dst_far_past_the_pool": ([0], [2**40]),
    "dst_beyond_int64": ([0], [2**70]),
    "negative_dst": ([0, 1], [-1, 0]),
    "length_mismatch": ([0, 1, 2], [0, 1]),
    "large_write_past_the_pool": (list(range(100)), list(range(RECV_SLOTS - 50, RECV_SLOTS + 50))),
    "large_write_negative_dst": (list(range(100)), list(range(-1, 99))),
    "large_write_beyond_int64": (list(range(100)), [*range(99), 2**70]),
    "large_write_near_int64_max": (list(range(100)), [*range(98), 2**63 - 2, 2**63 - 1]),
}


@pytest.mark.parametrize("case", list(WRITE_CASES))
def test_bad_slots_fail_the_flush_with_400(env, case):
    src, dst = WRITE_CASES[case]
    before = env.receiver.dump()
    env.t.write(0, [3], [2], env.remote)  # a good write in the same round still lands
    env.t.write(1, src, dst, env.remote)  # never raises for the receiver's fault ...
    with pytest.raises(TransferError) as e:
        env.t.flush(10.0)  # ... the flush reports it
    assert e.value.status == 400, e.value
    after = env.receiver.dump()
    assert torch.equal(_rows(after, 1).view(torch.uint8), _rows(before, 1).view(torch.uint8))  # nothing copied
    assert torch.equal(_rows(after, 0)[:, [2]], _rows(env.kv.cpu(), 0)[:, [3]])
    assert env.t.flush(1.0).bytes == 0  # reported once
    good_write(env)


def test_good_writes_land_byte_for_byte(env):
    """Decode-sized (plain Python) and prefill-sized (numpy, reused across layers) writes."""
    expected = env.receiver.dump()
    small = ([40, 3, 17, 18, 19], [31, 0, 13, 14, 15])
    large = ([*range(100, 40, -1), *range(0, 40)], [*range(60, 160)])  # > 64 slots: 61 runs, then one
    for src, dst in (small, large):
        for layer in range(RECV_SHAPE[0]):
            env.t.write(layer, src, dst, env.remote)
            _rows(expected, layer)[:, dst] = _rows(env.kv.cpu(), layer)[:, src]
        st = env.t.flush(10.0)
        assert st.bytes == RECV_SHAPE[0] * 2 * len(src) * RECV_SHAPE[4] * RECV_SHAPE[5] * env.kv.element_size()
        assert torch.equal(env.receiver.dump().view(torch.uint8), expected.view(torch.uint8))
