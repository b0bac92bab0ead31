"""The FastAPI routes of the wire contract, on top of an IngressCore."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from models.errors import ModelNotFound
from models.types import CHAT_COMPLETION, COMPLETION
from serving import billing_page, errors, openapi, runtime_status
from serving.disconnect import CancelOnDisconnect
from serving.health import database_probe, health_report
from serving.ingress import EXPOSED_HEADERS, IngressCore
from serving.routes import accounts as accounts_routes
from serving.routes import status as status_routes
from serving.routes import usage as usage_routes
from serving.routes.base import json_response
from serving.routes.registry import ADAPTERS
from serving.security import Guard

PREFIX = "/hf-inference"

# Suffixes of /models/{id}... that name an operation rather than part of the model id.
_POST_SUFFIXES = (
    ("/v1/chat/completions", CHAT_COMPLETION),
    ("/chat/completions", CHAT_COMPLETION),
    ("/v1/completions", COMPLETION),
    ("/completions", COMPLETION),
)


class StripPrefix:
    """Pure ASGI: route on the whole path, less the service's mount point (`route_prefix`), and serve every route
    under /hf-inference too, for clients that rewrite the router's host.

    Serve hands an application's requests over with its route prefix as `root_path`, which Starlette would strip
    before matching: a model application (at `/models/{id}`) serves the same full paths as the router."""

    def __init__(self, app: ASGIApp, mount: str = "/") -> None:
        self.app = app
        self.prefixes = [p for p in (mount.rstrip("/"), PREFIX) if p]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "root_path": ""}
            for prefix in self.prefixes:
                path = scope["path"]
                if path == prefix or path.startswith(prefix + "/"):
                    scope["path"] = path[len(prefix) :] or "/"
                    scope["raw_path"] = scope["path"].encode()
        await self.app(scope, receive, send)


class ModelPosts:
    """Pure ASGI, inside the guard (tokens, CORS, rate limits, body caps have run): `POST /models/{id}...`, the
    inference requests, go straight to the handler; everything else to the app's router.

    The route is the same as the router's `model_post` (declared first, so it already takes every such request),
    and errors are answered by the same handlers (`errors.handled_response`). What it skips is Starlette's and
    FastAPI's per-request machinery between the middleware and the handler (exception middleware, exit stack,
    route scan, dependency solving): 22 % of the event loop's CPU a request for a small model (measured in
    process, 8 interleaved rounds: 0.461 against 0.592 ms a request of local/tiny-sentiment at 16 clients)."""

    PREFIX = "/models/"

    def __init__(self, app: ASGIApp, core: IngressCore) -> None:
        self.app = app
        self.core = core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith(self.PREFIX):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        model_id, hint = split_model_path(scope["path"][len(self.PREFIX) :])
        try:
            response = await self.core.handle(request, model_id, hint)
        except Exception as err:
            response = errors.request_response(request, err, self.core.set_request_id_header)
        await response(scope, receive, send)


def split_model_path(path: str) -> tuple[str, str | None]:
    """`ORG/NAME/pipeline/TASK` or `ORG/NAME/v1/chat/completions` -> (model id, task hint)."""
    path = path.strip("/")
    for suffix, task in _POST_SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)], task
    if "/pipeline/" in path:
        model_id, _, task = path.rpartition("/pipeline/")
        return model_id, task
    return path, None


def create_app(core: IngressCore, *, model_routes_only: bool = False) -> FastAPI:
    """The service's HTTP API over `core`. `model_routes_only`: a model's (or a pool's) own application, which the
    proxy sends only paths under `/models/...`: the model routes and /health, nothing else. Besides being all it
    needs, it keeps Serve's per-request route-name scan short: Serve matches each request against this app's routes
    relative to the application's prefix, which no route matches, so it walks every route (and every included
    router's) twice: 205 us a request here with the full list, 35 us with this one (measured in one run)."""
    app = FastAPI(title="hf-inference backend", docs_url="/docs", redoc_url=None)
    app.state.core = core
    app.state.metering = core.metering
    app.state.billing = core.billing

    async def model_description(model_id: str) -> dict[str, Any]:
        spec = core.spec(model_id)
        info = await core.model_info(spec)
        profile = core.profiles.get(spec.hardware_profile)
        return {
            "id": spec.id,
            "task": spec.task,
            "tasks": list(info["tasks"]),
            "sha": info.get("revision"),
            "revision": spec.source.revision if spec.source.repo_id else None,
            "source": spec.source.model_dump(exclude_none=True),
            "hardware_profile": profile.name,
            "accelerator": profile.accelerator.model_dump() if profile.accelerator else None,
            "device": info.get("device"),
            "dtype": spec.dtype,
            "limits": spec.limits.model_dump(),
            "max_ongoing_requests": spec.max_ongoing_requests,
            "batching": spec.batching.model_dump() if spec.batching else None,
        }

    # The model routes first: each request's route is found by a scan of this list in order, by Starlette and again
    # by Serve (its request metrics' route name), and on a model's own application they are the only ones used.
    # (ModelPosts answers this one's requests before the router sees them; it stays for the route scans and the
    # OpenAPI description.)
    @app.post("/models/{path:path}")
    async def model_post(path: str, request: Request) -> Response:
        model_id, hint = split_model_path(path)
        return await core.handle(request, model_id, hint)

    @app.get("/models/{path:path}")
    async def model_get(path: str) -> Response:
        path = path.strip("/")
        if path.endswith("/info"):
            return json_response(await model_description(path.removesuffix("/info")))
        if path.endswith("/health"):
            spec = core.spec(path.removesuffix("/health"))
            await core.model_info(spec)
            # This process's charges waiting for its spool (a model's replica meters its own requests).
            held = core.metering.unspooled_charges
            if held:  # its spool cannot write: it refuses requests until these are on disk
                return json_response({"status": "degraded", "model": spec.id, "unspooled_charges": held})
            return json_response({"status": "ok", "model": spec.id})
        raise ModelNotFound(path)

    if not model_routes_only:
        app.include_router(usage_routes.router)
        app.include_router(accounts_routes.router)
        app.include_router(billing_page.router)  # GET /billing: the billing page and its reads
        app.include_router(status_routes.router)  # GET /admin/status: `hfi status`
    runtime_status.register(core)
    errors.install(app, set_request_id=core.set_request_id_header)
    app.add_middleware(ModelPosts, core=core)  # innermost: inference requests straight to the handler
    # CORS on the inference routes only; tokens, origins, rate limits and body caps before any handler runs.
    app.add_middleware(Guard, core=core, expose_headers=EXPOSED_HEADERS)
    app.add_middleware(CancelOnDisconnect)  # one hop: nobody else tells the handler its client left
    app.add_middleware(StripPrefix, mount=core.settings.route_prefix)
    openapi.install(app, ADAPTERS)  # the task routes' request and response schemas

    probe = app.state.health_probe = database_probe(core)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Up (200) with the database's state, cached a few seconds: see serving/health.py."""
        return await health_report(core, probe)

    if not model_routes_only:
        _router_routes(app, core)
    return app


def _router_routes(app: FastAPI, core: IngressCore) -> None:
    """The router application's own routes: the model named in the body, the listings, the Hub emulation."""

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": m.id,
                    "object": "model",
                    "created": 0,
                    "owned_by": m.id.split("/")[0],
                    "task": m.task,
                    "hardware_profile": m.hardware_profile,
                }
                for m in core.catalog.models
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await core.handle(request, None, CHAT_COMPLETION)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await core.handle(request, None, COMPLETION)

    @app.post("/pipeline/{task}/{model_id:path}")
    async def legacy_pipeline(task: str, model_id: str, request: Request) -> Response:
        return await core.handle(request, model_id, task)

    @app.get("/api/models/{model_id:path}")
    async def hub_model(model_id: str) -> Response:
        """A small emulation of the Hub's model endpoint, for tools that look a model up first."""
        spec = core.spec(model_id)
        return json_response(
            {
                "id": spec.id,
                "pipeline_tag": spec.task,
                "tags": [spec.task],
                "inferenceProviderMapping": [
                    {"provider": "hf-inference", "providerId": spec.id, "status": "live", "task": spec.task}
                ],
            }
        )
