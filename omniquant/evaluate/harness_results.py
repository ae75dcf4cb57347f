"""Typed results of an evaluation harness run (lm-eval, lmms-eval): what it scored, per sample.

Policy: plain records, no model, no client, no harness import (as ``results.py``), so the
report (``omniquant.report.harness``) reads them without the harness installed. The
harness entries that fill them live in ``omniquant.endpoint.harness``.

Corpus-level metrics (WER): a harness that aggregates per-document records into one
corpus number (lmms-eval's ASR tasks log ``{"gt", "pred"}`` per document and compute
``sum(edits) / sum(reference words)``) is paired through per-document counts
``(word errors, reference words)`` (``corpus_counts``); the report recomputes the
corpus ratio on bootstrap resamples of documents. The counting is done here (the
report's own word-level ``metrics.edit_distance``) rather than by calling the harness,
which may live in another Python environment: it lower-cases, drops punctuation and
Whisper-style special tokens (``<|en|>``) and splits on whitespace. lmms-eval additionally applies
Whisper's English normaliser (spelled-out numbers, British spellings), so the paired
corpus WER can differ slightly from the harness's own number; the harness's number is
kept beside it (``HarnessTask.reported``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from omniquant.evaluate.metrics import edit_distance


def _words(text: str) -> list[str]:
    text = re.sub(r"<\|.*?\|>", " ", str(text)).lower()
    text = "".join(" " if unicodedata.category(c)[0] in "PS" and c != "'" else c for c in text)
    return text.split()


def corpus_counts(record: dict) -> tuple[float, float] | None:
    """``(word errors, reference words)`` of one document's ``{"gt", "pred"}`` record, or
    ``None`` for a record of another shape."""
    if not isinstance(record, dict) or "gt" not in record or "pred" not in record:
        return None
    ref, hyp = _words(record["gt"]), _words(record["pred"])
    return float(edit_distance(hyp, ref)), float(len(ref))


@dataclass
class HarnessSample:
    """One document of one task, as the harness scored it.

    Attributes:
        doc_id: The harness's document index (the pairing key).
        value: The task's metric on this document.
        prediction: The filtered response (text, or the chosen option's index).
        cached: Whether every request of this document came from the harness's cache
            (``None`` where the harness does not say).
        counts: For a corpus-level metric, ``(errors, reference words)`` of this
            document (``value`` is then their ratio); ``None`` for a per-sample metric.
    """

    doc_id: int
    value: float
    prediction: str | None
    cached: bool | None = None
    counts: tuple[float, float] | None = None


@dataclass
class HarnessTask:
    """One task of one harness run.

    Attributes:
        name: Task name.
        metric: The metric read per sample.
        higher_is_better: ``False`` for error rates (WER).
        version: The task's version.
        num_fewshot: Few-shot examples.
        config: The task configuration the harness recorded (compared across models).
        samples: Per-document results, by ``doc_id``.
        log: The per-sample log file read.
        corpus: The metric is a corpus ratio (``sum(errors) / sum(words)`` over the
            samples' ``counts``), not a mean of per-sample values.
        reported: The harness's own aggregate for the task, where it wrote one.
    """

    name: str
    metric: str
    higher_is_better: bool
    version: str
    num_fewshot: int | None
    config: dict
    samples: list[HarnessSample]
    log: str
    corpus: bool = False
    reported: float | None = None


@dataclass
class HarnessRun:
    """One harness run against one model."""

    harness: str
    model: str
    tasks: dict[str, HarnessTask]
    output_dir: str
    log: str
    command: list[str] = field(default_factory=list)
