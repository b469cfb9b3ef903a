"""The microserving endpoints, in MLC-LLM's JSON contract, plus our additions.

    POST /microserving/prep_recv        {..., "end"}                       -> {"kv_append_metadata", "prefix_matched_length"}
    POST /microserving/remote_send      {..., "begin", "end", "kv_addr_info", "recv_rank"} -> {} once landed
    POST /microserving/start_generate   {..., "begin"}                     -> a completion (JSON or SSE)
    POST /microserving/commit           {..., "user"}                      -> {"cached_tokens"}
    POST /microserving/abort            {"user"}                           -> {}
    POST /microserving/match            {"prompt"}                         -> {"prefix_matched_length"}
    POST /microserving/fence            {"fence"}                          -> {"deadline"}  (sender -> receiver)

Every body is an OpenAI completion request; `user` is the request id shared by the calls. With a
cluster token, every call needs it (server/app.py), kv_append_metadata is signed with it, and a
remote_send claims the receiver's fence before it writes (server/fencing.py).
"""
from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel

from microserve.cluster import sign, verify
from microserve.protocol import MicroservingRequest, PrepRecvResponse
from microserve.server.fencing import FenceKeeper
from microserve.server.openai_api import OpenAIAPI, respond, sampling_params
from microserve.web import HTTPError, parse_body


class RequestId(BaseModel):
    user: str


class FenceRequest(BaseModel):
    fence: str
    renew: bool = False  # a sender that claimed it already, still queued or writing
    done: bool = False  # a sender that claimed it writes no more


class MicroservingAPI:
    def __init__(self, state, openai: OpenAIAPI, cluster_token: str | None = None) -> None:
        self.s, self.openai, self.token = state, openai, cluster_token
        self.fences = FenceKeeper(cluster_token)

    def routes(self) -> list[web.RouteDef]:
        return [web.post(f"/microserving/{name}", getattr(self, name))
                for name in ("prep_recv", "remote_send", "start_generate", "commit", "abort", "match", "fence")]

    async def _body(self, request: web.Request, *fields: str) -> tuple[MicroservingRequest, list[int]]:
        body = await parse_body(request, MicroservingRequest)
        self.openai.check_model(body.model)
        for f in ("user",) + fields:
            if getattr(body, f) is None:
                raise HTTPError(400, f"{request.path} needs the field {f!r}", "invalid_request", f)
        # text prompts are tokenized off the event loop, with the OpenAI front's length cap
        return body, await self.openai.front.prompt_ids(body, self.s.engine.max_model_len)

    async def _engine(self, fn, *args):
        return await self.s.aengine.call(fn, *args)

    async def prep_recv(self, request: web.Request) -> web.Response:
        body, ids = await self._body(request, "end")
        # senders claim the fence at the address the caller reached us by
        meta, matched = await self._engine(self.s.engine.prep_recv, body.user, ids, body.end,
                                           sampling_params(body, body.max_tokens), f"http://{request.host}")
        return web.json_response(PrepRecvResponse(kv_append_metadata=sign(meta, self.token),
                                                  prefix_matched_length=matched).model_dump())

    async def remote_send(self, request: web.Request) -> web.Response:
        body, ids = await self._body(request, "begin", "end", "kv_addr_info")
        kv_addr_info = verify(body.kv_addr_info, self.token)  # nothing in it is used unless it is ours
        doc, _ = self.s.engine.check_send(ids, body.begin, body.end, kv_addr_info)  # bad input: 4xx before a claim
        fence = await self.fences.claim(doc.get("fence") or {})
        async with self.fences.held(fence):
            sent = await self.s.aengine.remote_send(body.user, ids, body.begin, body.end, kv_addr_info, fence)
        return web.json_response({"kv_bytes": sent})

    async def fence(self, request: web.Request) -> web.Response:
        body = await parse_body(request, FenceRequest)
        return web.json_response({"deadline": await self._engine(self.s.engine.claim_fence, body.fence, body.renew, body.done)})

    async def start_generate(self, request: web.Request) -> web.StreamResponse:
        body, ids = await self._body(request, "begin")
        stream = self.s.aengine.start_generate(body.user, body.begin, ids, sampling_params(body, body.max_tokens))
        return await respond(request, self.s, body.user, body, stream, chat=False)

    async def commit(self, request: web.Request) -> web.Response:
        body = await parse_body(request, RequestId)
        return web.json_response({"cached_tokens": await self._engine(self.s.engine.commit, body.user)})

    async def abort(self, request: web.Request) -> web.Response:
        body = await parse_body(request, RequestId)
        await self._engine(self.s.engine.abort_parked, body.user)
        return web.json_response({})

    async def match(self, request: web.Request) -> web.Response:
        body = await parse_body(request, MicroservingRequest)
        ids = await self.openai.front.prompt_ids(body, self.s.engine.max_model_len)
        return web.json_response({"prefix_matched_length": await self._engine(self.s.engine.match, ids)})
