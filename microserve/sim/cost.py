"""Cost models of a simulated engine: what one engine step and one KV transfer take.

Every model answers one question, `cost(shape) -> seconds`, for the batch the real scheduler
picked (`StepShape`: prefill chunk tokens, decode rows, the contexts they attend to, rows sampled).
Three kinds ship:

- `LinearCostModel` ("measured"): a linear fit over the shape's features, made by
  `microserve sim calibrate` from the real engine's step timings on this machine (sim/calibrate.py),
  stored as JSON.
- `RooflineModel` ("analytic"): per GPU of a TP group, the bytes of weights, KV and activations
  over HBM bandwidth and the FLOPs over the tensor-core peak, each with an efficiency factor, the
  larger of the two, plus two all-reduces per layer over NVLink and a fixed step overhead.
- `fit_gpu_bench` ("from GPU measurements"): a roofline whose effective bandwidth, FLOP rate and
  overhead are fitted to benchmarks/gpu/run.py's JSON (decode and prefill sections).

`LinkModel` is the KV transfer between two engines: bandwidth, latency, and how much of the
transfer overlaps the sender's compute (`exposed`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

# what a step computes: defined by the engine, which records it (--step-trace); re-exported here
from microserve.engine.step_trace import StepShape, batch_shape  # noqa: F401


class StepCostModel:
    """The interface: `cost(shape)` seconds for one step; `num_layers` for layer-wise overlap;
    `slowdown` for engines that share a host's cores with each other's router and client."""
    kind = "base"
    num_layers: int = 1

    def cost(self, shape: StepShape) -> float:
        raise NotImplementedError

    def slowdown(self, others_decoding: float, others_prefilling: float) -> float:
        """The factor on `cost` while this share of the engines on the same host (0-1) is in a step
        with decode rows, or in a prefill-only step. 1 here: a GPU's step does not slow down
        because another GPU works."""
        return 1.0

    def step_time(self, prefill_tokens: int = 0, decode_batch: int = 0, context_tokens: int = 0) -> float:
        """Seconds of a step with one fresh prefill of `prefill_tokens` and `decode_batch` decodes
        of mean context `context_tokens` (the brief's interface; `cost` takes any shape)."""
        return self.cost(StepShape.of(prefill_tokens, decode_batch, context_tokens))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


# ---- measured: a linear model ------------------------------------------------------------------------
FEATURES = ("const", "prefill_tokens", "prefill_attn", "prefill_seqs", "decode_batch", "decode_context", "sampled")


def features(s: StepShape) -> list[float]:
    return [1.0, s.prefill_tokens, s.prefill_attn, s.prefill_seqs, s.decode_batch, s.decode_context, s.sampled]


@dataclass
class LinearCostModel(StepCostModel):
    """seconds = sum(coef[f] * feature f) over FEATURES ("const" is 1): fitted by sim/calibrate.py.
    Loaded from the calibration JSON; extra keys (model, engine flags, machine, fit quality, the
    measured KV link) ride along in `meta`.

    `interference` ({"decode": g_d, "prefill": g_p}, from `sim calibrate --served`): a step lasts
    (1 + g_d * others_decoding + g_p * others_prefilling) times `cost`. On a CPU host the engines'
    cores are also where the router, the client and the kernel's loopback traffic run: with a core
    idle they run there, with every core in a step they take time from the steps (measured on
    the Zen 4: a batch-1 decode ~20 ms alone, ~23 ms while the other engine decodes)."""
    coef: dict[str, float]
    num_layers: int = 1
    meta: dict[str, Any] = field(default_factory=dict)
    interference: dict[str, float] = field(default_factory=dict)
    kind = "measured"

    def slowdown(self, others_decoding: float, others_prefilling: float) -> float:
        g = self.interference
        return 1.0 + g.get("decode", 0.0) * others_decoding + g.get("prefill", 0.0) * others_prefilling

    def cost(self, s: StepShape) -> float:
        c = self.coef
        return max(0.0, c.get("const", 0.0) + c.get("prefill_tokens", 0.0) * s.prefill_tokens
                   + c.get("prefill_attn", 0.0) * s.prefill_attn + c.get("prefill_seqs", 0.0) * s.prefill_seqs
                   + c.get("decode_batch", 0.0) * s.decode_batch + c.get("decode_context", 0.0) * s.decode_context
                   + c.get("sampled", 0.0) * s.sampled)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "linear", "version": 1, "coef": self.coef, "num_layers": self.num_layers,
                **({"interference": self.interference} if self.interference else {}), **self.meta}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "LinearCostModel":
        if doc.get("kind") != "linear":
            raise ValueError(f"not a linear cost model (kind {doc.get('kind')!r})")
        unknown = set(doc["coef"]) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown cost features {sorted(unknown)}; known: {', '.join(FEATURES)}")
        meta = {k: v for k, v in doc.items() if k not in ("kind", "version", "coef", "num_layers", "interference")}
        inter = {k: float(v) for k, v in (doc.get("interference") or {}).items()}
        if set(inter) - {"decode", "prefill"}:
            raise ValueError(f"unknown interference terms {sorted(set(inter) - {'decode', 'prefill'})}; known: decode, prefill")
        return cls({k: float(v) for k, v in doc["coef"].items()}, int(doc.get("num_layers", 1)), meta, inter)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "coef": self.coef, "num_layers": self.num_layers, "interference": self.interference,
                **{k: self.meta[k] for k in ("model_name", "source", "machine", "fit", "created") if k in self.meta}}


