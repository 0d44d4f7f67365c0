"""OpenAI-style errors: every failure a client can cause becomes `{"error": {message, type, param, code}}`
with a 4xx status, and the server keeps serving. Anything else is a bug; it still answers in that shape."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kiln.errors import KilnError
from kiln.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"


class APIError(Exception):
    """An error to answer with: HTTP status plus OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return error_response(
            self.status, self.message, type=self.type, param=self.param, code=self.code, headers=self.headers
        )


def error_body(message: str, *, type: str = INVALID_REQUEST, param: str | None = None, code: Any = None):
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()


def error_response(
    status: int,
    message: str,
    *,
    type: str = INVALID_REQUEST,
    param: str | None = None,
    code: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = error_body(message, type=type, param=param, code=code)
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """One readable line (and the offending field) from pydantic's error list."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({detail})", None
    if first.get("type") == "field_invalid":  # from a model validator (protocol.field_error)
        return first.get("msg", "invalid value"), first["ctx"]["param"]
    params = [_param(error) for error in errors]
    param = params[0]
    if params.count(param) > 1:  # every branch of a union failed: a value error beats "wrong type"
        first = next((e for e in errors if _param(e) == param and not _is_type_error(e)), first)
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "this field is required"
    elif first.get("type") in ("model_attributes_type", "dict_type") and param is None:
        message = "the request body must be a JSON object"
    elif params.count(param) > 1 and _is_type_error(first):
        message = f"{_short(first.get('input'))} is none of the accepted types"
    num_others = len(set(params) - {param})
    plural = "s" if num_others > 1 else ""
    more = f" (and problems with {num_others} more field{plural})" if num_others else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


def _is_type_error(error: Mapping[str, Any]) -> bool:
    kind = str(error.get("type", ""))
    return kind.endswith("_type") or kind in ("literal_error", "is_instance_of", "union_tag_invalid")


def _param(error: Mapping[str, Any]) -> str | None:
    # Unions report each branch as a location part ("str", "list[int]"); name the field that has them.
    parts = []
    for part in (str(part) for part in error.get("loc", ()) if part != "body"):
        if "[" in part or part.startswith("constrained-") or part in ("str", "int", "float", "bool"):
            break
        parts.append(part)
    return ".".join(parts) or None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(error.errors())
        return error_response(400, message, param=param, code="invalid_value" if param else None)

    @app.exception_handler(KilnError)
    async def kiln_error(_: Request, error: KilnError) -> JSONResponse:
        # A KilnError that knows the request field at fault (the engine's vocabulary checks set
        # `param`, e.g. "top_k" or "stop_token_ids") names it, as pydantic's errors do.
        param = getattr(error, "param", None)
        return error_response(400, str(error), param=param, code="invalid_value" if param else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed here"}.get(
            error.status_code, str(error.detail)
        )
        code = "not_found" if error.status_code == 404 else None
        return error_response(error.status_code, message, code=code, headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving a request")
        return error_response(500, f"internal server error: {error!r}", type="server_error")
