"""The load phase through aiperf (optional): the workload's bodies replayed, per-request records read back.

aiperf (NVIDIA's OpenAI-API load generator, ``pip install "omniquant[aiperf]"`` or
any environment: it runs as its own program) replays request bodies verbatim with its
``raw-payload`` dataset type, so it sends exactly the chat turns the built-in client
sends (video and audio data URIs in one user turn); ``omniquant.endpoint.load`` keeps
the workload, the warm-up (which also probes streaming) and the figures.

Policy:
- One aiperf run per concurrency level: a payload file of exactly ``count`` bodies, in
  the built-in client's order (samples cycled), ``--dataset-sampling-strategy
  sequential --request-count count`` and no aiperf warm-up (aiperf refuses a count of 0;
  leaving it unset runs none), ``--streaming`` when the server streams,
  ``--use-server-token-count``. Duration mode is refused (which bodies
  were sent would be unknown).
- Read back ``profile_export.jsonl`` (one record per request: start/end timestamps,
  ``time_to_first_token``, usage, ``error``). The level is accepted only when it holds
  exactly ``count`` records from ``count`` distinct sessions, i.e. every body was sent
  once; the media seconds are then the payload file's sum, whatever the record order.
  Records are labelled with the sample at their ``session_num`` (the k-th session of a
  sequential replay is the k-th line).
- A failed or incomplete aiperf run makes the level ``n/a`` with the reason (its log
  path included), never a partial figure.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from omniquant.endpoint.client import EndpointClient, TimedAnswer
from omniquant.endpoint.load import MEDIA_KINDS, LoadRequest, Workload, _body, summarize_level
from omniquant.errors import ReportError, arg_ref

RUN_TIMEOUT_S = 6 * 3600


def find_aiperf(path: str | None) -> str:
    """The ``aiperf`` program: ``path``, else the one on ``PATH``.

    Raises:
        ReportError: Not found (with how to install it).
    """
    found = shutil.which(path or "aiperf")
    if found is None:
        raise ReportError(
            f"{arg_ref('aiperf')}: no aiperf program at {path or 'PATH'}; install it with "
            'pip install "omniquant[aiperf]" (or in its own environment) and pass its path.'
        )
    return found


def aiperf_version(program: str) -> str:
    done = subprocess.run(
        [program, "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    return (done.stdout.strip().splitlines() or ["unknown"])[-1]


def _answer(record: dict) -> TimedAnswer:
    meta, metrics = record.get("metadata") or {}, record.get("metrics") or {}

    def value(name):
        item = metrics.get(name)
        return item.get("value") if isinstance(item, dict) else None

    answer = TimedAnswer(meta["request_start_ns"] / 1e9)
    answer.end = meta["request_end_ns"] / 1e9
    ttft = value("time_to_first_token")
    answer.first_token = None if ttft is None else answer.start + ttft / 1e3
    prompt, completion = value("usage_prompt_tokens"), value("usage_completion_tokens")
    answer.prompt_tokens = None if prompt is None else int(prompt)
    answer.completion_tokens = None if completion is None else int(completion)
    error = record.get("error")
    if error:
        answer.error = f"{error.get('type') or 'error'} {error.get('code') or ''}: {error.get('message')}"
    return answer


def aiperf_level_runner(program: str, artifacts: Path, tokenizer: str):
    """A level runner for ``omniquant.endpoint.load.run_load`` that drives aiperf.

    Args:
        program: The aiperf program (``find_aiperf``).
        artifacts: Directory for the payload files and aiperf's artifacts (one per level).
        tokenizer: What aiperf loads as tokenizer (a local checkpoint directory, or the
            served model's hub name); token counts come from the server's usage.
    """

    def run(client: EndpointClient, workload: Workload, level: int, stream: bool,
            ttft_missing: str | None) -> dict:  # fmt: skip
        if workload.count is None:
            raise ReportError(
                f"the aiperf load generator needs {arg_ref('load_requests')} (a request count): "
                "with a duration, which bodies were sent would be unknown."
            )
        out = artifacts / f"c{level}"
        out.mkdir(parents=True, exist_ok=True)
        planned = [workload.requests[i % len(workload.requests)] for i in range(workload.count)]
        extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        lines = [json.dumps({**_body(r, workload.max_tokens), **client.request_extra,
                             "model": client.model_id, **extra}) for r in planned]  # fmt: skip
        (out / "payloads.jsonl").write_text("\n".join(lines) + "\n")
        cmd = [program, "profile", "--model", client.model_id, "--url",
               client.base_url.removesuffix("/v1"), "--endpoint-type", "chat",
               "--input-file", str(out / "payloads.jsonl"), "--custom-dataset-type", "raw-payload",
               "--dataset-sampling-strategy", "sequential", "--concurrency", str(level),
               "--request-count", str(workload.count),
               "--use-server-token-count", "--tokenizer", tokenizer,
               "--output-artifact-dir", str(out / "artifacts"), "--ui-type", "none",
               "--no-server-metrics", "--no-gpu-telemetry", "--no-auto-plot",
               *(["--streaming"] if stream else [])]  # fmt: skip
        media = {k: sum(r.seconds.get(k, 0.0) for r in planned) for k in MEDIA_KINDS}
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                                  check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            return _failed(level, f"aiperf ran past {RUN_TIMEOUT_S} s")
        (out / "aiperf.log").write_text(done.stdout + done.stderr)
        records_file = out / "artifacts" / "profile_export.jsonl"
        if done.returncode != 0 or not records_file.is_file():
            return _failed(level, f"aiperf exited with {done.returncode} (log {out / 'aiperf.log'})")
        records = [json.loads(x) for x in records_file.read_text().splitlines() if x.strip()]
        sessions = {r["metadata"].get("conversation_id") for r in records}
        if len(records) != workload.count or len(sessions) != workload.count:
            return _failed(level, f"aiperf returned {len(records)} records from {len(sessions)} "
                           f"sessions for {workload.count} bodies (log {out / 'aiperf.log'})")  # fmt: skip
        rows = []
        for record in records:
            k = int(record["metadata"].get("session_num", 0))
            req = planned[k] if 0 <= k < len(planned) else LoadRequest("?", [], {}, {})
            rows.append((k, req, _answer(record)))
        summary = summarize_level(sorted(rows, key=lambda r: r[0]), level, ttft_missing,
                                  media_seconds=media)  # fmt: skip
        summary["aiperf_records"] = str(records_file)
        return summary

    return run


def _failed(level: int, reason: str) -> dict:
    summary = summarize_level([], level, None)
    summary["not_available"] = f"{reason}; no figure is reported"
    return summary
