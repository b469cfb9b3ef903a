"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

Parsing, checks, tokenization and the reply are the router's too (`openai_front.OpenAIFront`); what is the
engine's own: generating, and turning engine outputs into reply pieces (`respond`, which the
microserving start_generate reuses, since its reply is an ordinary completion)."""
from __future__ import annotations

import time
from contextlib import aclosing
from typing import AsyncIterator

from aiohttp import web

from microserve.engine.request import RequestOutput
from microserve.engine.sampling import SamplingParams
from microserve.protocol import DEFAULT_MAX_TOKENS, SamplingFields, usage_dict
from microserve.openai_front import OpenAIFront, Piece, answer
from microserve.web import HTTPError


def sampling_params(body: SamplingFields, max_tokens: int | None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS,
                          temperature=body.temperature,
                          top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=body.stop_list,
                          stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos)


class OpenAIAPI:
    def __init__(self, state) -> None:
        self.s = state  # server.app.ServerState
        e = state.engine
        self.front = OpenAIFront("engine", e.model_name, e.tokenizer, lambda: e.max_model_len,
                                 aliases=(e.config.model,), model_dirs=(e.model_path,))

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/completions", self.completions), web.post("/v1/chat/completions", self.chat),
                web.get("/v1/models", self.models)]

    def check_model(self, model: str | None) -> None:
        self.front.check_model(model)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.generate(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.generate(request, chat=True)

    async def generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        p = await self.front.prepare(request, chat)
        stream = self.s.aengine.generate(p.rid, p.prompt, sampling_params(p.body, p.max_tokens))
        return await respond(request, self.s, p.rid, p.body, stream, chat)

    async def models(self, request: web.Request) -> web.Response:
        e = self.s.engine
        return self.front.models(self.s.started, root=e.model_path, max_model_len=e.max_model_len)


async def respond(request: web.Request, state, rid: str, body: SamplingFields,
                  outputs: AsyncIterator[RequestOutput], chat: bool) -> web.StreamResponse:
    """Engine outputs as an OpenAI (chat) completion (`openai_front.answer`). Validation errors surface with
    the first output, before anything is sent, so they get a proper 4xx; a client that leaves
    closes `outputs`, which aborts the request."""
    return await answer(request, rid, state.engine.model_name, body, pieces(state, outputs), chat)


async def pieces(state, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[Piece]:
    """RequestOutputs as reply pieces, observing TTFT, end-to-end latency and TPOT. An output that
    failed the request (finish_reason "error") raises its error."""
    m = state.metrics
    t0 = time.perf_counter()
    t_first = None
    async with aclosing(outputs) as outs:
        async for out in outs:
            if t_first is None:
                t_first = time.perf_counter()
                m.ttft.observe(t_first - t0)
            if out.error and out.finish_reason == "error":
                raise HTTPError(out.error_status, out.error, "engine_error")
            usage = None
            if out.finished:
                dt = time.perf_counter() - t0
                m.e2e.observe(dt)
                if out.num_output_tokens > 1:
                    m.tpot.observe((dt - (t_first - t0)) / (out.num_output_tokens - 1))
                usage = usage_dict(out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens)
            yield Piece(out.text, out.new_token_ids, out.finish_reason, usage)
