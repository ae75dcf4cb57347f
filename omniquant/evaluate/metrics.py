"""Answer metrics: exact match, multiple choice and word error rate.

Policy:
- Normalisation (for exact match, multiple choice and WER alike): Unicode NFKC,
  lower case, punctuation removed, the articles a/an/the dropped, whitespace
  collapsed (the SQuAD convention), so "The Circle." matches "circle". Articles are
  kept when they are all there is ("A" as a letter answer stays "a"), so an empty
  prediction never matches such an answer. Task sets refuse answers and choices
  that normalise to nothing (punctuation only).
- A generated prediction is cut at the first line break before scoring: the answer
  is the first line, whatever the model adds after it.
- Multiple choice is scored by likelihood, not by parsing generated text: the model
  picks the choice whose tokens, teacher-forced after the prompt, have the highest
  mean log-probability per token (length-normalised; ties go to the earlier choice).
  This measures the model even where it would not follow an answer format.
- WER is the word-level Levenshtein distance between normalised prediction and
  reference over the reference's word count. Its per-sample score is
  ``max(0, 1 - WER)``, so every metric yields a score in [0, 1] where higher is
  better and task accuracy is the mean score.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

_PUNCT_RE = re.compile(r"[^\w\s]", flags=re.UNICODE)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Normalise an answer for comparison (see the module's policy)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCT_RE.sub(" ", text)
    stripped = _ARTICLES_RE.sub(" ", text)
    return " ".join((stripped if stripped.strip() else text).split())


def first_line(text: str) -> str:
    """The first non-empty line of a generated prediction, stripped."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised first line of ``prediction`` equals the normalised answer."""
    return float(normalize_answer(first_line(prediction)) == normalize_answer(answer))


def edit_distance(hyp: list[str], ref: list[str]) -> int:
    """Levenshtein distance between two word lists (substitution, insertion, deletion cost 1)."""
    prev = list(range(len(ref) + 1))
    for i, h in enumerate(hyp, start=1):
        cur = [i] + [0] * len(ref)
        for j, r in enumerate(ref, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (h != r))
        prev = cur
    return prev[-1]


def word_error_rate(prediction: str, reference: str) -> float:
    """Word error rate of ``prediction`` against ``reference`` after normalisation.

    An empty reference gives 0.0 for an empty prediction and 1.0 otherwise.
    """
    hyp = normalize_answer(first_line(prediction)).split()
    ref = normalize_answer(reference).split()
    if not ref:
        return 0.0 if not hyp else 1.0
    return edit_distance(hyp, ref) / len(ref)


def choose(choice_scores: list[float]) -> int:
    """Index of the best choice by mean log-probability (earliest on ties)."""
    best = 0
    for i, score in enumerate(choice_scores):
        if score > choice_scores[best]:
            best = i
    return best


def score_sample(metric: str, prediction: str, answer: str) -> tuple[float, float | None]:
    """Score one prediction.

    Args:
        metric: ``exact_match``, ``multiple_choice`` (``prediction`` is the chosen
            option's text) or ``wer``.
        prediction: Generated text or chosen option.
        answer: Reference answer.

    Returns:
        ``(score, wer)``: the score in [0, 1] and the WER (``None`` unless ``wer``).
    """
    if metric == "wer":
        wer = word_error_rate(prediction, answer)
        return max(0.0, 1.0 - wer), wer
    return exact_match(prediction, answer), None


def mean_present(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None (None when there are none): a metric a sample
    could not provide lowers no average."""
    vals = [v for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else None
