"""The task routes in /openapi.json: one `POST /models/{org}/{name}/pipeline/{task}` per task whose adapter
describes itself (`openapi`: summary, request and response schemas by media type), so that a schema fuzzer can
generate real requests. `POST /models/{org}/{name}` serves the same bodies for the model's own task.

The routes themselves are one catch-all (serving/http.py); these descriptions are added to FastAPI's own."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
}
_PATH_PARAMS = [
    {"name": "org", "in": "path", "required": True, "schema": {"type": "string"}, "example": "local"},
    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
]


def task_operation(task: str, doc: dict[str, Any]) -> dict[str, Any]:
    """One OpenAPI operation from an adapter's description."""
    error = {"application/json": {"schema": _ERROR}}
    return {
        "post": {
            "operationId": f"task_{task.replace('-', '_')}",
            "tags": ["tasks"],
            "summary": doc["summary"],
            "parameters": _PATH_PARAMS,
            "requestBody": {"required": True, "content": doc["request"]},
            "responses": {
                "200": {"description": "the task's output", "content": doc["responses"]},
                "400": {
                    "description": "bad input or parameters: the message names the field",
                    "content": error,
                },
                "404": {"description": "no such model", "content": error},
                "413": {"description": "the body is too large", "content": error},
            },
        }
    }


def task_paths(adapters: dict[str, Any]) -> dict[str, Any]:
    paths = {}
    for task, adapter in sorted(adapters.items()):
        doc = getattr(adapter, "openapi", None)
        if doc:
            paths[f"/models/{{org}}/{{name}}/pipeline/{task}"] = task_operation(task, doc)
    return paths


def install(app: FastAPI, adapters: dict[str, Any]) -> None:
    """Make `app.openapi()` include the task routes (built once, on the first request for it)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("paths", {}).update(task_paths(adapters))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
