#!/usr/bin/env python
"""The GPU benchmark: one command, one device call (< 10 minutes), one markdown report.

    python benchmarks/gpu/run.py [--out report.md] [--json report.json] [--budget-s 540] [--skip-hf]
    python benchmarks/gpu/run.py --dry-run        # tiny config on CPU: exercises every section

On a GPU it builds a Llama-3.1-8B config with dummy bf16 weights (an Engine over a temp dir holding
only config.json, `load_format="dummy"`) and measures side by side, in one process:

  1. device ceilings: device-to-device copy GB/s (read + write counted) and a large bf16 matmul's TFLOP/s
  2. decode tokens/s at batch 1, 8, 64, 256 (model forward, context 1024 each) and the bytes it must
     move per step (weights + KV read) as GB/s, as a share of the copy ceiling
  3. prefill tokens/s at 1k-8k tokens, FLOPs (linear layers + causal attention) as a share of the
     matmul ceiling
  4. per-layer compute time T_layer (prefill time / layers), per-layer KV transfer time T_transfer
     (the KV transport writing one layer's rows of those tokens to scattered pages of a receiver
     pool, timed with CUDA events) and T_transfer / T_layer, for 1000-5000 tokens; plus the measured
     cost of sending from the per-layer hook during prefill (what overlap leaves exposed)
  5. migration vs recompute at 1000 tokens: copy every layer's KV page to page vs prefill again
  6. the engine (scheduler, runner, sampler: the whole serving loop) vs Hugging Face transformers
     `generate` on the same weights, at batch 1 and 64

The receiver pool in (4) and (5) is this engine's own pool reached through its transport (cuda_ipc
falls back to a loopback in one process): the copy is the same one-sided write a remote_send does,
minus the IPC mapping, and on one GPU it is a device-to-device copy. Every section is timed after a
warm-up, runs under a shared time budget, and records its error in the report instead of stopping
the run. Without CUDA (or with --dry-run) everything runs on CPU with a tiny config, so the script
itself is tested by tests/test_gpu_bench.py.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

try:
    from microserve.attention.base import AttentionMetadata, ForwardContext
    from microserve.bench.harness import command_line, machine, machine_line
except ModuleNotFoundError as e:  # a bare checkout (the GPU machine): the package is not installed
    if e.name is None or not e.name.startswith("microserve"):
        raise
    sys.exit("microserve is not importable: `pip install -e .`, or run this from the repository root as "
             "`python -m benchmarks.gpu.run ...` (or with PYTHONPATH=.)")

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}
TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}


@dataclass
class Plan:
    """Sizes of every section; GPU and dry-run (CPU) versions below."""
    model: dict
    dtype: str
    kv_cache_mb: int
    copy_mb: int
    matmul_n: int
    decode_batches: list[int]
    decode_ctx: int
    prefill_lens: list[int]
    transfer_lens: list[int]
    migration_len: int
    generate_batches: list[int]
    prompt_len: int
    new_tokens: int
    iters: int


GPU_PLAN = Plan(model=LLAMA_31_8B, dtype="bfloat16", kv_cache_mb=40 * 1024, copy_mb=1024, matmul_n=8192,
                decode_batches=[1, 8, 64, 256], decode_ctx=1024, prefill_lens=[1024, 2048, 4096, 8192],
                transfer_lens=[1000, 2000, 3000, 4000, 5000], migration_len=1000, generate_batches=[1, 64],
                prompt_len=128, new_tokens=64, iters=10)
DRY_PLAN = Plan(model=TINY, dtype="float32", kv_cache_mb=32, copy_mb=16, matmul_n=512,
                decode_batches=[1, 8], decode_ctx=64, prefill_lens=[64, 128], transfer_lens=[64, 100],
                migration_len=64, generate_batches=[1, 4], prompt_len=16, new_tokens=8, iters=2)


@dataclass
class Section:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ---- report -----------------------------------------------------------------------------------------

def fmt(v: Any) -> str:
    """Numbers to 3-4 significant figures, shares as percentages; everything else as str."""
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return "-"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def render(sections: list[Section], header: dict[str, Any]) -> str:
    """The markdown report: a header list, then one table per section with its notes."""
    out = ["# microserve GPU benchmark", ""]
    out += [f"- **{k}**: {v}" for k, v in header.items()]
    for s in sections:
        out += ["", f"## {s.title}", ""]
        if s.rows:
            out.append("| " + " | ".join(s.columns) + " |")
            out.append("|" + "|".join(" --- " for _ in s.columns) + "|")
            out += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in s.rows]
        out += [f"\n{n}" if i == 0 else n for i, n in enumerate(s.notes)] if s.notes else []
        out.append(f"\n_section time {s.seconds:.1f} s_")
    return "\n".join(out) + "\n"


def share(x: float, ceiling: float) -> str:
    return f"{100 * x / ceiling:.1f}%" if ceiling and ceiling > 0 and x == x else "-"


# ---- the harness ------------------------------------------------------------------------------------

class Bench:
    def __init__(self, plan: Plan, device: torch.device, budget_s: float, skip_hf: bool) -> None:
        self.plan, self.device, self.skip_hf = plan, device, skip_hf
        self.deadline = time.perf_counter() + budget_s
        self.sections: list[Section] = []
        self.ceil_copy_gbs = float("nan")
        self.ceil_tflops = float("nan")
        self.prefill_s: dict[int, float] = {}
        self.engine = None
        self.tmp = tempfile.TemporaryDirectory(prefix="microserve-gpu-bench-")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timeit(self, fn: Callable[[], Any], iters: int | None = None, warmup: int = 2) -> float:
        """Seconds per call, averaged over `iters` back-to-back calls after `warmup` calls."""
        iters = iters or self.plan.iters
        for _ in range(warmup):
            fn()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / iters

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def run_section(self, title: str, columns: list[str], body: Callable[[Section], None],
                    min_left_s: float = 10.0) -> None:
        s = Section(title, columns)
        self.sections.append(s)
        if self.left() < min_left_s:
            s.notes.append(f"**skipped**: {self.left():.0f} s of the time budget left")
            return
        t0 = time.perf_counter()
        try:
            body(s)
        except Exception as e:  # one section failing must not cost the others
            s.notes.append(f"**error**: `{type(e).__name__}: {str(e)[:300]}`")
            traceback.print_exc()
        finally:
            s.seconds = time.perf_counter() - t0
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"[bench] {title}: {s.seconds:.1f} s, {self.left():.0f} s left", file=sys.stderr, flush=True)

    # ---- engine and synthetic batches ----------------------------------------------------------
    def build_engine(self) -> None:
        from microserve.config import EngineConfig
        from microserve.engine.engine import Engine
        model_dir = os.path.join(self.tmp.name, "model")
        os.makedirs(model_dir, exist_ok=True)
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(self.plan.model, f)
        cuda = self.device.type == "cuda"
        kv_mb = self.plan.kv_cache_mb
        if cuda:  # half the GPU at most: weights (16 GB for 8B), activations and HF's own cache need the rest
            kv_mb = min(kv_mb, torch.cuda.get_device_properties(self.device).total_memory // 2**21)
        cfg = EngineConfig(model=model_dir, load_format="dummy", dtype=self.plan.dtype, device=self.device.type,
                           page_size=16, kv_cache_memory_mb=kv_mb,
                           max_num_batched_tokens=max(8192, self.plan.prompt_len * max(self.plan.generate_batches)),
                           max_num_seqs=max(256, max(self.plan.generate_batches)),
                           enable_prefix_caching=False,  # sections below write pages directly
                           attention_backend="auto", kv_transport="cuda_ipc" if cuda else "shm")
        t0 = time.perf_counter()
        self.engine = Engine(cfg)
        self.sync()
        self.load_s = time.perf_counter() - t0
        self.model, self.pool = self.engine.model, self.engine.pool
        self.mc = self.engine.model_config

    @property
    def backend_name(self) -> str:
        be = self.model.layers[0].self_attn.backend
        fallback = getattr(be, "_warned", None)
        return be.name + (f" (fell back to torch: {'; '.join(sorted(fallback))})" if fallback else "")

    def weight_bytes(self) -> int:
        """Bytes of weights a decode step reads: every parameter once, but only B rows of the embedding."""
        seen, total = set(), 0
        for name, p in self.model.named_parameters():
            if p.data_ptr() in seen or name.startswith("embed_tokens"):
                continue
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
        return total

    def kv_bytes_per_token(self) -> int:
        return self.pool.bytes_per_token_layer * self.pool.num_layers

    def forward_fn(self, qlens: list[int], slens: list[int], first_page: int = 0, hook=None,
                   logits_rows: list[int] | None = None) -> Callable[[], torch.Tensor]:
        """A closure running the model on one synthetic flat batch (decodes first, by construction of
        the callers). Sequence i owns consecutive pages from `first_page` on:

            seq 0: pages [first, first + n0) | seq 1: [first + n0, ...) | ...
            token at position p of seq i -> slot = pages_i[p // page_size] * page_size + p % page_size
        """
        ps, dev = self.pool.page_size, self.device
        tables, slots, ids, pos, page = [], [], [], [], first_page
        for ql, sl in zip(qlens, slens):
            n = -(-sl // ps)
            tables.append(list(range(page, page + n)))
            page += n
            for p in range(sl - ql, sl):
                slots.append(tables[-1][p // ps] * ps + p % ps)
                pos.append(p)
        if page > self.pool.num_pages:
            raise RuntimeError(f"needs {page} KV pages, the pool has {self.pool.num_pages}")
        width = max(len(t) for t in tables)
        cu = [0]
        for ql in qlens:
            cu.append(cu[-1] + ql)
        nd = 0
        while nd < len(qlens) and qlens[nd] == 1:
            nd += 1
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=dev), query_start_loc=torch.tensor(cu, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(slens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            query_lens_cpu=list(qlens), seq_lens_cpu=list(slens), num_decodes=nd, page_size=ps)
        g = torch.Generator().manual_seed(len(slots))
        input_ids = torch.randint(0, self.mc.vocab_size, (len(slots),), generator=g).to(dev)
        positions = torch.tensor(pos, device=dev)
        rows = torch.tensor(logits_rows if logits_rows is not None else [c - 1 for c in cu[1:]], device=dev)
        ctx = ForwardContext(meta=meta, kv=self.pool.kv, layer_hook=hook)
        return lambda: self.model(input_ids, positions, ctx, rows)

    # ---- sections -------------------------------------------------------------------------------
    def ceilings(self, s: Section) -> None:
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        n = self.plan.copy_mb * 2**20 // torch.empty((), dtype=dtype).element_size()
        src = torch.randn(n, device=self.device).to(dtype) if self.device.type == "cpu" else \
            torch.empty(n, dtype=dtype, device=self.device).normal_()
        dst = torch.empty_like(src)
        t = self.timeit(lambda: dst.copy_(src), iters=max(self.plan.iters, 10))
        nbytes = src.numel() * src.element_size()
        self.ceil_copy_gbs = 2 * nbytes / t / 1e9
        s.rows.append(["device-to-device copy (read + write)", f"{nbytes / 2**20:.0f} MiB", self.ceil_copy_gbs, "GB/s"])
        del src, dst
        m = self.plan.matmul_n
        a = torch.randn(m, m, device=self.device).to(dtype)
        b = torch.randn(m, m, device=self.device).to(dtype)
        t = self.timeit(lambda: a @ b, iters=max(self.plan.iters, 10))
        self.ceil_tflops = 2 * m ** 3 / t / 1e12
        s.rows.append([f"{str(dtype).removeprefix('torch.')} matmul", f"{m}x{m}x{m}", self.ceil_tflops, "TFLOP/s"])

    def decode(self, s: Section) -> None:
        wb, kvb = self.weight_bytes(), self.kv_bytes_per_token()
        s.notes.append(f"Model forward only (no scheduler, no sampling), eager PyTorch, attention backend "
                       f"`{self.backend_name}`, no CUDA graphs. Bytes per step = weights ({wb / 1e6:,.1f} MB) + "
                       f"KV read (batch x context x {kvb / 1e3:.1f} kB).")
        for B in self.plan.decode_batches:
            if self.left() < 15:
                s.notes.append(f"batch {B}: skipped, out of time budget")
                continue
            ctx = self.plan.decode_ctx
            max_ctx = self.pool.num_pages // B * self.pool.page_size
            if ctx > max_ctx:
                ctx = max_ctx
                s.notes.append(f"batch {B}: context cut to {ctx} to fit the KV pool")
            fn = self.forward_fn([1] * B, [ctx] * B)
            t = self.timeit(fn, warmup=3)
            moved = wb + B * ctx * kvb
            gbs = moved / t / 1e9
            s.rows.append([B, ctx, t * 1e3, B / t, moved / 1e9, gbs, share(gbs, self.ceil_copy_gbs)])

    def flops_prefill(self, n: int) -> float:
        """Linear layers (2 per weight per token; lm_head for the one sampled row) + causal attention
        (QK^T and PV over the lower triangle: 2 * n^2 * head_dim per q head per layer)."""
        c = self.mc
        per_layer = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                     + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
        linear = 2 * n * per_layer * c.num_layers + 2 * c.hidden_size * c.vocab_size
        attn = 2 * n * n * c.head_dim * c.num_heads * c.num_layers
        return float(linear + attn)

    def prefill(self, s: Section) -> None:
        s.notes.append("One sequence, no cached prefix, model forward only; FLOPs = linear layers + causal attention.")
        for n in self.plan.prefill_lens:
            if self.left() < 15:
                s.notes.append(f"{n} tokens: skipped, out of time budget")
                continue
            t = self.timeit(self.forward_fn([n], [n]), iters=max(3, self.plan.iters // 2))
            self.prefill_s[n] = t
            tf = self.flops_prefill(n) / t / 1e12
            s.rows.append([n, t * 1e3, n / t, tf, share(tf, self.ceil_tflops)])

    def _scattered_dst(self, n: int, first_page: int, seed: int) -> list[int]:
        """Receiver slots for n tokens: whole pages in a shuffled order, as a receiver's free list gives."""
        ps = self.pool.page_size
        pages = list(range(first_page, first_page + -(-n // ps)))
        random.Random(seed).shuffle(pages)
        if first_page + len(pages) > self.pool.num_pages:
            raise RuntimeError("KV pool too small for the receiver side of the transfer")
        return [pages[p // ps] * ps + p % ps for p in range(n)]

    def transfer(self, s: Section) -> None:
        tr = self.engine.transport
        peer = tr.connect(tr.describe())
        L, ps = self.pool.num_layers, self.pool.page_size
        s.notes.append(f"Transport `{tr.name}` (one process: its own pool as the receiver). T_transfer = one layer's "
                       f"K+V rows ({self.pool.bytes_per_token_layer} B/token) written to shuffled receiver pages, "
                       "timed by the transport; T_layer = prefill time / layers. 'Prefill + send' runs the "
                       "per-layer hook like remote_send (write after each layer's store) and waits for the last byte.")
        for n in self.plan.transfer_lens:
            if self.left() < 15:
                s.notes.append(f"{n} tokens: skipped, out of time budget")
                continue
            recv_first = -(-n // ps) + 1
            src = list(range(n))  # the prefill's own slots: pages 0.. in order (see forward_fn)
            dst = self._scattered_dst(n, recv_first, n)
            tr.flush(60.0)
            for _ in range(2):  # warm-up (index uploads, allocator)
                for layer in range(L):
                    tr.write(layer, src, dst, peer)
                tr.flush(60.0)
            reps, total_s, nbytes = 3, 0.0, 0
            for _ in range(reps):
                for layer in range(L):
                    tr.write(layer, src, dst, peer)
                st = tr.flush(60.0)
                total_s += st.transfer_s
                nbytes += st.bytes
            t_transfer = total_s / reps / L
            plain = self.forward_fn([n], [n])

            def hook(layer: int) -> None:
                tr.write(layer, src, dst, peer)
            sending = self.forward_fn([n], [n], hook=hook)

            def prefill_and_send() -> None:
                sending()
                tr.flush(60.0)
            iters = max(3, self.plan.iters // 2)
            t_plain = self.timeit(plain, iters=iters)
            t_send = self.timeit(prefill_and_send, iters=iters)
            t_layer = t_plain / L
            gbs = nbytes / total_s / 1e9 if total_s > 0 else float("nan")
            s.rows.append([n, t_layer * 1e3, t_transfer * 1e3, gbs, t_transfer / t_layer, t_plain * 1e3,
                           t_send * 1e3, f"{100 * (t_send - t_plain) / t_plain:+.1f}%"])

    def migration(self, s: Section) -> None:
        tr = self.engine.transport
        peer = tr.connect(tr.describe())
        n, L, ps = self.plan.migration_len, self.pool.num_layers, self.pool.page_size
        src = list(range(n))
        dst = self._scattered_dst(n, -(-n // ps) + 1, 7)

        def migrate() -> None:  # what remote_send does for a cached window: every layer, page to page
            for layer in range(L):
                tr.write(layer, src, dst, peer)
            tr.flush(60.0)
        t_mig = self.timeit(migrate, iters=max(3, self.plan.iters // 2))
        t_re = self.prefill_s.get(n) or self.timeit(self.forward_fn([n], [n]), iters=max(3, self.plan.iters // 2))
        kv = n * self.kv_bytes_per_token()
        s.rows.append([n, kv / 1e6, t_mig * 1e3, t_re * 1e3, t_re / t_mig])
        s.notes.append("Migrate = write all layers' KV of the tokens into a receiver pool and wait for it; "
                       "recompute = prefill the same tokens. In one process (no NVLink or PCIe hop).")

    def generate(self, s: Section) -> None:
        from microserve.engine.sampling import SamplingParams
        P, N = self.plan.prompt_len, self.plan.new_tokens
        rng = random.Random(0)
        hf = None if self.skip_hf else self._hf_model(s)
        # warm-up both on a tiny request (kernel compiles, allocator)
        self._engine_generate([[rng.randrange(3, self.mc.vocab_size) for _ in range(P)]], 2, SamplingParams)
        if hf is not None:
            self._hf_generate(hf, [[5] * P], 2)
        for B in self.plan.generate_batches:
            if self.left() < 20:
                s.notes.append(f"batch {B}: skipped, out of time budget")
                continue
            prompts = [[rng.randrange(3, self.mc.vocab_size) for _ in range(P)] for _ in range(B)]
            t_eng, outs = self._engine_generate(prompts, N, SamplingParams)
            row = [B, P, N, t_eng, B * N / t_eng]
            if hf is not None:
                t_hf, hf_outs = self._hf_generate(hf, prompts, N)
                agree = sum(a[0] == b[0] for a, b in zip(outs, hf_outs))
                row += [t_hf, B * N / t_hf, t_hf / t_eng, f"{agree}/{B}"]
            else:
                row += [None, None, None, "-"]
            s.rows.append(row)
        s.notes.append("Wall time for all requests, prefill included; greedy, ignore_eos. Engine = add_request + "
                       "step() until done (scheduler, paged KV, sampler). HF = `generate` (eager, its default "
                       "attention and KV cache) on the same weights. 'first tokens agree': first generated token "
                       "equal per request (bf16 numerics may differ after that).")

    def _engine_generate(self, prompts: list[list[int]], n: int, SamplingParams) -> tuple[float, list[list[int]]]:
        eng = self.engine
        self.sync()
        t0 = time.perf_counter()
        rids = []
        for i, p in enumerate(prompts):
            rid = f"gen-{time.monotonic_ns()}-{i}"
            eng.add_request(rid, p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            rids.append(rid)
        outs: dict[str, list[int]] = {r: [] for r in rids}
        while eng.has_work():
            for o in eng.step():
                outs[o.rid].extend(o.new_token_ids)
        self.sync()
        return time.perf_counter() - t0, [outs[r] for r in rids]

    def _hf_model(self, s: Section):
        """transformers' LlamaForCausalLM sharing our weights (views, no second copy)."""
        try:
            import transformers
        except ImportError:
            s.notes.append("transformers is not installed: HF columns left empty")
            return None
        cfg = dict(self.plan.model)
        hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
        with torch.device("meta"):
            hf = transformers.LlamaForCausalLM(hf_cfg)
        sd = {}
        c = self.mc
        for name, p in self.model.named_parameters():
            hf_name = name if name.startswith("lm_head") else f"model.{name}"
            if ".qkv_proj." in name:
                q, k, v = p.data.split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                                        c.num_kv_heads * c.head_dim])
                for part, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    sd[hf_name.replace("qkv_proj", part)] = t
            elif ".gate_up_proj." in name:
                gate, up = p.data.chunk(2)
                sd[hf_name.replace("gate_up_proj", "gate_proj")] = gate
                sd[hf_name.replace("gate_up_proj", "up_proj")] = up
            else:
                sd[hf_name] = p.data
        missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
        if unexpected or [m for m in missing if "rotary" not in m]:
            raise RuntimeError(f"weight names do not map onto transformers': missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        try:
            rotary = LlamaRotaryEmbedding(config=hf_cfg, device=self.device)
        except TypeError:  # transformers 5: no device argument
            rotary = LlamaRotaryEmbedding(config=hf_cfg)
        hf.model.rotary_emb = rotary.to(self.device)
        left = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"transformers model still has meta tensors: {left[:3]}")
        hf.eval()
        self.hf_version = transformers.__version__
        return hf

    def _hf_generate(self, hf, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
        ids = torch.tensor(prompts, device=self.device)
        self.sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)
        self.sync()
        return time.perf_counter() - t0, out[:, ids.shape[1]:].tolist()

    # ---- the run --------------------------------------------------------------------------------
    def run(self) -> str:
        t0 = time.perf_counter()
        self.build_engine()
        self.run_section("Device ceilings", ["measure", "size", "value", "unit"], self.ceilings)
        self.run_section("Decode (model forward per step)",
                         ["batch", "context", "step ms", "tokens/s", "GB moved/step", "achieved GB/s",
                          "share of copy ceiling"], self.decode)
        self.run_section("Prefill", ["tokens", "ms", "tokens/s", "TFLOP/s", "share of matmul peak"], self.prefill)
        self.run_section("Per-layer compute vs KV transfer (overlap)",
                         ["tokens", "T_layer ms", "T_transfer ms/layer", "transfer GB/s", "T_transfer/T_layer",
                          "prefill ms", "prefill + send ms", "send overhead"], self.transfer)
        self.run_section("Migration vs recompute",
                         ["tokens", "KV MB", "migrate ms", "recompute ms", "recompute / migrate"], self.migration)
        self.run_section("Engine vs HF transformers generate",
                         ["batch", "prompt", "new tokens", "engine s", "engine tok/s", "HF s", "HF tok/s",
                          "engine speedup", "first tokens agree"], self.generate, min_left_s=30)
        m = machine()
        dev = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else \
            f"CPU ({m['cpu']}, {torch.get_num_threads()} threads)"
        try:
            import triton
            triton_v = triton.__version__
        except ImportError:
            triton_v = "not installed"
        header = {
            "device": dev,
            "run": f"`{command_line()}`; {machine_line(m)}",
            "model": (f"{self.mc.architecture}, {self.mc.num_layers} layers, hidden {self.mc.hidden_size}, "
                      f"{self.mc.num_heads}/{self.mc.num_kv_heads} q/kv heads, head_dim {self.mc.head_dim}, "
                      f"dummy {self.plan.dtype} weights" + (" (Llama-3.1-8B shape)" if self.plan.model is LLAMA_31_8B
                                                           else " (tiny dry-run config)")),
            "attention backend": self.backend_name,
            "KV pool": f"{self.pool.num_pages} pages x {self.pool.page_size} tokens, "
                       f"{self.kv_bytes_per_token() / 1e3:.1f} kB/token, transport {self.engine.transport.name}",
            "versions": f"torch {torch.__version__}, triton {triton_v}, transformers "
                        f"{getattr(self, 'hf_version', 'n/a')}, python {m['python']}",
            "model load": f"{self.load_s:.1f} s",
            "total time": f"{time.perf_counter() - t0:.1f} s",
        }
        self.engine.close()
        return render(self.sections, header)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny config on CPU (automatic without CUDA)")
    ap.add_argument("--out", default=None, help="write the markdown report here (also printed); "
                                                "default $OUT/gpu_bench.md when $OUT is set")
    ap.add_argument("--json", default=None, help="also write the sections as JSON here")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting sections after this many seconds")
    ap.add_argument("--skip-hf", action="store_true", help="leave out the transformers comparison")
    a = ap.parse_args(argv)
    dry = a.dry_run or not torch.cuda.is_available()
    if dry and not a.dry_run:
        print("[bench] no CUDA: running the dry run (tiny config on CPU)", file=sys.stderr)
    plan = DRY_PLAN if dry else GPU_PLAN
    device = torch.device("cpu" if dry else "cuda")
    bench = Bench(plan, device, a.budget_s, a.skip_hf)
    report = bench.run()
    print(report)
    out = a.out or (os.path.join(os.environ["OUT"], "gpu_bench.md") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(report)
    if a.json or os.environ.get("OUT"):
        path = a.json or os.path.join(os.environ["OUT"], "gpu_bench.json")
        Path(path).write_text(json.dumps([{"title": s.title, "columns": s.columns, "rows": s.rows, "notes": s.notes,
                                           "seconds": s.seconds} for s in bench.sections], indent=1, default=str))
    failed = [s.title for s in bench.sections if any(n.startswith("**error**") for n in s.notes)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
