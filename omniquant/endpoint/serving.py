"""Requests to jobs and jobs to responses: ``/v1/chat/completions`` and ``/v1/completions``.

Policy (vLLM's ``serving_chat`` / ``serving_completion`` are the reference):
- Lengths: a prompt over ``max_model_len`` tokens, or a prompt plus ``max_tokens`` over
  it, gets a 400 in vLLM's wording. A chat prompt's text is counted before its media are
  decoded, so an oversized prompt is refused before any heavy work. Without
  ``max_tokens``, chat runs to the end of the context (vLLM); completions default to 16
  (vLLM's and OpenAI's default for that endpoint).
- Unset ``temperature`` / ``top_p`` / ``top_k`` take the checkpoint's
  ``generation_config.json`` values when it samples (``do_sample``), else vLLM's
  defaults: temperature 1.0 (sampling), top_p 1.0, top_k off. Send ``temperature: 0``
  for greedy answers (the report's clients and lm-eval do).
- Completions take text or token-id prompts, one or a list; text is tokenized as vLLM
  does (``add_special_tokens``, default true, no chat template), token ids are used as
  they are. ``echo`` prepends the prompt; with ``logprobs`` the prompt's tokens come
  first in the legacy shape (``token_logprobs`` and ``top_logprobs`` ``null`` at the
  first token). Completions take no media (``<image>`` etc. in the text is refused).
- Text is returned as decoded, unstripped (vLLM); ``n`` choices are ``n`` jobs.
- Streaming answers Server-Sent Events in OpenAI's chunk shape (the first chat chunk
  carries the role, the last of each choice its ``finish_reason``;
  ``stream_options.include_usage`` adds a chunk with ``usage`` and no choices), then
  ``data: [DONE]``. A client that goes away cancels its jobs (``Job.cancel``).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from omniquant.endpoint.engine import Event, GenParams, Job, Scheduler, ServedModel
from omniquant.endpoint.messages import ChatPrompt, chat_prompt
from omniquant.endpoint.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobEntry,
    ChatMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ProtocolError,
    TopLogprob,
    UsageInfo,
)

_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif",
           "video/mp4": ".mp4", "video/webm": ".webm", "video/x-matroska": ".mkv",
           "audio/wav": ".wav", "audio/x-wav": ".wav", "audio/flac": ".flac",
           "audio/mpeg": ".mp3", "audio/ogg": ".ogg"}  # fmt: skip


@dataclass
class Settings:
    """Server-wide request settings."""

    max_logprobs: int = 20
    allowed_media: Path | None = None


# ---------------------------------------------------------------------------- lengths


def check_prompt_length(model: ServedModel, n: int) -> None:
    """vLLM's refusal of a prompt that alone exceeds the context."""
    if n > model.max_model_len:
        raise ProtocolError(
            f"This model's maximum context length is {model.max_model_len} tokens. However, "
            f"your request has {n} input tokens. Please reduce the length of the input messages.",
            param="messages",
        )


#: Characters of a prompt tokenized before its length is known to fit, per allowed token.
CHARS_PER_TOKEN_BOUND = 8


