"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

`respond` turns a stream of engine outputs into an OpenAI response (SSE or one JSON body); the
microserving start_generate reuses it, since its reply is an ordinary completion."""
from __future__ import annotations

import time
from contextlib import aclosing
from typing import AsyncIterator

from aiohttp import web

from microserve.config import same_model_dir
from microserve.engine.request import RequestOutput
from microserve.engine.sampling import SamplingParams
from microserve.tokenizer import NoChatTemplate
from microserve.protocol import (DEFAULT_MAX_TOKENS, ChatCompletionRequest, CompletionRequest, SamplingFields,
                                 completion_chunk, completion_response, fit_context, new_id, usage_chunk, usage_dict)
from microserve.web import HTTPError, SSEWriter, parse_body


def sampling_params(body: SamplingFields, max_tokens: int | None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS,
                          temperature=body.temperature,
                          top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=body.stop_list,
                          stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos)


class OpenAIAPI:
    def __init__(self, state) -> None:
        self.s = state  # server.app.ServerState

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/completions", self.completions), web.post("/v1/chat/completions", self.chat),
                web.get("/v1/models", self.models)]

    def check_model(self, model: str | None) -> None:
        e = self.s.engine
        if model is not None and model not in (e.model_name, e.config.model) and not same_model_dir(model, e.model_path):
            raise HTTPError(404, f"the model {model!r} does not exist; this engine serves {e.model_name!r}",
                            "model_not_found", "model")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await parse_body(request, CompletionRequest)
        self.check_model(body.model)
        ids = body.prompt_ids(self.s.engine.tokenizer)
        rid = new_id("cmpl")
        stream = self.s.aengine.generate(rid, ids, sampling_params(body, body.max_tokens))
        return await respond(request, self.s, rid, body, stream, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await parse_body(request, ChatCompletionRequest)
        self.check_model(body.model)
        tok = self.s.engine.tokenizer
        if tok is None:
            raise HTTPError(400, "this model has no tokenizer, so it cannot chat", "invalid_request")
        try:
            ids = tok.encode_chat([m.text() for m in body.messages])
        except NoChatTemplate as e:
            raise HTTPError(400, str(e), "no_chat_template", "messages") from None
        except Exception as e:  # a template's raise_exception, or a jinja error
            raise HTTPError(400, f"chat template failed: {e}", "invalid_request", "messages") from None
        # None: the rest of the context (OpenAI's chat default); a too-long conversation is a 400 on
        # "messages"; the engine clamps (and checks) the rest as for any prompt
        max_tokens = fit_context(len(ids), body.max_completion_tokens or body.max_tokens,
                                 self.s.engine.max_model_len, param="messages")
        rid = new_id("chatcmpl")
        stream = self.s.aengine.generate(rid, ids, sampling_params(body, max_tokens))
        return await respond(request, self.s, rid, body, stream, chat=True)

    async def models(self, request: web.Request) -> web.Response:
        e = self.s.engine
        return web.json_response({"object": "list", "data": [
            {"id": e.model_name, "object": "model", "created": int(self.s.started), "owned_by": "microserve",
             "root": e.model_path, "max_model_len": e.max_model_len}]})


async def respond(request: web.Request, state, rid: str, body: SamplingFields,
                  outputs: AsyncIterator[RequestOutput], chat: bool) -> web.StreamResponse:
    """Stream or collect engine outputs as an OpenAI (chat) completion. Validation errors surface
    before anything is sent, so they get a proper 4xx; a client that leaves aborts the request."""
    model = state.engine.model_name
    t0 = time.perf_counter()
    async with aclosing(outputs) as outs:
        first = await anext(outs)  # a ServeError here (bad input) becomes a 4xx before anything is sent
        t_first = time.perf_counter()
        state.metrics.ttft.observe(t_first - t0)
        ids = body.return_token_ids
        text_parts, token_ids, last = [], [], first
        writer = None
        if body.stream:
            writer = SSEWriter(request)
            await writer.start()

        async def handle(out: RequestOutput, first_chunk: bool) -> None:
            text_parts.append(out.text)
            token_ids.extend(out.new_token_ids)
            if writer and (out.text or out.new_token_ids or out.finished):
                await writer.send(completion_chunk(rid, model, out.text, out.finish_reason,
                                                   out.new_token_ids if ids else None, chat, first_chunk))

        await handle(first, True)
        async for out in outs:
            last = out
            await handle(out, False)
    if last.error and last.finish_reason == "error" and writer is None:
        raise HTTPError(last.error_status, last.error, "engine_error")
    dt = time.perf_counter() - t0
    state.metrics.e2e.observe(dt)
    if last.num_output_tokens > 1:
        state.metrics.tpot.observe((dt - (t_first - t0)) / (last.num_output_tokens - 1))
    usage = usage_dict(last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens)
    if writer:
        if body.include_usage:
            await writer.send(usage_chunk(rid, model, usage, chat))
        return await writer.done()
    return web.json_response(completion_response(rid, model, "".join(text_parts), last.finish_reason, usage,
                                                 token_ids if ids else None, chat))