def nnls(a, b, weights=None):
    """Non-negative least squares (drop-and-refit: coefficients that come out negative are fixed at
    0 and the rest refitted, until none is negative). Small problems only; returns a numpy vector."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if weights is not None:
        w = np.sqrt(np.asarray(weights, dtype=np.float64))
        a, b = a * w[:, None], b * w
    active = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (sol >= 0).all():
            x[:] = 0
            x[active] = sol
            break
        active = [i for i, v in zip(active, sol) if v > 0]
    return x


# ---- analytic: the GPU roofline ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A Llama-family model's shape and number formats (bytes per weight, per KV element)."""
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    weight_bytes: float = 2.0  # linear layers
    embed_bytes: float = 2.0  # embedding and lm_head (FP8 checkpoints keep them in bf16)
    kv_bytes: float = 2.0
    max_position: int = 131072

    @property
    def layer_params(self) -> int:
        h, hd = self.hidden, self.head_dim
        return h * self.heads * hd + 2 * h * self.kv_heads * hd + self.heads * hd * h + 3 * h * self.intermediate

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden

    @property
    def weight_bytes_total(self) -> float:
        """Bytes a decode step reads: every linear layer and the lm_head (the embedding only by row)."""
        return self.layers * self.layer_params * self.weight_bytes + self.vocab * self.hidden * self.embed_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.kv_heads * self.head_dim * self.kv_bytes * self.layers

    def hf_config(self) -> dict[str, Any]:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab,
                "hidden_size": self.hidden, "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
                "max_position_embeddings": self.max_position}

    @classmethod
    def from_hf(cls, name: str, cfg: dict[str, Any], weight_bytes: float = 2.0, kv_bytes: float = 2.0) -> "ModelSpec":
        heads = cfg["num_attention_heads"]
        return cls(name, cfg["num_hidden_layers"], cfg["hidden_size"], heads, cfg.get("num_key_value_heads", heads),
                   cfg.get("head_dim") or cfg["hidden_size"] // heads, cfg["intermediate_size"], cfg["vocab_size"],
                   weight_bytes, weight_bytes, kv_bytes, cfg.get("max_position_embeddings", 4096))


@dataclass(frozen=True)
class GPUSpec:
    """Datasheet figures of one GPU (bytes/s, FLOP/s, bytes); see ../shared/notes/sim.md."""
    name: str
    hbm_bw: float
    bf16_flops: float
    fp8_flops: float
    memory: float
    nvlink_bw: float  # per direction, per GPU

    def peak_flops(self, weight_bytes: float) -> float:
        return self.fp8_flops if weight_bytes <= 1 else self.bf16_flops


