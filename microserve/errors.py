"""One error type for everything a client can cause: it carries the HTTP status and OpenAI error
code it maps to, so kv/, transfer/ and engine/ report failures without knowing about HTTP."""
from __future__ import annotations


class ServeError(Exception):
    def __init__(self, message: str, status: int = 400, code: str = "invalid_request", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param
