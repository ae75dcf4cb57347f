"""Typed results of evaluation: what a comparison of checkpoints measured, with no model in it.

Policy:
- These records are what evaluation hands to the report (``omniquant.report``), which
  renders them and never loads a model: nothing here holds a tensor, a model or a
  client, and this module imports neither torch nor any stage, so the report can
  read results (or a test can build them) without the evaluation stack.
- Per-sample results (``SampleResult``) are the unit; per-task, per-modality and
  overall numbers are computed from them by the report (``omniquant.report.stats``),
  so one set of samples always gives one set of numbers.
- Rows that already travel as plain JSON (an EVS sweep row, the sensitivity ranking)
  are ``TypedDict`` s: typed for readers and checkers, and written to ``report.json``
  as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict


@dataclass
class SampleResult:
    """What one model did on one task sample.

    Attributes:
        id: Sample id.
        task: Task name.
        modality: The modality the task tests.
        metric: Metric name.
        prediction: Generated text (scored on its first line) or the chosen option;
            ``None`` when only fidelity was measured.
        score: Metric score in [0, 1] (``None`` when only fidelity was measured).
        wer: Word error rate (``wer`` tasks only).
        kl: Mean ``KL(baseline || model)`` over the answer span (``None`` without a
            reference; 0 for the baseline itself).
        top1: Mean top-1 agreement with the baseline over the answer span.
        answer_tokens: Answer span length (reference tokens + EOS).
        video_tokens: Video tokens that reached the backbone (after EVS), video samples only.
        video_placeholders: Video placeholder tokens in the prompt (before EVS).
        evs_rate: EVS pruning rate in effect (``None`` for a served model: a server setting).
    """

    id: str
    task: str
    modality: str
    metric: str
    prediction: str | None
    score: float | None
    wer: float | None
    kl: float | None
    top1: float | None
    answer_tokens: int
    video_tokens: int | None
    video_placeholders: int | None
    evs_rate: float | None

    def to_json(self) -> dict:
        """Plain-JSON form."""
        return asdict(self)


class EvsRow(TypedDict):
    """One EVS rate of a sweep (``omniquant.evaluate.evs.evs_sweep``), over the video samples."""

    rate: float
    n: int
    video_tokens: int
    video_placeholders: int
    kept_fraction: float | None
    accuracy: float | None
    kl_mean: float | None
    top1_agreement: float | None


class SensitivityGroup(TypedDict):
    """One module group quantized alone (``omniquant.experiments.sensitivity``)."""

    group: str
    kl_mean: float | None
    top1_agreement: float | None
    kl_by_modality: dict[str, float]
    size_bytes: int
    bits_per_weight: float
    warnings: list[str]
    rank: int


class Sensitivity(TypedDict):
    """Module groups ranked by the KL each adds alone, and the recipe that follows."""

    format: str
    calibration: dict
    kv_cache: str
    groups: list[SensitivityGroup]
    skipped: list[dict]
    suggestion: dict


@dataclass
class ModelResult:
    """One model of a comparison (the baseline or a candidate), evaluated.

    Attributes:
        description: What its files (or its server) say, as written to the report:
            ``name``, ``path``, ``recipe``, ``precision``, ``kv_cache``,
            ``bits_per_weight``, ``size_bytes``, ``params``, ``group_precision``,
            ``calibration``, ``emulation`` and, for a served model, ``endpoint``
            (``omniquant.evaluate.describe``, ``omniquant.endpoint.evaluate``).
        samples: Per-sample results in task-set order (the baseline's carry KL 0 and
            full agreement: the reference against itself).
        seconds: Wall time of the evaluation.
        load_seconds: Wall time of loading the model (0 for a served model).
        evs: The EVS sweep, ``None`` where none could be run (a served model, or a
            candidate of a served baseline).
    """

    description: dict
    samples: list[SampleResult]
    seconds: float
    load_seconds: float = 0.0
    evs: list[EvsRow] | None = None

    @property
    def name(self) -> str:
        """The model's name in the report."""
        return self.description["name"]

    @property
    def samples_per_s(self) -> float:
        """Throughput (as ``omniquant.evaluate.runner.ModelEvaluation.samples_per_s``)."""
        return len(self.samples) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Comparison:
    """A baseline and candidates evaluated on one task set: everything a report shows.

    Attributes:
        created_unix: When the comparison started (seconds since the epoch).
        task_set: The task-set directory.
        samples: Samples in the task set.
        video_samples: Samples that carry a video (the EVS sweep's samples).
        baseline: The reference model.
        candidates: The compared models, in the order given.
        recovery_threshold: Verdicts name tasks whose recovery is below this.
        bootstrap: Paired bootstrap resamples for the accuracy-delta intervals.
        seed: Bootstrap seed.
        max_new_tokens: Greedy decoding budget per sample.
        evs_rates: Swept EVS rates, ascending.
        evs_reference: Whether the sweep had a reference (the baseline at the lowest
            rate); ``False`` with a served baseline.
        span_topk: Size of the stored baseline distributions (``None``: full
            vocabulary, exact KL).
        sensitivity_format: Format of the sensitivity probes, ``None`` without them.
        sensitivity: The ranking, ``None`` without sensitivity probes.
        endpoint_topk: Log-probabilities per position asked of served models, ``None``
            when no model was served.
        concurrency: Samples in flight per served model.
        peak_rss_mb: Peak resident memory of the process, where known.
        versions: Versions of omniquant and of the libraries that computed the numbers.
        throughput: The load phase's settings (workload, price, GPU memory), ``None``
            without one; each model's figures are in its description's ``throughput``.
    """

    created_unix: int
    task_set: Path
    samples: int
    video_samples: int
    baseline: ModelResult
    candidates: list[ModelResult]
    recovery_threshold: float
    bootstrap: int
    seed: int
    max_new_tokens: int
    evs_rates: tuple[float, ...]
    evs_reference: bool
    span_topk: int | None = None
    sensitivity_format: str | None = None
    sensitivity: Sensitivity | None = None
    endpoint_topk: int | None = None
    concurrency: int = 4
    peak_rss_mb: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    throughput: dict | None = None
