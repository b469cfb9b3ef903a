"""The engine's CPU prefill attention and linear layers against what torch would run instead, and
decode attention cost against the page size.

1. Prefill attention, one layer call, one fresh causal prompt of T tokens (8 q heads / 4 kv heads):
   the engine's paged kernel (microserve/attention/csrc/paged_prefill.cpp, reading K/V through a
   shuffled block table) vs torch SDPA (its CPU flash kernel) on dense K/V. Also a prompt over a
   cached prefix, where the torch backend must first gather the prefix out of the pool.
2. Linear layers of the served models: nn.Linear (F.linear, torch's BLAS) vs the engine's
   PackedLinear (microserve/model/packed_linear.py) on both of its routes, the oneDNN matmul on a
   reordered weight (bf16/fp16, `--attention-backend torch`) and oneDNN's brgemm micro-kernels on
   blocked weights (fp32 with the kernel library, the CPU default), per row count, all called as
   modules.
3. Decode attention (the engine's kernel) per context token against the page size, from a 1 GiB
   pool whose pages are shuffled, as a long-running server's are: B 64, context 232, D 32, all 5
   layers of stories260K-hd32 per step so the pool does not sit in cache.
4. The model's small per-token ops (microserve/model/layers.py) as eager torch ops vs the fused CPU
   kernels (microserve/model/csrc/layer_ops.cpp): the same module code, with the kernels switched
   off for the eager column.

5. What the engine picks on this machine (microserve/kernels/selection.py) for the served models:
   the same start-up measurement the engine makes, at each model's own shapes: each kernel's
   speed-ups over the torch path it replaces, and whether the engine then uses it.
Medians of --reps calls, in one process, side by side.

    python benchmarks/cpu_ops_micro.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
from unittest import mock

import torch
from torch import nn

from microserve.attention.base import AttentionMetadata, ForwardContext
from microserve.attention.cpu_backend import CPUPagedBackend
from microserve.attention.torch_backend import TorchSDPABackend
from microserve.bench.harness import machine_line, md_table, median_ms
from microserve.kernels.build import loaded_isa
from microserve.kernels.selection import attention_case
from microserve.model import layers
from microserve.model.layers import RMSNorm, RotaryEmbedding, silu_and_mul
from microserve.model.packed_linear import PackedLinear


def prefill_case(T: int, prefix: int, D: int, reps: int, hq: int = 8, hkv: int = 4, ps: int = 16):
    sl = prefix + T
    width = -(-sl // ps)
    kv = torch.randn(1, 2, 4 * width, ps, hkv, D)
    table = torch.randperm(4 * width)[:width].int()[None]
    slots = torch.tensor([int(table[0, t // ps]) * ps + t % ps for t in range(prefix, sl)])
    q, k, v = torch.randn(T, hq, D), torch.randn(T, hkv, D), torch.randn(T, hkv, D)
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.tensor([0, T], dtype=torch.int32),
                             seq_lens=torch.tensor([sl], dtype=torch.int32), block_tables=table,
                             query_lens_cpu=[T], seq_lens_cpu=[sl], num_decodes=0, page_size=ps)
    ctx = ForwardContext(meta, kv)
    engine, torch_backend = CPUPagedBackend(hq, hkv, D, D ** -0.5), TorchSDPABackend(hq, hkv, D, D ** -0.5)
    diff = (engine.forward(0, q, k, v, ctx) - torch_backend.forward(0, q, k, v, ctx)).abs().max().item()
    t_engine = median_ms(lambda: engine.forward(0, q, k, v, ctx), reps)
    t_torch = median_ms(lambda: torch_backend.forward(0, q, k, v, ctx), reps)
    return [T, prefix, D, f"{t_torch:.3f}", f"{t_engine:.3f}", f"**{t_torch / t_engine:.2f}x**", f"{diff:.1e}"]


def decode_page_case(ps: int, reps: int, layers: int = 5, hq: int = 8, hkv: int = 4, d: int = 32,
                     b: int = 64, ctx: int = 232, pool_mib: int = 1024):
    pages = pool_mib * 2**20 // (layers * 2 * ps * hkv * d * 4)
    pool = torch.empty(layers, 2, pages, ps, hkv, d).normal_()
    width = -(-ctx // ps)
    tables = torch.randperm(pages)[:b * width].view(b, width).int()
    lens = torch.full((b,), ctx, dtype=torch.int32)
    q, out = torch.randn(b, hq, d), torch.empty(b, hq, d)

    def step():
        for layer in range(layers):
            torch.ops.microserve.paged_decode_attention(q, pool[layer], tables, lens, d ** -0.5, out)
    per_token_ns = median_ms(step, reps) / layers / (b * ctx) * 1e6
    return [ps, f"{per_token_ns:.1f}"]


def linear_case(name: str, rows: int, k: int, n: int, reps: int):
    linear = nn.Linear(k, n, bias=False)
    onednn, brgemm = PackedLinear(linear, kernel=False), PackedLinear(linear, kernel=True)
    assert onednn.weight_t is None and brgemm.weight_t is not None
    x = torch.randn(rows, k)
    with torch.inference_mode():
        ref = linear(x)
        diff = max((m(x) - ref).abs().max().item() for m in (onednn, brgemm))
        t_plain, t_onednn, t_brgemm = (median_ms(lambda m=m: m(x), reps) for m in (linear, onednn, brgemm))
    return [name, rows, f"{k}x{n}", f"{t_plain * 1e3:.0f}", f"{t_onednn * 1e3:.0f}", f"{t_brgemm * 1e3:.0f}",
            f"**{t_plain / t_brgemm:.2f}x**", f"**{t_onednn / t_brgemm:.2f}x**", f"{diff:.1e}"]


def decode_case(b: int, ctx: int, reps: int, hq: int = 8, hkv: int = 4, d: int = 32):
    """Decode attention, one layer call: the paged kernel vs the torch backend (gather + SDPA)."""
    q, k, v, fctx = attention_case(hq, hkv, d, torch.float32, b, 1, ctx)
    engine, torch_backend = CPUPagedBackend(hq, hkv, d, d ** -0.5), TorchSDPABackend(hq, hkv, d, d ** -0.5)
    with torch.inference_mode():
        diff = (engine.forward(0, q, k, v, fctx) - torch_backend.forward(0, q, k, v, fctx)).abs().max().item()
        t_engine = median_ms(lambda: engine.forward(0, q, k, v, fctx), reps)
        t_torch = median_ms(lambda: torch_backend.forward(0, q, k, v, fctx), reps)
    return [b, ctx, d, f"{t_torch:.3f}", f"{t_engine:.3f}", f"**{t_torch / t_engine:.2f}x**", f"{diff:.1e}"]


def selection_rows(name: str, hf: dict, dtype: torch.dtype) -> list[list]:
    """The engine's start-up choice for a model (kernels/selection.py), measured afresh."""
    from microserve.config import ModelConfig
    from microserve.kernels import selection
    from microserve.model.llama import DecoderLayer
    cfg = ModelConfig.from_hf(hf)
    d, dt = cfg.head_dim, str(dtype).removeprefix("torch.")
    backend = CPUPagedBackend(cfg.num_heads, cfg.num_kv_heads, d, d ** -0.5)
    measured = {phase: selection.attention_speedups(phase, cfg.num_heads, cfg.num_kv_heads, d, dtype)
                for phase in ("decode", "prefill")}
    if dtype == torch.float32:  # brgemm is fp32 only; bf16/fp16 linears take oneDNN's matmul
        layer = DecoderLayer(cfg, 0, backend)
        rotary = RotaryEmbedding(d, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        measured["layers (brgemm + fused ops)"] = selection.layer_speedups(layer, rotary, dtype)
        measured["lm_head (brgemm)"] = selection.linear_speedups((cfg.hidden_size, cfg.vocab_size, False), dtype)
    return [[name, dt, what, ", ".join(f"{r:.2f}x" for r in rs), "kernel" if selection.decide(rs) else "**torch**"]
            for what, rs in measured.items()]


def layer_ops_case(model: str, rows: int, hidden: int, inter: int, heads: int, d: int, reps: int):
    """RMSNorm with its residual add, RoPE on a fused qkv's q/k heads, SiLU-and-mul: us per call."""
    norm, rope = RMSNorm(hidden, 1e-5), RotaryEmbedding(d, 4096, 10000.0, None)
    x, res = torch.randn(rows, hidden), torch.randn(rows, hidden)
    qkv, gate_up = torch.randn(rows, (heads + heads // 2 * 2) * d), torch.randn(rows, 2 * inter)
    qk = qkv[:, :(heads + heads // 2) * d].view(rows, -1, d)

    def timings() -> list[float]:
        table = rope.table(torch.arange(rows) % 4096, torch.float32)  # shaped for the path in use
        ops = [lambda: norm(x, res.clone()), lambda: RotaryEmbedding.apply(qk, *table), lambda: silu_and_mul(gate_up)]
        return [median_ms(fn, reps) for fn in ops]

    with torch.inference_mode():
        fused = timings()
        with mock.patch.object(layers, "_cpu_kernels", lambda t: False):
            eager = timings()
    return [[model, name, rows, f"{e * 1e3:.1f}", f"{f * 1e3:.1f}", f"**{e / f:.1f}x**"]
            for name, e, f in zip(("RMSNorm + residual", "RoPE (q and k)", "SiLU-and-mul"), eager, fused)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=20, help="timed calls per case (default: %(default)s)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    CPUPagedBackend(1, 1, 8, 1.0)  # builds or loads the kernel library ($MICROSERVE_CPU_ISA picks the variant)
    print(machine_line())
    print(f"kernel variant {loaded_isa()}, ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '')}, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '')}; threads {a.threads}, "
          f"loadavg {os.getloadavg()[0]:.2f}, median of {a.reps} calls")
    print("\n### Prefill attention, one layer call (ms)\n")
    rows = [prefill_case(T, 0, 32, a.reps) for T in (64, 200, 512, 2048)]
    rows += [prefill_case(200, 0, 64, a.reps), prefill_case(200, 0, 8, a.reps), prefill_case(64, 448, 32, a.reps)]
    print(md_table(["new tokens", "cached prefix", "head dim", "torch backend", "engine kernel", "speed-up",
                 "max abs diff"], rows))
    print("\n### Linear layers (us per call)\n")
    shapes = [("hd32 qkv_proj", 64, 512), ("hd32 gate_up_proj", 64, 344), ("hd32 down_proj", 172, 64),
              ("58M qkv_proj", 512, 1024), ("58M gate_up_proj", 512, 3072), ("58M lm_head", 512, 32000)]
    rows = [linear_case(name, m, k, n, a.reps) for name, k, n in shapes for m in (1, 16, 64, 2048)
            if not (m == 2048 and n == 32000)]  # prefill runs lm_head on the last tokens only
    print(md_table(["layer", "rows", "in x out", "nn.Linear", "oneDNN route", "brgemm route", "brgemm vs nn.Linear",
                    "brgemm vs oneDNN", "max abs diff"], rows))
    print("\n### Decode attention, one layer call, kernel vs torch backend (ms; 8 q / 4 kv heads, pages shuffled)\n")
    rows = [decode_case(b, ctx, a.reps) for b, ctx in ((1, 232), (1, 2048), (16, 232), (64, 232), (16, 1024))]
    print(md_table(["batch", "context", "head dim", "torch backend", "engine kernel", "speed-up", "max abs diff"], rows))
    print("\n### Decode attention per context token vs page size, shuffled 1 GiB pool (ns)\n")
    print(md_table(["page size", "ns per token"], [decode_page_case(ps, a.reps) for ps in (16, 32, 64, 128)]))
    print("\n### What the engine picks here (kernels/selection.py: kernel only if >= 1.0x at every size)\n")
    from microserve.bench.harness import shared_model
    from microserve.bench.presets import DUMMY_SHAPES
    with open(os.path.join(shared_model("stories260K-hd32"), "config.json")) as f:
        hd32 = json.load(f)
    rows = [r for name, hf, dtype in (("stories260K-hd32", hd32, torch.float32),
                                      ("llama-0.5b", DUMMY_SHAPES["llama-0.5b"], torch.float32),
                                      ("llama-0.5b", DUMMY_SHAPES["llama-0.5b"], torch.bfloat16))
            for r in selection_rows(name, hf, dtype)]
    print("sizes: decode batch x context 1 x 512, 16 x 256; prefill new/context 128/128, 64/512, 2048/2048; "
          "layers 1, 16 (decode, context 128) and 256 rows (prefill); lm_head 1, 16, 64 rows\n")
    print(md_table(["model", "dtype", "kernel", "speed-ups over torch", "engine uses"], rows))
    print("\n### Layer ops, eager torch vs fused kernel (us per call; RMSNorm's time includes cloning the residual)\n")
    rows = [r for m in (1, 16, 64, 2048) for r in layer_ops_case("hd32", m, 64, 172, 8, 32, a.reps)]
    rows += [r for m in (16, 2048) for r in layer_ops_case("58M", m, 512, 1536, 8, 64, a.reps)]
    print(md_table(["model", "op", "rows", "eager", "fused", "speed-up"], rows))


if __name__ == "__main__":
    main()
