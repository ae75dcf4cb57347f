"""Server side of chat messages: content parts to a prompt with media markers, media to files.

Policy:
- Media parts (``image_url``, ``video_url``, ``audio_url``, OpenAI's ``input_audio``)
  carry base64 ``data:`` URIs, or, only when the server was started with
  ``--allowed-local-media-path DIR`` (vLLM's flag), ``file://`` URLs and plain paths
  that resolve (symlinks followed) inside ``DIR``. http(s) URLs are refused: the server
  fetches nothing. Each media part becomes its marker (``<image>``, ``<video>``,
  ``<audio>``) in the message text; ``omniquant.data.processing`` expands the markers
  to placeholder runs, so the server rebuilds the token sequence the in-process
  evaluator builds.
- With a chat template (the checkpoint's ``tokenizer_config.json`` ``chat_template``
  or ``--chat-template FILE``), every message (system, user, assistant, any number of
  turns) goes through ``tokenizer.apply_chat_template`` as vLLM applies it: content as
  one string per message, ``add_generation_prompt`` (default true) and
  ``continue_final_message``; the rendered text is tokenized without adding special
  tokens (the template writes them), as vLLM does for chat.
- Without a chat template (the demo and tiny checkpoints have none; the in-process
  evaluator uses none), the prompt is the user message's text as the processor takes
  it, which is what ``omniquant report`` scores; one user message, optionally followed
  by an assistant message the model continues (``continue_final_message``, vLLM's
  extension), whose text is tokenized on its own and appended, as the evaluator appends
  answer tokens. System messages and several turns need a template and are refused with
  a 400 naming ``--chat-template`` (vLLM refuses every chat request without one).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from omniquant.endpoint.protocol import AUDIO_FORMATS, MARKERS, PART_TYPES, ProtocolError

_MARKER_RE = re.compile("(" + "|".join(re.escape(m) for m in MARKERS.values()) + ")")
_DATA_URI_RE = re.compile(
    r"^data:([A-Za-z0-9.+-]+/[A-Za-z0-9.+-]+)?((?:;[^,;]*)*),(.*)$", re.DOTALL
)
_ROLES = ("system", "developer", "user", "assistant")


@dataclass
class MediaBlob:
    """One media part: its kind and MIME type, with its bytes or a vetted local file."""

    kind: str
    mime: str
    data: bytes = b""
    path: Path | None = None


@dataclass
class ChatPrompt:
    """A chat request reduced to what the processor takes.

    Attributes:
        prompt: Text with ``<image>``/``<video>``/``<audio>`` markers where the media were
            (the rendered chat template when there is one).
        media: Media in order of appearance.
        prefill: Text of a trailing assistant message continued by the model, tokenized on
            its own (only without a chat template; ``None`` otherwise).
        templated: The prompt is a rendered chat template (tokenize without special tokens).
    """

    prompt: str
    media: list[MediaBlob] = field(default_factory=list)
    prefill: str | None = None
    templated: bool = False


def decode_data_uri(url: str, kind: str, param: str) -> MediaBlob:
    """Decode a ``data:`` URI of a ``kind`` (image, video, audio) part.

    Raises:
        ProtocolError: Not base64, bad base64, or a MIME type of another kind (e.g.
            ``audio/wav`` in an ``image_url`` part).
    """
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


def local_media(url: str, kind: str, param: str, allowed: Path | None) -> MediaBlob:
    """A ``file://`` URL or plain path, accepted only inside ``allowed`` (symlinks resolved).

    Raises:
        ProtocolError: No ``--allowed-local-media-path``, a path outside it, or no such file.
    """
    from omniquant.endpoint.protocol import mime_of

    if allowed is None:
        raise ProtocolError(
            f"{param}: local media ({url[:80]!r}) are refused: start the server with "
            "--allowed-local-media-path DIR to read files under DIR, or send a base64 data URI",
            param=param,
        )
    if url.startswith("file:"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ProtocolError(f"{param}: file URL with a host ({parsed.netloc!r})", param=param)
        raw = unquote(parsed.path)
    else:
        raw = url
    resolved = Path(raw).expanduser().resolve()
    root = allowed.resolve()
    if not resolved.is_relative_to(root):
        raise ProtocolError(
            f"{param}: {raw!r} resolves to {str(resolved)!r}, outside the allowed local media "
            f"path {str(root)!r} (--allowed-local-media-path)", status=403, param=param
        )  # fmt: skip
    if not resolved.is_file():
        raise ProtocolError(f"{param}: no such file {raw!r}", status=400, param=param)
    return MediaBlob(kind=kind, mime=mime_of(resolved), path=resolved)


def media_url(url, kind: str, param: str, allowed: Path | None) -> MediaBlob:
    """The media a part's URL names: a data URI, or a vetted local file."""
    if not isinstance(url, str) or not url:
        raise ProtocolError(f"{param}: must be a URL string", param=param)
    if url.startswith("data:"):
        return decode_data_uri(url, kind, param)
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme in ("http", "https", "ftp", "s3", "gs"):
        raise ProtocolError(
            f"{param}: {scheme} URLs are refused: this server fetches nothing; send a base64 "
            "data URI (data:<mime>;base64,...) or a file:// path under --allowed-local-media-path",
            param=param,
        )
    if scheme not in ("", "file") and len(scheme) > 1:  # one letter: a Windows drive
        raise ProtocolError(f"{param}: unsupported URL scheme {scheme!r}", param=param)
    return local_media(url, kind, param, allowed)


