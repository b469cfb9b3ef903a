"""Wire schemas (pydantic) shared by the engine server and the router: OpenAI requests, the
microserving bodies (an OpenAI completion request plus window fields, as in MLC-LLM), responses
and errors. Neither server/ nor router/ imports the other; both import this."""
from __future__ import annotations

import math
import time
import uuid
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from microserve.errors import ServeError

DEFAULT_MAX_TOKENS = 16  # /v1/completions' default, as OpenAI's (chat defaults to the rest of the context)

# Request body limits (web.parse_body). A body that carries a prompt (an OpenAI or microserving
# request) may have MAX_BODY_BYTES; any other (commit, abort, fence, admin) CONTROL_BODY_BYTES. The
# OpenAI fronts lower the first to what the longest prompt that could fit the context takes
# (`openai_body_limit`).
MAX_BODY_BYTES = 64 * 2**20
CONTROL_BODY_BYTES = 64 * 2**10
MAX_JSON_DEPTH = 64  # nesting levels of a request body; OpenAI's bodies need fewer than 10
# A prompt's characters per token, at most, beyond the longest token: Unicode normalization (NFC,
# NFKC) folds at most 3 characters into 1 (Hangul jamo into a syllable), so 4 leaves room.
NORMALIZATION_SLACK = 4
JSON_BYTES_PER_CHAR = 12  # the most JSON bytes one character can take: an escaped surrogate pair
BODY_SLACK_BYTES = 2**20  # the rest of an OpenAI body: sampling fields, stop strings, message roles


def max_prompt_chars(max_model_len: int, max_token_chars: int) -> int:
    """The longest text (in characters) whose tokens could fit a `max_model_len` context: no token
    stands for more than `max_token_chars` characters (`Tokenizer.max_token_chars`), times the
    normalization slack. A longer prompt (or chat conversation) is a 400 `context_length_exceeded`
    without being tokenized, which for a text of many megabytes would take seconds to minutes."""
    return max_model_len * max(max_token_chars, 1) * NORMALIZATION_SLACK


def openai_body_limit(max_model_len: int | None, max_token_chars: int | None) -> int:
    """The most bytes an OpenAI request body may have on a front with this context: the longest
    prompt that could fit (`max_prompt_chars`, as text or as token ids) at the most bytes JSON
    spends on a character, plus BODY_SLACK_BYTES for the rest; MAX_BODY_BYTES at most, and while
    the context is unknown (a router before any engine answered)."""
    if max_model_len is None:
        return MAX_BODY_BYTES
    chars = max_prompt_chars(max_model_len, max_token_chars or 1)
    return min(MAX_BODY_BYTES, BODY_SLACK_BYTES + JSON_BYTES_PER_CHAR * chars)


def fit_context(prompt_len: int, max_tokens: int | None, max_model_len: int, param: str = "prompt") -> int:
    """vLLM's context rule, the one engines and the router both apply: a prompt that leaves no room
    for one token (prompt_len >= max_model_len) is a 400 `context_length_exceeded` on `param`
    ("prompt", or "messages" for chat); any other request is served, with max_tokens (None: all the
    room left) clamped to max_model_len - prompt_len, so it stops at the context limit with
    finish_reason "length". Returns the effective max_tokens (a max_tokens < 1 passes through, for
    the sampling checks to reject)."""
    if prompt_len >= max_model_len:
        raise ServeError(f"the prompt has {prompt_len} tokens; this model's context is {max_model_len} tokens, "
                         f"and at least one must be left to generate", param=param, code="context_length_exceeded")
    room = max_model_len - prompt_len
    return room if max_tokens is None else min(max_tokens, room)


