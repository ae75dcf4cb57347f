"""``omniquant serve``: an OpenAI-compatible server over the emulated serving numerics.

Policy:
- vLLM's OpenAI-compatible server is the reference for every field, shape, default and
  error wording; where omniquant differs it says so in an error. The wire models are in
  ``omniquant.endpoint.protocol``, messages and media in ``omniquant.endpoint.messages``,
  requests to jobs and jobs to responses in ``omniquant.endpoint.serving``, the model and
  its scheduler (chunked prefill, cancellation, the bounded queue) in
  ``omniquant.endpoint.engine``. This module is the HTTP side only.
- Built on FastAPI + uvicorn (no hand-written HTTP). Endpoints: ``GET /v1/models``,
  ``GET /v1/models/{id}``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
  ``GET /health``.
- Safety: binds 127.0.0.1 unless told otherwise; a request body over
  ``max_request_bytes`` is refused with 413 while it is read; a body that is not JSON
  gets 415 / 400; local media only under ``--allowed-local-media-path``; no URL is
  fetched. Every refusal is OpenAI-style error JSON (``{"error": {"message", "type",
  "param", "code"}}``); a full queue answers 429 with ``Retry-After``; an unexpected
  exception becomes a 500 with a one-line message (the traceback goes to the server
  log), and the server keeps serving.
- Media are decoded and prompts tokenized in the request's thread (outside the model);
  one worker thread runs the model (``omniquant.endpoint.engine.Scheduler``).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at run time,
# and `Request` is imported inside create_app.

import logging
import socket
from pathlib import Path

from omniquant.endpoint.engine import Scheduler, ServedModel, release_memory
from omniquant.endpoint.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    ProtocolError,
)

__all__ = ["ServedModel", "bind", "create_app", "serve"]

DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
DEFAULT_MAX_LOGPROBS = 20
log = logging.getLogger("omniquant.serve")
_KINDS = {400: "BadRequestError", 403: "PermissionDeniedError", 404: "NotFoundError",
          405: "MethodNotAllowed", 413: "RequestEntityTooLarge", 415: "UnsupportedMediaType",
          429: "RateLimitError", 500: "InternalServerError"}  # fmt: skip


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    body = ErrorResponse(error=ErrorInfo(message=message, type=_KINDS.get(status, "BadRequestError"),
                                         param=param, code=status))  # fmt: skip
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


def _validation_message(err) -> tuple[str, str | None]:
    """A pydantic error as ``(message naming the field, param)``."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if not str(p).startswith("function-"))
    name = str(first["loc"][0]) if first.get("loc") else None
    if first.get("type") == "extra_forbidden":
        return f"{loc}: not supported by omniquant serve (unknown parameter)", name
    if first.get("type") == "missing":
        return f"{loc}: field required", name
    return f"{loc}: {first.get('msg')} (got {first.get('input')!r})"[:500], name


