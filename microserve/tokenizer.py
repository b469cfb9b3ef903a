"""Tokenizer: Hugging Face `tokenizer.json` through the `tokenizers` library (what transformers'
fast tokenizers run underneath), chat templates rendered with jinja2 as transformers does, and
incremental detokenization for streaming. Top level because the engine and the router (which
never imports torch) both use it."""
from __future__ import annotations

import json
import os
from datetime import datetime

from tokenizers import Tokenizer as HFTokenizer


class NoChatTemplate(ValueError):
    pass


class Tokenizer:
    def __init__(self, path: str) -> None:
        self.path = path
        self.tk = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        cfg_path = os.path.join(path, "tokenizer_config.json")
        self.config = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
        self.chat_template = self.config.get("chat_template")
        tmpl_path = os.path.join(path, "chat_template.jinja")
        if self.chat_template is None and os.path.exists(tmpl_path):
            self.chat_template = open(tmpl_path).read()
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self._template = None
        self._max_token_chars: int | None = None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_nogil(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids `encode` gives, through `encode_batch`, which releases the GIL while it works:
        `encode` holds it, so a long text tokenized on a worker thread would still stall the event
        loop (the HTTP fronts tokenize on one, `openai_front.OpenAIFront`)."""
        return self.tk.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @property
    def max_token_chars(self) -> int:
        """The most characters one token stands for: its length in the vocabulary (byte-level
        tokens spell one character a byte, SentencePiece ones spell the space as one ▁, byte
        fallback `<0xE2>` is longer than the byte), so a text of n characters takes at least
        n / max_token_chars tokens, give or take normalization (`protocol.max_prompt_chars`)."""
        if self._max_token_chars is None:
            self._max_token_chars = max((len(t) for t in self.tk.get_vocab(with_added_tokens=True)), default=1)
        return self._max_token_chars

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise NoChatTemplate("this model has no chat template; use /v1/completions instead")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise ValueError(msg)
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The template already spells BOS where the model wants it.
        return self.encode_nogil(self.apply_chat_template(messages), add_special_tokens=False)


def _token_str(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text pieces, never splitting a multi-byte character.

    Decodes a short window that starts a few tokens back (so decoders that strip a leading space,
    or merge byte-fallback tokens, see the same context every time) and emits only what is new and
    complete (no trailing U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-6:])
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""
