"""Named models, GPUs, KV links and clusters for `microserve sim`.

Figures come from ../shared/notes/sim.md (datasheets and this workplace's measurements). The
efficiency factors of the roofline are guesses until a GPU run fits them (cost.fit_gpu_bench).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from microserve.bench.presets import MINIATURE_MODEL, Workload
from microserve.sim.cost import GPUSpec, LinkModel, ModelSpec

MIB = 2**20

MODELS: dict[str, ModelSpec] = {
    "llama-3.1-8b": ModelSpec("Llama-3.1-8B (bf16)", layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128,
                              intermediate=14336, vocab=128256, weight_bytes=2, embed_bytes=2, kv_bytes=2),
    "llama-3.1-70b-fp8": ModelSpec("Llama-3.1-70B (FP8 weights, bf16 KV)", layers=80, hidden=8192, heads=64,
                                   kv_heads=8, head_dim=128, intermediate=28672, vocab=128256, weight_bytes=1,
                                   embed_bytes=2, kv_bytes=2),
    "llama-3.1-70b": ModelSpec("Llama-3.1-70B (bf16)", layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128,
                               intermediate=28672, vocab=128256, weight_bytes=2, embed_bytes=2, kv_bytes=2),
    # the CPU miniature (bench/presets.py), served in bf16
    "miniature": ModelSpec.from_hf("miniature (95M, bf16)", MINIATURE_MODEL, weight_bytes=2, kv_bytes=2),
}

GPUS: dict[str, GPUSpec] = {
    # datasheet HBM3 3.35 TB/s (measured copy ~3.0), dense bf16 989 / FP8 1979 TFLOP/s, NVLink 4 900 GB/s both ways
    "h100": GPUSpec("H100 SXM 80GB", hbm_bw=3.35e12, bf16_flops=989e12, fp8_flops=1979e12, memory=81559 * MIB,
                    nvlink_bw=450e9),
    "h200": GPUSpec("H200 141GB", hbm_bw=4.8e12, bf16_flops=989e12, fp8_flops=1979e12, memory=143771 * MIB,
                    nvlink_bw=450e9),
}

# Per-GPU bandwidth (bytes/s, one direction, ~80-90% of the datasheet); an engine of TP t sends over
# t of them at once (ClusterSpec.link_for).
LINKS: dict[str, LinkModel] = {
    "nvlink": LinkModel("NVLink 4 (intra-node), 360 GB/s per GPU", bandwidth=360e9, latency_s=10e-6, overlap=1.0),
    "ib-ndr": LinkModel("InfiniBand NDR 400 Gb/s, one port per GPU, 45 GB/s", bandwidth=45e9, latency_s=15e-6,
                        overlap=1.0),
    # what the paper's seed figures imply (4 MiB per layer in 0.197 ms: ~21-24 GB/s); see notes/sim.md
    "paper-seed": LinkModel("the paper's measured per-layer transfer rate, ~22 GB/s", bandwidth=22e9,
                            latency_s=10e-6, overlap=1.0),
    # shared memory on one CPU host: a memcpy per run of slots on a transport thread (replace with a
    # measured figure: `microserve sim calibrate` records one)
    "shm": LinkModel("shared memory (CPU memcpy), 4 GB/s", bandwidth=4e9, latency_s=20e-6, overlap=0.5),
}


@dataclass(frozen=True)
class ClusterPreset:
    """A simulated cluster and its default workload and rates (`microserve sim --preset`)."""
    name: str
    model: str  # a MODELS key
    gpu: str | None  # a GPUS key; None: the cost model is measured (calibration JSON)
    tp: int = 1
    engines: int = 2
    link: str = "nvlink"
    gpus_per_node: int = 8
    max_num_batched_tokens: int = 4096
    max_num_seqs: int = 256
    page_size: int = 16
    max_model_len: int | None = None
    num_pages: int | None = None  # None: from the GPU memory (roofline) or 256 MiB (CPU)
    workload: Workload = field(default_factory=Workload)
    rates: tuple[float, ...] = ()
    num_prompts: int = 100
    doc: str = ""


LONG = Workload("random", input_len=3000, output_len=100, range_ratio=5 / 3000)

PRESETS: dict[str, ClusterPreset] = {p.name: p for p in (
    ClusterPreset("paper-70b", "llama-3.1-70b-fp8", "h100", tp=4, engines=2, link="nvlink", workload=LONG,
                  rates=(1.6, 2.4, 3.2, 4.0, 4.8, 5.6), num_prompts=800,
                  doc="the MLC blog's: Llama-3.1-70B FP8 on 8 x H100 as 2 x TP4 (DP, or 1P1D); 3000+-5 in, "
                      "100 out; 1.6-5.6 req/s; 100 requests per GPU"),
    ClusterPreset("paper-8b", "llama-3.1-8b", "h100", tp=1, engines=2, link="nvlink", workload=LONG,
                  rates=(2, 4, 6, 8, 10, 12), num_prompts=400,
                  doc="the seed's long-input setup on Llama-3.1-8B bf16: 2 x H100 (DP, or 1P1D); 3000 in, 100 out"),
    ClusterPreset("paper-70b-h200", "llama-3.1-70b-fp8", "h200", tp=4, engines=2, link="nvlink", workload=LONG,
                  rates=(1.6, 2.4, 3.2, 4.0, 4.8, 5.6), num_prompts=800, doc="paper-70b on H200s"),
    ClusterPreset("miniature", "miniature", None, tp=1, engines=2, link="shm", gpus_per_node=64,
                  max_num_batched_tokens=2048, max_num_seqs=128, max_model_len=1024,
                  workload=Workload("random", input_len=640, output_len=100, range_ratio=0.015),
                  rates=(0.5, 1.0, 1.5, 2.0), num_prompts=40,
                  doc="the CPU miniature (bench/presets.py): 2 engines of one core each; needs a measured cost "
                      "model (`microserve sim calibrate`)"),
)}
