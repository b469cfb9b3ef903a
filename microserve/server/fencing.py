"""The sender's side of fencing (the receiver's is in kv/cache.py): before a remote_send writes a
byte, claim the receiver's fence; while the send is queued or running, renew it; never start a
write after the deadline the receiver granted, or once it refused a renewal (revoked).

A claim is one small HTTP call to the receiver's microserving API at the address in the (signed)
kv_addr_info. Without a cluster token nothing is signed, so the address is only called if it is
this machine's loopback: a caller cannot make the engine call out anywhere else.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from urllib.parse import urlsplit

import aiohttp

from microserve.cluster import auth_headers, is_loopback
from microserve.errors import ServeError
from microserve.kv.cache import Fence

log = logging.getLogger(__name__)


class FenceKeeper:
    def __init__(self, token: str | None) -> None:
        self.token = token
        self._session: aiohttp.ClientSession | None = None

    async def claim(self, fence: dict) -> Fence:
        """Claim the fence described in kv_addr_info; 409 if the reservation has ended."""
        fid, url = fence.get("id"), fence.get("url")
        if not isinstance(fid, str) or not isinstance(url, str) or urlsplit(url).scheme != "http":
            raise ServeError("kv_addr_info has no usable fence", 400, "invalid_kv_addr_info", "kv_addr_info")
        if not self.token and not is_loopback(urlsplit(url).hostname or ""):
            raise ServeError("without a cluster token, KV is only sent to engines on this host's loopback",
                             400, "invalid_kv_addr_info", "kv_addr_info")
        f = Fence(fid, url.rstrip("/"), 0.0)
        f.deadline = await self._post(f)
        return f

    @contextlib.asynccontextmanager
    async def held(self, fence: Fence):
        """Renew the fence (at half its remaining time) for as long as the block runs. If the block
        fails with a 4xx (it stopped, and every write it started has landed), tell the receiver
        so that an abort frees the pages at once instead of quarantining them; a success needs no
        word (start_generate or commit takes the pages over), nor can a timeout give one."""
        task = asyncio.create_task(self._renew(fence))
        try:
            yield fence
        except ServeError as e:
            if e.status < 500:
                with contextlib.suppress(ServeError):
                    await self._post(fence, done=True)
            raise
        finally:
            task.cancel()

    async def _renew(self, fence: Fence) -> None:
        while True:
            await asyncio.sleep(max((fence.deadline - time.time()) / 2, 0.05))
            try:
                fence.deadline = await self._post(fence, renew=True)
            except ServeError as e:
                if e.status in (401, 403, 409):  # ended or refused: no more writes
                    fence.revoked = True
                    return
                log.info("renewing fence %s at %s failed (%s); writes stop at its deadline", fence.id, fence.url, e)

    async def _post(self, fence: Fence, renew: bool = False, done: bool = False) -> float:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=auth_headers(self.token))
        try:
            async with self._session.post(fence.url + "/microserving/fence", json={"fence": fence.id, "renew": renew, "done": done},
                                          timeout=aiohttp.ClientTimeout(total=10)) as r:
                reply = await r.json(content_type=None)
                if r.status != 200:
                    err = (reply or {}).get("error") or {}
                    raise ServeError(f"the receiver refused the KV write: {err.get('message', r.status)}",
                                     r.status if r.status < 500 else 502, err.get("code") or "stale_reservation")
                return 0.0 if done else float(reply["deadline"])
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
            raise ServeError(f"cannot reach the receiving engine at {fence.url}: {type(e).__name__}: {e}",
                             502, "transfer_error") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
