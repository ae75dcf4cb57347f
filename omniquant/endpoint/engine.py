"""The model behind ``omniquant serve``: one worker thread, jobs stepped in turn.

Policy:
- The model is the one the report measures: ``omniquant.evaluate.emulated.load_emulated``
  loads the checkpoint's files (FP8 / NVFP4 dequantized from the stored bytes, activation
  and FP8 KV quantization emulated), prompts go through ``omniquant.data.processing``,
  and the backbone is driven on the embeddings ``omniquant.evaluate.runner.backbone_input``
  captures, as the in-process evaluator drives it. It runs on the CPU, batch size 1.
- Why a scheduler of our own: no serving engine runs here, and the emulated numerics are
  plain torch modules. One worker thread owns the model; each request (each of its ``n``
  choices) is a ``Job`` that advances one unit at a time: the encoder pass, one prefill
  chunk of at most ``prefill_chunk`` tokens (the model cache carries attention K/V and
  Mamba states across chunks; measured equal to a whole-prompt pass, max |diff| 0.0 on the
  demo model), or one decode step. Running jobs take turns, cheap units first: decode
  steps and prompts of at most one chunk run before a long prompt's next chunk until
  they have spent a chunk's worth of tokens (vLLM's decode-first token budget, without
  batching), so a short request is not held behind all of a long prompt. At most ``max_num_seqs`` jobs run; up to
  ``max_queued`` more wait; beyond that ``submit`` raises ``QueueFull`` (HTTP 429).
- A job whose client went away (``Job.cancel``) is dropped before its next unit, which
  frees its cache.
- Decoding: greedy at temperature 0, otherwise sampling with ``top_k`` / ``top_p`` from
  a generator seeded per choice (``seed`` and the choice index: the same seed gives the
  same text). Log-probabilities are the model's raw ones (vLLM's default
  ``raw_logprobs``). It stops at EOS (unless ``ignore_eos``), at a ``stop_token_ids``
  token, at a ``stop`` string (the text is cut before it unless
  ``include_stop_str_in_output``), or after ``max_tokens``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omniquant.endpoint.protocol import ProtocolError

log = logging.getLogger("omniquant.serve")


def release_memory() -> None:
    """Give freed heap pages back to the OS when the model goes idle (glibc only).

    Why: glibc keeps the pages a burst of requests freed (large prompts tokenized in
    several request threads, each with its own malloc arena), so the server's resident
    memory would stay at its high-water mark; ``malloc_trim`` returns them. Measured on
    the demo FP8 soak (benchmarks/bench_serve.py).
    """
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
            _LIBC.malloc_trim  # noqa: B018 - probe: absent outside glibc
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


class QueueFull(ProtocolError):
    """More requests wait than ``--max-queued-requests`` allows (HTTP 429)."""


@dataclass
class StepLogprobs:
    """One decoded or scored position: the token, its log-probability, rank and top-k."""

    token: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


def step_logprobs(logits, token: int, k: int) -> StepLogprobs:
    """Log-probability, rank and top-``k`` of ``token`` under ``logits`` ``(V,)``."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    value = float(logp[token])
    rank = int((logp > logp[token]).sum()) + 1
    top = []
    if k > 0:
        vals, idx = logp.topk(min(k, logp.shape[-1]))
        top = [(int(i), float(v)) for i, v in zip(idx.tolist(), vals.tolist())]
    return StepLogprobs(token=token, logprob=value, rank=rank, top=top)


