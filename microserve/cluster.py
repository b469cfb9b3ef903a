"""Cluster credentials: one shared secret, the cluster token, held by the engines and the router of
one deployment (`--cluster-token` or $MICROSERVE_CLUSTER_TOKEN; `up` and `demo` make one).

- Engines answer the microserving calls (prep_recv, remote_send, start_generate, commit, abort,
  match, fence) and the debug calls only with `Authorization: Bearer <token>`. The OpenAI API stays
  open (or takes `--api-key`, as vLLM's does).
- A receiver signs its kv_append_metadata with the token (HMAC-SHA256), and a sender writes only
  where a signature it can verify says it may: metadata forged, edited, or made by another
  cluster is refused before anything in it is used.

Without a token (a single host, loopback only, as in development) nothing is checked.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets

from microserve.errors import ServeError

TOKEN_ENV = "MICROSERVE_CLUSTER_TOKEN"


def resolve_token(explicit: str | None = None) -> str | None:
    """The cluster token: the flag's value, else $MICROSERVE_CLUSTER_TOKEN, else None (no checks)."""
    return explicit or os.environ.get(TOKEN_ENV) or None


def new_token() -> str:
    return secrets.token_urlsafe(24)


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _mac(text: str, token: str) -> str:
    return hmac.new(token.encode(), text.encode(), hashlib.sha256).hexdigest()


def sign(text: str, token: str | None) -> str:
    """`text.<hmac>` (base64 text never holds a '.'), or text unchanged without a token."""
    return f"{text}.{_mac(text, token)}" if token else text


def verify(signed: str, token: str | None) -> str:
    """The text a `sign` call signed; 403 if the token is set and the signature is missing or wrong."""
    text, dot, mac = signed.rpartition(".")
    if not dot:
        text, mac = signed, ""
    if token and not hmac.compare_digest(mac.encode(), _mac(text, token).encode()):
        raise ServeError("kv_addr_info is not signed with this cluster's token (forged, altered, or from "
                         "another cluster)", 403, "forbidden", "kv_addr_info")
    return text


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine's loopback (what an engine without a token may bind)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