def _content(content, param: str, allowed: Path | None, media: list[MediaBlob]) -> str:
    """A message's content as text with markers (media appended to ``media``)."""
    if content is None:
        return ""
    if isinstance(content, str):
        if _MARKER_RE.search(content):
            raise ProtocolError(
                f"{param}: contains a media marker ({', '.join(MARKERS.values())}); send media "
                "as image_url / video_url / audio_url parts", param=param
            )  # fmt: skip
        return content
    if not isinstance(content, list):
        raise ProtocolError(f"{param}: must be a string or a list of parts", param=param)
    text = []
    for i, part in enumerate(content):
        where = f"{param}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            piece = part.get("text")
            if not isinstance(piece, str):
                raise ProtocolError(f"{where}.text: must be a string", param=where)
            text.append(_content(piece, f"{where}.text", allowed, media))
        elif kind in PART_TYPES:
            body = part.get(kind)
            url = body.get("url") if isinstance(body, dict) else body
            blob = media_url(url, PART_TYPES[kind], f"{where}.{kind}.url", allowed)
            media.append(blob)
            text.append(MARKERS[blob.kind])
        elif kind == "input_audio":
            media.append(_input_audio(part.get("input_audio"), where))
            text.append(MARKERS["audio"])
        else:
            raise ProtocolError(
                f"{where}.type: {kind!r} is not supported; use text, image_url, video_url, "
                "audio_url or input_audio", param=where
            )  # fmt: skip
    return "".join(text)


def _input_audio(body, where: str) -> MediaBlob:
    if not isinstance(body, dict) or not isinstance(body.get("data"), str):
        raise ProtocolError(f"{where}.input_audio: needs 'data' (base64) and 'format'", param=where)
    data = body["data"]
    if data.startswith("data:"):
        return decode_data_uri(data, "audio", f"{where}.input_audio.data")
    fmt = str(body.get("format", "")).lower()
    if fmt not in AUDIO_FORMATS:
        raise ProtocolError(
            f"{where}.input_audio.format: {fmt!r}; use one of {sorted(AUDIO_FORMATS)}", param=where
        )
    return MediaBlob("audio", AUDIO_FORMATS[fmt], b64decode(data, f"{where}.input_audio.data"))


def chat_prompt(
    messages: list,
    continue_final_message: bool,
    add_generation_prompt: bool,
    *,
    template=None,
    allowed_media: Path | None = None,
) -> ChatPrompt:
    """Reduce ``messages`` to a prompt with markers, media and an optional prefill.

    Args:
        messages: The request's messages.
        continue_final_message: vLLM's flag: the model continues the last (assistant)
            message.
        add_generation_prompt: vLLM's flag (default true in the request).
        template: ``render(conversation, add_generation_prompt, continue_final_message)``
            returning the rendered text, or ``None`` (no chat template; see module policy).
        allowed_media: ``--allowed-local-media-path`` (``None``: no local files).

    Raises:
        ProtocolError: A shape the server cannot render, an unknown part type, bad media.
    """
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("messages: must be a non-empty list", param="messages")
    media: list[MediaBlob] = []
    conversation = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _ROLES:
            raise ProtocolError(
                f"messages[{i}].role: {role!r} is not supported; use one of {list(_ROLES)} "
                "(tool calls are not supported)", param="messages"
            )  # fmt: skip
        for key in message:
            if key not in ("role", "content", "name"):
                raise ProtocolError(
                    f"messages[{i}].{key}: not supported by omniquant serve", param="messages"
                )
        text = _content(message.get("content"), f"messages[{i}].content", allowed_media, media)
        conversation.append({"role": role, "content": text})
    if continue_final_message and conversation[-1]["role"] != "assistant":
        raise ProtocolError(
            "continue_final_message: the last message must be an assistant message",
            param="continue_final_message",
        )
    if continue_final_message and add_generation_prompt:
        raise ProtocolError(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            param="continue_final_message",
        )
    if template is not None:
        prompt = template(conversation, add_generation_prompt, continue_final_message)
        return ChatPrompt(prompt=prompt, media=media, templated=True)
    roles = [m["role"] for m in conversation]
    prefill_allowed = continue_final_message or not add_generation_prompt
    if roles == ["user", "assistant"] and prefill_allowed:
        if _MARKER_RE.search(conversation[1]["content"]):
            raise ProtocolError("messages[1]: media in a continued assistant message", "messages")
        return ChatPrompt(conversation[0]["content"], media, prefill=conversation[1]["content"])
    if roles == ["user"]:
        return ChatPrompt(prompt=conversation[0]["content"], media=media)
    raise ProtocolError(
        f"messages: roles {roles} need a chat template, and this checkpoint has none "
        "(tokenizer_config.json chat_template): start the server with --chat-template FILE, "
        "or send one user message (optionally followed by an assistant message with "
        "continue_final_message=true), which is the prompt the model was evaluated with",
        param="messages",
    )
