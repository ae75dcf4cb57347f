"""``omniquant serve``: an OpenAI-compatible server over the emulated serving numerics.

Policy:
- The model is the one the report measures: ``omniquant.evaluate.emulated.load_emulated`` loads
  the checkpoint's files (FP8 / NVFP4 dequantized from the stored bytes, activation and
  FP8 KV quantization emulated), prompts go through ``omniquant.data.processing`` and
  the backbone is driven by the same helpers as ``omniquant.evaluate.runner``. It runs
  on the CPU (the loader places the model there), with no serving engine installed.
- Built on FastAPI + uvicorn (no hand-written HTTP). Endpoints: ``GET /v1/models``,
  ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /health``. Chat takes
  ``text``, ``image_url``, ``video_url``, ``audio_url`` and ``input_audio`` parts with
  base64 data URIs (see ``omniquant.endpoint.protocol``); the server fetches no URL.
- Decoding is greedy (``temperature`` 0 or unset; anything else is refused rather than
  silently ignored). ``logprobs`` / ``top_logprobs`` cover the generated tokens;
  vLLM's ``prompt_logprobs`` extension covers the tokens of a continued assistant
  message (the prefill); positions of the user turn are ``null`` (the emulator does not
  compute them), as is the first token. ``return_tokens_as_token_ids`` (vLLM) writes
  tokens as ``token_id:N``.
- Safety: binds 127.0.0.1 unless told otherwise; a request body over
  ``max_request_bytes`` is refused with 413 while it is read; a body that is not JSON
  gets 415 / 400; media are decoded fully before the model sees them. Every refusal is
  OpenAI-style error JSON (``{"error": {"message", "type", "param", "code"}}``); an
  unexpected exception becomes a 500 with a one-line message (the traceback goes to the
  server log), and the server keeps serving.
- One model, one lock: HTTP requests are accepted concurrently, media are decoded
  outside the lock, model calls run one at a time.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at run time,
# and `Request` is imported inside create_app.

import logging
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from omniquant.endpoint.protocol import ChatPrompt, ProtocolError, chat_prompt

DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
DEFAULT_MAX_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 16
log = logging.getLogger("omniquant.serve")
_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif",
           "video/mp4": ".mp4", "video/webm": ".webm", "video/x-matroska": ".mkv",
           "audio/wav": ".wav", "audio/x-wav": ".wav", "audio/flac": ".flac",
           "audio/mpeg": ".mp3", "audio/ogg": ".ogg"}  # fmt: skip


@dataclass
class StepLogprobs:
    """One decoded (or scored) position: the token, its log-probability and the top-k."""

    token: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass
class Completion:
    """What the model did for one request."""

    tokens: list[int]
    steps: list[StepLogprobs]
    finish_reason: str
    prompt_tokens: int
    prefill_steps: list[StepLogprobs] | None


def _step(logits, token: int, k: int) -> StepLogprobs:
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    value = float(logp[token])
    rank = int((logp > logp[token]).sum()) + 1
    top = []
    if k > 0:
        vals, idx = logp.topk(min(k, logp.shape[-1]))
        top = [(int(i), float(v)) for i, v in zip(idx.tolist(), vals.tolist())]
    return StepLogprobs(token=token, logprob=value, rank=rank, top=top)


class ServedModel:
    """A checkpoint loaded with serving numerics, its processor and the model lock.

    Args:
        path: Checkpoint directory (BF16, FP8, NVFP4 or mixed export).
        model_id: Id served in ``/v1/models`` (default: the directory name).
    """

    def __init__(self, path: str | Path, model_id: str | None = None):
        from omniquant.data.processing import OmniProcessor
        from omniquant.evaluate.describe import describe_checkpoint
        from omniquant.evaluate.emulated import load_emulated

        self.path = Path(path)
        self.info = describe_checkpoint(self.path, "model")
        self.loaded = load_emulated(self.path)
        self.processor = OmniProcessor.from_pretrained(self.path)
        self.model_id = model_id or self.path.resolve().name
        self.created = int(time.time())
        self.lock = threading.Lock()
        tok = self.loaded.tokenizer
        eos = getattr(tok, "eos_token_id", None)
        self.eos = eos[0] if isinstance(eos, (list, tuple)) else eos

    # ------------------------------------------------------------------ inputs
    def sample(self, chat: ChatPrompt, media_io: dict | None = None):
        """Process a chat prompt into a ``Sample`` (media decoded through temp files).

        Raises:
            ProtocolError: Media that do not decode, or markers that do not fit.
        """
        from omniquant.data import media
        from omniquant.errors import DataError, OmniquantError

        video_kwargs = ((media_io or {}).get("video") or {}) if isinstance(media_io, dict) else {}
        images, audio, video = [], [], None
        with tempfile.TemporaryDirectory(prefix="omniquant-serve-") as tmp:
            try:
                for i, blob in enumerate(chat.media):
                    file = Path(tmp) / f"m{i}{_SUFFIX.get(blob.mime, '')}"
                    file.write_bytes(blob.data)
                    if blob.kind == "image":
                        images.append(media.read_image(file))
                    elif blob.kind == "audio":
                        audio.append(media.read_audio(file, self.processor.settings.sampling_rate))
                    elif video is not None:
                        raise ProtocolError("messages: more than one video part; send one video")
                    else:
                        video = media.read_video(
                            file,
                            num_frames=video_kwargs.get("num_frames"),
                            fps=video_kwargs.get("fps"),
                        )
                return self.processor(chat.prompt, images=images, video=video, audio=audio)
            except ProtocolError:
                raise
            except (DataError, OmniquantError) as err:
                # Name the part, not the temporary file it was decoded through.
                message = str(err)
                for i, blob in enumerate(chat.media):
                    file = str(Path(tmp) / f"m{i}{_SUFFIX.get(blob.mime, '')}")
                    message = message.replace(file, f"{blob.kind} part {i + 1} ({blob.mime})")
                raise ProtocolError(f"messages: {message}", param="messages") from err

    def encode(self, text: str) -> list[int]:
        """Tokens of a prefill text, as the evaluator tokenizes answers (no special tokens)."""
        return self.processor.tokenizer(text, add_special_tokens=False).input_ids

    def token_text(self, token: int) -> str:
        """Decoded text of one token."""
        return self.loaded.tokenizer.decode([token])

    # ------------------------------------------------------------------ model
    def complete(
        self,
        sample,
        prefill: list[int],
        max_tokens: int,
        top_logprobs: int,
        prompt_logprobs: int | None,
    ) -> Completion:
        """Greedy continuation of ``sample`` + ``prefill`` (under the model lock).

        The prompt pass teacher-forces ``prefill`` after the backbone input and keeps the
        logits of the prefill positions and the first new token, as the evaluator does;
        decoding then continues with the model cache (see ``runner._greedy``).
        """
        import torch

        from omniquant.evaluate.runner import _append_tokens, _continue, backbone_input

        loaded = self.loaded
        backbone = loaded.adapter.quant_root(loaded.model)
        embed = loaded.model.get_input_embeddings()
        with self.lock, torch.no_grad():
            prefix = backbone_input(loaded, sample)
            logits = _continue(backbone, embed, prefix, prefill, len(prefill) + 1)
            prefill_steps = None
            if prompt_logprobs is not None:
                prefill_steps = [
                    _step(logits[j], prefill[j], prompt_logprobs) for j in range(len(prefill))
                ]
            step_logits = logits[-1]
            tokens: list[int] = []
            steps: list[StepLogprobs] = []
            cache = None
            finish = "length"
            while len(tokens) < max_tokens:
                if step_logits is None:
                    if cache is None:  # prompt + prefill + tokens so far fill the cache
                        embeds = _append_tokens(embed, prefix, prefill + tokens)
                    else:
                        embeds = embed(
                            torch.tensor([[tokens[-1]]], dtype=torch.long, device=prefix.device)
                        )
                    out = backbone(
                        inputs_embeds=embeds,
                        past_key_values=cache,
                        use_cache=True,
                        logits_to_keep=1,
                    )
                    cache = out.past_key_values
                    step_logits = out.logits[0, -1].float()
                if not bool(torch.isfinite(step_logits).all()):
                    raise RuntimeError(f"{self.path}: non-finite logits; the checkpoint is broken")
                token = int(step_logits.argmax())
                steps.append(_step(step_logits, token, top_logprobs))
                tokens.append(token)
                step_logits = None
                if token == self.eos:
                    finish = "stop"
                    break
        return Completion(
            tokens=tokens,
            steps=steps,
            finish_reason=finish,
            prompt_tokens=int(sample.input_ids.shape[1]) + len(prefill),
            prefill_steps=prefill_steps,
        )

    def text_of(self, tokens: list[int]) -> str:
        """Generated text (special tokens skipped, stripped as the evaluator does)."""
        return self.loaded.tokenizer.decode(tokens, skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------- request handling


def _int(body: dict, key: str, default, low: int, high: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(
            f"{key}: must be an integer in [{low}, {high}], got {value!r}", param=key
        )
    return value


def _common(body: dict, max_logprobs: int) -> dict:
    temperature = body.get("temperature")
    if temperature not in (None, 0, 0.0):
        raise ProtocolError(
            f"temperature: {temperature!r}; omniquant serve decodes greedily, send temperature 0",
            param="temperature",
        )
    if body.get("stream"):
        raise ProtocolError("stream: streaming is not supported; send stream=false", param="stream")
    if body.get("n", 1) != 1:
        raise ProtocolError("n: only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    body = {**body, "max_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens}
    return {
        "max_tokens": _int(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, 4096),
        "prompt_logprobs": _int(body, "prompt_logprobs", None, 0, max_logprobs),
    }


def _token_name(model: ServedModel, token: int, as_ids: bool) -> str:
    return f"token_id:{token}" if as_ids else model.token_text(token)


def _prompt_logprobs(model: ServedModel, completion: Completion, as_ids: bool) -> list | None:
    if completion.prefill_steps is None:
        return None
    n_user = completion.prompt_tokens - len(completion.prefill_steps)
    out: list = [None] * n_user
    for step in completion.prefill_steps:
        entry = {
            str(t): {"logprob": lp, "rank": r + 1, "decoded_token": _token_name(model, t, as_ids)}
            for r, (t, lp) in enumerate(step.top)
        }
        entry.setdefault(
            str(step.token),
            {"logprob": step.logprob, "rank": step.rank,
             "decoded_token": _token_name(model, step.token, as_ids)},
        )  # fmt: skip
        out.append(entry)
    return out


def _usage(c: Completion) -> dict:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": len(c.tokens),
        "total_tokens": c.prompt_tokens + len(c.tokens),
    }


def handle_chat(model: ServedModel, body: dict, max_logprobs: int) -> dict:
    """Answer a ``/v1/chat/completions`` body (already JSON-decoded)."""
    common = _common(body, max_logprobs)
    want_logprobs = bool(body.get("logprobs", False))
    top = _int(body, "top_logprobs", 0, 0, max_logprobs) or 0
    chat = chat_prompt(
        body.get("messages"),
        bool(body.get("continue_final_message", False)),
        bool(body.get("add_generation_prompt", True)),
    )
    sample = model.sample(chat, body.get("media_io_kwargs"))
    prefill = model.encode(chat.prefill) if chat.prefill else []
    c = model.complete(sample, prefill, common["max_tokens"], top, common["prompt_logprobs"])
    as_ids = bool(body.get("return_tokens_as_token_ids", False))
    logprobs = None
    if want_logprobs:
        logprobs = {
            "content": [
                {
                    "token": _token_name(model, s.token, as_ids),
                    "logprob": s.logprob,
                    "bytes": list(model.token_text(s.token).encode()),
                    "top_logprobs": [
                        {
                            "token": _token_name(model, t, as_ids),
                            "logprob": lp,
                            "bytes": list(model.token_text(t).encode()),
                        }
                        for t, lp in s.top
                    ],
                }
                for s in c.steps
            ]
        }
    text = model.text_of(c.tokens)  # only the new text, not the prefill (as vLLM)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model.model_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
            }
        ],
        "usage": _usage(c),
        "prompt_logprobs": _prompt_logprobs(model, c, as_ids),
    }


def handle_completion(model: ServedModel, body: dict, max_logprobs: int) -> dict:
    """Answer a ``/v1/completions`` body: a text prompt (no media), greedy."""
    common = _common(body, max_logprobs)
    if body.get("echo"):
        raise ProtocolError("echo: not supported; use prompt_logprobs", param="echo")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ProtocolError("prompt: must be one string", param="prompt")
    chat = chat_prompt([{"role": "user", "content": prompt}], False, True)
    sample = model.sample(chat)
    top = _int(body, "logprobs", None, 0, max_logprobs)
    c = model.complete(sample, [], common["max_tokens"], top or 0, common["prompt_logprobs"])
    as_ids = bool(body.get("return_tokens_as_token_ids", False))
    logprobs = None
    if top is not None:
        names = [_token_name(model, s.token, as_ids) for s in c.steps]
        offsets, pos = [], 0
        for s in c.steps:
            offsets.append(pos)
            pos += len(model.token_text(s.token))
        logprobs = {
            "tokens": names,
            "token_logprobs": [s.logprob for s in c.steps],
            "top_logprobs": [
                {_token_name(model, t, as_ids): lp for t, lp in s.top} for s in c.steps
            ],
            "text_offset": offsets,
        }
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model.model_id,
        "choices": [
            {
                "index": 0,
                "text": model.text_of(c.tokens),
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
            }
        ],
        "usage": _usage(c),
        "prompt_logprobs": _prompt_logprobs(model, c, as_ids),
    }


def _error(status: int, message: str, param: str | None = None):
    from fastapi.responses import JSONResponse

    kinds = {400: "BadRequestError", 404: "NotFoundError", 413: "RequestEntityTooLarge",
             415: "UnsupportedMediaType", 405: "MethodNotAllowed", 500: "InternalServerError"}  # fmt: skip
    return JSONResponse(
        status_code=status,
        content={
            "error": {
                "message": message,
                "type": kinds.get(status, "BadRequestError"),
                "param": param,
                "code": status,
            }
        },
    )


def create_app(
    model: ServedModel,
    *,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_logprobs: int = DEFAULT_MAX_LOGPROBS,
):
    """The FastAPI application serving ``model``.

    Args:
        model: The loaded model.
        max_request_bytes: Larger request bodies get 413 (checked while reading).
        max_logprobs: Upper bound of ``top_logprobs``, ``logprobs`` and ``prompt_logprobs``.
    """
    import json

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="omniquant serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.requests_served = 0

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

    async def read_json(request: Request) -> dict:
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
        if requested is not None and requested != model.model_id:
            raise ProtocolError(
                f"The model `{requested}` does not exist; this server serves `{model.model_id}`",
                status=404,
                param="model",
            )
        return body

    async def answer(request: Request, handler):
        try:
            body = await read_json(request)
            result = await run_in_threadpool(handler, model, body, max_logprobs)
        except ProtocolError as err:
            return _error(err.status, str(err), err.param)
        app.state.requests_served += 1
        return result

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": model.model_id,
                    "object": "model",
                    "created": model.created,
                    "owned_by": "omniquant",
                    "root": str(model.path.resolve()),
                    # What the checkpoint's files say (precision, size, bits per weight):
                    # the report shows it for served models as for loaded ones.
                    "omniquant": {**model.info, "emulation": model.loaded.emulation},
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, handle_chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, handle_completion)

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
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_logprobs: int = DEFAULT_MAX_LOGPROBS,
    announce=print,
) -> None:
    """Load ``path`` and serve it until interrupted.

    Prints ``listening on http://HOST:PORT/v1`` once the socket is bound (with port 0,
    the port chosen).
    """
    import uvicorn

    model = ServedModel(path, model_id)
    app = create_app(model, max_request_bytes=max_request_bytes, max_logprobs=max_logprobs)
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    announce(f"serving {model.model_id} ({model.info['precision']}) from {model.path}")
    announce(f"listening on http://{shown}:{bound}/v1")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
