"""The OpenAI front, one for the engine and the router: /v1/completions and /v1/chat/completions
parsed, checked, tokenized off the event loop and fit to the context (`OpenAIFront.prepare`), and
the reply streamed or collected (`answer`). Each side adapts its own output to `Piece`s; nothing
else about the OpenAI API is written twice."""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from aiohttp import web

from microserve.config import same_model_dir
from microserve.errors import ServeError
from microserve.protocol import (DEFAULT_MAX_TOKENS, ChatCompletionRequest, CompletionRequest, SamplingFields,
                                 completion_chunk, completion_response, error_body, fit_context, max_prompt_chars,
                                 new_id, openai_body_limit, usage_chunk)
from microserve.tokenizer import NoChatTemplate, Tokenizer
from microserve.web import ClientDisconnected, HTTPError, SSEWriter, parse_body

log = logging.getLogger(__name__)

# Chat's max_tokens default where the context is not known yet (a router before any engine answered).
UNKNOWN_CONTEXT_CHAT_MAX_TOKENS = 256


@dataclass
class Piece:
    """A step of a completion as a front streams it: new text and token ids, the finish reason on
    the last, and the request's usage where known (on the last piece, or on a piece of its own)."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None


@dataclass
class Prepared:
    """An OpenAI request checked and tokenized: what the engine generates from, or the router routes."""
    body: SamplingFields
    prompt: list[int]
    max_tokens: int  # fit to the context (as asked, when the context is not known yet)
    rid: str
    chat: bool


class OpenAIFront:
    """/v1/completions and /v1/chat/completions as the engine and the router both serve them.

    `prepare` reads the body (at most what the longest prompt that could fit takes,
    `protocol.openai_body_limit`), validates it (protocol's models: sampling fields, unsupported
    features), checks the model, turns the prompt into token ids on a worker thread (chat template
    included; text too long to fit the context is refused before, `protocol.max_prompt_chars`) and
    applies the context rule (`protocol.fit_context`). `answer` streams or collects the reply.
    Every refusal is a ServeError, answered by error_middleware in OpenAI's shape."""

    def __init__(self, what: str, model_name: str, tokenizer: Tokenizer | None,
                 max_model_len: Callable[[], int | None], aliases: tuple[str, ...] = (),
                 model_dirs: tuple[str, ...] = ()) -> None:
        self.what, self.model_name, self.tokenizer = what, model_name, tokenizer
        self.max_model_len = max_model_len  # the context, None while unknown
        self.names = (model_name, *aliases)
        self.model_dirs = model_dirs
        self.max_token_chars = tokenizer.max_token_chars if tokenizer is not None else None
        self._executor = ThreadPoolExecutor(2, thread_name_prefix="tokenize")

    def check_model(self, model: str | None) -> None:
        """The served name (or an alias), or a path to the same model directory."""
        if model is not None and model not in self.names and not any(same_model_dir(model, d) for d in self.model_dirs):
            raise HTTPError(404, f"the model {model!r} does not exist; this {self.what} serves {self.model_name!r}",
                            "model_not_found", "model")

    async def prepare(self, request: web.Request, chat: bool) -> Prepared:
        context = self.max_model_len()
        why = f" (room for the longest prompt a context of {context} tokens could hold)" if context else ""
        body = await parse_body(request, ChatCompletionRequest if chat else CompletionRequest,
                                openai_body_limit(context, self.max_token_chars), why)
        self.check_model(body.model)
        if chat:
            prompt, param = await self.chat_ids(body, context), "messages"
            max_tokens = body.max_completion_tokens or body.max_tokens  # None: the rest of the context
        else:
            prompt, param = await self.prompt_ids(body, context), "prompt"
            max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        if not prompt:
            raise ServeError("the prompt is empty", param=param)
        if context is not None:
            max_tokens = fit_context(len(prompt), max_tokens, context, param)
        elif max_tokens is None:
            max_tokens = UNKNOWN_CONTEXT_CHAT_MAX_TOKENS
        return Prepared(body, prompt, max_tokens, new_id("chatcmpl" if chat else "cmpl"), chat)

    def _check_length(self, chars: int, context: int | None, param: str) -> None:
        if context is None or self.max_token_chars is None:
            return
        most = max_prompt_chars(context, self.max_token_chars)
        if chars > most:
            what = "the prompt has" if param == "prompt" else "the messages have"
            raise ServeError(f"{what} {chars} characters, more than this model's context of {context} tokens can "
                             f"hold (at most {most} characters)", param=param, code="context_length_exceeded")

    async def _off_loop(self, fn, *args):
        """Tokenizing (and templating) a long text takes a while: never on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def prompt_ids(self, body: CompletionRequest, context: int | None) -> list[int]:
        p = body.prompt_value(self.tokenizer)
        if isinstance(p, list):
            return p
        self._check_length(len(p), context, "prompt")
        try:
            return await self._off_loop(self.tokenizer.encode_nogil, p)
        except Exception as e:  # noqa: BLE001 - whatever the tokenizer refuses is the input's fault
            raise ServeError(f"the prompt could not be tokenized: {e}", param="prompt") from None

    async def chat_ids(self, body: ChatCompletionRequest, context: int | None) -> list[int]:
        if self.tokenizer is None:
            raise HTTPError(400, f"this {self.what} has no tokenizer, so it cannot chat", "invalid_request")
        messages = [m.text() for m in body.messages]
        self._check_length(sum(len(m["content"]) + len(m["role"]) for m in messages), context, "messages")
        try:
            return await self._off_loop(self.tokenizer.encode_chat, messages)
        except NoChatTemplate as e:
            raise HTTPError(400, str(e), "no_chat_template", "messages") from None
        except Exception as e:  # noqa: BLE001 - a template's raise_exception, or a jinja error
            raise HTTPError(400, f"chat template failed: {e}", "invalid_request", "messages") from None

    async def answer(self, request: web.Request, p: Prepared, pieces: AsyncIterator[Piece]) -> web.StreamResponse:
        return await answer(request, p.rid, self.model_name, p.body, pieces, p.chat)

    def models(self, created: float, **extra) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": int(created), "owned_by": "microserve", **extra}]})


async def answer(request: web.Request, rid: str, model: str, body: SamplingFields, pieces: AsyncIterator[Piece],
                 chat: bool) -> web.StreamResponse:
    """Stream (SSE) or collect `pieces` as an OpenAI (chat) completion. Nothing is sent before the
    first piece with content, so an error up to then is a proper 4xx/5xx; after it, an error is
    reported in-band (an error event, then [DONE]). A client that leaves closes `pieces` (which
    aborts the request) and costs one INFO line."""
    writer: SSEWriter | None = None
    parts, token_ids, finish, usage, first = [], [], None, None, True
    async with aclosing(pieces) as ps:
        try:
            async for piece in ps:
                usage = piece.usage or usage
                if not (piece.text or piece.token_ids or piece.finish_reason):
                    continue
                if body.stream and writer is None:
                    writer = SSEWriter(request)
                    await writer.start()
                parts.append(piece.text)
                token_ids += piece.token_ids
                finish = piece.finish_reason or finish
                if writer:
                    await writer.send(completion_chunk(rid, model, piece.text, piece.finish_reason,
                                                       piece.token_ids if body.return_token_ids else None, chat, first))
                first = False
        except ClientDisconnected:
            raise
        except Exception as e:
            if writer is None:
                raise
            if isinstance(e, ServeError):  # headers are out: report in-band
                log.warning("request %s failed mid-stream: %s", rid, e)
                err = error_body(str(e), e.status, e.code, e.param)
            else:
                log.exception("request %s failed mid-stream", rid)
                err = error_body("internal server error (see the server log)", 500, "internal_error")
            await writer.send(err)
            return await writer.done()
    if writer:
        if body.include_usage and usage:
            await writer.send(usage_chunk(rid, model, usage, chat))
        return await writer.done()
    return web.json_response(completion_response(rid, model, "".join(parts), finish, usage or {},
                                                 token_ids if body.return_token_ids else None, chat))
