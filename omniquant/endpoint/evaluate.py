"""Evaluate a served model on a task set: what ``evaluate.runner`` does, through the API.

``describe_endpoint`` says what a served model is (``evaluate.describe`` for a
checkpoint directory), in the fields a report shows.

Policy (per sample, in this order; the requests of one sample run one after another,
samples run concurrently on ``concurrency`` threads):
1. Prompt request: the user message (``protocol.entry_content``), ``temperature`` 0,
   ``max_tokens`` = the decoding budget (1 for multiple choice, which is not decoded).
   Its text is the greedy prediction; its ``usage.prompt_tokens`` is the prompt length
   the next requests are measured against.
2. Fidelity request (when a baseline reference is given or spans are kept): the
   reference answer as a continued assistant message (``continue_final_message``,
   vLLM), ``prompt_logprobs`` = ``logprobs``/``top_logprobs`` = k, ``max_tokens`` 1,
   ``return_tokens_as_token_ids``. The answer's positions are the last
   ``prompt_tokens(2) - prompt_tokens(1)`` entries of ``prompt_logprobs``; the
   position after the answer (the one the in-process span scores against EOS) is the
   generated token's ``top_logprobs``. KL and top-1 agreement then follow
   ``fidelity.compare_topk``.
3. Multiple choice: one request per choice with the choice as the continued assistant
   message and ``prompt_logprobs`` 0; the score is the mean log-probability of the
   choice tokens, exactly the in-process rule (``metrics.choose``).
- Metrics the server cannot provide (no ``prompt_logprobs``, tokens not returned as
  ids, an HTTP 4xx on those requests) are recorded as not available: ``kl``/``top1``
  ``None``, multiple-choice ``prediction`` and ``score`` ``None``, with the reason in
  the returned capabilities. Nothing is estimated in their place.
- Alignment assumption: the server's chat template renders a continued assistant
  message as its generation prompt followed by the message text (true of ChatML-style
  templates and of ``omniquant serve``, which renders none). A template that adds text
  only to the generation prompt (a thinking block, say) shifts the positions; switch
  it off with ``request_extra`` (e.g. ``chat_template_kwargs``).
- Video token counts and EVS rates are server settings (``--video-pruning-rate``) that
  the API does not report: ``None`` for served models.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from omniquant.endpoint.client import EndpointClient
from omniquant.endpoint.protocol import entry_content
from omniquant.errors import EndpointError, OmniquantError


class Unavailable(Exception):
    """The server does not provide what a metric needs (the reason is the message)."""


def _token_id(name: str) -> int:
    if isinstance(name, str) and name.startswith("token_id:"):
        return int(name.split(":", 1)[1])
    raise Unavailable(
        "the server returned tokens as text, not as token ids (vLLM's "
        "return_tokens_as_token_ids); fidelity needs ids"
    )


def _prompt_tokens(answer: dict) -> int:
    usage = answer.get("usage") or {}
    if "prompt_tokens" not in usage:
        raise Unavailable("the server reports no usage.prompt_tokens")
    return int(usage["prompt_tokens"])


def _prefill_entries(answer: dict, base_tokens: int) -> list[dict]:
    """The ``prompt_logprobs`` entries of the continued assistant message."""
    entries = answer.get("prompt_logprobs")
    if not isinstance(entries, list):
        raise Unavailable("the server returns no prompt_logprobs (a vLLM extension)")
    n = _prompt_tokens(answer) - base_tokens
    if n <= 0 or n > len(entries):
        raise Unavailable(
            f"cannot locate the continued message in prompt_logprobs ({n} tokens of {len(entries)})"
        )
    tail = entries[-n:]
    if any(not isinstance(e, dict) or not e for e in tail):
        raise Unavailable("prompt_logprobs has null entries on the continued message")
    return tail


def _messages(parts: list[dict], prefill: str | None) -> dict:
    messages = [{"role": "user", "content": parts}]
    if prefill is None:
        return {"messages": messages}
    return {
        "messages": [*messages, {"role": "assistant", "content": prefill}],
        "continue_final_message": True,
        "add_generation_prompt": False,
    }


def _span(answer: dict, base_tokens: int, k: int):
    """``(indices, logprobs)`` of shape ``(A + 1, k)`` from a fidelity answer."""
    import torch

    rows: list[list[tuple[int, float]]] = []
    for entry in _prefill_entries(answer, base_tokens):
        top = sorted(
            (
                (int(t), float(v["logprob"]))
                for t, v in entry.items()
                if int(v.get("rank", k + 1)) <= k
            ),
            key=lambda tv: -tv[1],
        )
        rows.append(top)
    content = ((answer.get("choices") or [{}])[0].get("logprobs") or {}).get("content") or []
    if not content or not content[0].get("top_logprobs"):
        raise Unavailable("the server returns no top_logprobs for generated tokens")
    rows.append(
        sorted(
            ((_token_id(t["token"]), float(t["logprob"])) for t in content[0]["top_logprobs"]),
            key=lambda tv: -tv[1],
        )
    )
    width = min(len(r) for r in rows)
    if width == 0:
        raise Unavailable("prompt_logprobs lacks the top-k alternatives")
    indices = torch.tensor([[t for t, _ in r[:width]] for r in rows], dtype=torch.long)
    logprobs = torch.tensor([[v for _, v in r[:width]] for r in rows], dtype=torch.float32)
    return indices, logprobs


def _squash(text: str) -> str:
    """Text without whitespace or the BPE / SentencePiece space markers."""
    return "".join(text.replace("\u0120", " ").replace("\u2581", " ").split())


def _choice_score(answer: dict, base_tokens: int, choice: str) -> float:
    values, decoded = [], []
    for entry in _prefill_entries(answer, base_tokens):
        if len(entry) != 1:
            raise Unavailable("prompt_logprobs=0 returned more than the prompt token's own entry")
        value = next(iter(entry.values()))
        values.append(float(value["logprob"]))
        decoded.append(value.get("decoded_token"))
    # Guard the alignment assumption: the scored tokens must spell the choice.
    if all(isinstance(d, str) for d in decoded) and _squash("".join(decoded)) != _squash(choice):
        raise Unavailable(
            f"the scored prompt tokens spell {''.join(decoded)!r}, not the choice {choice!r}: the "
            "chat template adds text between the user turn and a continued assistant message "
            "(see request_extra)"
        )
    return sum(values) / len(values)


def evaluate_endpoint(
    client: EndpointClient,
    entries: list,
    *,
    reference: dict | None = None,
    keep_spans: bool = False,
    max_new_tokens: int = 16,
    topk: int = 20,
    concurrency: int = 4,
    progress: Callable[[int, int], None] | None = None,
):
    """Evaluate the served model behind ``client`` on validated task ``entries``.

    Args:
        client: A client whose model is resolved (``resolve_model``).
        entries: ``TaskEntry`` lines (``evaluate.tasks.validate_task_set``).
        reference: Baseline spans by sample id (KL and top-1 against them).
        keep_spans: Keep this model's answer-span distributions (top-k form).
        max_new_tokens: Greedy decoding budget.
        topk: Log-probabilities asked per position (``top_logprobs``, ``prompt_logprobs``).
        concurrency: Samples in flight at once.
        progress: Called with ``(done, total)`` as samples finish.

    Returns:
        ``(evaluation, capabilities)``: a ``ModelEvaluation`` in entry order, and
        ``{"likelihood": reason-or-None, "fidelity": reason-or-None}`` (``None``: available).

    Raises:
        EndpointError: The server failed (after retries) or refused a prompt request.
    """
    import threading

    from omniquant.evaluate.fidelity import compare_topk, topk_span
    from omniquant.evaluate.metrics import choose, score_sample
    from omniquant.evaluate.runner import ModelEvaluation, SampleResult

    want_fidelity = keep_spans or reference is not None
    missing: dict[str, str | None] = {"likelihood": None, "fidelity": None}
    lock = threading.Lock()

    def unavailable(what: str, why: Exception) -> None:
        with lock:
            missing[what] = missing[what] or str(why)

    def optional(what: str, fn):
        try:
            return fn()
        except Unavailable as why:
            unavailable(what, why)
        except EndpointError as err:
            if err.status is None or not 400 <= err.status < 500:
                raise
            unavailable(what, err)
        return None

    def one(entry):
        parts, extra = entry_content(entry)
        mc = entry.metric == "multiple_choice"
        first = client.chat(
            {**_messages(parts, None), **extra, "temperature": 0,
             "max_tokens": 1 if mc else max_new_tokens},
            entry.id,
        )  # fmt: skip
        try:
            base_tokens = _prompt_tokens(first)
        except Unavailable as why:
            base_tokens = None
            unavailable("likelihood", why)
            unavailable("fidelity", why)
        span = kl = top1 = None
        if want_fidelity and base_tokens is not None:
            body = {**_messages(parts, entry.answer), **extra, "temperature": 0, "max_tokens": 1,
                    "logprobs": True, "top_logprobs": topk, "prompt_logprobs": topk,
                    "return_tokens_as_token_ids": True}  # fmt: skip
            span = optional(
                "fidelity", lambda: _span(client.chat(body, entry.id), base_tokens, topk)
            )
            ref = reference.get(entry.id) if reference is not None else None
            if span is not None and ref is not None:
                kl_t, agree_t = compare_topk(ref, *span)
                kl, top1 = float(kl_t.mean()), float(agree_t.mean())
        prediction = score = wer = None
        if mc:
            scores = []
            for choice in entry.choices:
                body = {**_messages(parts, choice), **extra, "temperature": 0, "max_tokens": 1,
                        "prompt_logprobs": 0}  # fmt: skip
                got = None
                if base_tokens is not None:
                    got = optional(
                        "likelihood",
                        lambda b=body, c=choice: _choice_score(
                            client.chat(b, entry.id), base_tokens, c
                        ),
                    )
                if got is None:
                    scores = None
                    break
                scores.append(got)
            if scores is not None:
                prediction = entry.choices[choose(scores)]
        else:
            prediction = ((first.get("choices") or [{}])[0].get("message") or {}).get("content")
            prediction = (prediction or "").strip()
        if prediction is not None:
            score, wer = score_sample(entry.metric, prediction, entry.answer)
        result = SampleResult(
            id=entry.id, task=entry.task, modality=entry.modality, metric=entry.metric,
            prediction=prediction, score=score, wer=wer, kl=kl, top1=top1,
            answer_tokens=int(span[0].shape[0]) if span is not None else 0,
            video_tokens=None, video_placeholders=None, evs_rate=None,
        )  # fmt: skip
        return result, span

    start = time.perf_counter()
    results: list = [None] * len(entries)
    spans: dict = {}
    done = 0
    pool = ThreadPoolExecutor(
        max_workers=max(1, concurrency), thread_name_prefix="omniquant-endpoint"
    )
    try:
        futures = {pool.submit(one, entry): i for i, entry in enumerate(entries)}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in finished:
                result, span = fut.result()  # re-raises the first failure
                i = futures[fut]
                results[i] = result
                if keep_spans and span is not None:
                    spans[result.id] = topk_span(*span)
                done += 1
                if progress:
                    progress(done, len(entries))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    evaluation = ModelEvaluation(samples=results, spans=spans, seconds=time.perf_counter() - start)
    return evaluation, missing


def describe_endpoint(client, role: str) -> dict:
    """What a served model says about itself, in ``describe_checkpoint``'s fields.

    ``omniquant serve`` reports its checkpoint in ``/v1/models`` (field ``omniquant``);
    another server whose ``root`` is a checkpoint directory on this machine (vLLM or
    trtllm-serve started by a bundle's ``eval.sh``) is described from those files;
    otherwise precision, size and bits per weight are not available (``None``).

    Raises:
        EndpointError: The server is unreachable or does not serve the model.
    """
    from omniquant.evaluate.describe import describe_checkpoint

    entry = client.resolve_model()
    own = entry.get("omniquant") if isinstance(entry.get("omniquant"), dict) else None
    root = entry.get("root")
    info = None
    if own is not None:
        info = {k: own.get(k) for k in ("recipe", "precision", "kv_cache", "bits_per_weight",
                                        "size_bytes", "params", "group_precision", "calibration")}  # fmt: skip
    elif isinstance(root, str) and Path(root).is_dir():
        try:
            info = describe_checkpoint(Path(root), role)
        except OmniquantError:
            info = None
    if info is None:
        info = dict.fromkeys(("recipe", "kv_cache", "bits_per_weight", "size_bytes", "params",
                              "calibration"))  # fmt: skip
        info.update(precision="served (not reported)", group_precision={})
    info.update(
        name=client.source.name or (own or {}).get("name") or client.model_id,
        path=f"{client.base_url}#{client.model_id}",
        endpoint={"url": client.base_url, "model": client.model_id, "root": root},
    )
    info["emulation"] = (own or {}).get("emulation")
    return info
