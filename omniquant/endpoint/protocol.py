"""The wire format shared by ``omniquant serve`` and the endpoint backend of the report.

Policy:
- Media travel inside the request as base64 ``data:`` URIs in chat content parts, the
  way vLLM documents multimodal chat: ``image_url``, ``video_url`` and ``audio_url``
  parts (``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``),
  and OpenAI's ``input_audio`` (``{"data": <base64>, "format": "wav"}``; a data URI in
  ``data`` is accepted too). The report sends ``image_url`` / ``video_url`` /
  ``audio_url``; servers fetch nothing, so no URL other than a data URI is sent or
  accepted.
- A task prompt maps to parts in order: text between markers becomes ``text`` parts,
  each ``<image>`` / ``<video>`` / ``<audio>`` marker becomes the next media part of
  that kind. Media without a marker go first, each followed by a ``"\\n"`` text part,
  images, then the video, then audio: the placement ``omniquant.data.processing``
  gives them in-process, so the server rebuilds the same token sequence.
- The server side of messages (markers, media, chat templates) is
  ``omniquant.endpoint.messages``.
- Requests and responses of ``omniquant serve`` are typed pydantic models below, one per
  request / response kind, with vLLM's OpenAI-compatible server as the reference for
  every field name, shape and default. A field the server does not implement is
  refused with a 400 naming it: known ones with a non-default value, unknown ones at all
  (``extra="forbid"``); nothing is accepted and ignored.
"""

from __future__ import annotations

import base64
import mimetypes
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MARKERS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}
PART_TYPES = {"image_url": "image", "video_url": "video", "audio_url": "audio"}
_MARKER_RE = re.compile("(" + "|".join(re.escape(m) for m in MARKERS.values()) + ")")
_NAME_RE = re.compile(r"^([A-Za-z0-9_.+-]+)=(.+)$")
# Suffixes mimetypes does not know everywhere.
_EXTRA_MIME = {".flac": "audio/flac", ".wav": "audio/wav", ".webm": "video/webm",
               ".mp4": "video/mp4", ".mkv": "video/x-matroska", ".ogg": "audio/ogg"}  # fmt: skip
#: ``input_audio`` formats and their MIME types.
AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg"}


def is_endpoint(text: str) -> bool:
    """Whether ``text`` (``URL`` or ``NAME=URL``) names an OpenAI-compatible server."""
    m = _NAME_RE.match(text)
    url = m.group(2) if m else text
    return url.startswith(("http://", "https://"))


@dataclass(frozen=True)
class ModelSource:
    """A model given to the report: a checkpoint directory or a served endpoint.

    Attributes:
        name: Report name from ``NAME=...`` (``None``: derived from the model).
        path: Checkpoint directory (in-process).
        url: Base URL of an OpenAI-compatible server (``http://host:port/v1``).
        model: Served model id (URL fragment ``#id``; ``None``: the server's only model).
    """

    name: str | None = None
    path: Path | None = None
    url: str | None = None
    model: str | None = None

    @property
    def is_endpoint(self) -> bool:
        """Served rather than loaded in-process."""
        return self.url is not None

    def __str__(self) -> str:
        where = self.url if self.url else str(self.path)
        if self.model:
            where += f"#{self.model}"
        return f"{self.name}={where}" if self.name else where


def parse_model_source(value: str | Path | ModelSource) -> ModelSource:
    """Parse ``DIR``, ``NAME=DIR``, ``URL``, ``NAME=URL`` or ``URL#MODEL_ID``.

    ``NAME=`` is split off only when what follows is a URL or an existing directory,
    so a directory whose own name holds ``=`` still works.
    """
    if isinstance(value, ModelSource):
        return value
    if isinstance(value, Path):
        return ModelSource(path=value)
    name, rest = None, value
    m = _NAME_RE.match(value)
    if m and (m.group(2).startswith(("http://", "https://")) or Path(m.group(2)).is_dir()):
        name, rest = m.group(1), m.group(2)
    if rest.startswith(("http://", "https://")):
        url, _, model = rest.partition("#")
        return ModelSource(name=name, url=url.rstrip("/"), model=model or None)
    return ModelSource(name=name, path=Path(rest))


# ---------------------------------------------------------------------------- client side