# The field checks of every OpenAI body (SamplingFields and its subclasses), done at parsing so that
# the engine and the router refuse the same bodies with the same 400 before any work (the engine's
# SamplingParams checks again, for its direct callers): field -> (is bad, code, message), for a
# value that is not None. Code "unsupported": a feature we lack.
FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "max_tokens": (lambda v: v < 1, "invalid_request", "max_tokens must be at least 1"),
    "max_completion_tokens": (lambda v: v < 1, "invalid_request", "max_completion_tokens must be at least 1"),
    "temperature": (lambda v: not 0 <= v < math.inf, "invalid_request", "temperature must be a finite number >= 0"),
    "top_p": (lambda v: not 0 < v <= 1, "invalid_request", "top_p must be in (0, 1]"),
    "top_k": (lambda v: v < -1, "invalid_request", "top_k must be -1 (off) or a positive integer"),
    "seed": (lambda v: not -2**63 <= v < 2**64, "invalid_request", "seed must fit in 64 bits"),
    "n": (lambda v: v != 1, "unsupported", "only n=1 is supported"),
    "best_of": (lambda v: v != 1, "unsupported", "best_of is not supported (only best_of=1)"),
    "echo": (bool, "unsupported", "echo is not supported"),
    "logprobs": (lambda v: True, "unsupported", "logprobs is not supported"),
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The sampling fields of every OpenAI body, checked at parsing (FIELD_CHECKS)."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    best_of: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    return_token_ids: bool = False  # ours (as vLLM's): include the generated token ids

    @field_validator(*FIELD_CHECKS, check_fields=False)
    @classmethod
    def _check(cls, v: Any, info: ValidationInfo) -> Any:
        bad, code, message = FIELD_CHECKS[info.field_name]
        if v is not None and bad(v):
            raise PydanticCustomError(code, message)
        return v

    @property
    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]  # an empty stop string would end every request at once

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    echo: bool = False
    logprobs: int | None = None

    def prompt_value(self, tokenizer) -> str | list[int]:
        """The one prompt, as token ids or as text (a one-element list unwrapped); an empty one is a
        400, and so is text without a tokenizer (None) to encode it."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ServeError("only one prompt per request is supported", param="prompt")
            p = p[0]
        if not p:
            raise ServeError("the prompt is empty", param="prompt")
        if isinstance(p, str) and tokenizer is None:
            raise ServeError("no tokenizer here: give the prompt as token ids", param="prompt")
        return p


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> dict:
        c = self.content
        if isinstance(c, list):  # OpenAI content parts: keep the text ones
            c = "".join(part.text or "" for part in c if part.type == "text")
        return {"role": self.role, "content": c or ""}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class MicroservingRequest(CompletionRequest):
    """prep_recv (end), remote_send (begin, end, kv_addr_info, recv_rank), start_generate (begin).
    `user` is the request id shared by the calls of one request."""
    end: int | None = None
    begin: int | None = None
    kv_addr_info: str | None = None
    recv_rank: int | None = None


class PrepRecvResponse(BaseModel):
    kv_append_metadata: str
    prefix_matched_length: int


# ---- responses -------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_chunk(rid: str, model: str, text: str, finish_reason: str | None,
                     token_ids: list[int] | None = None, chat: bool = False, first: bool = False) -> dict:
    """One choice-0 chunk (streaming) in the completions or chat.completions shape."""
    if chat:
        delta: dict[str, Any] = {"content": text}
        if first:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def completion_response(rid: str, model: str, text: str, finish_reason: str | None, usage: dict,
                        token_ids: list[int] | None = None, chat: bool = False) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage}


def usage_chunk(rid: str, model: str, usage: dict, chat: bool = False) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": usage}


def error_body(message: str, status: int, code: str | None = None, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 404:
        kind = "not_found_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code or kind}}


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """A pydantic error as one readable line, plus the offending field (the deepest error: of a
    union's alternatives, the one that got furthest; the alternatives' type names left out of the
    path, so `messages.0.content.0.text`, not `messages.0.content.list[ContentPart].0.text`)."""
    err = max(e.errors(), key=lambda x: len(x.get("loc", ())))
    loc = ".".join(str(x) for x in err.get("loc", ())
                   if isinstance(x, int) or (str(x).isidentifier() and str(x) not in _TYPE_NAMES))
    if err["type"] in OUR_CHECKS:  # our messages name their field already
        return err["msg"], (loc or None)
    return (f"{loc}: {err['msg']}" if loc else err["msg"]), (loc or None)


_TYPE_NAMES = {"str", "int", "float", "bool", "bytes", "list", "dict", "none"}
OUR_CHECKS = ("invalid_request", "unsupported")  # the codes of FIELD_CHECKS


def validation_error(e: ValidationError) -> ServeError:
    """A pydantic error as a 400 with our code ("unsupported" for a feature we lack)."""
    msg, param = validation_message(e)
    code = max(e.errors(), key=lambda x: len(x.get("loc", ())))["type"]
    return ServeError(msg, 400, code if code in OUR_CHECKS else "invalid_request", param)
