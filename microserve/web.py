"""HTTP plumbing shared by the engine server and the router (aiohttp): body reading and parsing
into protocol models (size, text and depth checks), OpenAI-style error responses, bearer
credentials, and server-sent events. The OpenAI endpoints themselves are in openai_front.py."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import signal
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from microserve.errors import ServeError
from microserve.protocol import (CONTROL_BODY_BYTES, MAX_BODY_BYTES, MAX_JSON_DEPTH,
                                 SamplingFields, error_body, validation_error)

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger(__name__)



class HTTPError(ServeError):
    """Raise anywhere in a handler to answer with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message, status, code or "invalid_request", param)


class ClientDisconnected(Exception):
    """The client went away while we wrote to it: nothing to answer, nobody to tell (one INFO line)."""

    def __init__(self, resp: web.StreamResponse, why: BaseException) -> None:
        super().__init__(f"{type(why).__name__}: {why}")
        self.resp = resp


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> web.Response:
    return web.json_response(error_body(message, status, code, param), status=status)


# ---- request bodies ---------------------------------------------------------------------------------
async def read_body(request: web.Request, max_bytes: int, why: str = "") -> bytearray:
    """The body, or 413 as soon as it is known to exceed `max_bytes` (from Content-Length, before
    reading anything, or while reading a chunked one). Read here rather than with request.read(),
    whose limit is the app's client_max_size, one for every endpoint."""
    too_large = HTTPError(413, f"the request body is larger than {max_bytes} bytes, the most {request.path} takes"
                          f"{why}", "request_too_large")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    buf = bytearray()
    while chunk := await request.content.readany():
        buf += chunk
        if len(buf) > max_bytes:
            raise too_large
    return buf


_SURROGATE = re.compile("[\ud800-\udfff]")


def loads(raw: bytes | bytearray | str) -> Any:
    """JSON that is also valid text: a 400 for bytes that are not UTF-8 (or -16/-32), malformed JSON,
    integers too long to convert, nesting deeper than MAX_JSON_DEPTH (10,000 levels made json.loads
    raise RecursionError) and strings holding a lone UTF-16 surrogate ("\\ud800": JSON allows it,
    nothing downstream can encode it)."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise HTTPError(400, f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                        "invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, "Exceeds the limit ... for integer string"
        raise HTTPError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
    stack = [(data, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, str):
            if not x.isascii() and _SURROGATE.search(x):
                raise HTTPError(400, "the request body is not valid text: a string holds a lone UTF-16 surrogate "
                                "(an escape such as \\ud800 without its pair)", "invalid_json")
        elif isinstance(x, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise HTTPError(400, f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                                "invalid_json")
            items = [*x.keys(), *x.values()] if isinstance(x, dict) else x
            stack.extend((v, depth + 1) for v in items if isinstance(v, (str, dict, list)))
    return data


async def parse_body(request: web.Request, model: type[M], max_bytes: int | None = None, why: str = "") -> M:
    """Read, check and validate a body into `model`. `max_bytes` defaults by what the body carries:
    MAX_BODY_BYTES for a request with a prompt (a SamplingFields model), CONTROL_BODY_BYTES for any
    other (commit, abort, fence, admin calls); `why` explains it in the 413."""
    if max_bytes is None:
        max_bytes = MAX_BODY_BYTES if issubclass(model, SamplingFields) else CONTROL_BODY_BYTES
    data = loads(await read_body(request, max_bytes, why))
    if not isinstance(data, dict):
        raise HTTPError(400, "request body must be a JSON object", "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def check_bearer(request: web.Request, token: str, what: str) -> None:
    """401 unless the request carries exactly `Authorization: Bearer <token>` (compared in constant time)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme != "Bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPError(401, f"missing or wrong {what} (Authorization: Bearer <token>)", "unauthorized")


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ServeError as e:
        return error_response(e.status, str(e), e.code, e.param)
    except web.HTTPException as e:
        if e.status >= 400 and e.content_type != "application/json":
            return error_response(e.status, e.reason, e.reason.lower().replace(" ", "_"))
        raise
    except (ClientDisconnected, ConnectionResetError) as e:  # the client left mid-answer: not our error
        log.info("client went away during %s %s (%s)", request.method, request.path, e)
        return e.resp if isinstance(e, ClientDisconnected) else web.Response(status=499)
    except Exception:  # a bug: still answer in OpenAI's format, and log it
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal server error (see the server log)", "internal_error")


class SSEWriter:
    """`data: {json}\\n\\n` events, ending with `data: [DONE]`. A write to a client that left raises
    ClientDisconnected (error_middleware logs it on one INFO line)."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

    async def _io(self, op) -> None:
        try:
            await op
        except ConnectionError as e:  # aiohttp's ClientConnectionResetError("Cannot write to closing transport")
            raise ClientDisconnected(self.resp, e) from None

    async def start(self) -> None:
        await self._io(self.resp.prepare(self.request))

    async def send(self, obj: dict) -> None:
        await self._io(self.resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"))

    async def done(self) -> web.StreamResponse:
        await self._io(self.resp.write(b"data: [DONE]\n\n"))
        await self._io(self.resp.write_eof())
        return self.resp


async def serve_until_signal(runner: web.AppRunner) -> None:
    """Block until SIGINT or SIGTERM, then stop serving cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


async def run_app(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving (handler cancellation on: a client that disconnects cancels its handler)."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