def encode_bounded(model: ServedModel, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of ``text``; a text whose first characters alone exceed the context is
    refused without tokenizing the rest (a 99k-token prompt costs a 32k-character pass).

    Cut at whitespace, a prefix has no more tokens than the whole text (the tokenizers
    served split words before merging), so "at least" is a lower bound.
    """
    cut = CHARS_PER_TOKEN_BOUND * (model.max_model_len + 1)
    if len(text) > cut:
        space = text.rfind(" ", 0, cut)
        head = text[: space if space > cut // 2 else cut]
        n = len(model.encode(head, add_special_tokens=add_special_tokens))
        if n > model.max_model_len:
            raise ProtocolError(
                f"This model's maximum context length is {model.max_model_len} tokens. However, "
                f"your request has at least {n} input tokens (counted on its first {len(head)} "
                f"of {len(text)} characters). Please reduce the length of the input messages.",
                param="messages",
            )
    return model.encode(text, add_special_tokens=add_special_tokens)


def budget(model: ServedModel, max_tokens: int | None, n_prompt: int) -> int:
    """``max_tokens`` checked against the context (``None``: what is left of it)."""
    check_prompt_length(model, n_prompt)
    left = model.max_model_len - n_prompt
    if max_tokens is None:
        return left
    if max_tokens > left:
        raise ProtocolError(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
            f"maximum context length is {model.max_model_len} tokens and your request has "
            f"{n_prompt} input tokens ({max_tokens} > {model.max_model_len} - {n_prompt}).",
            param="max_tokens",
        )
    return max_tokens


def _k(value: int | None, name: str, settings: Settings) -> int | None:
    if value is None:
        return None
    k = settings.max_logprobs if value == -1 else value
    if k > settings.max_logprobs:
        raise ProtocolError(
            f"{name}: {value} exceeds the server's --max-logprobs {settings.max_logprobs}",
            param=name,
        )
    return k


def gen_params(model: ServedModel, req, n_prompt: int, logprobs: int | None,
               prompt_logprobs: int | None) -> GenParams:  # fmt: skip
    """Decoding parameters of a checked request (see module policy for defaults)."""
    d = model.defaults

    def pick(value, default, fallback):
        return value if value is not None else (default if default is not None else fallback)

    return GenParams(
        max_tokens=budget(model, req.max_tokens, n_prompt),
        temperature=float(pick(req.temperature, d["temperature"], 1.0)),
        top_p=float(pick(req.top_p, d["top_p"], 1.0)),
        top_k=max(0, int(pick(req.top_k, d["top_k"], 0))),
        seed=req.seed,
        stops=req.stops,
        stop_token_ids=list(req.stop_token_ids or []),
        include_stop=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
    )


# ---------------------------------------------------------------------------- inputs


def chat_sample(model: ServedModel, req: ChatCompletionRequest, settings: Settings):
    """``(sample, prefill ids)`` of a chat request; long prompts refused before media decode."""
    template = None
    if model.chat_template is not None:
        kwargs = req.chat_template_kwargs or {}

        def template(conv, add_generation_prompt, continue_final_message):
            return model.render(conv, add_generation_prompt, continue_final_message, **kwargs)
    elif req.chat_template_kwargs:
        raise ProtocolError(
            "chat_template_kwargs: this checkpoint has no chat template (start the server with "
            "--chat-template FILE)", param="chat_template_kwargs"
        )  # fmt: skip
    chat = chat_prompt(req.messages, req.continue_final_message, req.add_generation_prompt,
                       template=template, allowed_media=settings.allowed_media)  # fmt: skip
    text_tokens = len(encode_bounded(model, chat.prompt, not chat.templated))
    prefill = model.encode(chat.prefill) if chat.prefill else []
    check_prompt_length(model, text_tokens + len(prefill))
    return media_sample(model, chat, req.media_io_kwargs), prefill


def media_sample(model: ServedModel, chat: ChatPrompt, media_io: dict | None = None):
    """Process a chat prompt into a ``Sample`` (data URIs decoded through temp files).

    Raises:
        ProtocolError: Media that do not decode, or markers that do not fit.
    """
    from omniquant.data import media
    from omniquant.errors import DataError, OmniquantError

    video_kwargs = ((media_io or {}).get("video") or {}) if isinstance(media_io, dict) else {}
    images, audio, video = [], [], None
    names: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="omniquant-serve-") as tmp:
        try:
            for i, blob in enumerate(chat.media):
                file = blob.path
                if file is None:
                    file = Path(tmp) / f"m{i}{_SUFFIX.get(blob.mime, '')}"
                    file.write_bytes(blob.data)
                names[str(file)] = f"{blob.kind} part {i + 1} ({blob.mime})"
                if blob.kind == "image":
                    images.append(media.read_image(file))
                elif blob.kind == "audio":
                    audio.append(media.read_audio(file, model.processor.settings.sampling_rate))
                elif video is not None:
                    raise ProtocolError("messages: more than one video part; send one video")
                else:
                    video = media.read_video(file, num_frames=video_kwargs.get("num_frames"),
                                             fps=video_kwargs.get("fps"))  # fmt: skip
            sample = model.processor(chat.prompt, images=images, video=video, audio=audio)
        except ProtocolError:
            raise
        except (DataError, OmniquantError) as err:
            message = str(err)  # name the part, not the temporary file it was decoded through
            for file, name in names.items():
                message = message.replace(file, name)
            raise ProtocolError(f"messages: {message}", param="messages") from err
    if chat.templated:
        # The template writes its own special tokens: vLLM tokenizes chat without adding
        # any, the processor adds the tokenizer's (BOS): drop them again.
        added = model.encode("", add_special_tokens=True)
        if added and sample.input_ids[0, : len(added)].tolist() == added:
            sample.input_ids = sample.input_ids[:, len(added):]
    return sample


def completion_samples(model: ServedModel, req: CompletionRequest) -> list:
    """One ``Sample`` per prompt (text tokenized as vLLM does, token ids as given)."""
    import torch

    from omniquant.data.batch import Sample

    vocab = int(model.embed.num_embeddings)
    placeholders = {model.processor.image_token_id, model.processor.audio_token_id}
    out = []
    for i, prompt in enumerate(req.prompts()):
        param = "prompt" if len(req.prompts()) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            ids = encode_bounded(model, prompt, req.add_special_tokens)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ProtocolError(f"{param}: token id {bad[0]} out of vocabulary [0, {vocab})",
                                    param="prompt")  # fmt: skip
        else:
            raise ProtocolError(f"{param}: a string or a list of token ids", param="prompt")
        if not ids:
            raise ProtocolError(f"{param}: empty prompt", param="prompt")
        if placeholders & set(ids):
            raise ProtocolError(
                f"{param}: holds media placeholder tokens; /v1/completions takes no media "
                "(send media to /v1/chat/completions)", param="prompt"
            )  # fmt: skip
        check_prompt_length(model, len(ids))
        out.append(Sample(id=f"prompt{i}", input_ids=torch.tensor([ids], dtype=torch.long)))
    return out


# ---------------------------------------------------------------------------- running


class Run:
    """Jobs of one request and the queue their events arrive on (in the event loop)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.jobs: list[Job] = []

    def add(self, sample, prefill: list[int], params: GenParams, index: int) -> Job:
        def emit(event: Event) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

        job = Job(sample, prefill, params, emit, index)
        self.jobs.append(job)
        return job

    def start(self) -> None:
        self.scheduler.submit(self.jobs)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    async def events(self, request) -> AsyncIterator[Event]:
        """Events until every job is done; stops (and cancels) when the client disconnects."""
        pending = len(self.jobs)
        checked = time.monotonic()
        try:
            while pending:
                try:
                    event = await asyncio.wait_for(self.queue.get(), timeout=0.1)
                except TimeoutError:
                    event = None
                if request is not None and time.monotonic() - checked >= 0.1:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        self.cancel()
                        return
                if event is None:
                    continue
                if event.kind == "error":
                    raise event.error
                if event.kind == "done":
                    pending -= 1
                yield event
        finally:
            if pending:
                self.cancel()


async def submit(model: ServedModel, scheduler: Scheduler, req, settings: Settings) -> Run:
    """Check and prepare ``req`` in a worker thread (tokenizing, media), queue its jobs.

    Raises:
        ProtocolError: A refused request; ``QueueFull`` (429) when the queue is full.
    """
    from starlette.concurrency import run_in_threadpool

    run = Run(scheduler)
    if isinstance(req, ChatCompletionRequest):
        sample, prefill, params = await run_in_threadpool(prepare_chat, model, req, settings)
        for i in range(req.n):
            run.add(sample, prefill, params, i)
    else:
        prepared = await run_in_threadpool(prepare_completion, model, req, settings)
        for p, (sample, params) in enumerate(prepared):
            for i in range(req.n):
                run.add(sample, [], params, p * req.n + i)
    run.start()
    return run


def _token(model: ServedModel, token: int, as_ids: bool) -> str:
    return f"token_id:{token}" if as_ids else model.token_text(token)


def prompt_logprobs_out(model: ServedModel, job: Job, as_ids: bool) -> list | None:
    """vLLM's ``prompt_logprobs``: one entry per prompt token (``None`` where not computed)."""
    if job.params.prompt_logprobs is None:
        return None
    out: list = []
    for step in job.prompt_steps:
        if step is None:
            out.append(None)
            continue
        entry = {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": _token(model, t, as_ids)}
                 for r, (t, lp) in enumerate(step.top)}  # fmt: skip
        entry.setdefault(str(step.token), {"logprob": step.logprob, "rank": step.rank,
                                           "decoded_token": _token(model, step.token, as_ids)})  # fmt: skip
        out.append(entry)
    return out


def _chat_logprobs(model: ServedModel, steps, as_ids: bool) -> ChatChoiceLogprobs:
    def entry(t, lp):
        return {"token": _token(model, t, as_ids), "logprob": lp,
                "bytes": list(model.token_text(t).encode())}  # fmt: skip

    return ChatChoiceLogprobs(content=[
        ChatLogprobEntry(**entry(s.token, s.logprob),
                         top_logprobs=[TopLogprob(**entry(t, lp)) for t, lp in s.top])
        for s in steps
    ])  # fmt: skip


def _top_dict(model: ServedModel, step, as_ids: bool) -> dict[str, float]:
    top = {_token(model, t, as_ids): lp for t, lp in step.top}
    top.setdefault(_token(model, step.token, as_ids), step.logprob)
    return top


def completion_logprobs(model: ServedModel, job: Job, echo: bool, as_ids: bool,
                        offset: int = 0) -> CompletionLogprobs:  # fmt: skip
    """The legacy logprobs of a choice (prompt tokens first when echoing)."""
    lp = CompletionLogprobs()
    entries = []
    if echo:
        for i, token in enumerate(job.ids):
            step = job.prompt_steps[i] if i < len(job.prompt_steps) else None
            entries.append((token, step))
    entries += [(s.token, s) for s in job.steps]
    for token, step in entries:
        text = _token(model, token, as_ids)
        lp.tokens.append(text)
        lp.text_offset.append(offset)
        offset += len(model.token_text(token))
        lp.token_logprobs.append(None if step is None else step.logprob)
        lp.top_logprobs.append(None if step is None else _top_dict(model, step, as_ids))
    return lp


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj) -> str:
    """One Server-Sent Event (a chat delta lists only the fields it carries, as OpenAI's)."""
    if isinstance(obj, str):
        return f"data: {obj}\n\n"
    body = obj.model_dump()
    for choice in body.get("choices", []):
        if isinstance(choice.get("delta"), dict):
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------- chat


