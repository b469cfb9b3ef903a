"""HTTP plumbing shared by the engine server and the router (aiohttp): body parsing into protocol
models, OpenAI-style error responses, and server-sent events."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from microserve.errors import ServeError
from microserve.protocol import error_body, validation_message

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger(__name__)


class HTTPError(ServeError):
    """Raise anywhere in a handler to answer with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message, status, code or "invalid_request", param)


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> web.Response:
    return web.json_response(error_body(message, status, code, param), status=status)


async def parse_body(request: web.Request, model: type[M]) -> M:
    try:
        raw = await request.read()
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "request body must be a JSON object", "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        msg, param = validation_message(e)
        raise HTTPError(400, msg, "invalid_request", param) from None


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
    except Exception:  # a bug: still answer in OpenAI's format, and log it
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal server error (see the server log)", "internal_error")


class SSEWriter:
    """`data: {json}\\n\\n` events, ending with `data: [DONE]`."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

    async def start(self) -> None:
        await self.resp.prepare(self.request)

    async def send(self, obj: dict) -> None:
        await self.resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

    async def done(self) -> web.StreamResponse:
        await self.resp.write(b"data: [DONE]\n\n")
        await self.resp.write_eof()
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
