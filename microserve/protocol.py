"""Wire schemas (pydantic) shared by the engine server and the router: OpenAI requests, the
microserving bodies (an OpenAI completion request plus window fields, as in MLC-LLM), responses
and errors. Neither server/ nor router/ imports the other; both import this."""
from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from microserve.errors import ServeError

DEFAULT_MAX_TOKENS = 16  # /v1/completions' default, as OpenAI's (chat defaults to the rest of the context)


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


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    return_token_ids: bool = False  # ours (as vLLM's): include the generated token ids

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
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

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("logprobs is not supported")
        return v

    def prompt_ids(self, tokenizer) -> list[int]:
        """The prompt as token ids: given as ids, or text encoded with `tokenizer` (None: ids only)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ServeError("only one prompt per request is supported", param="prompt")
            p = p[0]
        if isinstance(p, list):
            return p
        if not p:
            raise ServeError("the prompt is empty", param="prompt")
        if tokenizer is None:
            raise ServeError("no tokenizer here: give the prompt as token ids", param="prompt")
        return tokenizer.encode(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> dict:
        c = self.content
        if isinstance(c, list):  # OpenAI content parts: keep the text ones
            c = "".join(part.get("text", "") for part in c if part.get("type") == "text")
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
    """A pydantic error as one readable line, plus the offending field."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    return (f"{loc}: {err['msg']}" if loc else err["msg"]), (loc or None)
