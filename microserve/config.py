"""Configuration: what the model is (ModelConfig) and how the engine runs it (EngineConfig)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass
class ModelConfig:
    """The subset of a Hugging Face `config.json` the Llama family needs.

    One definition covers Llama (incl. llama3 rope scaling, tied embeddings), Mistral and Qwen2
    (bias on q/k/v only). `from_hf` accepts both transformers 4 (`rope_theta`, `rope_scaling`) and
    transformers 5 (`rope_parameters`) spellings.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None) -> "ModelConfig":
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        rope = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise ValueError(f"unsupported rope scaling {kind!r} (supported: llama3)")
            scaling = None if kind == "default" else dict(scaling)
        heads = cfg["num_attention_heads"]
        qwen = arch == "Qwen2ForCausalLM"
        eos: list[int] = []
        for source in (cfg, generation_config or {}):
            ids = source.get("eos_token_id")
            ids = ids if isinstance(ids, list) else ([] if ids is None else [ids])
            eos += [i for i in ids if i not in eos]
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=qwen or cfg.get("attention_bias", False),
            o_bias=(not qwen) and cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype") or "float32",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos),
        )

    @classmethod
    def from_dir(cls, path: str) -> "ModelConfig":
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        gen_path = os.path.join(path, "generation_config.json")
        gen = json.load(open(gen_path)) if os.path.exists(gen_path) else None
        return cls.from_hf(cfg, gen)


@dataclass
class EngineConfig:
    """How one engine runs. Every field maps to a `microserve engine` flag of the same name."""

    model: str = "embedded"
    served_model_name: str | None = None
    load_format: str = "auto"  # auto | safetensors | dummy
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    page_size: int = 16
    num_pages: int | None = None  # None: from gpu_memory_utilization on CUDA, kv_cache_memory_mb on CPU
    kv_cache_memory_mb: int = 256
    max_model_len: int | None = None
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto | cpu | torch | triton
    linear_backend: str = "auto"  # CPU fp32 linears: auto | kernel (brgemm) | torch
    enforce_eager: bool = False  # CUDA: no decode CUDA graphs (CPU never uses them)
    gpu_memory_utilization: float = 0.9  # CUDA: share of GPU memory for weights + activations + KV
    kv_transport: str = "auto"  # auto (shm on CPU, cuda_ipc on CUDA) | shm | nixl | cuda_ipc | none
    recv_lease_s: float = 60.0
    transfer_timeout_s: float = 30.0
    num_threads: int | None = None
    cpu_affinity: list[int] | None = None
    step_trace: str | None = None  # file for a JSON line per step ("{port}": the engine's port); engine/step_trace.py
    extra: dict[str, Any] = field(default_factory=dict)


def same_model_dir(name: str, path: str) -> bool:
    """Whether `name` is a path to the model directory `path`: clients such as `vllm bench serve`
    send the absolute path of a model that was served by a relative one."""
    return os.path.isdir(name) and os.path.realpath(name) == os.path.realpath(path)