@dataclass
class GenParams:
    """What one choice decodes (resolved from a request; see ``omniquant.endpoint.serving``)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True


@dataclass
class Event:
    """What a job reports: ``delta`` (new text, the step's log-probs) or ``done`` / ``error``."""

    kind: str
    text: str = ""
    step: StepLogprobs | None = None
    job: Job | None = None
    offset: int = 0  # where ``text`` starts in the choice's text
    error: BaseException | None = None


class Job:
    """One choice of one request, advanced a unit at a time by the ``Scheduler``.

    Args:
        sample: The processed prompt (``omniquant.data.batch.Sample``).
        prefill: Tokens appended after the sample (a continued assistant message).
        params: Decoding parameters.
        emit: Called with each ``Event`` (from the worker thread).
        index: The choice index (seeds the sampler with ``params.seed``).
    """

    def __init__(self, sample, prefill: list[int], params: GenParams,
                 emit: Callable[[Event], None], index: int = 0):  # fmt: skip
        self.sample, self.prefill, self.params, self.emit = sample, prefill, params, emit
        self.index = index
        self.ids: list[int] = sample.input_ids[0].tolist() + list(prefill)
        self.prompt_tokens = len(self.ids)
        self.cancelled = False
        self.embeds = None  # (1, T, H) once encoded
        self.pos = 0  # prefill progress
        self.cache = None
        self.logits = None  # logits for the next token
        self.targets: list[int | None] = []
        self.prompt_steps: list[StepLogprobs | None] = []
        self.tokens: list[int] = []
        self.steps: list[StepLogprobs] = []
        self.text = ""
        self.sent = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.generator = None

    def cancel(self) -> None:
        """Drop this job before its next unit (the client went away)."""
        self.cancelled = True


class Scheduler:
    """The worker thread: admits jobs, steps running ones in turn (see module policy).

    Args:
        model: The ``ServedModel``.
        max_num_seqs: Jobs running at once.
        max_queued: Jobs that may wait beyond those (more: ``QueueFull``).
        prefill_chunk: Prompt tokens per prefill unit.
    """

    def __init__(self, model, *, max_num_seqs: int = 16, max_queued: int = 256,
                 prefill_chunk: int = 256):  # fmt: skip
        self.model = model
        self.max_num_seqs, self.max_queued, self.prefill_chunk = max_num_seqs, max_queued, prefill_chunk
        self.waiting: deque[Job] = deque()
        self.running: deque[Job] = deque()
        self.cv = threading.Condition()
        self.units = 0
        self.current: Job | None = None  # the job whose unit runs now
        self.spent = 0  # tokens of cheap units since the last long prefill chunk
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="omniquant-serve-model", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` (all of one request) or refuse them all.

        Raises:
            QueueFull: ``max_queued`` jobs already wait.
        """
        with self.cv:
            running = len(self.running) + (self.current is not None)
            if len(self.waiting) + len(jobs) > self.max_queued + max(0, self.max_num_seqs - running):
                raise QueueFull(
                    f"the server is busy: {len(self.waiting)} requests are queued "
                    f"(--max-queued-requests {self.max_queued}); retry later",
                    status=429, headers={"Retry-After": "1"},
                )  # fmt: skip
            self.waiting.extend(jobs)
            self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()

    def load(self) -> dict:
        """Running and waiting job counts."""
        with self.cv:
            current = self.current is not None
            return {"running": len(self.running) + current, "waiting": len(self.waiting)}

    def _loop(self) -> None:
        import torch

        while True:
            with self.cv:
                if not self.waiting and not self.running:
                    release_memory()
                while not self.waiting and not self.running and not self.closed:
                    self.cv.wait()
                if self.closed:
                    return
                while self.waiting and len(self.running) < self.max_num_seqs:
                    self.running.append(self.waiting.popleft())
                job = self._next()
                self.current = job
            if job.cancelled:
                self.current = None
                job.cache = job.embeds = job.logits = None
                continue
            try:
                with torch.no_grad():
                    done = self._unit(job)
            except Exception as err:
                log.exception("generation failed")
                job.cache = job.embeds = job.logits = None
                job.emit(Event("error", job=job, error=err))
                continue
            self.units += 1
            if done:
                job.cache = job.embeds = job.logits = None
                job.emit(Event("done", job=job))
            else:
                with self.cv:
                    self.running.append(job)

    def _cost(self, job: Job) -> int:
        """Prompt tokens the job's next unit processes (1 for a decode step)."""
        if job.embeds is None:
            return job.prompt_tokens
        return max(1, int(job.embeds.shape[1]) - job.pos)

    def _next(self) -> Job:
        """The job to step (under ``cv``): cheap units first, within a token budget.

        Like vLLM's scheduler, decode steps and short prompts go before a long prompt's
        next chunk: units costing at most ``prefill_chunk`` tokens run in turn until
        they have spent ``prefill_chunk`` tokens since the last long chunk; then the
        first job with a long prompt left gets one chunk, so it always progresses.
        """
        if self.spent < self.prefill_chunk:
            for i, job in enumerate(self.running):
                cost = self._cost(job)
                if cost <= self.prefill_chunk:
                    del self.running[i]
                    self.spent += cost
                    return job
        self.spent = 0
        for i, job in enumerate(self.running):
            if self._cost(job) > self.prefill_chunk:
                del self.running[i]
                return job
        return self.running.popleft()

    # ------------------------------------------------------------------ units
    def _unit(self, job: Job) -> bool:
        """Advance ``job`` by one unit; ``True`` when it is finished."""
        if job.embeds is None:
            self._encode(job)
            return False
        if job.pos < job.embeds.shape[1]:
            self._prefill_chunk(job)
            if job.pos < job.embeds.shape[1]:
                return False
            if job.params.max_tokens == 0:
                job.finish_reason = "length"
                return True
            return False
        return self._decode(job)

    def _encode(self, job: Job) -> None:
        import torch

        from omniquant.evaluate.runner import _append_tokens, backbone_input

        m = self.model
        prefix = backbone_input(m.loaded, job.sample)
        job.embeds = _append_tokens(m.embed, prefix, job.prefill)
        n_ids = int(job.sample.input_ids.shape[1])
        known = job.sample.input_ids[0].tolist() if prefix.shape[1] == n_ids else [None] * int(
            prefix.shape[1]
        )
        job.targets = known + list(job.prefill)
        job.prompt_steps = [None] * len(job.targets)
        if job.params.seed is not None:
            job.generator = torch.Generator().manual_seed(
                (int(job.params.seed) * 1_000_003 + job.index) % 2**63
            )
        elif job.params.temperature > 0:
            job.generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)

    def _prefill_chunk(self, job: Job) -> None:
        m, p = self.model, job.params
        end = min(job.pos + self.prefill_chunk, int(job.embeds.shape[1]))
        keep = end - job.pos if p.prompt_logprobs is not None else 1
        out = m.backbone(inputs_embeds=job.embeds[:, job.pos:end], past_key_values=job.cache,
                         use_cache=True, logits_to_keep=keep)  # fmt: skip
        job.cache = out.past_key_values
        logits = out.logits[0].float()
        if p.prompt_logprobs is not None:
            for j in range(keep):
                position = end - keep + j  # logits at `position` predict token position + 1
                target = job.targets[position + 1] if position + 1 < len(job.targets) else None
                if target is not None:
                    job.prompt_steps[position + 1] = step_logprobs(
                        logits[j], target, p.prompt_logprobs
                    )
        job.logits = logits[-1]
        job.pos = end

    def _choose(self, job: Job) -> int:
        import torch

        p, logits = job.params, job.logits
        if p.temperature <= 1e-5:
            return int(logits.argmax())
        scores = logits / p.temperature
        if p.top_k and 0 < p.top_k < scores.shape[-1]:
            kth = scores.topk(p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            ordered, order = scores.sort(descending=True)
            probs = ordered.softmax(-1)
            drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest set reaching top_p
            drop[0] = False
            scores = scores.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
        probs = scores.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=job.generator))

    def _decode(self, job: Job) -> bool:
        import torch

        m, p = self.model, job.params
        if not bool(torch.isfinite(job.logits).all()):
            raise RuntimeError(f"{m.path}: non-finite logits; the checkpoint is broken")
        token = self._choose(job)
        step = step_logprobs(job.logits, token, p.logprobs or 0) if p.logprobs is not None else None
        job.tokens.append(token)
        if step is not None:
            job.steps.append(step)
        finished = self._finish(job, token)
        text = job.text
        if not finished:
            hold = max((len(s) for s in p.stops), default=1) - 1
            text = text[: max(job.sent, len(text) - hold)]
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
                text = text[: job.sent]
        delta, offset = text[job.sent:], job.sent
        job.sent = max(job.sent, len(text))
        job.emit(Event("delta", text=delta, step=step, job=job, offset=offset))
        if finished:
            return True
        out = m.backbone(
            inputs_embeds=m.embed(torch.tensor([[token]], dtype=torch.long)),
            past_key_values=job.cache, use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        job.cache = out.past_key_values
        job.logits = out.logits[0, -1].float()
        return False

    def _finish(self, job: Job, token: int) -> bool:
        """Update the job's text after ``token``; set its finish reason when it stops."""
        m, p = self.model, job.params
        before = len(job.text)
        job.text = m.tokenizer.decode(job.tokens, skip_special_tokens=p.skip_special_tokens)
        if token in p.stop_token_ids:
            job.finish_reason, job.stop_reason = "stop", token
            job.text = m.tokenizer.decode(job.tokens[:-1], skip_special_tokens=p.skip_special_tokens)
            return True
        if token == m.eos and not p.ignore_eos:
            job.finish_reason = "stop"
            return True
        if p.stops:
            start = max(0, before - max(len(s) for s in p.stops) + 1)
            hits = [(job.text.find(s, start), s) for s in p.stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                job.text = job.text[: i + (len(s) if p.include_stop else 0)]
                job.finish_reason, job.stop_reason = "stop", s
                return True
        if len(job.tokens) >= p.max_tokens:
            job.finish_reason = "length"
            return True
        return False


class ServedModel:
    """A checkpoint loaded with serving numerics, its processor and chat template.

    Args:
        path: Checkpoint directory (BF16, FP8, NVFP4 or mixed export).
        model_id: Id served in ``/v1/models`` (default: the directory name).
        max_model_len: Prompt plus completion tokens per request (default: the config's
            ``max_position_embeddings``).
        chat_template: A Jinja chat template (text) replacing the checkpoint's (vLLM's
            ``--chat-template``); ``None``: the tokenizer's, if it has one.
    """

    def __init__(self, path: str | Path, model_id: str | None = None, *,
                 max_model_len: int | None = None, chat_template: str | None = None):  # fmt: skip
        import time

        from omniquant.data.processing import OmniProcessor
        from omniquant.evaluate.describe import describe_checkpoint
        from omniquant.evaluate.emulated import load_emulated
        from omniquant.evaluate.runner import _eos_id

        self.path = Path(path)
        self.info = describe_checkpoint(self.path, "model")
        self.loaded = load_emulated(self.path)
        self.processor = OmniProcessor.from_pretrained(self.path)
        self.tokenizer = self.loaded.tokenizer
        self.model_id = model_id or self.path.resolve().name
        self.created = int(time.time())
        self.eos = _eos_id(self.loaded)
        self.backbone = self.loaded.adapter.quant_root(self.loaded.model)
        self.embed = self.loaded.model.get_input_embeddings()
        text_config = self.loaded.model.config.get_text_config()
        positions = getattr(text_config, "max_position_embeddings", None)
        self.max_model_len = int(max_model_len or positions or 4096)
        if positions and self.max_model_len > positions:
            from omniquant.errors import ModelLoadError

            raise ModelLoadError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {positions} ({self.path / 'config.json'})",
                arg="max_model_len",
            )
        self.chat_template = chat_template or getattr(self.tokenizer, "chat_template", None)
        gen = self.loaded.model.generation_config
        #: vLLM's defaults for fields a request leaves out: the generation config's, else these.
        self.defaults = {
            "temperature": getattr(gen, "temperature", None) if gen.do_sample else None,
            "top_p": getattr(gen, "top_p", None) if gen.do_sample else None,
            "top_k": getattr(gen, "top_k", None) if gen.do_sample else None,
        }

    def render(self, conversation: list[dict], add_generation_prompt: bool,
               continue_final_message: bool, **kwargs) -> str:  # fmt: skip
        """The chat template applied to ``conversation`` (text, not tokenized)."""
        return self.tokenizer.apply_chat_template(
            conversation, chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **kwargs,
        )  # fmt: skip

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``."""
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def token_text(self, token: int) -> str:
        """Decoded text of one token."""
        return self.tokenizer.decode([token])
