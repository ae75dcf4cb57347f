"""The load phase: served throughput, latency and hours of media per hour, under an explicit workload.

Load generators (checked for this issue): ``vllm bench serve`` ships inside vLLM (a
CUDA build; it cannot install beside the pinned CPU torch). guidellm 0.8 installs
beside it, but builds its own request bodies from dataset columns and re-encodes
audio (torchcodec, MP3 by default), so it would not send the task set's own bytes.
aiperf 0.13 installs beside it too and replays bodies verbatim (``raw-payload``):
it is the optional external generator (``omniquant.endpoint.aiperf``, its
``profile_export.jsonl`` read back). The default is this module's own threads over
``EndpointClient.chat_timed``, because it needs no ~70-package install (kubernetes,
optuna, dash come with aiperf), runs a level in-process, and knows which sample each
request carried. Both send the same chat bodies as the quality phase
(``omniquant.endpoint.protocol.entry_content``): one user turn holding the ``video_url``
and ``audio_url`` data URIs.

Policy:
- The workload is explicit and recorded: which samples (the task set's video/audio
  samples, or a ``--workload`` file whose clips state their length, checked against
  the files), the concurrency levels, the warm-up, the request count or duration
  per level, and ``max_tokens``. Requests cycle through the samples in order, so
  every model sees the same bodies in the same order.
- Warm-up: ``warmup`` requests one at a time, not counted. The first of them (or one
  uncounted probe when ``warmup`` is 0) asks for ``stream: true``: a server that
  streams gets TTFT measured from its events; one that refuses with a 400 naming
  ``stream`` is measured without streaming and TTFT is recorded as not available with
  the server's reason. End-to-end latency is measured either way.
- A level's figures are all or nothing: one failed request (HTTP error, timeout,
  connection lost) makes every figure of that level ``None`` with the reason and the
  error count, never a partial number; no new request is started after a failure.
- Hours of media per hour, per modality: the summed stated durations of the videos
  (audio) of the measured requests divided by the level's wall time (first send to
  last answer). Requests/s and tokens/s use the same wall time; tokens come from the
  server's ``usage`` (``None`` with the reason when it reports none).
- Percentiles: linear interpolation (numpy) over the level's requests; the request
  count is recorded next to them (p99 of a few requests is close to their maximum).
- Per-request records (send offset, TTFT, latency, tokens, media seconds, error) are
  returned with each level so the composition can write them beside the report.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from omniquant.endpoint.client import EndpointClient, TimedAnswer
from omniquant.endpoint.protocol import entry_content
from omniquant.errors import DataError, EndpointError, ReportError, arg_ref

#: Stated and measured clip lengths may differ by this much (container rounding).
LENGTH_TOLERANCE_S = 0.25
MEDIA_KINDS = ("video", "audio")


@dataclass(frozen=True)
class LoadRequest:
    """One request of the workload: its chat content and the media seconds it carries."""

    id: str
    parts: list[dict]
    extra: dict
    seconds: dict[str, float]


@dataclass(frozen=True)
class Workload:
    """What the load phase sends to every model (recorded in ``report.json``).

    Attributes:
        source: Where the samples come from, in words.
        requests: The samples, cycled in order.
        concurrency: Levels, each measured separately (requests in flight).
        warmup: Uncounted requests before the first level, one at a time.
        count: Requests per level (``None``: ``duration_s`` decides).
        duration_s: Seconds per level in which new requests are started (``None``:
            ``count`` decides).
        max_tokens: Decoding budget per request (temperature 0).
    """

    source: str
    requests: tuple[LoadRequest, ...]
    concurrency: tuple[int, ...]
    warmup: int = 1
    count: int | None = None
    duration_s: float | None = None
    max_tokens: int = 16

    def describe(self) -> dict:
        """The workload as ``report.json`` records it."""
        return {
            "source": self.source,
            "samples": [
                {"id": r.id, **{f"{k}_seconds": round(v, 3) for k, v in r.seconds.items()}}
                for r in self.requests
            ],
            "media_seconds_per_cycle": {
                k: round(sum(r.seconds.get(k, 0.0) for r in self.requests), 3) for k in MEDIA_KINDS
            },
            "concurrency": list(self.concurrency),
            "warmup_requests": self.warmup,
            "requests_per_level": self.count,
            "duration_s_per_level": self.duration_s,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "order": "samples in order, cycled; the same bodies for every model",
        }


def check_load_settings(
    concurrency, warmup: int, count: int | None, duration_s: float | None, max_tokens: int
) -> tuple[int, ...]:
    """Validate the load settings (before any model work); returns the sorted levels.

    Raises:
        ReportError: naming the argument and the fix.
    """
    levels = tuple(sorted({int(c) for c in concurrency}))
    if not levels or levels[0] < 1:
        raise ReportError(
            f"{arg_ref('load_concurrency')}: give one or more levels >= 1 (e.g. 1,4); got "
            f"{list(concurrency)}."
        )
    if warmup < 0:
        raise ReportError(f"{arg_ref('warmup')}: must be >= 0, got {warmup}.")
    if (count is None) == (duration_s is None):
        raise ReportError(
            f"give exactly one of {arg_ref('load_requests')} (requests per level) and "
            f"{arg_ref('load_duration')} (seconds per level)."
        )
    if count is not None and count < 1:
        raise ReportError(f"{arg_ref('load_requests')}: must be >= 1, got {count}.")
    if duration_s is not None and duration_s <= 0:
        raise ReportError(f"{arg_ref('load_duration')}: must be > 0, got {duration_s}.")
    if max_tokens < 1:
        raise ReportError(f"{arg_ref('load_max_tokens')}: must be >= 1, got {max_tokens}.")
    return levels


def _seconds_of(entry) -> dict[str, float]:
    from omniquant.data.media import media_seconds

    out: dict[str, float] = {}
    if entry.video is not None:
        out["video"] = media_seconds(entry.resolve(entry.video), "video")
    if entry.audio:
        out["audio"] = sum(media_seconds(entry.resolve(p), "audio") for p in entry.audio)
    return out


def workload_from_entries(entries: list, task_set: str, **settings) -> Workload:
    """The task set's samples that carry video or audio (all samples when none does).

    Args:
        entries: Validated task lines (``evaluate.tasks.validate_task_set``).
        task_set: The task set's name, for the record.
        **settings: ``Workload`` fields (concurrency, warmup, count, duration_s, max_tokens).
    """
    media = [e for e in entries if e.video is not None or e.audio]
    picked = media or list(entries)
    which = "video and audio samples" if media else "all samples (none has video or audio)"
    requests = tuple(LoadRequest(e.id, *entry_content(e), _seconds_of(e)) for e in picked)
    return Workload(f"task set {task_set}: {len(picked)} {which}", requests, **settings)


@dataclass
class _Clip:
    """A workload-file line in the shape ``entry_content`` reads."""

    id: str
    prompt: str
    base: Path
    images: list[str] = field(default_factory=list)
    video: str | None = None
    audio: list[str] = field(default_factory=list)
    video_frames: int | None = None
    video_fps: float | None = None

    def resolve(self, rel: str) -> Path:
        path = Path(rel)
        return path if path.is_absolute() else self.base / path


def read_workload_file(path: str | Path, **settings) -> Workload:
    """A ``--workload`` JSON Lines file: one clip per line.

    Each line: ``{"id", "prompt", "video"?, "audio"? (a path or a list), "image"?,
    "video_seconds"?, "audio_seconds"?, "video_frames"?, "video_fps"?}``; paths are
    relative to the file. A line with a video (audio) must state ``video_seconds``
    (``audio_seconds``, the sum over its audio files), and the stated length must match
    the file within ``LENGTH_TOLERANCE_S``.

    Raises:
        DataError: every bad line listed (file, line number, field, fix).
    """
    from omniquant.data.media import MediaError, media_seconds

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{arg_ref('workload')} {path}: no such file.")
    problems, requests = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
            audio = row.get("audio") or []
            clip = _Clip(
                id=str(row.get("id", f"line-{number}")), prompt=str(row["prompt"]), base=path.parent,
                images=[row["image"]] if isinstance(row.get("image"), str) else row.get("image") or [],
                video=row.get("video"), audio=[audio] if isinstance(audio, str) else list(audio),
                video_frames=row.get("video_frames"), video_fps=row.get("video_fps"),
            )  # fmt: skip
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            problems.append(f"{where}: not a clip line ({type(err).__name__}: {err}); each line is "
                            '{"id", "prompt", "video"/"audio", "video_seconds"/"audio_seconds"}')  # fmt: skip
            continue
        stated, ok = {}, True
        for kind, files in (("video", [clip.video] if clip.video else []), ("audio", clip.audio)):
            if not files:
                continue
            if not isinstance(row.get(f"{kind}_seconds"), (int, float)):
                problems.append(f"{where}: {kind}_seconds missing; state the clip's length in seconds")
                ok = False
                continue
            try:
                measured = sum(media_seconds(clip.resolve(f), kind) for f in files)
            except MediaError as err:
                problems.append(f"{where}: {err}")
                ok = False
                continue
            if abs(measured - row[f"{kind}_seconds"]) > LENGTH_TOLERANCE_S:
                problems.append(f"{where}: {kind}_seconds {row[f'{kind}_seconds']} but the file "
                                f"lasts {measured:.2f} s; state the real length")  # fmt: skip
                ok = False
            stated[kind] = float(row[f"{kind}_seconds"])
        if ok:
            requests.append(LoadRequest(clip.id, *entry_content(clip), stated))
    if problems:
        raise DataError(f"{arg_ref('workload')} {path}:\n  " + "\n  ".join(problems))
    if not requests:
        raise DataError(f"{arg_ref('workload')} {path}: no clip lines.")
    return Workload(f"workload file {path}: {len(requests)} clips", tuple(requests), **settings)


# ---------------------------------------------------------------------------- running


def _body(request: LoadRequest, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": request.parts}], **request.extra,
            "temperature": 0, "max_tokens": max_tokens}  # fmt: skip


def _refuses_streaming(answer: TimedAnswer) -> bool:
    return (
        answer.status == 400
        and (answer.param == "stream" or "stream" in (answer.error or "").lower())
    )


def _warm_up(client: EndpointClient, workload: Workload) -> tuple[bool, str | None]:
    """Uncounted requests; returns ``(stream, why TTFT is not available)``.

    Raises:
        EndpointError: A warm-up request failed (the model gets no figures).
    """
    stream, why = True, None
    for i in range(max(1, workload.warmup)):
        request = workload.requests[i % len(workload.requests)]
        answer = client.chat_timed(_body(request, workload.max_tokens), stream=stream)
        if stream and _refuses_streaming(answer):
            stream, why = False, f"the server does not stream ({answer.error})"
            answer = client.chat_timed(_body(request, workload.max_tokens), stream=False)
        if answer.error:
            raise EndpointError(f"warm-up request {request.id} failed: {answer.error}")
        if stream and answer.first_token is None:
            why = "the stream carried no content token"
    return stream, why


def _percentiles(values: list[float]) -> dict | None:
    import numpy as np

    if not values:
        return None
    arr = np.asarray(values, dtype=float)
    return {"p50": round(float(np.percentile(arr, 50)), 6),
            "p99": round(float(np.percentile(arr, 99)), 6)}  # fmt: skip


def _run_level(client: EndpointClient, workload: Workload, level: int, stream: bool) -> list:
    """``level`` workers pull request indices until the count or the duration is reached;
    after a failure no new request is started."""
    lock = threading.Lock()
    counter = iter(range(10**9))
    failed = threading.Event()
    records: list[tuple[int, LoadRequest, TimedAnswer]] = []
    start = time.perf_counter()
    stop_at = start + workload.duration_s if workload.duration_s is not None else None

    def worker() -> None:
        while not failed.is_set():
            with lock:
                i = next(counter)
            if workload.count is not None and i >= workload.count:
                return
            if stop_at is not None and time.perf_counter() >= stop_at:
                return
            request = workload.requests[i % len(workload.requests)]
            answer = client.chat_timed(_body(request, workload.max_tokens), stream=stream)
            with lock:
                records.append((i, request, answer))
            if answer.error:
                failed.set()

    threads = [threading.Thread(target=worker, name=f"omniquant-load-{k}") for k in range(level)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(records, key=lambda r: r[0])


def summarize_level(
    records: list, level: int, ttft_missing: str | None, media_seconds: dict | None = None
) -> dict:
    """The figures of one level from its per-request records (all or nothing).

    ``media_seconds`` overrides the per-record sum (a generator that sent every body of a
    payload file once, without saying which record was which body).
    """
    rows = [
        {"i": i, "id": req.id, "start_s": a.start, "ttft_s": None if a.first_token is None
         else round(a.first_token - a.start, 6), "latency_s": round(a.end - a.start, 6),
         "prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
         **{f"{k}_seconds": v for k, v in req.seconds.items()}, "error": a.error}
        for i, req, a in records
    ]  # fmt: skip
    t0 = min((a.start for _, _, a in records), default=0.0)
    for row in rows:
        row["start_s"] = round(row["start_s"] - t0, 6)
    errors = [a.error for _, _, a in records if a.error]
    out: dict = {"concurrency": level, "requests": len(records), "errors": len(errors),
                 "records": rows}  # fmt: skip
    keys = ("wall_s", "requests_per_s", "input_tokens_per_s", "output_tokens_per_s", "ttft_s",
            "latency_s", "media_seconds", "media_hours_per_hour")  # fmt: skip
    if errors or not records:
        out.update(dict.fromkeys(keys))
        out["not_available"] = (
            f"{len(errors)} of {len(records)} requests failed (first: {errors[0]}); "
            "no partial figure is reported" if errors else "no request was sent"
        )
        return out
    wall = max(a.end for _, _, a in records) - t0
    answers = [a for _, _, a in records]
    prompt = [a.prompt_tokens for a in answers]
    completion = [a.completion_tokens for a in answers]
    media = media_seconds or {
        k: sum(r.seconds.get(k, 0.0) for _, r, _ in records) for k in MEDIA_KINDS
    }
    ttfts = [a.first_token - a.start for a in answers if a.first_token is not None]
    out.update(
        wall_s=round(wall, 6),
        requests_per_s=len(records) / wall,
        input_tokens_per_s=None if None in prompt else sum(prompt) / wall,
        output_tokens_per_s=None if None in completion else sum(completion) / wall,
        max_prompt_tokens=None if None in prompt else max(prompt),
        ttft_s=_percentiles(ttfts) if len(ttfts) == len(answers) else None,
        latency_s=_percentiles([a.end - a.start for a in answers]),
        media_seconds={k: round(v, 3) for k, v in media.items()},
        media_hours_per_hour={k: (v / wall if v else None) for k, v in media.items()},
    )
    missing = {}
    if out["ttft_s"] is None:
        missing["ttft_s"] = ttft_missing or "some streamed answers carried no content token"
    if None in prompt or None in completion:
        missing["tokens_per_s"] = "the server reports no usage for some requests"
    if missing:
        out["not_available"] = missing
    return out


def run_load(client: EndpointClient, workload: Workload, *, log=None, level_runner=None) -> dict:
    """Warm up, then measure each concurrency level of ``workload`` against ``client``.

    Args:
        client: A client whose model is resolved (``resolve_model``); its timeout bounds
            each request.
        workload: What to send.
        log: Receives one progress line per level.
        level_runner: ``fn(client, workload, level, stream, ttft_missing) -> level summary``
            for an external load generator (``omniquant.endpoint.aiperf``); ``None``: this
            module's threads and ``EndpointClient.chat_timed``.

    Returns:
        ``{"stream": bool, "ttft_not_available": reason|None, "levels": [...]}`` (see
        ``summarize_level``), or ``{"error": reason, "levels": []}`` when the warm-up
        failed.
    """
    say = log or (lambda _m: None)
    try:
        stream, why = _warm_up(client, workload)
    except EndpointError as err:
        return {"stream": None, "ttft_not_available": None, "levels": [],
                "error": f"{err}; no figure is reported"}  # fmt: skip
    levels = []
    for level in workload.concurrency:
        if level_runner is None:
            summary = summarize_level(_run_level(client, workload, level, stream), level, why)
        else:
            summary = level_runner(client, workload, level, stream, why)
        levels.append(summary)
        if summary["requests_per_s"] is None:
            say(f"  concurrency {level}: n/a ({summary['not_available']})")
        else:
            lat = summary["latency_s"]
            say(f"  concurrency {level}: {summary['requests']} requests, "
                f"{summary['requests_per_s']:.3f} req/s, latency p50 {lat['p50']:.3f} s "
                f"p99 {lat['p99']:.3f} s")  # fmt: skip
    return {"stream": stream, "ttft_not_available": why, "levels": levels,
            "warmup_requests": max(1, workload.warmup)}  # fmt: skip