async def read_json(request, max_request_bytes: int, model_id: str) -> dict:
    """The request body as a JSON object (413 / 415 / 400 / 404 as ``ProtocolError``)."""
    import json

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ProtocolError(
            f"Content-Type {ctype or '(none)'!r}: send application/json", status=415
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
        raise ProtocolError(
            f"request body of {int(declared)} bytes exceeds the limit of {max_request_bytes} "
            "bytes (omniquant serve --max-request-mb)", status=413
        )  # fmt: skip
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_request_bytes:
            raise ProtocolError(
                f"request body exceeds the limit of {max_request_bytes} bytes "
                "(omniquant serve --max-request-mb)", status=413
            )  # fmt: skip
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProtocolError(f"request body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise ProtocolError("request body must be a JSON object")
    requested = body.get("model")
    if requested is not None and requested != model_id:
        raise ProtocolError(
            f"The model `{requested}` does not exist; this server serves `{model_id}`",
            status=404,
            param="model",
        )
    return body


def create_app(
    model: ServedModel,
    *,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_logprobs: int = DEFAULT_MAX_LOGPROBS,
    max_queued_requests: int = 64,
    max_num_seqs: int = 16,
    prefill_chunk: int = 256,
    allowed_local_media_path: str | Path | None = None,
):
    """The FastAPI application serving ``model``.

    Args:
        model: The loaded model.
        max_request_bytes: Larger request bodies get 413 (checked while reading).
        max_logprobs: Upper bound of ``top_logprobs``, ``logprobs`` and ``prompt_logprobs``.
        max_queued_requests: Jobs that may wait for the model beyond the running ones;
            more get 429 with ``Retry-After``.
        max_num_seqs: Jobs the model steps in turn.
        prefill_chunk: Prompt tokens per prefill step.
        allowed_local_media_path: Directory whose files media parts may name
            (``file://`` or plain paths); ``None``: data URIs only.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse
    from pydantic import ValidationError
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from omniquant.endpoint import serving

    settings = serving.Settings(
        max_logprobs=max_logprobs,
        allowed_media=Path(allowed_local_media_path).resolve() if allowed_local_media_path else None,
    )
    scheduler = Scheduler(model, max_num_seqs=max_num_seqs, max_queued=max_queued_requests,
                          prefill_chunk=prefill_chunk)  # fmt: skip
    app = FastAPI(title="omniquant serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.requests_served = 0
    app.state.scheduler = scheduler
    app.router.on_shutdown.append(scheduler.close)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc):
        return _error(400, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(Exception)
    async def _unexpected(_request, exc):
        log.exception("request failed")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    async def answer(request: Request, kind):
        chat = kind is ChatCompletionRequest
        try:
            body = await read_json(request, max_request_bytes, model.model_id)
            try:
                req = kind.model_validate(body)
            except ValidationError as err:
                message, param = _validation_message(err)
                raise ProtocolError(message, param=param) from err
            run = await serving.submit(model, scheduler, req, settings)
        except ProtocolError as err:
            if scheduler.load() == {"running": 0, "waiting": 0}:
                release_memory()  # what a refused (e.g. huge) body allocated
            return _error(err.status, str(err), err.param, err.headers)
        app.state.requests_served += 1
        if req.stream:
            stream = (serving.chat_stream if chat else serving.completion_stream)(
                model, run, req, request
            )
            # The background task also cancels jobs whose stream never started.
            return StreamingResponse(stream, media_type="text/event-stream",
                                     background=BackgroundTask(run.cancel))  # fmt: skip
        result = await (serving.chat_response if chat else serving.completion_response)(
            model, run, req, request
        )
        if result is None:  # the client went away; nobody reads this
            return _error(499, "client disconnected")
        return result.model_dump()

    @app.get("/health")
    async def health():
        return {"status": "ok", **scheduler.load()}

    def card() -> ModelCard:
        return ModelCard(
            id=model.model_id,
            created=model.created,
            root=str(model.path.resolve()),
            max_model_len=model.max_model_len,
            # What the checkpoint's files say (precision, size, bits per weight):
            # the report shows it for served models as for loaded ones.
            omniquant={**model.info, "emulation": model.loaded.emulation},
        )

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[card()]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str):
        if model_id != model.model_id:
            return _error(404, f"The model `{model_id}` does not exist.", "model")
        return card().model_dump()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, CompletionRequest)

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_id: str | None = None,
    max_model_len: int | None = None,
    chat_template: str | None = None,
    announce=print,
    **limits,
) -> None:
    """Load ``path`` and serve it until interrupted.

    Prints ``listening on http://HOST:PORT/v1`` once the socket is bound (with port 0,
    the port chosen). ``limits`` are ``create_app``'s keyword arguments.
    """
    import uvicorn

    model = ServedModel(path, model_id, max_model_len=max_model_len, chat_template=chat_template)
    app = create_app(model, **limits)
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    announce(f"serving {model.model_id} ({model.info['precision']}) from {model.path}, "
             f"max_model_len {model.max_model_len}")  # fmt: skip
    announce(f"listening on http://{shown}:{bound}/v1")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
