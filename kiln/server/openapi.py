"""The OpenAPI schema and /docs: each route documents the statuses it really answers (OpenAI error objects,
never FastAPI's 422, which kiln answers as 400), its non-JSON media types (SSE streams, Prometheus text),
and the bearer key where one is set; Swagger UI is served from local files, so /docs works offline.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from kiln.server.errors import error_response
from kiln.server.fields import MAX_INT64, MIN_INT64
from kiln.server.middleware import PROTECTED_PREFIXES
from kiln.server.protocol import ErrorResponse

ERROR_DESCRIPTIONS = {
    400: "Invalid request: a field out of range or of the wrong type, a prompt too long for the context",
    401: "Missing or wrong API key (only when the server has one)",
    404: "No such model",
    413: "Request body larger than the server's --max-body-size",
    503: "At capacity (with Retry-After), shutting down, or the engine stopped",
}
# With stream: true, server-sent events; as OpenAPI before 3.2 reads it, `schema` describes one event.
STREAM = {
    "schema": {
        "type": "object",
        "properties": {
            "data": {"type": "string", "description": "A chunk (or an error object) as JSON; last, [DONE]"}
        },
        "required": ["data"],
    }
}
HEALTH = {
    "type": "object",
    "properties": {"status": {"type": "string", "enum": ["ok", "draining", "engine stopped"]}},
    "required": ["status"],
}
DOCS_ASSETS = "/docs/assets"


def responses(*statuses: int, ok: type[BaseModel] | None = None, stream: bool = False) -> dict[int, Any]:
    """The `responses=` of a route: its 200 model (and SSE stream), and its error statuses."""
    documented: dict[int, Any] = {
        status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in statuses
    }
    if ok is not None:
        documented[200] = {"model": ok}
    if stream:
        documented.setdefault(200, {})["content"] = {"text/event-stream": STREAM}
    return documented


HEALTH_RESPONSES: dict[int | str, Any] = {
    200: {"description": "Serving", "content": {"application/json": {"schema": HEALTH}}},
    503: {"description": "Draining or engine stopped", "content": {"application/json": {"schema": HEALTH}}},
}
METRICS_RESPONSES: dict[int | str, Any] = {
    200: {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


def install_openapi(app: FastAPI, *, api_key_required: bool) -> None:
    """Replace app.openapi with kiln's: FastAPI's schema less 422, plus bearer auth on the guarded paths."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
                    if api_key_required and path.startswith(PROTECTED_PREFIXES):
                        operation["security"] = [{"bearer": []}]
            components = schema.setdefault("components", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.get("schemas", {}).pop(name, None)
            if api_key_required:
                components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            app.openapi_schema = _exact_int64_bounds(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _exact_int64_bounds(value: Any) -> Any:
    """FastAPI's OpenAPI model types bounds as floats, so the seed's 2**63 - 1 comes out as 2**63 (the
    nearest float): put the exact integers back."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("minimum", "maximum") and isinstance(item, float) and abs(item) == 2.0**63:
                value[key] = MIN_INT64 if item < 0 else MAX_INT64
            else:
                _exact_int64_bounds(item)
    elif isinstance(value, list):
        for item in value:
            _exact_int64_bounds(item)
    return value


def swagger_assets() -> Path | None:
    """Swagger UI's files as the fastapi-offline package ships them, or None when it is not installed."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        return None
    assets = Path(spec.origin).parent / "static"
    return assets if (assets / "swagger-ui-bundle.js").is_file() else None


def install_docs(app: FastAPI) -> None:
    """/docs: Swagger UI from local files (no CDN), or a 404 saying what to install."""
    assets = swagger_assets()
    if assets is not None:
        app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if assets is None:
            return error_response(  # type: ignore[return-value]
                404,
                "the API docs page needs the fastapi-offline package (Swagger UI's files, served locally): "
                "pip install fastapi-offline; the schema itself is at /openapi.json",
                code="not_found",
            )
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )
