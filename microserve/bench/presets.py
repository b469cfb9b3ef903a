"""Named cluster presets for `microserve bench sweep`.

A preset fixes what a sweep brings up (model, engine count, engine flags, core pinning) and the
workload it sends, so a result names one reproducible setting. `miniature` is the paper's
experiment shrunk onto a CPU: two engines, one core and one torch thread each, dummy weights of a
Llama-architecture config. How its size and lengths were chosen is in docs/benchmarks_paper.md;
the probe used for it (decode step time by batch, prefill tokens/s) is `sim.calibrate.measure_engine`,
with the simulator's step timing: this module, like the rest of bench/, is a client and never loads
the engine or torch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Workload:
    """A benchmark workload in `microserve bench` terms (see `bench.cli.build_requests`).

    dataset: "random" | "sharegpt" | "prefix". input_len/output_len/range_ratio apply to random;
    prefix_* to prefix; sharegpt_max_* to sharegpt. Sampling is the paper's unless overridden.
    """
    dataset: str = "random"
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    prefix_num_groups: int = 4
    prefix_len: int = 512
    prefix_question_len: int = 32
    prefix_output_len: int = 32
    sharegpt_max_prompt_len: int = 1024
    sharegpt_max_total_len: int = 2048
    input_scale: float = 1.0  # sharegpt: lengths are multiplied by these (at least 1 token)
    output_scale: float = 1.0
    temperature: float = 0.6
    top_p: float | None = 0.9
    ignore_eos: bool = True


@dataclass(frozen=True)
class Preset:
    """A cluster and its default workloads.

    model: a model directory, "embedded", or a dict (a Hugging Face config.json body) that
    `model_dir` writes out once under the microserve cache and serves with dummy weights.
    engine_args: flags passed to every engine (as `microserve up` passes unknown flags).
    workloads: named workloads ("long", "sharegpt", "prefix").
    """
    name: str
    model: str | dict[str, Any]
    engines: int = 2
    pin_cores: bool = True
    engine_args: tuple[str, ...] = ()
    workloads: dict[str, Workload] = field(default_factory=dict)
    doc: str = ""


# The miniature's model: Llama-3 architecture (SwiGLU 3.5x, head_dim 128, GQA, rope 500000), 8 layers
# of hidden 1024 -> 95M parameters, 182 MiB in bf16: 6x the 32 MiB L3 of the machine it was sized
# on (12x with both engines' weights), so every decode step streams the weights from DRAM.
# - bf16, not fp32: this CPU has AVX512-BF16; bf16 prefill is ~4x faster than fp32 and bf16 GEMMs
#   of 16 rows cost ~1.7x one row (fp32: ~4x), so batching decode stays cheap.
# - 2 query heads (attention width 256, not 1024): the engine's CPU decode attention (masked SDPA
#   in bf16) costs ~0.12 ms per head per 640-token context per layer, which with Llama's 8 heads
#   made a batch-16 step 4.8x a batch-1 step; the paper's regime has batching nearly free.
#   (71e451c later made that path ~4x faster; the preset was kept as chosen, before any results.)
# - vocab 512: prompts are token ids, and a 128k-entry head would add decode cost the 70B model
#   (1.5% of its weights) does not have.
MINIATURE_MODEL: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 1024,
    "intermediate_size": 3584, "num_hidden_layers": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
    "head_dim": 128, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}

PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


def model_dir(model: str | dict[str, Any], name: str) -> str:
    """A servable model path: strings are returned as is; a config dict is written (once, atomically)
    to $MICROSERVE_CACHE/preset-<name>-<hash>/config.json. Such a directory has no weights and no
    tokenizer: serve it with --load-format dummy and send token-id prompts."""
    if isinstance(model, str):
        return model
    import hashlib
    body = json.dumps(model, sort_keys=True)
    root = os.environ.get("MICROSERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "microserve"))
    path = os.path.join(root, f"preset-{name}-{hashlib.sha1(body.encode()).hexdigest()[:10]}")
    if not os.path.exists(os.path.join(path, "config.json")):
        tmp = f"{path}.tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(body)
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race; its copy is identical
            pass
    return path


# Model shapes served with dummy weights (model_dir writes the config; --load-format dummy).
# llama-0.5b: a realistic CPU-serving shape: Llama architecture, 0.53B parameters (24 layers of
# 1024, GQA 16/8 heads of 64, MLP 6144); the vocabulary is stories260K's tokenizer's (512), so both
# microserve and vLLM can serve it with that tokenizer, and nearly all weights are in the layers.
DUMMY_SHAPES: dict[str, dict[str, Any]] = {"llama-0.5b": {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 1024,
    "intermediate_size": 6144, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 64, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}}


# Sized by the ratio rule (docs/benchmarks_paper.md): on one core, T_prefill(640 tokens) is about
# 1/6 of T_decode(100 tokens) at batch 1, the paper's 0.15-0.2 s : ~1 s for 3000 in / 100 out on
# Llama-3.1-70B FP8 TP4. The paper's 30:1 token ratio cannot hold at the same time on a CPU (a core
# has ~20 flops per byte of DRAM bandwidth, an H100 ~600), so the input is 640, not 3000.
MINIATURE = register(Preset(
    name="miniature", model=MINIATURE_MODEL, engines=2, pin_cores=True,
    engine_args=("--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "1024"),
    workloads={
        # the paper's long-input workload, scaled: 3000 +- 5 in / 100 +- 5 out -> 640 / 100, +-1.5%
        "long": Workload("random", input_len=640, output_len=100, range_ratio=0.015),
        # ShareGPT first turns; lengths scaled like the long workload's (input x 640/3000, and both
        # by 1/3 more to fit the time budget), so prefill:decode time keeps ShareGPT's proportions
        "sharegpt": Workload("sharegpt", input_scale=640 / 3000 / 3, output_scale=1 / 3,
                             sharegpt_max_prompt_len=1024, sharegpt_max_total_len=2048),
        # LooGLE-like: 4 long documents, distinct questions on each, for cache-aware PD and migration
        "prefix": Workload("prefix", prefix_num_groups=4, prefix_len=576, prefix_question_len=64,
                           prefix_output_len=100, range_ratio=0.015),
    },
    doc="2 engines, one core + one thread each, dummy bf16 weights of a 95M-parameter Llama-3-style "
        "config (hidden 1024, 8 layers, 2 query heads); workloads long (640/100), sharegpt (scaled), prefix (4 x 576-token documents)."))
