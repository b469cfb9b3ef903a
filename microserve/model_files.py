"""Where a model's files are: a local Hugging Face directory, a hub snapshot, or the embedded model.

Torch-free and outside the model package, so that the router can find a model's tokenizer without
importing model code (see docs/architecture.md); the engine's loader resolves through it too
(`model.loader.resolve_model_path`, which also fetches the weights).

The embedded default model is a tiny Llama with deterministic dummy weights and a tokenizer the
project builds itself, so a fresh machine can serve something with no download. The tokenizer is
word-level over the few sentences below (deterministic); the model config is written beside it.
Weights are drawn at load time (`--load-format dummy`, seed 0), so the text is meaningless but
every part of the serving path is real.
"""
from __future__ import annotations

import json
import os
import shutil

EMBEDDED = "embedded"
TOKENIZER_FILES = ("*.json", "tokenizer*", "*.jinja")  # config, tokenizer, chat template: no weights


def model_dir(model: str, allow_patterns: tuple[str, ...]) -> str:
    """A local directory as is; `embedded` to the built-in tiny model's directory (written on first
    use); anything else is a hub id, of which only the files matching `allow_patterns` are fetched."""
    if model == EMBEDDED:
        return embedded_model_dir()
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise ValueError(f"model path {model!r} is not a directory with config.json")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(model, allow_patterns=list(allow_patterns))
    except Exception as e:  # offline, unknown id, gated...
        raise ValueError(f"model {model!r} is neither a local directory nor a reachable hub id: {e}") from e


# ---- the embedded model ------------------------------------------------------------------------
VERSION = "2"
CORPUS = """Once upon a time there was a little engine that served language models.
It split every request into prefill and decode, and sent the key value cache to its friends.
The router asked each engine how much of the prompt it had cached, and chose the best one.
Data parallel, prefill decode disaggregation, balanced splits and cache migration all worked.
The quick brown fox jumps over the lazy dog. Hello world! How are you today?
"""
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
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
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    # Word-level, so even random weights emit words (from the corpus) rather than stray bytes.
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({**CONFIG, "vocab_size": tok.get_vocab_size()}, f, indent=2)
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
    try:
        os.replace(tmp, path)  # atomic: readers see all of the directory or none of it
    except OSError:  # another process (engines start side by side) put its identical copy there first
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