@dataclass
class RooflineModel(StepCostModel):
    """Per GPU of a TP group (weights, KV heads and FLOPs split tp ways):

        bytes  = weights + KV read (decode contexts, prefill prefixes) + KV written + activations
        flops  = 2 * linear params * tokens + 2 * lm_head * sampled + 4 * layers * q width * query-key pairs
        time   = max(bytes / (eta_mem * HBM), flops / (eta_mm * peak))
                 + 2 * layers * (allreduce_latency + tokens * hidden * 2 B * 2 (tp-1)/tp / NVLink)   (tp > 1)
                 + overhead_s

    eta_mem, eta_mm, overhead_s and allreduce_latency_s are guesses until a GPU run fits them
    (`fit_gpu_bench`); act_bytes_per_token_layer counts activation traffic per token and layer in
    units of hidden * 2 bytes (reads and writes of the residual stream, norms, MLP intermediates)."""
    model: ModelSpec
    gpu: GPUSpec
    tp: int = 1
    eta_mem: float = 0.8
    eta_mm: float = 0.6
    overhead_s: float = 1.0e-3
    allreduce_latency_s: float = 10e-6
    act_factor: float = 12.0
    source: str = "analytic"
    kind = "roofline"

    @property
    def num_layers(self) -> int:  # type: ignore[override]
        return self.model.layers

    def parts(self, s: StepShape) -> dict[str, float]:
        m, tp = self.model, self.tp
        tokens = s.tokens
        kvt = m.kv_bytes_per_token
        act = tokens * m.layers * (self.act_factor * m.hidden + 3 * m.intermediate) * 2
        mem = (m.weight_bytes_total + (s.decode_context + s.prefill_context) * kvt + tokens * kvt + act) / tp
        flops = (2 * m.layers * m.layer_params * tokens + 2 * m.vocab * m.hidden * s.sampled
                 + 4 * m.layers * m.heads * m.head_dim * (s.decode_context + s.prefill_attn)) / tp
        t_mem = mem / (self.eta_mem * self.gpu.hbm_bw)
        t_mm = flops / (self.eta_mm * self.gpu.peak_flops(m.weight_bytes))
        comm = 0.0
        if tp > 1 and tokens:
            comm = 2 * m.layers * (self.allreduce_latency_s
                                   + tokens * m.hidden * 2 * 2 * (tp - 1) / tp / self.gpu.nvlink_bw)
        return {"bytes": mem, "flops": flops, "t_mem": t_mem, "t_mm": t_mm, "t_comm": comm}

    def cost(self, s: StepShape) -> float:
        if s.tokens == 0:
            return 0.0
        p = self.parts(s)
        return max(p["t_mem"], p["t_mm"]) + p["t_comm"] + self.overhead_s

    def kv_capacity_bytes(self, memory_utilization: float = 0.9, activation_reserve: float = 2e9) -> float:
        """KV pool bytes of the whole TP group: what the weights and an activation reserve leave
        of each GPU's allowed share."""
        per_gpu = self.gpu.memory * memory_utilization - self.model.weight_bytes_total / self.tp - activation_reserve
        if per_gpu <= 0:
            raise ValueError(f"{self.model.name} does not fit {self.tp} x {self.gpu.name} "
                             f"({self.model.weight_bytes_total / self.tp / 1e9:.1f} GB of weights per GPU)")
        return per_gpu * self.tp

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "model": self.model.name, "gpu": asdict(self.gpu),
                "tp": self.tp, "eta_mem": self.eta_mem, "eta_mm": self.eta_mm, "overhead_s": self.overhead_s,
                "allreduce_latency_s": self.allreduce_latency_s, "act_factor": self.act_factor}


# ---- from GPU measurements: benchmarks/gpu/run.py's JSON -------------------------------------------
def _section(doc: list[dict], prefix: str) -> dict | None:
    return next((s for s in doc if str(s.get("title", "")).startswith(prefix)), None)


