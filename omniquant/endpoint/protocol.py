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
- The server renders no chat template (the demo and tiny checkpoints have none, and
  the in-process evaluator uses none): it joins the user message's parts back into a
  prompt with markers. A trailing assistant message with ``continue_final_message``
  (vLLM's extension) is a prefill: its text is tokenized on its own and appended, as
  the in-process evaluator appends answer and choice tokens.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
from dataclasses import dataclass, field
from pathlib import Path

MARKERS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}
PART_TYPES = {"image_url": "image", "video_url": "video", "audio_url": "audio"}
_MARKER_RE = re.compile("(" + "|".join(re.escape(m) for m in MARKERS.values()) + ")")
_NAME_RE = re.compile(r"^([A-Za-z0-9_.+-]+)=(.+)$")
_DATA_URI_RE = re.compile(
    r"^data:([A-Za-z0-9.+-]+/[A-Za-z0-9.+-]+)?((?:;[^,;]*)*),(.*)$", re.DOTALL
)
# Suffixes mimetypes does not know everywhere.
_EXTRA_MIME = {".flac": "audio/flac", ".wav": "audio/wav", ".webm": "video/webm",
               ".mp4": "video/mp4", ".mkv": "video/x-matroska", ".ogg": "audio/ogg"}  # fmt: skip
#: ``input_audio`` formats and their MIME types.
AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg"}


class ProtocolError(ValueError):
    """A request the server refuses (maps to an OpenAI-style 4xx error).

    Attributes:
        status: HTTP status.
        param: The request field at fault (OpenAI's ``param``), if any.
    """

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


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


# ---------------------------------------------------------------------------- server side


@dataclass
class MediaBlob:
    """One decoded media part: its kind, MIME type and bytes."""

    kind: str
    mime: str
    data: bytes


@dataclass
class ChatPrompt:
    """A chat request reduced to what the processor takes.

    Attributes:
        prompt: The user text with ``<image>``/``<video>``/``<audio>`` markers where the
            media parts were.
        media: Media in order of appearance.
        prefill: Text of a trailing assistant message continued by the model (``None``
            without one).
    """

    prompt: str
    media: list[MediaBlob] = field(default_factory=list)
    prefill: str | None = None


def decode_data_uri(url: str, kind: str, param: str) -> MediaBlob:
    """Decode a ``data:`` URI of a ``kind`` (image, video, audio) part.

    Raises:
        ProtocolError: Not a data URI, not base64, bad base64, or a MIME type of another
            kind (e.g. ``audio/wav`` in an ``image_url`` part).
    """
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ProtocolError(
            f"{param}: only base64 data URIs are accepted (data:<mime>;base64,...); this "
            "server fetches no URLs", param=param
        )  # fmt: skip
    m = _DATA_URI_RE.match(url)
    if not m or ";base64" not in m.group(2):
        raise ProtocolError(
            f"{param}: malformed data URI; expected data:<mime>;base64,<data>", param=param
        )
    mime = (m.group(1) or "").lower()
    if not mime.startswith(f"{kind}/"):
        raise ProtocolError(
            f"{param}: content type {mime or '(none)'!r} in a {kind} part; send {kind}/* data "
            f"in this part", param=param
        )  # fmt: skip
    return MediaBlob(kind=kind, mime=mime, data=b64decode(m.group(3), param))


def b64decode(text: str, param: str) -> bytes:
    """Strict base64 (whitespace allowed, nothing else), or ``ProtocolError``."""
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ProtocolError(f"{param}: invalid base64 data ({err})", param=param) from err
    if not data:
        raise ProtocolError(f"{param}: empty media data", param=param)
    return data


def _text_of(content, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" for p in content
    ):
        return "".join(str(p.get("text", "")) for p in content)
    raise ProtocolError(f"{param}: must be a string or a list of text parts", param=param)


def chat_prompt(
    messages: list, continue_final_message: bool, add_generation_prompt: bool
) -> ChatPrompt:
    """Reduce ``messages`` to a prompt with markers, media and an optional prefill.

    Accepted shapes: one ``user`` message, optionally followed by one ``assistant``
    message that the model continues (``continue_final_message: true`` or
    ``add_generation_prompt: false``, as in vLLM).

    Raises:
        ProtocolError: Any other shape, an unknown part type, or bad media.
    """
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("messages: must be a non-empty list", param="messages")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    prefill_allowed = continue_final_message or not add_generation_prompt
    if roles == ["user", "assistant"] and prefill_allowed:
        prefill = _text_of(messages[1].get("content", ""), "messages[1].content")
    elif roles == ["user"]:
        prefill = None
    else:
        raise ProtocolError(
            f"messages: roles {roles} are not supported; send one user message, optionally "
            "followed by an assistant message with continue_final_message=true (this server "
            "renders no chat template)", param="messages"
        )  # fmt: skip
    content = messages[0].get("content")
    if isinstance(content, str):
        if _MARKER_RE.search(content) is None:
            return ChatPrompt(prompt=content, prefill=prefill)
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ProtocolError(
            "messages[0].content: must be a string or a list of parts", param="messages"
        )
    text, media = [], []
    for i, part in enumerate(content):
        param = f"messages[0].content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            piece = part.get("text")
            if not isinstance(piece, str):
                raise ProtocolError(f"{param}.text: must be a string", param=param)
            if _MARKER_RE.search(piece):
                raise ProtocolError(
                    f"{param}.text: contains a media marker ({', '.join(MARKERS.values())}); "
                    "send media as image_url / video_url / audio_url parts", param=param
                )  # fmt: skip
            text.append(piece)
        elif kind in PART_TYPES:
            body = part.get(kind)
            url = body.get("url") if isinstance(body, dict) else body
            blob = decode_data_uri(url, PART_TYPES[kind], f"{param}.{kind}.url")
            media.append(blob)
            text.append(MARKERS[blob.kind])
        elif kind == "input_audio":
            body = part.get("input_audio")
            if not isinstance(body, dict) or not isinstance(body.get("data"), str):
                raise ProtocolError(
                    f"{param}.input_audio: needs 'data' (base64) and 'format'", param=param
                )
            data = body["data"]
            if data.startswith("data:"):
                blob = decode_data_uri(data, "audio", f"{param}.input_audio.data")
            else:
                fmt = str(body.get("format", "")).lower()
                if fmt not in AUDIO_FORMATS:
                    raise ProtocolError(
                        f"{param}.input_audio.format: {fmt!r}; use one of {sorted(AUDIO_FORMATS)}",
                        param=param,
                    )
                blob = MediaBlob(
                    "audio", AUDIO_FORMATS[fmt], b64decode(data, f"{param}.input_audio.data")
                )
            media.append(blob)
            text.append(MARKERS["audio"])
        else:
            raise ProtocolError(
                f"{param}.type: {kind!r} is not supported; use text, image_url, video_url, "
                "audio_url or input_audio", param=param
            )  # fmt: skip
    return ChatPrompt(prompt="".join(text), media=media, prefill=prefill)