def prepare_chat(model: ServedModel, req: ChatCompletionRequest, settings: Settings):
    """``(sample, prefill, params)`` of a chat request (blocking: tokenizes, decodes media)."""
    req.check()
    top = _k(req.top_logprobs or 0, "top_logprobs", settings) if req.logprobs else None
    prompt_k = _k(req.prompt_logprobs, "prompt_logprobs", settings)
    sample, prefill = chat_sample(model, req, settings)
    n_prompt = int(sample.input_ids.shape[1]) + len(prefill)
    return sample, prefill, gen_params(model, req, n_prompt, top, prompt_k)


async def _all_done(run: Run, request) -> bool:
    """Drain ``run``'s events; whether every job finished (False: the client went away)."""
    done = 0
    async for event in run.events(request):
        done += event.kind == "done"
    return done >= len(run.jobs)


async def chat_response(model: ServedModel, run: Run, req: ChatCompletionRequest,
                        request) -> ChatCompletionResponse | None:  # fmt: skip
    """Wait for the jobs; ``None`` when the client went away."""
    if not await _all_done(run, request):
        return None
    as_ids = req.return_tokens_as_token_ids
    jobs = run.jobs
    choices = [
        ChatChoice(index=j.index, message=ChatMessage(content=j.text),
                   logprobs=_chat_logprobs(model, j.steps, as_ids) if req.logprobs else None,
                   finish_reason=j.finish_reason, stop_reason=j.stop_reason)
        for j in jobs
    ]  # fmt: skip
    completion = sum(len(j.tokens) for j in jobs)
    prompt = jobs[0].prompt_tokens
    return ChatCompletionResponse(
        model=model.model_id, choices=choices,
        usage=UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                        total_tokens=prompt + completion),
        prompt_logprobs=prompt_logprobs_out(model, jobs[0], as_ids),
    )  # fmt: skip


