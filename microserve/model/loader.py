"""Find a model's files, build the model and fill its weights: from a local HF directory
(safetensors), a hub id, or dummy.

Dummy weights are deterministic: every tensor is drawn from a generator seeded by (seed, its name),
so two engines given the same config and seed hold the same model (needed for disaggregation).
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import zlib

import torch
from torch import nn

from microserve.attention.base import get_backend
from microserve.attention.cpu_backend import CPUPagedBackend
from microserve.config import ModelConfig
from microserve.kernels.build import loaded_isa
from microserve.kernels.selection import Choice, choose_attention
from microserve.model.layers import RotaryEmbedding
from microserve.model.llama import LlamaForCausalLM
from microserve.model.packed_linear import pack_linears
from microserve.model_files import model_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}

MODEL_FILES = ("*.json", "*.safetensors", "tokenizer*", "*.jinja")  # what an engine loads


def resolve_model_path(model: str) -> str:
    """A local directory as is; `embedded` to the built-in tiny model; anything else as a hub id,
    downloaded with its weights. (The router, which needs only a tokenizer, calls
    `model_files.model_dir` itself and never imports this package.)"""
    return model_dir(model, MODEL_FILES)


def resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto`: fp32 on CPU; on CUDA the model's own half type, or bf16 for fp32 checkpoints."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r} (choose auto, float32, bfloat16, float16)")
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    own = DTYPES.get(cfg.torch_dtype, torch.float32)
    return own if own != torch.float32 else torch.bfloat16


@contextlib.contextmanager
def _skip_init():
    """Build modules without their default random init: every weight is overwritten anyway, and
    init on meta tensors drags in torch._dynamo (about 1.5 s of start-up)."""
    saved = [(cls, cls.reset_parameters) for cls in (nn.Linear, nn.Embedding)]
    for cls, _ in saved:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, fn in saved:
            cls.reset_parameters = fn


def dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    for name, p in model.named_parameters():
        g = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
        if "norm" in name:
            p.data.copy_(1.0 + 0.1 * noise)
        else:  # unit-variance activations, so dummy models produce varied (if meaningless) tokens
            std = 1.0 if "embed" in name else p.shape[-1] ** -0.5 if p.dim() > 1 else 0.02
            p.data.copy_(std * noise)


def safetensors_weights(path: str):
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors in {path}; pass --load-format dummy for random weights")
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def load_model(path: str, cfg: ModelConfig, load_format: str, dtype: torch.dtype, device: torch.device,
               attention_backend: str = "auto", seed: int = 0, linear_backend: str = "auto") -> LlamaForCausalLM:
    """On CPU, `auto` backends keep each compiled kernel only where it measures at least as fast as
    the torch path it replaces on this machine (kernels/selection.py); the choice is logged once."""
    backend = get_backend(attention_backend, device, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                          head_dim=cfg.head_dim, scale=cfg.head_dim ** -0.5)
    with torch.device("meta"), _skip_init():
        model = LlamaForCausalLM(cfg, backend).to(dtype)
    model = model.to_empty(device=device)  # allocate once, in place, in the final dtype
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                   cfg.rope_scaling).to(device)  # tables stay fp32, like transformers
    if load_format == "dummy":
        dummy_weights(model, seed)
    elif load_format in ("auto", "safetensors"):
        filled = model.load_weights(safetensors_weights(path))
        missing = model.expected_weights() - filled
        if missing:
            raise ValueError(f"checkpoint in {path} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    else:
        raise ValueError(f"unknown load format {load_format!r} (choose auto, safetensors, dummy)")
    if device.type == "cpu":
        choices = {}
        if isinstance(backend, CPUPagedBackend):
            if attention_backend == "auto":
                choices.update(choose_attention(backend, dtype))
            else:
                choices.update(decode=Choice(True, how="forced"), prefill=Choice(True, how="forced"))
        choices.update(pack_linears(model, linear_backend))  # after loading: packed from the loaded weights
        model.bind_fused()
        if choices:
            log.info("CPU kernels (%s variant): %s", loaded_isa(),
                     "; ".join(f"{name} {c.describe()}" for name, c in choices.items()))
    return model.eval()
