"""The start-up choice between each compiled CPU kernel and the torch path it replaces
(microserve/kernels/selection.py): the rule, the per-machine cache, and that a kernel judged slower
is really not run."""
from __future__ import annotations

import logging

import pytest
import torch

from microserve.attention.cpu_backend import CPUPagedBackend
from microserve.attention.torch_backend import TorchSDPABackend
from microserve.config import EngineConfig
from microserve.engine.engine import Engine
from microserve.kernels import build, selection
from microserve.kernels.build import kernel_error

pytestmark = pytest.mark.skipif(kernel_error() is not None, reason=f"CPU kernels unavailable: {kernel_error()}")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "library_dir", lambda variant=None: str(tmp_path))
    return tmp_path


def test_rule_is_at_least_as_fast_at_every_size():
    assert selection.decide([1.0, 3.0])
    assert not selection.decide([0.99, 5.0])  # one slower size is enough to keep torch
    assert not selection.decide([])


def test_measured_once_then_cached_per_key(cache_dir):
    calls = []

    def measure():
        calls.append(1)
        return [1.5, 0.8]
    first = selection.cached({"op": "x"}, measure)
    again = selection.cached({"op": "x"}, measure)
    assert (first.use, first.how, again.use, again.how, again.speedups) == (False, "measured", False, "cached", [1.5, 0.8])
    assert len(calls) == 1
    selection.cached({"op": "y"}, measure)  # another key measures again
    assert len(calls) == 2
    assert (cache_dir / "selection.json").exists()


def test_the_key_holds_threads_and_torch_isa_caps(cache_dir, monkeypatch):
    selection.cached({"op": "x"}, lambda: [2.0])
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # torch's side now runs other code: measure again
    assert selection.cached({"op": "x"}, lambda: [0.5]).how == "measured"


def _prefill_case():
    q, k, v, ctx = selection.attention_case(8, 4, 32, torch.float32, batch=2, new=40, ctx=100)
    return q, k, v, ctx


def test_a_kernel_judged_slower_is_not_run(cache_dir, monkeypatch):
    """With the prefill kernel measured slower, the backend's prefill is torch's, bit for bit, while
    decode (measured faster) stays on the kernel."""
    monkeypatch.setattr(selection, "attention_speedups", lambda phase, *a: [2.0] if phase == "decode" else [1.3, 0.9])
    backend = CPUPagedBackend(8, 4, 32, 32 ** -0.5)
    choices = selection.choose_attention(backend, torch.float32)
    assert (choices["decode"].use, choices["prefill"].use) == (True, False)
    assert (backend.use_decode, backend.use_prefill) == (True, False)
    q, k, v, ctx = _prefill_case()
    with torch.inference_mode():
        ref = TorchSDPABackend(8, 4, 32, 32 ** -0.5).forward(0, q, k, v, ctx)
        assert torch.equal(backend.forward(0, q, k, v, ctx), ref)
        backend.use_prefill = True  # and the kernel differs in the last bits: the switch is real
        assert not torch.equal(backend.forward(0, q, k, v, ctx), ref)


def test_measurements_are_real_ratios(cache_dir):
    """The measuring functions time both paths at the model's shapes (a tiny one here)."""
    for phase in ("decode", "prefill"):
        ratios = selection.attention_speedups(phase, 4, 2, 16, torch.float32)
        assert len(ratios) == (2 if phase == "decode" else 3) and all(r > 0 for r in ratios)
    assert len(selection.linear_speedups((64, 96, False), torch.float32)) == len(selection.HEAD_ROWS)


@pytest.mark.parametrize("attention,linear", [("auto", "auto"), ("cpu", "torch")])
def test_engine_logs_its_choice_once(attention, linear, cache_dir, caplog):
    caplog.set_level(logging.INFO, logger="microserve.model.loader")
    e = Engine(EngineConfig(model="embedded", kv_transport="none", kv_cache_memory_mb=8,
                            attention_backend=attention, linear_backend=linear))
    try:
        lines = [r.getMessage() for r in caplog.records if "CPU kernels" in r.getMessage()]
        assert len(lines) == 1
        assert f"({build.loaded_isa()} variant)" in lines[0]
        for part in ("decode ", "prefill ", "layers ", "lm_head "):
            assert part in lines[0]
        if attention == "cpu":
            assert "decode kernel (forced)" in lines[0] and "layers torch (forced)" in lines[0]
            assert e.model.layers[0].fused is None
        else:
            assert "measured" in lines[0]
    finally:
        e.close()