async def chat_stream(model: ServedModel, run: Run, req: ChatCompletionRequest,
                      request) -> AsyncIterator[str]:  # fmt: skip
    """SSE lines of a streamed chat completion."""
    rid, created = new_id("chatcmpl"), int(time.time())
    as_ids = req.return_tokens_as_token_ids

    def chunk(choices, usage=None) -> str:
        return sse(ChatCompletionChunk(id=rid, created=created, model=model.model_id,
                                       choices=choices, usage=usage))  # fmt: skip

    for job in run.jobs:
        yield chunk([ChatStreamChoice(index=job.index,
                                      delta=DeltaMessage(role="assistant", content=""))])  # fmt: skip
    async for event in run.events(request):
        job = event.job
        if event.kind == "delta" and (event.text or (req.logprobs and event.step)):
            logprobs = None
            if req.logprobs and event.step is not None:
                logprobs = _chat_logprobs(model, [event.step], as_ids)
            yield chunk([ChatStreamChoice(index=job.index, delta=DeltaMessage(content=event.text),
                                          logprobs=logprobs)])  # fmt: skip
        elif event.kind == "done":
            rest = job.text[job.sent:]
            yield chunk([ChatStreamChoice(index=job.index, delta=DeltaMessage(content=rest or None),
                                          finish_reason=job.finish_reason,
                                          stop_reason=job.stop_reason)])  # fmt: skip
    if req.stream_options is not None and req.stream_options.include_usage:
        completion = sum(len(j.tokens) for j in run.jobs)
        prompt = run.jobs[0].prompt_tokens
        yield chunk([], UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                                  total_tokens=prompt + completion))  # fmt: skip
    yield sse("[DONE]")