def mime_of(path: Path) -> str:
    """MIME type of a media file from its suffix."""
    suffix = path.suffix.lower()
    return (
        _EXTRA_MIME.get(suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    )


def data_uri(path: Path) -> str:
    """``data:<mime>;base64,<bytes>`` of a file."""
    return f"data:{mime_of(path)};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _media_part(kind: str, path: Path) -> dict:
    part_type = {"image": "image_url", "video": "video_url", "audio": "audio_url"}[kind]
    return {"type": part_type, part_type: {"url": data_uri(path)}}


def entry_content(entry) -> tuple[list[dict], dict]:
    """Chat content parts of a task line, and extra request fields it needs.

    Args:
        entry: A ``TaskEntry`` (its media are read from disk).

    Returns:
        ``(parts, extra)``: the user message's content parts (see the module policy),
        and ``{"media_io_kwargs": {"video": {...}}}`` when the line sets
        ``video_frames`` / ``video_fps`` (vLLM's per-request video sampling option).
    """
    media = {
        "image": [entry.resolve(p) for p in entry.images],
        "video": [entry.resolve(entry.video)] if entry.video else [],
        "audio": [entry.resolve(p) for p in entry.audio],
    }
    marked = {kind: entry.prompt.count(marker) > 0 for kind, marker in MARKERS.items()}
    parts: list[dict] = []
    for kind in ("image", "video", "audio"):
        if not marked[kind]:
            for path in media[kind]:
                parts += [_media_part(kind, path), {"type": "text", "text": "\n"}]
    used = dict.fromkeys(MARKERS, 0)
    by_marker = {marker: kind for kind, marker in MARKERS.items()}
    for piece in _MARKER_RE.split(entry.prompt):
        if piece in by_marker:
            kind = by_marker[piece]
            # validate_task_set has checked one marker per file; extra markers stay text.
            if used[kind] < len(media[kind]):
                parts.append(_media_part(kind, media[kind][used[kind]]))
                used[kind] += 1
                continue
        if piece:
            parts.append({"type": "text", "text": piece})
    extra: dict = {}
    video_kwargs = {}
    if getattr(entry, "video_frames", None):
        video_kwargs["num_frames"] = int(entry.video_frames)
    if getattr(entry, "video_fps", None):
        video_kwargs["fps"] = float(entry.video_fps)
    if video_kwargs:
        extra["media_io_kwargs"] = {"video": video_kwargs}
    return parts, extra




# ---------------------------------------------------------------------------- server wire models


class ProtocolError(ValueError):
    """A request the server refuses (maps to an OpenAI-style 4xx error).

    Attributes:
        status: HTTP status.
        param: The request field at fault (OpenAI's ``param``), if any.
        headers: Extra response headers (``Retry-After`` on 429).
    """

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.param = param
        self.headers = headers or {}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Fields omniquant serve knows but does not implement, with the value(s) it accepts.
    _UNSUPPORTED: dict[str, Any] = {
        "presence_penalty": (None, 0, 0.0),
        "frequency_penalty": (None, 0, 0.0),
        "repetition_penalty": (None, 1, 1.0),
        "logit_bias": (None, {}),
        "min_p": (None, 0, 0.0),
        "min_tokens": (None, 0),
        "best_of": (None, 1),
        "suffix": (None, ""),
        "response_format": (None, {"type": "text"}),
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "functions": (None, []),
        "function_call": (None, "none"),
        "parallel_tool_calls": (None,),
        "chat_template": (None,),
        "guided_json": (None,),
        "guided_regex": (None,),
        "guided_choice": (None,),
        "structured_outputs": (None,),
        "truncate_prompt_tokens": (None,),
    }

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    prompt_logprobs: int | None = Field(default=None, ge=-1)
    return_tokens_as_token_ids: bool = False
    user: str | None = None  # OpenAI's end-user label: it changes no output anywhere
    # Known, not implemented: refused unless at their neutral value (see check()).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    truncate_prompt_tokens: int | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    structured_outputs: Any = None

    def check(self) -> None:
        """Refuse fields set to something omniquant serve does not implement.

        Raises:
            ProtocolError: Naming the field.
        """
        for name, accepted in self._UNSUPPORTED.items():
            if name in type(self).model_fields and getattr(self, name) not in accepted:
                raise ProtocolError(
                    f"{name}: {getattr(self, name)!r} is not supported by omniquant serve "
                    "(remove it, or send its neutral value)", param=name
                )  # fmt: skip
        if self.stream_options is not None and not self.stream:
            raise ProtocolError(
                "Stream options can only be defined when `stream=True`.", param="stream_options"
            )
        if self.n > 1 and self.temperature == 0:
            raise ProtocolError("n: n > 1 needs temperature > 0 (greedy answers are identical)",
                                param="n")  # fmt: skip

    @property
    def stops(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` (a last chunk with usage and no choices)."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: Literal[False] = False


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions`` (OpenAI's fields and vLLM's extensions)."""

    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    media_io_kwargs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool = False

    @model_validator(mode="after")
    def _budget(self):
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def check(self) -> None:
        super().check()
        if self.echo:
            raise ProtocolError("echo: not supported on chat completions by omniquant serve",
                                param="echo")  # fmt: skip
        if self.top_logprobs and not self.logprobs:
            raise ProtocolError("top_logprobs: needs logprobs=true", param="top_logprobs")


class CompletionRequest(_Request):
    """``POST /v1/completions``: text or token-id prompts, one or a list (no media)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # vLLM's (and OpenAI's) default here
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0)
    add_special_tokens: bool = True
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per choice group."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ProtocolError("prompt: empty list", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def check(self) -> None:
        super().check()
        if self.max_tokens == 0 and not self.echo:
            raise ProtocolError("max_tokens: 0 needs echo=true (scoring the prompt only)",
                                param="max_tokens")  # fmt: skip


# --- responses


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprobEntry] | None = None


class ChatMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape lm-eval reads (``None`` first when echoing the prompt)."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "omniquant"
    root: str
    max_model_len: int
    omniquant: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


_Request.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
