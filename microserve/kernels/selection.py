"""Which compiled CPU kernels the engine uses on this machine: only those that beat, here, the torch
path they replace.

A kernel tuned on one CPU can lose on another (the paged prefill kernel ran at 0.06-0.17x of torch
on an AVX2 EPYC when its blocking assumed AVX-512's registers). So at start-up the engine times each
kernel against its torch path at the model's own shapes and keeps it only where it is at least as
fast at every measured size:

- `decode`: paged decode attention vs the torch backend (gather + SDPA), batch 1 x 512 and 16 x 256
  context tokens;
- `prefill`: paged prefill attention vs torch's flash SDPA: fresh prompts of 128 and 2048 tokens
  (the default step budget) and a 64-token chunk over a 448-token cached prefix;
- `layers`: the decoder layers' linears on oneDNN brgemm (which also switches on the fused layer
  ops) vs the torch route (PackedLinear's oneDNN matmul / F.linear), summed over a layer's shapes,
  at 1, 16 and 256 rows;
- `lm_head` (and any other linear outside the layers): the same two routes, per weight shape.

Each choice is measured once per machine and cached beside the kernel library it measured
(kernels/build.py's library_dir(), so a new build or variant measures again), keyed by everything
that moves the timings: shapes, dtype, threads, and the torch/oneDNN ISA caps in the environment.
An flock makes engines that start together measure once and agree. `--attention-backend cpu|torch`
and `--linear-backend kernel|torch` force a path without measuring.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

log = logging.getLogger(__name__)

# Environment that changes what torch's side of a comparison runs.
_ENV_KEYS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


@dataclass
class Choice:
    """One kernel's verdict: `use` it or not, and the speed-ups over torch it was decided on
    (torch time / kernel time, one per measured size; empty when forced)."""

    use: bool
    speedups: list[float] = field(default_factory=list)
    how: str = "measured"  # measured | cached | forced | unavailable

    def describe(self) -> str:
        what = "kernel" if self.use else "torch"
        if not self.speedups:
            return f"{what} ({self.how})"
        return f"{what} ({self.how}: {', '.join(f'{s:.2f}x' for s in self.speedups)})"


def _median_s(fn: Callable[[], object], reps: int = 5) -> float:
    t0 = time.perf_counter()
    fn()  # warm-up: first-call allocation, oneDNN/brgemm JIT
    if time.perf_counter() - t0 > 0.05:  # long calls vary less; keep the start-up short
        reps = 3
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decide(speedups: list[float]) -> bool:
    """The rule: a kernel runs only where it is at least as fast as torch at every measured size."""
    return bool(speedups) and min(speedups) >= 1.0


@contextlib.contextmanager
def _locked_cache():
    """The cache file, read and written under an exclusive flock: (dict, save)."""
    from microserve.kernels.build import library_dir
    d = library_dir()
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "selection.json")
    with open(os.path.join(d, "selection.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}

        def save() -> None:
            tmp = f"{path}.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(cache, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        yield cache, save


def cached(key: dict, measure: Callable[[], list[float]]) -> Choice:
    """The cached verdict for `key`, else measure() (speed-ups), decide, and remember it."""
    full = {**key, "threads": torch.get_num_threads(), "env": {k: os.environ.get(k, "") for k in _ENV_KEYS}}
    k = json.dumps(full, sort_keys=True)
    with _locked_cache() as (cache, save):
        if k in cache:
            return Choice(**{**cache[k], "how": "cached"})
        speedups = [round(s, 3) for s in measure()]
        choice = Choice(decide(speedups), speedups)
        cache[k] = asdict(choice)
        save()
        return choice


# ---- attention ---------------------------------------------------------------------------------

def attention_case(hq: int, hkv: int, d: int, dtype: torch.dtype, batch: int, new: int, ctx: int, ps: int = 16):
    """q/k/v and a ForwardContext for `batch` sequences of `ctx` tokens, the last `new` of them new,
    their pages shuffled through a pool twice the size they need."""
    from microserve.attention.base import AttentionMetadata, ForwardContext
    g = torch.Generator().manual_seed(0)
    width = -(-ctx // ps)
    pages = 2 * batch * width
    kv = torch.randn(1, 2, pages, ps, hkv, d, generator=g).to(dtype)
    tables = torch.randperm(pages, generator=g)[:batch * width].view(batch, width).int()
    slots = torch.tensor([int(tables[b, t // ps]) * ps + t % ps for b in range(batch) for t in range(ctx - new, ctx)])
    T = batch * new
    q, k, v = (torch.randn(T, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.arange(0, T + 1, new, dtype=torch.int32),
                             seq_lens=torch.full((batch,), ctx, dtype=torch.int32), block_tables=tables,
                             query_lens_cpu=[new] * batch, seq_lens_cpu=[ctx] * batch,
                             num_decodes=batch if new == 1 else 0, page_size=ps)
    return q, k, v, ForwardContext(meta, kv)


def attention_speedups(phase: str, hq: int, hkv: int, d: int, dtype: torch.dtype) -> list[float]:
    """torch backend time / kernel time for `phase` (decode | prefill) at its measured sizes."""
    from microserve.attention.cpu_backend import CPUPagedBackend
    from microserve.attention.torch_backend import TorchSDPABackend
    kernel = CPUPagedBackend(hq, hkv, d, d ** -0.5, use_decode=True, use_prefill=True)
    plain = TorchSDPABackend(hq, hkv, d, d ** -0.5)
    sizes = [(1, 1, 512), (16, 1, 256)] if phase == "decode" else [(1, 128, 128), (1, 64, 512), (1, 2048, 2048)]
    out = []
    with torch.inference_mode():
        for batch, new, ctx in sizes:
            q, k, v, fctx = attention_case(hq, hkv, d, dtype, batch, new, ctx)
            t_torch = _median_s(lambda: plain.forward(0, q, k, v, fctx))
            t_kernel = _median_s(lambda: kernel.forward(0, q, k, v, fctx))
            out.append(t_torch / t_kernel)
    return out


def choose_attention(backend, dtype: torch.dtype) -> dict[str, Choice]:
    """Measure (or recall) the decode and prefill kernels for a CPUPagedBackend's shapes and switch
    each off where torch is faster. Returns the choices by phase."""
    key = {"hq": backend.num_heads, "hkv": backend.num_kv_heads, "d": backend.head_dim, "dtype": str(dtype)}
    choices = {phase: cached({"op": f"attention.{phase}", **key},
                             lambda phase=phase: attention_speedups(phase, backend.num_heads, backend.num_kv_heads,
                                                                    backend.head_dim, dtype))
               for phase in ("decode", "prefill")}
    backend.use_decode, backend.use_prefill = choices["decode"].use, choices["prefill"].use
    return choices


# ---- linear layers -----------------------------------------------------------------------------

LAYER_ROWS = (1, 16, 256)  # decode batches of 1 and 16 (context 128), one 256-token prefill
HEAD_ROWS = (1, 16, 64)  # lm_head sees the batch's last tokens only


def layer_speedups(layer, rotary, dtype: torch.dtype, rows: tuple[int, ...] = LAYER_ROWS) -> list[float]:
    """One decoder layer (a copy of `layer`, its attention backend as the model's) with its linears on
    the torch route / on brgemm with the fused layer ops, time ratio per row count."""
    import copy

    from microserve.model.packed_linear import pack_module
    attn = layer.self_attn
    hkv, d = attn.nkv, attn.hd
    routes = []
    for kernel in (False, True):
        copy_ = copy.deepcopy(layer)
        pack_module(copy_, lambda name, kernel=kernel: kernel)
        copy_.bind_fused()
        routes.append(copy_)
    hidden = layer.input_layernorm.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    out = []
    with torch.inference_mode():
        for m in rows:
            batch, new, ctx = (m, 1, 128) if m <= 16 else (1, m, m)
            _, _, _, fctx = attention_case(attn.nh, hkv, d, dtype, batch, new, ctx)
            x, res = (torch.randn(m, hidden, generator=g).to(dtype) for _ in range(2))
            positions = torch.tensor([ctx - new + i for _ in range(batch) for i in range(new)])
            rope = rotary.table(positions, dtype)
            t_torch, t_kernel = (_median_s(lambda r=r: r(x, res.clone(), rope, fctx)) for r in routes)
            out.append(t_torch / t_kernel)
    return out


def choose_layer(layer, rotary, dtype: torch.dtype) -> Choice:
    """Whether the decoder layers' linears take the brgemm route (and the fused layer ops), measured
    on a copy of `layer` or recalled."""
    attn = layer.self_attn
    shapes = sorted((m.in_features, m.out_features, m.bias is not None)
                    for m in layer.modules() if isinstance(m, torch.nn.Linear))
    key = {"op": "linear.layers", "shapes": shapes, "heads": [attn.nh, attn.nkv, attn.hd], "dtype": str(dtype)}
    return cached(key, lambda: layer_speedups(layer, rotary, dtype))


def linear_speedups(shape: tuple[int, int, bool], dtype: torch.dtype, rows: tuple[int, ...] = HEAD_ROWS) -> list[float]:
    """One linear of `shape` (in, out, bias): torch-route time / brgemm time per row count."""
    from torch import nn

    from microserve.model.packed_linear import PackedLinear
    g = torch.Generator().manual_seed(0)
    k, n, bias = shape
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    plain, kernel = PackedLinear(lin, kernel=False), PackedLinear(lin, kernel=True)
    out = []
    with torch.inference_mode():
        for m in rows:
            x = torch.randn(m, k, generator=g).to(dtype)
            out.append(_median_s(lambda: plain(x)) / _median_s(lambda: kernel(x)))
    return out


def choose_linear(shape: tuple[int, int, bool], dtype: torch.dtype) -> Choice:
    """Whether a linear outside the decoder layers (lm_head) of this shape takes the brgemm route."""
    return cached({"op": "linear", "shape": list(shape), "dtype": str(dtype)}, lambda: linear_speedups(shape, dtype))
