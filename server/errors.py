"""Exceptions -> OpenAI error JSON ({"error": {message, type, param, code}}) with the right status.

No handler ever puts a stack trace in a response; unexpected errors are logged server-side
and answered with a generic 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlxkv.errors import (
    EngineDeadError,
    EngineOverloadedError,
    GenerationError,
    InvalidRequestError,
    MlxkvError,
    ModelNotFoundError,
)

log = logging.getLogger("mlxkv.server")


def error_response(status: int, message: str, err_type: str, param=None, code=None,
                   headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _mlxkv_error(_: Request, exc: MlxkvError) -> JSONResponse:
    if isinstance(exc, InvalidRequestError):
        return error_response(400, str(exc), "invalid_request_error", exc.param,
                              getattr(exc, "code", None))
    if isinstance(exc, ModelNotFoundError):
        return error_response(404, str(exc), "invalid_request_error", "model",
                              "model_not_found")
    if isinstance(exc, EngineOverloadedError):
        retry = max(1, int(getattr(exc, "retry_after_s", 1) or 1))
        return error_response(429, str(exc), "rate_limit_error", None, "overloaded",
                              headers={"Retry-After": str(retry)})
    if isinstance(exc, EngineDeadError):
        return error_response(503, str(exc), "server_error", None, "engine_dead")
    if isinstance(exc, GenerationError):
        return error_response(500, str(exc), "server_error", None, "generation_failed")
    return error_response(500, "internal error", "server_error")


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid" or (not loc and first.get("type") in (
        "model_attributes_type", "dict_type", "missing")):
        msg, param = "the request body must be a JSON object", None
    return error_response(400, f"{param + ': ' if param else ''}{msg}",
                          "invalid_request_error", param)


def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    err_type = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
    return error_response(exc.status_code, str(exc.detail), err_type,
                          headers=getattr(exc, "headers", None))


def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled %s: %s", type(exc).__name__, exc)
    return error_response(500, "internal server error", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(MlxkvError, _mlxkv_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
