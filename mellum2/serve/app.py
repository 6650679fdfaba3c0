"""The ASGI application: routes, API-key check, OpenAI-shaped errors, the chat page.

    app = build_app(state)      # state: common.ServeState (backend, tokenizer, model name, limits)

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics,
GET / (the web chat page, static/index.html). With an API key, /v1/* needs `Authorization: Bearer
KEY` (401 otherwise), as vLLM's --api-key; /health, /metrics and the page stay open.

Every error a client can cause is answered as OpenAI's error JSON (protocol.py) with its status;
request bodies are parsed here (not by FastAPI's dependency machinery) so malformed JSON, a body that
is not an object, wrong types and unknown fields all get a 400 naming the field, never a 422 or a
500. An exception inside a handler ends that request with a 500 and the server goes on serving.
"""
from __future__ import annotations

import hmac
import json
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import chat, completions
from .common import ServeState, now
from .protocol import APIError, ChatRequest, CompletionRequest, bad_request, pydantic_error

PAGE = Path(__file__).with_name("static") / "index.html"
log = logging.getLogger("mellum2.serve")


def _error_response(e: APIError, state: ServeState | None = None) -> JSONResponse:
    if state is not None:
        state.backend.metrics.http_errors.labels(str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _body(request: Request, model):
    raw = await request.body()
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" ({e.msg} at line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise bad_request(f"We could not parse the JSON body of your request{where}. The body must be a JSON "
                          f"object.") from None
    if not isinstance(obj, dict):
        raise bad_request(f"The request body must be a JSON object, got {type(obj).__name__}.")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise pydantic_error(e) from None


class _APIKey:
    """`Authorization: Bearer KEY` on /v1/* (401 otherwise), as plain ASGI middleware: a streamed
    response passes through untouched (Starlette's BaseHTTPMiddleware relays every chunk of a stream
    through a memory channel and a task switch, which under 32 streams cost the event loop a
    measurable share of its time)."""

    def __init__(self, app, state: ServeState):
        self.app, self.state = app, state
        self.key = state.api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            got = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
            scheme, _, key = got.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.key):
                msg = ("You didn't provide an API key. Pass it as `Authorization: Bearer KEY`." if not got
                       else "Incorrect API key provided.")
                err = APIError(401, msg, "authentication_error", None, "invalid_api_key")
                return await _error_response(err, self.state)(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(state: ServeState) -> FastAPI:
    app = FastAPI(title="mellum2", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    if state.api_key is not None:
        app.add_middleware(_APIKey, state=state)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error_response(e, state)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return _error_response(APIError(e.status_code, msg, kind), state)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_server_error"),
                               state)

    @app.post("/v1/completions")
    async def create_completion(request: Request):
        return await completions.create(state, await _body(request, CompletionRequest), request)

    @app.post("/v1/chat/completions")
    async def create_chat(request: Request):
        return await chat.create(state, await _body(request, ChatRequest), request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": now(),
                                            "owned_by": "mellum2", "root": state.model_name,
                                            "max_model_len": state.max_model_len}]}

    @app.get("/health")
    async def health():
        thread = state.backend._thread
        alive = getattr(state.backend.engine, "alive", None)  # the engine process, when it has one
        if thread is None or not thread.is_alive() or (alive is not None and not alive()):
            return JSONResponse({"status": "error", "error": "the engine is not running"}, status_code=503)
        return {"status": "ok", **state.backend.stats()}

    @app.get("/metrics")
    async def metrics():
        m = state.backend.metrics
        return Response(m.render(), media_type=m.content_type)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app
