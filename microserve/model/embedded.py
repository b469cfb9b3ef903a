"""The embedded default model: a tiny Llama with deterministic dummy weights and a tokenizer the
project builds itself, so a fresh machine can serve something with no download.

The tokenizer is a byte-level BPE trained (deterministically) on a few sentences below; the model
config is written beside it. Weights are drawn at load time (`--load-format dummy`, seed 0), so the
text is meaningless but every part of the serving path is real.
"""
from __future__ import annotations

import json
import os

VERSION = "1"
CORPUS = """Once upon a time there was a little engine that served language models.
It split every request into prefill and decode, and sent the key value cache to its friends.
The router asked each engine how much of the prompt it had cached, and chose the best one.
Data parallel, prefill decode disaggregation, balanced splits and cache migration all worked.
The quick brown fox jumps over the lazy dog. Hello world! How are you today?
"""
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 384, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def embedded_model_dir() -> str:
    root = os.environ.get("MICROSERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "microserve"))
    path = os.path.join(root, f"embedded-tiny-llama-v{VERSION}")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        _build(path)
    return path


def _build(path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CONFIG["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
    os.replace(tmp, path) if not os.path.exists(path) else None
