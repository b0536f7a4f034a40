"""create_app(engine, config): the OpenAI-compatible FastAPI app. Routes only; no mx here.

Handlers validate (pydantic + SamplingParams), build prompt token ids (chat template),
and read the engine's async stream; the engine thread does everything else. A stream's
first delta is awaited before the response starts, so engine-side refusals (bad input,
overload, dead engine) become proper HTTP errors; closing a stream (client disconnect)
aborts the request and frees its blocks.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import uuid
from collections import Counter

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from mlxkv.config import ServerConfig
from mlxkv.errors import InvalidRequestError, ModelNotFoundError
from server import metrics as prom
from server.batch import open_stream
from server.engine_client import EngineClient
from server.errors import install_error_handlers
from server.middleware import BodyLimitMiddleware, StatusCountMiddleware
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.streaming import SSEResponse, collect, stream_chunks
from server.tool_calls import PlainText
from server.tool_choice import dump_schema, plan_output, response_format_schema, template_tool_call

log = logging.getLogger("mlxkv.server")


def _check_model(engine: EngineClient, name: str) -> None:
    if name != engine.model_name:
        raise ModelNotFoundError(f"model {name!r} is not served here (serving {engine.model_name!r})")


def _template_message(i: int, m) -> dict:
    m.check_content(i)
    msg = {"role": m.role, "content": m.text()}
    for key in ("name", "tool_call_id"):
        if getattr(m, key) is not None:
            msg[key] = getattr(m, key)
    if m.tool_calls is not None:
        msg["tool_calls"] = [template_tool_call(tc) for tc in m.tool_calls]
    return msg


def _chat_prompt(engine: EngineClient, req: ChatCompletionRequest) -> list[int]:
    messages = [_template_message(i, m) for i, m in enumerate(req.messages)]
    kwargs = {"tools": req.tools} if req.tools and req.tool_choice != "none" else {}
    try:
        ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except Exception as exc:  # no template, or the template rejects the conversation
        raise InvalidRequestError(f"cannot apply the chat template: {exc}", "messages") from exc
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    if isinstance(ids, str):
        ids = engine.tokenizer.encode(ids)
    return [int(t) for t in ids]


def _completion_prompts(engine: EngineClient, req: CompletionRequest) -> list[list[int]]:
    """Every prompt of the request as token ids (a batch: several strings or id lists)."""
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise InvalidRequestError("the prompt is empty", "prompt")
    out = []
    for i, p in enumerate(prompt):
        ids = list(engine.tokenizer.encode(p)) if isinstance(p, str) else list(p)
        if not ids:
            raise InvalidRequestError(f"prompt[{i}] is empty", "prompt")
        out.append(ids)
    return out


def _check_length(engine: EngineClient, ids: list[int], max_tokens: int | None) -> None:
    if len(ids) + (max_tokens or 1) > engine.max_model_len:
        raise InvalidRequestError(
            f"this model's maximum context is {engine.max_model_len} tokens; the prompt has "
            f"{len(ids)} tokens and {max_tokens or 1} more were requested", "messages")


def _attention_metrics(attention: dict) -> str:
    """Prometheus lines: the active attention backend and each kernel's state (1 = usable)."""
    lines = ["# HELP mlxkv_attention_backend_info attention backend in use",
             "# TYPE mlxkv_attention_backend_info gauge",
             f'mlxkv_attention_backend_info{{backend="{attention.get("backend", "reference")}"}} 1',
             "# HELP mlxkv_kernel_enabled kernel variant usable (0: disabled or declined)",
             "# TYPE mlxkv_kernel_enabled gauge"]
    for key, status in sorted(attention.get("kernels", {}).items()):
        usable = int(status["state"] in ("ok", "unchecked"))
        lines.append(f'mlxkv_kernel_enabled{{kernel="{key}",state="{status["state"]}"}} {usable}')
    return "\n".join(lines) + "\n"


def _linear_metrics(linear: dict) -> str:
    """Prometheus lines: what the linear layers run (cpu-ext or reference)."""
    return ("# HELP mlxkv_linear_backend_info backend of the model's linear layers\n"
            "# TYPE mlxkv_linear_backend_info gauge\n"
            f'mlxkv_linear_backend_info{{backend="{linear.get("backend", "reference")}"}} 1\n')


def create_app(engine: EngineClient, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (which must already be running)."""
    config = config or ServerConfig()
    app = FastAPI(title="mlxkv", version="0.1.0")
    http_counts: Counter[int] = Counter()
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(StatusCountMiddleware, counts=http_counts)
    install_error_handlers(app)

    async def require_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), config.api_key.encode()):
            raise HTTPException(401, "invalid or missing API key",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        if not engine.is_healthy():
            return JSONResponse({"status": "engine dead"}, status_code=503)
        stats = engine.cache_stats()
        attention, linear = stats.get("attention", {}), stats.get("linear", {})
        disabled = sorted(k for k, s in attention.get("kernels", {}).items()
                          if s["state"] == "disabled")
        return {"status": "ok", "attention_backend": attention.get("backend", "reference"),
                "linear_backend": linear.get("backend", "reference"),
                "disabled_kernels": disabled}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        stats = engine.cache_stats()
        return (prom.render(engine.metrics(), stats, dict(http_counts))
                + _attention_metrics(stats.get("attention", {}))
                + _linear_metrics(stats.get("linear", {})))

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models():
        card = {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "mlxkv",
                "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/v1/cache/stats", dependencies=[Depends(require_key)])
    async def cache_stats():
        return engine.cache_stats()

    async def _generate(kind: str, prompts: list[list[int]], body, params,
                        make_parser=PlainText):
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        for ids in prompts:
            _check_length(engine, ids, params.max_tokens)
            if config.log_prompts:
                log.info("%s prompt: %r", request_id, engine.tokenizer.decode(ids))
        log.info("%s: %s prompt tokens, n=%d, max_tokens=%s%s", request_id,
                 "+".join(str(len(ids)) for ids in prompts), params.n, params.max_tokens,
                 ", json-constrained" if params.json_schema else "")
        # engine refusals raise here, before any byte is sent
        first, stream = await open_stream(engine, request_id, prompts, params)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            chunks = stream_chunks(engine, kind, request_id, first, stream, params.n,
                                   include_usage, len(prompts), make_parser)
            return SSEResponse(chunks, stream)
        return await collect(engine, kind, request_id, first, stream, params.n, len(prompts),
                             make_parser)

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(body: ChatCompletionRequest):
        _check_model(engine, body.model)
        plan = plan_output(body.tools, body.tool_choice, body.response_format, engine.tokenizer)
        params = body.to_sampling_params(config, plan.json_schema)
        if not plan.skip_special_tokens:
            params = dataclasses.replace(params, skip_special_tokens=False)
        return await _generate("chat", [_chat_prompt(engine, body)], body, params,
                               plan.make_parser)

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(body: CompletionRequest):
        _check_model(engine, body.model)
        params = body.to_sampling_params(config, dump_schema(response_format_schema(
            body.response_format)))
        return await _generate("text", _completion_prompts(engine, body), body, params)

    return app
