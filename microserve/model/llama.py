"""One Llama-family model (Llama, Mistral, Qwen2) over flat varlen batches and a paged KV cache.

The same code runs on CPU and CUDA; only the attention backend differs. q/k/v and gate/up are fused
into one matmul each (the loader stacks Hugging Face's separate weights into them).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from microserve.attention.base import AttentionBackend, ForwardContext
from microserve.config import ModelConfig
from microserve.model.layers import RMSNorm, RotaryEmbedding, silu_and_mul


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.layer, self.backend = layer, backend
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.nh * self.hd, self.nkv * self.hd
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        # q and k heads are adjacent in qkv: rotate them in one go
        qk = RotaryEmbedding.apply(self.qk_heads(qkv), *rope)
        return self.o_proj(self.attend(qk, qkv, ctx))

    def qk_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """The q and k heads of a fused qkv, as one [T, nh + nkv, hd] view."""
        return qkv[:, :self.q_size + self.kv_size].view(-1, self.nh + self.nkv, self.hd)

    def attend(self, qk: torch.Tensor, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Attention of the rotated q/k heads `qk` and the v columns of `qkv`; returns [T, q_size]."""
        v = qkv[:, self.q_size + self.kv_size:].view(-1, self.nkv, self.hd)
        o = self.backend.forward(self.layer, qk[:, :self.nh], qk[:, self.nh:], v, ctx)
        return o.reshape(-1, self.q_size)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.fused: tuple | None = None  # the fused ops' weights, when bind_fused() found them laid out

    def bind_fused(self) -> None:
        """Take the fused CPU path from now on if the linears were laid out for the kernel library's
        GEMM (pack_linears, fp32): collects what its two calls take, so a forward looks nothing up."""
        attn, mlp, ln1, ln2 = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm
        if getattr(mlp.down_proj, "weight_t", None) is None:
            self.fused = None
            return
        self.fused = ((ln1.weight, ln1.eps, attn.qkv_proj.weight_t, attn.qkv_proj.bias),
                      (attn.nh + attn.nkv, attn.hd),
                      (attn.o_proj.weight_t, attn.o_proj.bias, ln2.weight, ln2.eps, mlp.gate_up_proj.weight_t,
                       mlp.gate_up_proj.bias, mlp.down_proj.weight_t, mlp.down_proj.bias))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope, ctx: ForwardContext):
        """x: the previous layer's output (the embeddings for layer 0, with residual None); residual:
        the stream so far. Returns (this layer's output, the stream), the stream not yet holding the
        output: the next norm adds it in, in the same pass (vLLM's layout)."""
        if self.fused is not None:
            return self._forward_fused(x, residual, rope, ctx)
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, rope, ctx), residual)
        return self.mlp(h), residual

    def _forward_fused(self, x: torch.Tensor, residual: torch.Tensor | None, rope, ctx: ForwardContext):
        """The same layer as two kernel calls around the attention (model/csrc/layer_ops.cpp): at a
        small model's batch sizes each of the ~20 ops of the path above costs more in dispatch than
        in arithmetic."""
        before, heads, after = self.fused
        qkv = torch.ops.microserve.norm_qkv_rope(x, residual, *before, *rope, *heads)
        residual = x if residual is None else residual
        attn = self.self_attn
        o = attn.attend(attn.qk_heads(qkv), qkv, ctx)
        return torch.ops.microserve.oproj_norm_mlp(o, residual, *after), residual


class LlamaForCausalLM(nn.Module):
    # Hugging Face checkpoint names that we store stacked: (ours, theirs, shard index)
    STACKED = (("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
               ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, backend) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        with torch.device("cpu"):  # tables are computed, never on meta (which would import torch._dynamo)
            self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [T]. Returns fp32 logits for the rows in `logits_indices` (all if None)."""
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rotary.table(positions, x.dtype)  # once per forward, shared by every layer
        for layer in self.layers:
            x, residual = layer(x, residual, rope, ctx)
        if logits_indices is not None:
            x, residual = x[logits_indices], residual[logits_indices]
        return self.lm_head(self.norm(x, residual)[0]).float()

    def bind_fused(self) -> None:
        """Once weights are final (after pack_linears): let each layer pick its fused CPU path."""
        for layer in self.layers:
            layer.bind_fused()

    def shard_sizes(self, ours: str) -> list[int]:
        c = self.cfg
        if ours == "qkv_proj":
            return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        return [c.intermediate_size, c.intermediate_size]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy Hugging Face named tensors into this model; returns the parameter names filled."""
        params = dict(self.named_parameters(remove_duplicate=False))
        filled: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            for ours, theirs, shard in self.STACKED:
                if f".{theirs}." in name:
                    name = name.replace(theirs, ours)
                    sizes = self.shard_sizes(ours)
                    offset = sum(sizes[:shard])
                    params[name].data[offset:offset + sizes[shard]].copy_(tensor)
                    filled.add(f"{name}#{shard}")
                    break
            else:
                if name not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no place in {self.cfg.architecture}")
                params[name].data.copy_(tensor)
                filled.add(name)
        return filled

    def expected_weights(self) -> set[str]:
        names = set()
        for name, _ in self.named_parameters():
            for ours, _, shard in self.STACKED:
                if f".{ours}." in name:
                    names |= {f"{name}#{i}" for i in range(len(self.shard_sizes(ours)))}
                    break
            else:
                names.add(name)
        return names
