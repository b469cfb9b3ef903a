"""The engine's model against the oracle: transformers on the very same weights (fp32, CPU).

For each Llama-family variant the engine supports, prefill logits at every prompt position must
match transformers' to 1e-4, and 32 greedy tokens (prefill + paged decode through the real
scheduler and runner) must equal transformers' `generate`.
"""
from __future__ import annotations

import pytest
import torch

from conftest import make_hf_model
from microserve.attention.base import AttentionMetadata, ForwardContext
from microserve.config import EngineConfig
from microserve.engine.engine import Engine
from microserve.engine.sampling import SamplingParams
from microserve.kv.pool import slots_for

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

VARIANTS = {
    "llama": ("llama", {}),
    # larger weights, so that positions (and the rescaled long wavelengths) move the logits a lot
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE, "initializer_range": 0.2}),
    # with 0.02-scale weights a tied model only ever repeats its input token
    "tied": ("llama", {"tie_word_embeddings": True, "initializer_range": 0.2}),
    # head_dim * heads != hidden_size, and more KV heads per group
    "mistral": ("mistral", {"head_dim": 32, "num_key_value_heads": 1, "sliding_window": None}),
    "qwen2": ("qwen2", {"num_key_value_heads": 4}),
}


def randomize(path: str) -> None:
    """transformers initialises biases to 0 and norm weights to 1, which would hide a loader that
    drops them: give every such tensor random values, then save again."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    import transformers
    arch, overrides = VARIANTS[request.param]
    path = make_hf_model(tmp_path_factory.mktemp(request.param), arch, **overrides)
    randomize(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = Engine(EngineConfig(model=path, num_pages=32, kv_transport="none"))
    yield request.param, hf, engine
    engine.close()


def engine_prefill_logits(engine: Engine, prompt: list[int]) -> torch.Tensor:
    """Logits at every prompt position, from one prefill through the paged KV pool: the runner's
    batch layout built by hand for a single sequence, with pages taken from (and given back to) the
    engine's cache."""
    seq = engine.cache.match(prompt, 0)
    assert engine.cache.allocate(seq, len(prompt))
    try:
        ps, n = engine.pool.page_size, len(prompt)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots_for(seq.pages, 0, n, ps)),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32),
            seq_lens=torch.tensor([n], dtype=torch.int32),
            block_tables=torch.tensor([seq.pages], dtype=torch.int32),
            query_lens_cpu=[n], seq_lens_cpu=[n], num_decodes=int(n == 1), page_size=ps)
        return engine.model(torch.tensor(prompt), torch.arange(n), ForwardContext(meta=meta, kv=engine.pool.kv))
    finally:
        engine.cache.release(seq)


def engine_greedy(engine: Engine, prompt: list[int], n: int) -> list[int]:
    req = engine.add_request("greedy", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    for _ in range(10 * n):
        if not engine.has_work():
            break
        engine.step()
    assert req.finish_reason == "length"
    return req.output_ids


def prompt_ids(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 512, (n - 1,), generator=g).tolist()


def test_engine_config_matches_checkpoint(variant):
    name, hf, engine = variant
    mc, hc = engine.model_config, hf.config
    assert mc.head_dim == getattr(hc, "head_dim", hc.hidden_size // hc.num_attention_heads)
    assert mc.tie_word_embeddings == (name == "tied") == bool(hc.tie_word_embeddings)
    assert (engine.model.lm_head.weight is engine.model.embed_tokens.weight) == (name == "tied")
    assert mc.qkv_bias == (name == "qwen2")
    assert (mc.rope_scaling is not None) == (name == "llama3-rope")
    if name == "llama3-rope":
        assert mc.rope_theta == 500000.0 and mc.rope_scaling["factor"] == 8.0


@pytest.mark.parametrize("n", [1, 7, 40])
def test_prefill_logits_match_transformers(variant, n):
    _, hf, engine = variant
    prompt = prompt_ids(n, n)
    ours = engine_prefill_logits(engine, prompt)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    assert ours.shape == ref.shape == (n, 512)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4, f"max abs logit error {err:.3g}"
    assert ref.abs().max().item() > 0.1  # the comparison is not between two near-zero tensors
    engine.cache.check()


def test_fused_cpu_layers_match_the_layer_by_layer_path(variant):
    """The CPU default runs each decoder layer as two fused calls around its attention; the
    layer-by-layer path (one op at a time, as on CUDA) must give the same logits."""
    _, _, engine = variant
    layers = engine.model.layers
    if engine.device.type != "cpu" or layers[0].fused is None:
        pytest.skip("the fused layer path is the CPU kernel library's")
    prompt = prompt_ids(7, 40)
    fused = engine_prefill_logits(engine, prompt)
    saved = [layer.fused for layer in layers]
    try:
        for layer in layers:
            layer.fused = None
        plain = engine_prefill_logits(engine, prompt)
    finally:
        for layer, f in zip(layers, saved):
            layer.fused = f
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert fused.abs().max().item() > 0.1


def test_greedy_32_tokens_match_transformers_generate(variant):
    _, hf, engine = variant
    prompt = prompt_ids(123, 21)
    ours = engine_greedy(engine, prompt, 32)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert len(ours) == len(ref) == 32
    assert ours == ref
    a = engine.cache.check()
    assert a["owned"] == 0 and a["live_seqs"] == 0
