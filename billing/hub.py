"""The Hugging Face Hub, as billing needs it: whoami for routed tokens (cached briefly), the partner API.

The Hub's base URL is configuration (`BillingSettings.hub_url`), so tests point it at a local stand-in.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from billing.errors import HubError, HubUnavailable, Unauthorized

MAX_CACHED_TOKENS = 10_000


@dataclass(frozen=True)
class HubIdentity:
    """Who a Hugging Face token belongs to, from whoami-v2."""

    name: str
    orgs: tuple[str, ...]
    type: str = "user"


def _parse_whoami(data: Any) -> HubIdentity:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise HubUnavailable("The Hugging Face Hub gave an unexpected answer about the token")
    orgs = tuple(
        o["name"] for o in data.get("orgs") or [] if isinstance(o, dict) and isinstance(o.get("name"), str)
    )
    return HubIdentity(name=data["name"], orgs=orgs, type=str(data.get("type", "user")))


class WhoamiCache:
    """Answers of the Hub's whoami endpoint, cached by the token's hash for a short while (unknown tokens too, for
    `negative_ttl_s`).

    Look-ups run on their own bounded thread pool (`max_concurrency` at once), one per token at a time: callers
    asking about a token already being looked up wait for that answer (single-flight). With `max_pending`
    look-ups already waiting, a new token is refused at once (HubUnavailable, 503): random tokens can neither
    flood the Hub nor tie up the threads that admit requests."""

    def __init__(
        self,
        hub_url: str,
        *,
        ttl_s: float = 60,
        negative_ttl_s: float = 10,
        timeout_s: float = 10,
        monotonic: Callable[[], float] = time.monotonic,
        transport: httpx.BaseTransport | None = None,
        max_concurrency: int = 4,
        max_pending: int = 64,
    ):
        self.hub_url = hub_url.rstrip("/")
        self.ttl_s, self.negative_ttl_s = ttl_s, negative_ttl_s
        self.timeout_s = timeout_s
        self.monotonic = monotonic
        self.max_pending = max_pending
        self._client = httpx.Client(timeout=timeout_s, transport=transport)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[float, HubIdentity | None]] = OrderedDict()
        self._inflight: dict[str, Future[HubIdentity | None]] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="hub-whoami")
        self.hub_calls = 0  # how many times the Hub was asked (the cache's effect is observable)
        self.joined = 0  # look-ups that waited for one already in flight for the same token

    def identify(self, token: str) -> HubIdentity:
        """The identity behind `token`; Unauthorized when the Hub does not know it (blocks this thread)."""
        return _known(self.lookup(token).result(timeout=self.timeout_s + 5))

    async def identify_async(self, token: str) -> HubIdentity:
        """`identify` for an event loop: waits without holding a thread."""
        return _known(await asyncio.wrap_future(self.lookup(token)))

    def lookup(self, token: str) -> Future[HubIdentity | None]:
        """A future of the identity behind `token` (None: unknown to the Hub): cached, joined or started."""
        key = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > self.monotonic():
                done: Future[HubIdentity | None] = Future()
                done.set_result(hit[1])
                return done
            running = self._inflight.get(key)
            if running is not None:
                self.joined += 1
                return running
            if len(self._inflight) >= self.max_pending:
                raise HubUnavailable(
                    "Too many Hugging Face tokens are being checked right now; try again shortly",
                    retry_after_s=1,
                )
            future = self._pool.submit(self._fetch, key, token)
            self._inflight[key] = future
            return future

    def _fetch(self, key: str, token: str) -> HubIdentity | None:
        try:
            identity = self._ask(token)
        except BaseException:
            with self._lock:
                self._inflight.pop(key, None)
            raise
        ttl = self.ttl_s if identity is not None else self.negative_ttl_s
        with self._lock:
            self._cache[key] = (self.monotonic() + ttl, identity)
            self._cache.move_to_end(key)
            while len(self._cache) > MAX_CACHED_TOKENS:
                self._cache.popitem(last=False)
            self._inflight.pop(key, None)
        return identity

    def _ask(self, token: str) -> HubIdentity | None:
        self.hub_calls += 1
        try:
            resp = self._client.get(
                f"{self.hub_url}/api/whoami-v2", headers={"Authorization": f"Bearer {token}"}
            )
        except httpx.HTTPError:
            raise HubUnavailable("Could not verify the Hugging Face token right now; try again") from None
        if resp.status_code in (401, 403):
            return None
        if resp.status_code != 200:
            raise HubUnavailable("Could not verify the Hugging Face token right now; try again")
        try:
            return _parse_whoami(resp.json())
        except ValueError:
            raise HubUnavailable("The Hugging Face Hub gave an unexpected answer about the token") from None

    def close(self) -> None:
        """Stop the look-ups and close the HTTP client."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def _known(identity: HubIdentity | None) -> HubIdentity:
    if identity is None:
        raise Unauthorized("Invalid credentials in Authorization header")
    return identity


@dataclass(frozen=True)
class Mapping:
    """One model mapping on the Hub: a Hub model served by us under `provider_model` for `task`."""

    task: str
    hf_model: str
    provider_model: str
    status: str  # staging | live


class PartnerApi:
    """The Hub's partner API for model mappings: `/api/partners/{provider}/models`."""

    def __init__(
        self,
        hub_url: str,
        provider: str,
        token: str | None,
        *,
        timeout_s: float = 30,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base = f"{hub_url.rstrip('/')}/api/partners/{provider}/models"
        self._client = httpx.Client(timeout=timeout_s, headers=headers, transport=transport)

    def _check(self, resp: httpx.Response, what: str) -> Any:
        if resp.status_code >= 400:
            raise HubError(f"{what}: the Hub answered {resp.status_code}: {resp.text[:300]}")
        return resp.json() if resp.content else None

    def list(self) -> list[Mapping]:
        """Every mapping registered for the provider (the Hub groups them by task)."""
        try:
            data = self._check(self._client.get(self.base), "list mappings")
        except httpx.HTTPError as err:
            raise HubError(f"list mappings: cannot reach the Hub: {err}") from None
        out: list[Mapping] = []
        for task, models in (data or {}).items():
            for hf_model, item in (models or {}).items():
                out.append(
                    Mapping(task, hf_model, item.get("providerId", hf_model), item.get("status", "staging"))
                )
        return sorted(out, key=lambda m: (m.hf_model.lower(), m.task))

    def register(self, m: Mapping) -> None:
        """Create or update a mapping."""
        body = {"task": m.task, "hfModel": m.hf_model, "providerModel": m.provider_model, "status": m.status}
        try:
            self._check(self._client.post(self.base, json=body), f"register {m.hf_model}")
        except httpx.HTTPError as err:
            raise HubError(f"register {m.hf_model}: cannot reach the Hub: {err}") from None

    def set_status(self, hf_model: str, status: str) -> None:
        """Flip a mapping between staging and live."""
        try:
            self._check(
                self._client.put(f"{self.base}/status", json={"hfModel": hf_model, "status": status}),
                f"set status of {hf_model}",
            )
        except httpx.HTTPError as err:
            raise HubError(f"set status of {hf_model}: cannot reach the Hub: {err}") from None

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()