def fit_gpu_bench(doc: list[dict] | str, gpu: GPUSpec, measured_model: ModelSpec) -> dict[str, float]:
    """Effective HBM bandwidth, FLOP rate and step overhead of one GPU, fitted to the JSON that
    benchmarks/gpu/run.py writes (`--json` or $OUT/gpu_bench.json: a list of sections with
    title, columns, rows). Decode rows give (GB moved per step, step ms): ms = overhead + bytes / BW;
    prefill rows give (FLOPs, ms): ms = overhead' + flops / F. Returns
    {"hbm_bw", "flops", "overhead_s", "prefill_overhead_s", "copy_gbs", "matmul_tflops", "points"}.

    UNTESTED against real GPU data: no GPU run existed when this was written; it is checked on the
    run.py --dry-run output (same format, CPU numbers) and on synthetic sections only. The decode
    section times the eager model forward (no CUDA graphs), so its overhead is an upper bound."""
    import numpy as np

    if isinstance(doc, str):
        with open(doc) as f:
            doc = json.load(f)
    dec, pre = _section(doc, "Decode"), _section(doc, "Prefill")
    if not dec or not dec.get("rows") or not pre or not pre.get("rows"):
        raise ValueError("the GPU benchmark JSON has no decode or prefill rows (did those sections fail?)")
    # decode: [batch, context, step ms, tokens/s, GB moved/step, achieved GB/s, share]
    d = np.array([[float(r[4]) * 1e9, float(r[2]) / 1e3] for r in dec["rows"]])
    # prefill: [tokens, ms, tokens/s, TFLOP/s, share]: flops = TFLOP/s * s
    p = np.array([[float(r[3]) * 1e12 * float(r[1]) / 1e3, float(r[1]) / 1e3] for r in pre["rows"]])
    od, inv_bw = nnls(np.c_[np.ones(len(d)), d[:, 0]], d[:, 1])
    op, inv_f = nnls(np.c_[np.ones(len(p)), p[:, 0]], p[:, 1])
    bw = 1 / inv_bw if inv_bw > 0 else float(np.median(d[:, 0] / d[:, 1]))
    fl = 1 / inv_f if inv_f > 0 else float(np.median(p[:, 0] / p[:, 1]))
    out = {"hbm_bw": bw, "flops": fl, "overhead_s": float(od), "prefill_overhead_s": float(op),
           "points": len(d) + len(p), "copy_gbs": math.nan, "matmul_tflops": math.nan}
    ceil = _section(doc, "Device ceilings")
    for r in (ceil or {}).get("rows", []):
        if str(r[0]).startswith("device-to-device"):
            out["copy_gbs"] = float(r[2])
        elif "matmul" in str(r[0]):
            out["matmul_tflops"] = float(r[2])
    return out


def roofline_from_gpu_bench(path: str, model: ModelSpec, gpu: GPUSpec, tp: int = 1,
                            measured_model: ModelSpec | None = None, **kw) -> RooflineModel:
    """A RooflineModel for `model` on `tp` x `gpu` whose bandwidth, FLOP rate and overhead come
    from a benchmarks/gpu/run.py JSON (efficiencies 1: the fitted rates are what was achieved).
    The fitted FLOP rate is bf16 (run.py runs bf16); for FP8 weights it is scaled by the
    datasheet's FP8 / bf16 ratio."""
    fit = fit_gpu_bench(path, gpu, measured_model or model)
    fp8_scale = gpu.fp8_flops / gpu.bf16_flops
    g = replace(gpu, name=f"{gpu.name} (fitted to {path})", hbm_bw=fit["hbm_bw"], bf16_flops=fit["flops"],
                fp8_flops=fit["flops"] * fp8_scale)
    return RooflineModel(model, g, tp, eta_mem=1.0, eta_mm=1.0, overhead_s=fit["overhead_s"],
                         source=f"gpu-bench:{path} (untested against real GPU data)", **kw)


# ---- KV links ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkModel:
    """KV transfer from one engine to another.

    bandwidth: bytes/s of the engine pair (per-GPU link x TP: each GPU sends its own KV heads);
    latency_s: once per step that sends; overlap: 1 = a transfer engine (copy engine, NIC) moves
    layer l while layer l+1 computes, as the reference does; 0 = copies take the sender's own
    compute time (e.g. one CPU core doing both)."""
    name: str
    bandwidth: float
    latency_s: float = 10e-6
    overlap: float = 1.0

    def exposed(self, compute_s: float, layers: int, layer_bytes: float, cached_bytes: float = 0.0) -> tuple[float, float]:
        """(transfer seconds, seconds the step is extended by) for a step of `compute_s` that sends
        `layer_bytes` layer by layer as it computes (each layer's share right after that layer)
        and `cached_bytes` of already-computed KV queued at the start.

        Pipeline, per-layer compute c = compute_s / L and per-layer transfer x: a layer's write
        starts when the layer is done and the link is free, so the last byte lands at
        max(max(t_cached, c) + L x, compute_s + x) (+ latency). What exceeds compute_s is exposed."""
        total = (layer_bytes + cached_bytes) / self.bandwidth
        if total == 0:
            return 0.0, 0.0
        L = max(layers, 1)
        c, x, tc = compute_s / L, layer_bytes / self.bandwidth / L, cached_bytes / self.bandwidth
        if layer_bytes:
            finish = max(max(tc, c) + L * x, compute_s + x)
        else:
            finish = max(tc, compute_s)
        pipelined = max(0.0, finish + self.latency_s - compute_s)
        serial = total + self.latency_s
        return total, self.overlap * pipelined + (1 - self.overlap) * serial

    def describe(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
