"""The Triton attention kernels and backend, checked against the torch backend.

The kernel checks live in `tests/triton_kernel_checks.py` and run in a subprocess: the interpreter
(`TRITON_INTERPRET=1`, CPU tensors) must be switched on before triton is first imported, and a fresh
process is the only way to be sure nothing in this pytest process imported it earlier. One
subprocess runs every case; each group below asserts on its own cases (fp32 relative error < 1e-4,
outputs poisoned with NaN first so every element must be written).

On a machine with CUDA the same cases also run compiled on the GPU.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "triton_kernel_checks.py"
GROUPS = ["store", "prefill", "decode", "backend", "chunks", "fallback", "engine", "graph"]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _run_checks(device: str) -> dict[str, list[dict]]:
    env = dict(os.environ, MICROSERVE_TRITON_CHECK_DEVICE=device, PYTHONPATH=str(HERE.parent))
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for CPU
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=HERE.parent, env=env, capture_output=True,
                          text=True, timeout=280)
    results: dict[str, list[dict]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results.setdefault(r["group"], []).append(r)
    if not results:
        raise AssertionError(f"the check script produced no results (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return results


@pytest.fixture(scope="module")
def cpu_results():
    return _run_checks("cpu")


@pytest.fixture(scope="module")
def cuda_results():
    return _run_checks("cuda")


def _assert_group(results: dict[str, list[dict]], group: str) -> None:
    cases = results.get(group)
    assert cases, f"no results for group {group!r}"
    bad = [f"{c['case']}: rel_err={c['rel_err']} (tol {c['tol']}) {c['detail']}" for c in cases if not c["ok"]]
    assert not bad, "\n".join(bad)


@needs_triton
@pytest.mark.parametrize("group", GROUPS)
def test_kernels_interpreted_on_cpu(cpu_results, group):
    _assert_group(cpu_results, group)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("group", GROUPS)
def test_kernels_compiled_on_cuda(cuda_results, group):
    _assert_group(cuda_results, group)


def test_cpu_without_interpreter_falls_back_to_torch(monkeypatch):
    """On CPU tensors without TRITON_INTERPRET, the triton backend is the torch backend, and it does
    not import triton to find that out."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from microserve.attention.base import AttentionMetadata, ForwardContext, get_backend
    from microserve.attention.torch_backend import TorchSDPABackend
    from microserve.attention.triton_backend import TritonBackend

    triton_loaded_before = "triton" in sys.modules
    g = torch.Generator().manual_seed(0)
    kv = torch.randn((1, 2, 4, 16, 2, 16), generator=g)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([3 * 16 + 4] + [16 + i for i in range(5)]),
        query_start_loc=torch.tensor([0, 1, 6], dtype=torch.int32), seq_lens=torch.tensor([5, 5], dtype=torch.int32),
        block_tables=torch.tensor([[3], [1]], dtype=torch.int32), query_lens_cpu=[1, 5], seq_lens_cpu=[5, 5],
        num_decodes=1, page_size=16)
    q, k, v = (torch.randn((6, h, 16), generator=g) for h in (4, 2, 2))
    ref = TorchSDPABackend(4, 2, 16, 0.25).forward(0, q, k, v, ForwardContext(meta=meta, kv=kv.clone()))
    be = TritonBackend(4, 2, 16, 0.25)
    out = be.forward(0, q, k, v, ForwardContext(meta=meta, kv=kv))
    assert torch.equal(out, ref)
    assert "TRITON_INTERPRET" in be.unsupported(q, kv)
    if not triton_loaded_before:
        assert "triton" not in sys.modules
    # auto never picks triton for CPU: the compiled CPU kernel when it builds, else torch
    from microserve.kernels.build import kernel_error
    want = "cpu" if kernel_error() is None else "torch"
    assert get_backend("auto", torch.device("cpu"), num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25).name == want
    assert get_backend("triton", torch.device("cpu"), num_heads=4, num_kv_heads=2, head_dim=16,
                       scale=0.25).name == "triton"


def test_decode_partition_policy():
    """Split-KV partitions cover the context with no empty one, are block multiples, are never
    shorter than asked, and split only when the batch alone would not fill the GPU."""
    from microserve.attention.triton_backend import decode_partition

    res = {}
    for max_len, seqs, kvh, sms in [(100, 1, 8, 132), (8192, 1, 8, 132), (8192, 256, 8, 132), (300, 4, 2, 8),
                                    (1, 1, 1, 132), (100000, 1, 8, 132), (511, 1, 8, 132), (512, 1, 8, 132)]:
        splits, part = res[max_len, seqs] = decode_partition(max_len, seqs, kvh, sms)
        assert 1 <= splits <= 32 and part % 64 == 0
        assert splits * part >= max_len > (splits - 1) * part
        if splits > 1:
            assert part >= 256
    assert res[8192, 1][0] == 32  # one long sequence: split to fill the GPU
    assert res[8192, 256][0] == 1  # a big batch fills it already
    assert res[511, 1][0] == 1 and res[512, 1][0] == 2
