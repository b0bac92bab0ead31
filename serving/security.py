"""The service's front door: who may reach which route, from where, how often, with how big a body.

`Guard` is pure ASGI middleware around the FastAPI app (serving/http.py). Before a route's handler runs, and so
before its body is read or parsed and before any wait for a loading model, it:

- refuses a browser's cross-origin request to the account, admin, billing and operations routes (403). Only the
  inference routes answer CORS (as Hugging Face's do): a web page the user visits can neither read nor drive the
  admin API, `/usage` or `/billing`;
- checks the caller's token: the admin API needs one in every mode (open mode has no tokenless admin); in tokens
  mode every inference and account route needs one (401 before anything else is done); routed Hugging Face
  tokens are checked with the Hub's whoami, single-flight and bounded (billing/hub.py);
- applies the caller's rate limits (billing/ratelimit.py): 429 with Retry-After and the IETF RateLimit fields;
- caps the body: Content-Length over the route's cap is a 413 at once; the account, admin and billing routes'
  bodies are read here, within their cap, before the handler sees them (inference bodies are capped as they are
  read, serving/ingress.py);
- keeps `/metrics` and `/docs` to an admin token where settings say so;
- writes each admin action (who, what, when, the answer's status) to the audit log (billing/audit.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing.accounts import Caller
from billing.errors import Forbidden, Unauthorized
from billing.ratelimit import Check, RateLimited, RateLimiter, Ticket, limits_for
from core.errors import ServiceError
from models.errors import InvalidInput, PayloadTooLarge
from models.types import CHAT_COMPLETION, COMPLETION, TEXT_GENERATION

if TYPE_CHECKING:
    from models.catalog import ModelSpec
    from serving.config import Settings
    from serving.ingress import IngressCore
    from serving.routes.base import Parsed

log = logging.getLogger("serving.security")

OPEN_TIER = "open"
ROUTED_TIER = "hf-routed"
RATELIMIT_HEADERS = ["ratelimit", "ratelimit-policy", "retry-after"]
OPS_PATHS = ("/metrics", "/docs", "/openapi.json", "/redoc")
PAGE_SUFFIXES = (".html", ".js", ".css", ".png", ".svg", ".ico", ".map", ".woff2")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
MISSING_ADMIN_TOKEN = (
    "The admin API needs a token in every mode: send Authorization: Bearer <token>, the operator's "
    "HFI_ADMIN_TOKEN or an admin user's token (`hfi accounts issue-token`)"
)
MISSING_TOKEN = "Missing credentials: send Authorization: Bearer <token>"

RouteKind = Literal["inference", "admin", "account", "cost_lookup", "ops", "page", "health"]


class SecuritySettings(BaseModel):
    """Who may reach what: part of the service settings (`security:`)."""

    model_config = ConfigDict(extra="forbid")

    # /metrics, /docs and /openapi.json: "public"; "admin" (an admin token); "off" (404); "auto": public in open
    # mode on a loopback address (a laptop), admin otherwise. On a cluster Prometheus scrapes Ray's metrics
    # port on each pod instead (the chart's PodMonitor), which is not the public port.
    ops_endpoints: Literal["auto", "public", "admin", "off"] = "auto"
    # Origins whose pages may call the inference routes (CORS); the other routes never answer CORS.
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])
    # Browser origins allowed to call the account, admin and billing routes besides the service's own (a
    # console served elsewhere); empty: the same origin only.
    trusted_origins: list[str] = Field(default_factory=list)
    # The body cap of the account, admin and billing routes (inference routes: settings.max_body_bytes).
    max_api_body_bytes: int = Field(default=64 * 1024, ge=1024)
    # ... and of Hugging Face's cost look-up (POST /billing/requests: a list of request ids).
    max_cost_lookup_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Write each admin action to the audit log (`hfi accounts audit`).
    audit_admin_actions: bool = True


def route_kind(method: str, path: str) -> RouteKind:
    """Which family a route belongs to (the path is the service's own, without any mount prefix)."""
    if path == "/admin" or path.startswith("/admin/"):
        return "admin"
    if path == "/billing/requests":
        return "cost_lookup"
    if path in ("/billing", "/billing/") or (path.startswith("/billing/") and path.endswith(PAGE_SUFFIXES)):
        return "page" if method in SAFE_METHODS else "account"
    if path.startswith("/billing/") or path == "/usage" or path.startswith("/usage/"):
        return "account"
    if path in OPS_PATHS or path.startswith("/docs/"):
        return "ops"
    if path == "/health":
        return "health"
    return "inference"


def _host_port(netloc: str) -> tuple[str, int | None]:
    parsed = urlsplit("//" + netloc)
    try:
        return (parsed.hostname or "").lower(), parsed.port
    except ValueError:
        return (parsed.hostname or "").lower(), None


def same_origin(origin: str, host_header: str | None) -> bool:
    """Whether a browser's Origin names the host it sent the request to (Host, scheme aside: TLS may end in
    front of the service)."""
    parsed = urlsplit(origin)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or not host_header:
        return False
    try:
        origin_port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        return False
    host, port = _host_port(host_header)
    if host != parsed.hostname.lower():
        return False
    return origin_port in (80, 443) if port is None else origin_port == port


def cross_origin(headers: Headers, trusted: list[str]) -> str | None:
    """The origin (or fetch site) of a browser's cross-origin request, or None for a same-origin request, a
    top-level navigation without an Origin, or a non-browser client."""
    origin = headers.get("origin")
    if origin is not None:
        if origin in trusted or same_origin(origin, headers.get("host")):
            return None
        return origin
    site = headers.get("sec-fetch-site")
    if site in ("cross-site", "same-site") and headers.get("sec-fetch-mode") != "navigate":
        return site
    return None


def bearer(headers: Headers) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ops_policy(settings: Settings) -> str:
    """What `ops_endpoints: auto` means for these settings."""
    policy = settings.security.ops_endpoints
    if policy != "auto":
        return policy
    open_laptop = settings.billing.mode == "open" and is_loopback(settings.host)
    return "public" if open_laptop else "admin"


def _refusal(err: ServiceError) -> JSONResponse:
    from serving.errors import error_response

    response = error_response(err)
    if isinstance(err, RateLimited):
        response.headers.update(err.headers)
    return response


class Guard:
    """Pure ASGI: see the module's docstring. `core`: the IngressCore whose settings, billing and metering the
    app serves; `expose_headers`: what CORS exposes on the inference routes."""

    def __init__(self, app: ASGIApp, core: IngressCore, expose_headers: list[str] | None = None) -> None:
        self.app = app
        self.core = core
        sec = core.settings.security
        self.cors_app = CORSMiddleware(
            app,
            allow_origins=sec.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[*(expose_headers or []), *RATELIMIT_HEADERS],
        )
        self.limiter: RateLimiter = core.rate_limiter  # one per process, whichever app asks
        # Token look-ups in flight, so that the concurrent requests of one token whose cache entry just expired
        # (every token_cache_ttl_s) share one database read instead of each making its own.
        self._resolving: dict[tuple[asyncio.AbstractEventLoop, str], asyncio.Future[Caller]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        kind = route_kind(method, path)
        headers = Headers(scope=scope)
        ticket: Ticket | None = None
        try:
            caller, ticket, receive = await self._admit(kind, method, path, headers, scope, receive)
        except ServiceError as err:
            await _refusal(err)(scope, receive, send)
            return
        except Exception as err:  # the accounts database down while checking a token: the usual 503
            from serving.errors import error_response

            await error_response(err)(scope, receive, send)
            return
        status: list[int] = []
        send = self._sending(send, ticket, status)
        try:
            await (self.cors_app if kind == "inference" else self.app)(scope, receive, send)
        finally:
            if ticket is not None:
                ticket.release()
            if kind == "admin" and method not in SAFE_METHODS and caller is not None:
                await self._audit(caller, method, path, status[0] if status else 500, scope)

    async def _admit(
        self, kind: RouteKind, method: str, path: str, headers: Headers, scope: Scope, receive: Receive
    ) -> tuple[Caller | None, Ticket | None, Receive]:
        """Everything before the handler: origin, size announced, token, rate limit, and (API routes) the body."""
        sec = self.core.settings.security
        if kind != "inference" and ("\x00" in path or b"%00" in scope.get("query_string", b"")):
            # no name, month or id has one, and PostgreSQL refuses it in a query (an inference request's path only
            # names a model, looked up in the catalog)
            raise InvalidInput("the URL has a NUL character (%00)")
        if kind not in ("inference", "page", "health"):
            origin = cross_origin(headers, sec.trusted_origins)
            if origin is not None:
                raise Forbidden(f"Cross-origin requests to {path} are refused (from {origin})")
        cap = {
            "inference": self.core.settings.max_body_bytes,
            "cost_lookup": sec.max_cost_lookup_body_bytes,
        }.get(kind, sec.max_api_body_bytes)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise PayloadTooLarge(f"the request body is {length} bytes, more than the limit of {cap}")
        token = bearer(headers)
        caller = await self._authenticate(kind, token)
        if caller is not None:
            scope.setdefault("state", {})["caller"] = caller
        ticket = self._rate_limit(caller, token) if kind == "inference" and caller is not None else None
        if kind in ("admin", "account", "cost_lookup") and method not in SAFE_METHODS:
            try:
                receive = await _buffered(receive, cap)
            except BaseException:
                if ticket is not None:
                    ticket.release()
                raise
        return caller, ticket, receive

    async def _authenticate(self, kind: RouteKind, token: str | None) -> Caller | None:
        billing = self.core.billing
        mode = billing.settings.mode
        if kind == "admin":
            if token is None:
                raise Unauthorized(MISSING_ADMIN_TOKEN)
            return await run_in_threadpool(billing.authenticate, token)
        if kind == "account":
            if token is None:
                if mode == "tokens":
                    raise Unauthorized(MISSING_TOKEN)
                return None  # open mode: the local account (serving/routes/accounts.py caller_of)
            return await run_in_threadpool(billing.authenticate, token)
        if kind == "cost_lookup":
            metering = self.core.metering
            if metering.settings.provider_secret and not metering.check_provider_secret(token):
                raise Unauthorized("Invalid credentials for the billing endpoint")
            return None
        if kind == "ops":
            return await self._ops_caller(token)
        if kind == "inference":
            return await self._inference_caller(token)
        return None

    async def _ops_caller(self, token: str | None) -> Caller | None:
        policy = ops_policy(self.core.settings)
        if policy == "public":
            return None
        if policy == "off":
            from serving.routes.usage import EndpointDisabled

            raise EndpointDisabled("this endpoint is turned off (security.ops_endpoints: off)")
        if token is None:
            raise Unauthorized("This endpoint needs an admin token (security.ops_endpoints: admin)")
        caller = await run_in_threadpool(self.core.billing.authenticate, token)
        if not caller.is_admin:
            raise Forbidden("This endpoint needs an administrator token")
        return caller

    async def _resolve_once(self, token: str) -> Caller:
        """`resolve_token` in a worker thread, one at a time per token: a caller that finds the same token's look-up
        in flight waits for its answer (the caller or the 401) instead of reading the database again."""
        key = (asyncio.get_running_loop(), token)
        pending = self._resolving.get(key)
        if pending is None:
            pending = asyncio.ensure_future(
                run_in_threadpool(self.core.billing.accounts.resolve_token, token)
            )
            self._resolving[key] = pending
            pending.add_done_callback(lambda done: self._resolved(key, done))
        # Shielded: a caller that leaves (its client went away) does not cancel the others' look-up.
        return await asyncio.shield(pending)

    def _resolved(self, key: tuple[asyncio.AbstractEventLoop, str], done: asyncio.Future[Caller]) -> None:
        self._resolving.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here: every caller may have left before it came

    async def _inference_caller(self, token: str | None) -> Caller:
        """Who is asking, checked before the body is read: the local account in open mode; in tokens mode one of
        our tokens (cached, or one look-up) or a Hugging Face token (the Hub's whoami), else 401."""
        billing = self.core.billing
        s = billing.settings
        if s.mode == "open":
            return Caller(name=s.local_account, tier=OPEN_TIER, is_admin=False)
        if token is None:
            raise Unauthorized(MISSING_TOKEN)
        if token.startswith(s.token_prefix):
            if billing.migrations is None or billing.migrations.done:
                cached = billing.accounts.cached_caller(token)  # raises 401 for a token cached as unknown
                if cached is not None:
                    return cached
            return await self._resolve_once(token)
        if s.accept_hf_tokens:
            identity = await billing.whoami.identify_async(token)
            return Caller(name=s.routed_account_prefix + identity.name, tier=ROUTED_TIER, is_admin=False)
        raise Unauthorized("Invalid credentials in Authorization header")

    def _rate_limit(self, caller: Caller, token: str | None) -> Ticket:
        tiers = self.core.settings.billing.rate_limits
        limits = limits_for(caller.tier or "default", tiers)
        checks = [Check("account", "account:" + caller.name, limits.per_account)]
        if token is not None:
            checks.insert(0, Check("token", "token:" + token_key(token), limits.per_token))
        return self.limiter.acquire(checks)

    @staticmethod
    def _sending(send: Send, ticket: Ticket | None, status: list[int]) -> Send:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                if ticket is not None and ticket.headers:
                    response_headers = MutableHeaders(scope=message)
                    for name, value in ticket.headers.items():
                        response_headers[name] = value
            await send(message)

        return sending

    async def _audit(self, caller: Caller, method: str, path: str, status: int, scope: Scope) -> None:
        if not self.core.settings.security.audit_admin_actions:
            return
        from billing.audit import record

        client = scope.get("client")
        try:
            billing = self.core.billing
            await run_in_threadpool(billing.ensure_schema)
            await run_in_threadpool(
                record,
                billing.engine,
                actor=caller.name,
                action=f"{method} {path}",
                status=status,
                source=f"http {client[0]}" if client else "http",
            )
        except Exception:  # the action is done; a lost audit line is logged, never the caller's problem
            log.exception("audit: could not record %s %s by %s", method, path, caller.name)


async def _buffered(receive: Receive, cap: int) -> Callable[[], Awaitable[Message]]:
    """Read the whole body now (PayloadTooLarge past `cap` bytes) and hand it to the app as one message."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            pending: list[Message] = [message]
            break
        body = message.get("body", b"")
        size += len(body)
        if size > cap:
            raise PayloadTooLarge(f"the request body is more than the limit of {cap} bytes")
        chunks.append(body)
        if not message.get("more_body", False):
            pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
            break

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


def _text_chars(value: object) -> int:
    """Characters of text in chat message content: a string, or the `text` of content parts (not images)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(p.get("text")) if isinstance(p, dict) else _text_chars(p) for p in value)
    return 0


# Generation tasks: their prompt is tokenised on the replica, under its lock. Field named in the refusal.
_PROMPT_FIELDS = {CHAT_COMPLETION: "messages", COMPLETION: "prompt", TEXT_GENERATION: "inputs"}


def check_input_chars(parsed: Parsed, spec: ModelSpec) -> None:
    """Refuse (400, naming the field and `limits.max_input_chars`) a generation prompt longer than the model
    takes, at the ingress: before the replica's lock, where tokenising it would hold the model for nothing."""
    task = parsed.request.task
    field = _PROMPT_FIELDS.get(task)
    if field is None:
        return
    inputs = parsed.request.inputs
    if task == CHAT_COMPLETION and isinstance(inputs, list):
        chars = sum(_text_chars(m.get("content")) for m in inputs if isinstance(m, dict))
    else:
        chars = parsed.request.input_characters()
    limit = spec.limits.max_input_chars
    if chars > limit:
        raise InvalidInput(
            f"{field} has {chars} characters, more than this model's limit of {limit} (limits.max_input_chars)"
        )