# ---------------------------------------------------------------------------- completions


def prepare_completion(model: ServedModel, req: CompletionRequest, settings: Settings):
    """``[(sample, params)]`` per prompt of a completion request (blocking: tokenizes)."""
    req.check()
    if req.stream and req.echo and req.logprobs is not None:
        raise ProtocolError("echo: with logprobs, send stream=false (omniquant serve streams "
                            "generated tokens' logprobs only)", param="echo")  # fmt: skip
    top = _k(req.logprobs, "logprobs", settings)
    prompt_k = _k(req.prompt_logprobs, "prompt_logprobs", settings)
    if req.echo and top is not None:
        prompt_k = max(prompt_k or 0, top)
    out = []
    for sample in completion_samples(model, req):
        out.append((sample, gen_params(model, req, int(sample.input_ids.shape[1]), top, prompt_k)))
    return out


def _prompt_text(model: ServedModel, req: CompletionRequest, i: int, job: Job) -> str:
    prompt = req.prompts()[i]
    return prompt if isinstance(prompt, str) else model.tokenizer.decode(job.ids)


async def completion_response(model: ServedModel, run: Run, req: CompletionRequest,
                              request) -> CompletionResponse | None:  # fmt: skip
    """Wait for the jobs; ``None`` when the client went away."""
    if not await _all_done(run, request):
        return None
    as_ids = req.return_tokens_as_token_ids
    choices = []
    for job in run.jobs:
        i = job.index // req.n
        prefix = _prompt_text(model, req, i, job) if req.echo else ""
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(model, job, req.echo, as_ids)
        choices.append(CompletionChoice(
            index=job.index, text=prefix + job.text, logprobs=logprobs,
            finish_reason=job.finish_reason, stop_reason=job.stop_reason,
            prompt_logprobs=prompt_logprobs_out(model, job, as_ids) if req.prompt_logprobs is not None else None,
        ))  # fmt: skip
    prompt = sum(j.prompt_tokens for j in run.jobs if j.index % req.n == 0)
    completion = sum(len(j.tokens) for j in run.jobs)
    return CompletionResponse(model=model.model_id, choices=choices,
                              usage=UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                                              total_tokens=prompt + completion))  # fmt: skip


async def completion_stream(model: ServedModel, run: Run, req: CompletionRequest,
                            request) -> AsyncIterator[str]:  # fmt: skip
    """SSE lines of a streamed completion."""
    rid, created = new_id("cmpl"), int(time.time())
    as_ids = req.return_tokens_as_token_ids

    def chunk(choices, usage=None) -> str:
        return sse(CompletionChunk(id=rid, created=created, model=model.model_id,
                                   choices=choices, usage=usage))  # fmt: skip

    if req.echo:
        for job in run.jobs:
            text = _prompt_text(model, req, job.index // req.n, job)
            yield chunk([CompletionChoice(index=job.index, text=text)])
    async for event in run.events(request):
        job = event.job
        if event.kind == "delta" and (event.text or (req.logprobs is not None and event.step)):
            logprobs = None
            if req.logprobs is not None and event.step is not None:
                step = event.step
                logprobs = CompletionLogprobs(
                    tokens=[_token(model, step.token, as_ids)], token_logprobs=[step.logprob],
                    top_logprobs=[_top_dict(model, step, as_ids)], text_offset=[event.offset],
                )  # fmt: skip
            yield chunk([CompletionChoice(index=job.index, text=event.text, logprobs=logprobs)])
        elif event.kind == "done":
            yield chunk([CompletionChoice(index=job.index, text=job.text[job.sent:],
                                          finish_reason=job.finish_reason,
                                          stop_reason=job.stop_reason)])  # fmt: skip
    if req.stream_options is not None and req.stream_options.include_usage:
        prompt = sum(j.prompt_tokens for j in run.jobs if j.index % req.n == 0)
        completion = sum(len(j.tokens) for j in run.jobs)
        yield chunk([], UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                                  total_tokens=prompt + completion))  # fmt: skip
    yield sse("[DONE]")
