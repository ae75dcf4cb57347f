"""Compare exported checkpoints or served models on a task set: the composition behind a report.

``compare`` loads each model, evaluates it, sweeps EVS and (with ``sensitivity``)
probes module groups, and returns the typed results
(``omniquant.evaluate.results.Comparison``); ``build_report`` runs it and has
``omniquant.report`` write ``report.json``, ``report.md`` and ``report.html`` from
those results (the report itself never loads a model).

Policy:
- Measure the artifact: baseline and candidates alike are loaded from their files
  with ``omniquant.evaluate.emulated.load_emulated`` (serving numerics, on any machine).
- Pre-flight before any model work: arguments, output directory, the whole task set
  (every media file decoded), every checkpoint directory (config, weights, size on
  disk) and, for ``sensitivity``, that the baseline is BF16.
- One model in memory at a time: the baseline runs first and keeps only its
  answer-span distributions (``omniquant.evaluate.fidelity``), then it is freed and
  each candidate is loaded, evaluated and freed in turn.
- Every checkpoint passes ``omniquant.checkpoint.verify.verify_checkpoint`` (finished, shard
  checksums, finite scales), and every candidate must come from the baseline's model
  (``source.fingerprint`` in its ``omniquant.json``): both before any evaluation.
- Samples are processed once with the baseline's processor; each candidate must
  carry the same tokenizer and processing settings (they are exports of one model),
  else the comparison would not be sample for sample and the report refuses (checked
  before the baseline is evaluated).
- Served models: a baseline or candidate may be the base URL of an OpenAI-compatible
  server (``NAME=http://127.0.0.1:8000/v1``), mixed freely with directories. It is
  evaluated through the API (``omniquant.endpoint.evaluate``) from the task lines
  themselves, concurrently, with retries and a resume cache (default
  ``<out>/endpoint-cache``). What the server cannot provide (likelihood choices or
  fidelity without ``prompt_logprobs``, video token counts, EVS sweeps, which are a
  server setting) is recorded as not available. Sensitivity needs the BF16 baseline's
  files and refuses a served baseline. In-process models are evaluated and rendered
  exactly as before.
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omniquant.checkpoint.layout import OmniquantRecord, SourceRecord
from omniquant.errors import ReportError, arg_ref
from omniquant.evaluate.results import Comparison, ModelResult
from omniquant.experiments.sensitivity import HIGHER


def _check_args(
    sensitivity_format: str,
    evs_rates,
    recovery_threshold: float,
    bootstrap: int,
    max_new_tokens: int,
) -> tuple[float, ...]:
    if sensitivity_format not in HIGHER:  # a quantized format, probed group by group
        raise ReportError(
            f"choose {' or '.join(HIGHER)}.",
            arg="sensitivity_format",
            value=repr(sensitivity_format),
        )
    rates = tuple(sorted({float(r) for r in evs_rates}))
    bad = [r for r in rates if not 0.0 <= r < 1.0]
    if bad:
        raise ReportError(
            f"evs_rates {list(evs_rates)}: every EVS rate must be in [0, 1); got {bad}."
        )
    if not 0.0 < recovery_threshold <= 1.0:
        raise ReportError(
            "must be in (0, 1] (e.g. 0.95).", arg="recovery_threshold", value=recovery_threshold
        )
    if bootstrap < 0:
        raise ReportError(
            "must be >= 0 (0 disables the intervals).", arg="bootstrap", value=bootstrap
        )
    if max_new_tokens < 1:
        raise ReportError("must be >= 1.", arg="max_new_tokens", value=max_new_tokens)
    return rates


def _unique_names(infos: list[dict]) -> None:
    seen: dict[str, int] = {}
    for info in infos:
        base = info["name"]
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            info["name"] = f"{base} ({seen[base]})"


def _source_of(path: Path, meta: OmniquantRecord | None) -> tuple[str | None, str]:
    """``(fingerprint, source path)`` of the model a checkpoint was quantized from (itself
    for a source checkpoint without ``omniquant.json``)."""
    from omniquant.checkpoint.verify import source_fingerprint

    if meta is None:
        return source_fingerprint(path), str(path.resolve())
    source = meta.source or SourceRecord()
    return source.fingerprint, str(source.path)


def _check_same_source(
    baseline: Path, base_meta: OmniquantRecord | None, candidate: Path, meta: OmniquantRecord | None
) -> None:
    """Refuse a candidate quantized from another model than the baseline (before any
    evaluation: the verdict would otherwise call a 0% top-1 agreement a recovery)."""
    base_fp, base_src = _source_of(baseline, base_meta)
    cand_fp, cand_src = _source_of(candidate, meta)
    if base_fp and cand_fp:
        same = base_fp == cand_fp
    else:  # an export without a recorded fingerprint: only its source path can tell
        same = base_src == cand_src
    if not same:
        raise ReportError(
            f"quantized from another model ({cand_src}) than the "
            f"baseline {baseline} (weights differ); a report compares exports of one model. "
            f"Pass the checkpoint it was quantized from as {arg_ref('baseline')}.",
            arg="candidates",
            value=candidate,
        )


def _check_same_processing(processor, candidate: Path) -> None:
    from omniquant.data.processing import OmniProcessor

    other = OmniProcessor.from_pretrained(candidate)
    if (
        other.settings != processor.settings
        or other.tokenizer.get_vocab() != processor.tokenizer.get_vocab()
    ):
        raise ReportError(
            f"its tokenizer or processing settings differ from the "
            "baseline's; a report compares exports of one model. Pass the checkpoint it was "
            f"quantized from as {arg_ref('baseline')}.",
            arg="candidates",
            value=candidate,
        )


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MB (``VmHWM`` on Linux).

    Not ``ru_maxrss`` where ``/proc`` exists: it survives ``exec``, so a process started
    by a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _versions() -> dict:
    import torch
    import transformers

    import omniquant

    return {
        "omniquant": omniquant.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _span_topk(spans: dict) -> int | None:
    """Size of the stored baseline distributions; ``None`` for the full vocabulary."""
    first = next(iter(spans.values()), None)
    if first is None or first.indices is None:
        return None
    return int(first.indices.shape[-1])


class _Endpoints:
    """The served models of one comparison: a client per model, made when it is described
    (before any evaluation, so a server that does not answer fails the pre-flight) and
    used when it is evaluated."""

    def __init__(self, *, timeout, retries, cache, topk, concurrency, request_extra):
        if concurrency < 1 or topk < 1 or retries < 0 or timeout <= 0:
            raise ReportError(
                f"{arg_ref('concurrency')} and {arg_ref('endpoint_topk')} must be >= 1, {arg_ref('endpoint_retries')} >= 0 and "
                f"{arg_ref('endpoint_timeout')} > 0."
            )
        self.timeout, self.retries, self.cache = timeout, retries, cache
        self.topk, self.concurrency, self.request_extra = topk, concurrency, request_extra
        self.clients: dict[int, object] = {}

    @property
    def used(self) -> bool:
        return bool(self.clients)

    def describe(self, src, role: str) -> dict:
        """A model's description: its checkpoint's files, or what its server reports."""
        if not src.is_endpoint:
            from omniquant.evaluate.describe import describe_checkpoint

            info = describe_checkpoint(src.path, role)
            if src.name:
                info["name"] = src.name
            return info
        from omniquant.endpoint.client import EndpointClient
        from omniquant.endpoint.evaluate import describe_endpoint

        client = EndpointClient(
            src,
            timeout=self.timeout,
            retries=self.retries,
            cache_dir=Path(self.cache) if self.cache else None,
            concurrency=self.concurrency,
            request_extra=self.request_extra,
        )
        self.clients[id(src)] = client
        return describe_endpoint(client, role)

    def evaluate(self, src, info: dict, role: str, run: _Run, reference, keep: bool):
        """``(ModelResult, evaluation)`` of a served model, through its API."""
        from omniquant.endpoint.evaluate import evaluate_endpoint

        client = self.clients[id(src)]
        run.say(f"{role} {info['name']}: {len(run.entries)} samples from {client.base_url} "
                f"(model {client.model_id}, concurrency {self.concurrency})")  # fmt: skip
        ev, missing = evaluate_endpoint(
            client,
            run.entries,
            reference=reference,
            keep_spans=keep,
            max_new_tokens=run.max_new_tokens,
            topk=self.topk,
            concurrency=self.concurrency,
        )
        info["endpoint"].update(
            not_available={k: v for k, v in missing.items() if v},
            requests_sent=client.requests_sent,
            cache_hits=client.cache_hits,
            cache=str(client.cache_dir) if client.cache_dir else None,
            topk=self.topk,
        )
        client.close()
        run.say(f"{role} {info['name']}: {ev.samples_per_s:.2f} samples/s "
                f"({client.requests_sent} requests, {client.cache_hits} from the cache)")  # fmt: skip
        # EVS is a server setting; the API cannot sweep it.
        return ModelResult(info, ev.samples, ev.seconds, 0.0, None), ev


def _describe_models(
    endpoints: _Endpoints, baseline, base_src, cand_srcs, baseline_name, sensitivity
):
    """``(baseline info, candidate infos, their omniquant.json records)``, with the
    baseline checked fit for ``sensitivity`` (local files, BF16) before any model work."""
    if sensitivity and base_src.is_endpoint:
        raise ReportError(
            f"{arg_ref('sensitivity')} quantizes module groups of the baseline's "
            "files; pass the BF16 checkpoint directory, not a served model.",
            arg="baseline",
            value=base_src,
        )
    base_info = endpoints.describe(base_src, "baseline")
    if baseline_name:
        base_info["name"] = baseline_name
    cand_infos = [endpoints.describe(c, "candidate") for c in cand_srcs]
    _unique_names([base_info, *cand_infos])
    if sensitivity and base_info["precision"] != "BF16":
        raise ReportError(
            f"{arg_ref('sensitivity')} quantizes groups from the baseline, which must be "
            f"a BF16 checkpoint (it is {base_info['precision']}).",
            arg="baseline",
            value=baseline,
        )
    # Same model and tokenizer as the baseline: checked now, not after its evaluation.
    metas = [info.pop("_meta", None) for info in (base_info, *cand_infos)]
    return base_info, cand_infos, metas


def _prepare_items(base_src, cand_srcs, metas, entries):
    """The task samples processed once, with the first local model's processor, after
    every local candidate is checked to be an export of the baseline's model with the
    same tokenizer and processing (``None`` when every model is served)."""
    from omniquant.data.processing import OmniProcessor
    from omniquant.evaluate.tasks import prepare_task_items

    local = [s for s in (base_src, *cand_srcs) if not s.is_endpoint]
    if not local:
        return None
    processor = OmniProcessor.from_pretrained(local[0].path)
    for src, meta in zip(cand_srcs, metas[1:]):
        if src.is_endpoint:
            continue
        if not base_src.is_endpoint:
            _check_same_source(Path(base_src.path), metas[0], Path(src.path), meta)
        _check_same_processing(processor, Path(src.path))
    return prepare_task_items(processor, entries)


@dataclass
class _Baseline:
    """What the candidates are measured against."""

    result: ModelResult
    #: The baseline's answer-span distributions, by sample id (fidelity's reference).
    spans: dict
    #: The EVS sweep's reference (``None``: a served baseline, no sweep).
    evs_reference: object | None
    #: Whether a candidate's main evaluation doubles as its lowest-rate sweep row.
    reuse_main: bool
    #: Quantizable module groups the baseline has (what sensitivity probes).
    groups_present: list[str]


@dataclass
class _Run:
    """One comparison's evaluation settings, shared by the baseline and every candidate.
    One model is in memory at a time: each is loaded, evaluated and freed in turn."""

    entries: list
    items: list | None
    rates: tuple[float, ...]
    max_new_tokens: int
    topk: int | None
    endpoints: _Endpoints
    say: Callable[[str], None]

    def _load(self, src, info: dict, role: str):
        """``(model with serving numerics, seconds to load it)`` of a local checkpoint."""
        from omniquant.evaluate.emulated import load_emulated

        self.say(f"{role} {info['name']}: loading {src.path}")
        t0 = time.perf_counter()
        loaded = load_emulated(src.path)
        return loaded, time.perf_counter() - t0

    def baseline(self, src, info: dict) -> _Baseline:
        if src.is_endpoint:
            result, ev = self.endpoints.evaluate(src, info, "baseline", self, None, True)
            base = _Baseline(result, ev.spans, None, False, [])
            if set(ev.spans) != {e.id for e in self.entries}:
                reason = info["endpoint"]["not_available"].get("fidelity", "no spans")
                self.say(f"baseline {info['name']}: fidelity not available ({reason})")
        else:
            base = self._local_baseline(src, info)
        for s in base.result.samples:  # the baseline against itself, by definition
            s.kl, s.top1 = 0.0, 1.0
        return base

    def _local_baseline(self, src, info: dict) -> _Baseline:
        from omniquant.evaluate.evs import evs_sweep
        from omniquant.evaluate.runner import evaluate_model
        from omniquant.quantize.plan import QUANTIZABLE_GROUPS

        loaded, load_s = self._load(src, info, "baseline")
        groups_present = sorted(
            g
            for g, mods in loaded.adapter.module_groups(loaded.model).items()
            if mods and g in QUANTIZABLE_GROUPS
        )
        ev = evaluate_model(
            loaded, self.items, keep_spans=True, max_new_tokens=self.max_new_tokens, topk=self.topk
        )
        info["emulation"] = loaded.emulation
        self.say(
            f"baseline {info['name']}: {len(self.items)} samples at {ev.samples_per_s:.2f} samples/s"
        )
        base_evs, evs_reference = evs_sweep(
            loaded,
            self.items,
            self.rates,
            max_new_tokens=self.max_new_tokens,
            topk=self.topk,
            main=ev,
        )
        result = ModelResult(info, ev.samples, ev.seconds, load_s, base_evs)
        # A candidate's main evaluation doubles as its lowest-rate sweep row only when its
        # KL was taken against that same reference: the baseline's main run at that rate.
        base_rates = {s.evs_rate for s in ev.samples}
        reuse_main = bool(self.rates) and base_rates == {min(self.rates)}
        del loaded
        gc.collect()
        return _Baseline(result, ev.spans, evs_reference, reuse_main, groups_present)

    def candidate(self, src, info: dict, base: _Baseline) -> ModelResult:
        complete = set(base.spans) == {e.id for e in self.entries}
        if src.is_endpoint:
            result, _ = self.endpoints.evaluate(src, info, "candidate", self, base.spans or None, False)
            return result
        from omniquant.evaluate.evs import evs_sweep
        from omniquant.evaluate.runner import evaluate_model

        loaded, load_s = self._load(src, info, "candidate")
        ev = evaluate_model(
            loaded,
            self.items,
            reference=base.spans if complete else None,
            max_new_tokens=self.max_new_tokens,
            topk=self.topk,
        )
        info["emulation"] = loaded.emulation
        self.say(f"candidate {info['name']}: {ev.samples_per_s:.2f} samples/s")
        evs = None  # a served baseline: no reference to sweep against
        if base.evs_reference is not None:
            evs, _ = evs_sweep(
                loaded,
                self.items,
                self.rates,
                reference=base.evs_reference,
                max_new_tokens=self.max_new_tokens,
                topk=self.topk,
                main=ev if base.reuse_main else None,
            )
        del loaded
        gc.collect()
        return ModelResult(info, ev.samples, ev.seconds, load_s, evs)


def compare(
    baseline: str | Path,
    candidates: list[str | Path],
    tasks: str | Path,
    *,
    sensitivity: bool = False,
    sensitivity_format: str = "nvfp4",
    evs_rates: tuple[float, ...] | list[float] = (0.0, 0.25, 0.5, 0.75),
    recovery_threshold: float = 0.95,
    bootstrap: int = 1000,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    max_new_tokens: int = 16,
    topk: int | None = None,
    sensitivity_calib: str = "synthetic",
    baseline_name: str | None = None,
    concurrency: int = 4,
    endpoint_timeout: float = 300.0,
    endpoint_retries: int = 5,
    endpoint_cache: Path | None = None,
    endpoint_topk: int = 20,
    request_extra: dict | None = None,
    scratch: Path | None = None,
) -> Comparison:
    """Evaluate ``baseline`` and ``candidates`` on a task set (see ``build_report``).

    Args:
        baseline: The BF16 checkpoint directory or a served model.
        candidates: Checkpoint directories or served models.
        tasks: Shipped task-set name or a directory with ``tasks.jsonl``.
        sensitivity: Also rank module groups by the KL each adds alone.
        sensitivity_format: ``nvfp4`` or ``fp8``.
        evs_rates: EVS pruning rates for the video sweep (empty: no sweep).
        recovery_threshold: Recorded for the verdicts (the report applies it).
        bootstrap: Recorded for the intervals (the report computes them).
        seed: Bootstrap seed (recorded).
        log: Receives progress lines.
        max_new_tokens: Greedy decoding budget per sample.
        topk: Stored baseline distribution size.
        sensitivity_calib: Calibration set of the sensitivity probes.
        baseline_name: How the results name the baseline.
        concurrency: Samples in flight per served model.
        endpoint_timeout: Seconds per request to a served model.
        endpoint_retries: Retries of a transient failure.
        endpoint_cache: Resume cache directory for served models (``None``: none).
        endpoint_topk: Log-probabilities per position asked of served models.
        request_extra: Fields merged into every request to a served model.
        scratch: Directory for the sensitivity probes' temporary checkpoints
            (``None``: the system's temporary directory).

    Returns:
        The typed results, no model or tensor in them.

    Raises:
        ReportError: Bad arguments, checkpoints or (with ``sensitivity``) a baseline
            that is not BF16.
        DataError: A bad task set (every bad line listed).
    """
    from omniquant.endpoint.protocol import parse_model_source
    from omniquant.evaluate.tasks import resolve_task_set, validate_task_set

    say = log or (lambda _m: None)
    started = time.time()
    # ---------------------------------------------------------------- pre-flight
    rates = _check_args(
        sensitivity_format, evs_rates, recovery_threshold, bootstrap, max_new_tokens
    )
    if not candidates:
        raise ReportError(
            f"no {arg_ref('candidates')} given; pass one or more quantized checkpoint directories."
        )
    task_dir = resolve_task_set(tasks)
    entries = validate_task_set(task_dir)
    endpoints = _Endpoints(
        timeout=endpoint_timeout,
        retries=endpoint_retries,
        cache=endpoint_cache,
        topk=endpoint_topk,
        concurrency=concurrency,
        request_extra=request_extra,
    )
    base_src = parse_model_source(baseline)
    cand_srcs = [parse_model_source(c) for c in candidates]
    base_info, cand_infos, metas = _describe_models(
        endpoints, baseline, base_src, cand_srcs, baseline_name, sensitivity
    )
    items = _prepare_items(base_src, cand_srcs, metas, entries)
    run = _Run(entries, items, rates, max_new_tokens, topk, endpoints, say)

    # ---------------------------------------------------------------- models
    base = run.baseline(base_src, base_info)
    cand_results = [run.candidate(src, info, base) for src, info in zip(cand_srcs, cand_infos)]

    # ---------------------------------------------------------------- sensitivity
    sens = None
    if sensitivity:
        from omniquant.experiments.sensitivity import group_sensitivity

        with tempfile.TemporaryDirectory(prefix=".omniquant-sensitivity-", dir=scratch) as tmp:
            sens = group_sensitivity(
                Path(base_src.path),
                items,
                base.spans,
                base.groups_present,
                sensitivity_format,
                Path(tmp),
                calib=sensitivity_calib,
                topk=topk,
                log=say,
            )

    return Comparison(
        created_unix=int(started),
        task_set=task_dir,
        samples=len(entries),
        video_samples=sum(1 for e in entries if e.video is not None),
        baseline=base.result,
        candidates=cand_results,
        recovery_threshold=recovery_threshold,
        bootstrap=bootstrap,
        seed=seed,
        max_new_tokens=max_new_tokens,
        evs_rates=rates,
        evs_reference=base.evs_reference is not None,
        span_topk=_span_topk(base.spans),
        sensitivity_format=sensitivity_format if sensitivity else None,
        sensitivity=sens,
        endpoint_topk=endpoint_topk if endpoints.used else None,
        concurrency=concurrency,
        peak_rss_mb=_peak_rss_mb(),
        versions=_versions(),
    )


def build_report(
    baseline: Path,
    candidates: list[Path],
    tasks: str | Path,
    out: Path,
    *,
    sensitivity: bool = False,
    sensitivity_format: str = "nvfp4",
    evs_rates: tuple[float, ...] | list[float] = (0.0, 0.25, 0.5, 0.75),
    recovery_threshold: float = 0.95,
    bootstrap: int = 1000,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    force: bool = False,
    max_new_tokens: int = 16,
    topk: int | None = None,
    sensitivity_calib: str = "synthetic",
    baseline_name: str | None = None,
    concurrency: int = 4,
    endpoint_timeout: float = 300.0,
    endpoint_retries: int = 5,
    endpoint_cache: Path | None | bool = True,
    endpoint_topk: int = 20,
    request_extra: dict | None = None,
    throughput: bool = False,
    workload: Path | None = None,
    load_concurrency: tuple[int, ...] | list[int] = (1,),
    warmup: int = 1,
    load_requests: int | None = None,
    load_duration: float | None = None,
    load_max_tokens: int = 16,
    gpu_hour_price: float | None = None,
    gpus: int = 1,
    gpu_memory: str = "80GiB",
    machine: str | None = None,
    harness: str | None = None,
    harness_tasks: list[str] | None = None,
    harness_args: str | None = None,
    harness_include: Path | None = None,
    harness_python: str | None = None,
    load_generator: str = "builtin",
    aiperf: str | None = None,
) -> dict:
    """Evaluate ``baseline`` and ``candidates`` on a task set and write the report.

    Args:
        baseline: The BF16 checkpoint directory (the reference for fidelity), or a
            served model: ``URL``, ``NAME=URL`` or ``URL#MODEL_ID`` (see
            ``omniquant.endpoint.protocol.parse_model_source``).
        candidates: Quantized checkpoint directories (FP8, NVFP4, mixed; BF16 works
            too) or served models, mixed as needed.
        tasks: Shipped task-set name or a directory with ``tasks.jsonl``.
        out: Directory for ``report.json``, ``report.md`` and ``report.html``.
        sensitivity: Also rank module groups by the KL each adds alone in
            ``sensitivity_format`` and suggest a recipe.
        sensitivity_format: ``nvfp4`` or ``fp8``.
        evs_rates: EVS pruning rates for the video sweep (empty: no sweep).
        recovery_threshold: Verdicts name tasks whose recovery is below this.
        bootstrap: Paired bootstrap resamples for the accuracy-delta intervals.
        seed: Bootstrap seed.
        log: Receives progress lines.
        force: Overwrite report files already in ``out``.
        max_new_tokens: Greedy decoding budget per sample.
        topk: Stored baseline distribution size (``None``: full vocabulary for
            vocabularies up to 32768 tokens, else the top 256).
        sensitivity_calib: Calibration set of the sensitivity probes.
        baseline_name: How the report names the baseline (default: its directory name,
            or its recipe when it is an omniquant export).
        concurrency: Samples in flight per served model.
        endpoint_timeout: Seconds per request to a served model.
        endpoint_retries: Retries of a transient failure (connection, 429, 5xx).
        endpoint_cache: Resume cache directory; ``True``: ``<out>/endpoint-cache``;
            ``False``/``None``: none.
        endpoint_topk: Log-probabilities per position asked of served models.
        request_extra: Fields merged into every request to a served model.
        throughput: After the quality phase, serve each model (a local checkpoint through
            ``omniquant serve`` on a free port) and measure it under one workload
            (``omniquant.experiments.throughput``).
        workload: A JSON Lines file of clips with stated lengths (``None``: the task
            set's video and audio samples).
        load_concurrency: Concurrency levels of the load phase.
        warmup: Uncounted requests before the first level.
        load_requests: Requests per level (``None`` with no ``load_duration``: one per
            workload sample).
        load_duration: Seconds per level instead of a request count.
        load_max_tokens: ``max_tokens`` of the load requests.
        gpu_hour_price: Price of one GPU-hour; adds cost per hour of media.
        gpus: GPUs each served model occupies (the price is per GPU).
        gpu_memory: GPU memory for the capacity arithmetic (``80GiB``).
        machine: The servers' machine in words, for served URLs.
        harness: Also run this evaluation harness (``lm-eval``, ``lmms-eval``) on every
            model's endpoint (``omniquant.experiments.harness``); its per-task numbers go
            into the report's ``harness`` block.
        harness_tasks: The harness's task names.
        harness_args: Extra harness command-line arguments (shell-quoted).
        harness_include: Extra harness task folder (default: the shipped
            ``tasks/<harness>-demo`` when it exists).
        harness_python: The harness's own interpreter (a separate environment, e.g.
            lmms-eval's); default: the entry's environment variable, else this one.
        load_generator: ``builtin`` (the report's httpx client) or ``aiperf`` (replays
            the same bodies; its per-request records are read back).
        aiperf: The aiperf program (default: ``aiperf`` on PATH).

    Returns:
        The report as written to ``report.json``.

    Raises:
        ReportError: Bad arguments, output directory, checkpoints or (with
            ``sensitivity``) a baseline that is not BF16.
        DataError: A bad task set (every bad line listed).
    """
    from omniquant.outdir import check_out, out_path
    from omniquant.report.build import REPORT_FILES, report_dict, write_report

    # Arguments, then the output directory, before anything else (compare checks the
    # arguments again: it is callable on its own).
    _check_args(sensitivity_format, evs_rates, recovery_threshold, bootstrap, max_new_tokens)
    out = out_path(out, ReportError)
    check_out(out, force=force, error=ReportError, files=REPORT_FILES)
    if endpoint_cache is True:
        endpoint_cache = out / "endpoint-cache"
    load = None
    if throughput:
        load = _load_setup(tasks, workload, load_concurrency, warmup, load_requests,
                           load_duration, load_max_tokens, gpu_hour_price, gpus, gpu_memory)  # fmt: skip
        load["aiperf"] = _load_generator(load_generator, aiperf, load_duration)
    elif workload is not None or gpu_hour_price is not None:
        raise ReportError(
            f"{arg_ref('workload')} and {arg_ref('gpu_hour_price')} belong to the load phase; "
            f"add {arg_ref('throughput')}."
        )
    include = None
    if harness is not None:
        from omniquant.experiments.harness import check_harness

        include = check_harness(harness, list(harness_tasks or []), harness_include, harness_python)
    elif harness_tasks or harness_args or harness_python:
        raise ReportError(f"{arg_ref('harness_tasks')} needs {arg_ref('harness')}.")
    results = compare(
        baseline,
        candidates,
        tasks,
        sensitivity=sensitivity,
        sensitivity_format=sensitivity_format,
        evs_rates=evs_rates,
        recovery_threshold=recovery_threshold,
        bootstrap=bootstrap,
        seed=seed,
        log=log,
        max_new_tokens=max_new_tokens,
        topk=topk,
        sensitivity_calib=sensitivity_calib,
        baseline_name=baseline_name,
        concurrency=concurrency,
        endpoint_timeout=endpoint_timeout,
        endpoint_retries=endpoint_retries,
        endpoint_cache=endpoint_cache or None,
        endpoint_topk=endpoint_topk,
        request_extra=request_extra,
        scratch=out.parent if out.parent.is_dir() else None,
    )
    if load is not None:
        _throughput_phase(results, [baseline, *candidates], load, out, machine=machine,
                          timeout=endpoint_timeout, request_extra=request_extra, log=log)  # fmt: skip
    report = report_dict(results)
    if harness is not None:
        _harness_phase(report, results, [baseline, *candidates], harness, list(harness_tasks),
                       out, include=include, harness_args=harness_args, seed=seed, log=log,
                       python=harness_python)  # fmt: skip
    write_report(report, out)
    (log or (lambda _m: None))(f"wrote {out / 'report.html'}")
    return report


def _harness_phase(report: dict, results: Comparison, sources: list, harness: str,
                   tasks: list[str], out: Path, *, include, harness_args, seed, log,
                   python=None) -> None:  # fmt: skip
    """Run the harness on every model and add its block and verdicts to ``report``."""
    from omniquant.endpoint.protocol import parse_model_source
    from omniquant.experiments.harness import run_harness
    from omniquant.report.harness import harness_block

    names = [results.baseline.name, *[c.name for c in results.candidates]]
    runs = run_harness(harness, tasks, [parse_model_source(s) for s in sources], names,
                       out / "harness", include=include, harness_args=harness_args, log=log,
                       python=python)  # fmt: skip
    block = harness_block(runs, names, threshold=results.recovery_threshold,
                          resamples=results.bootstrap, seed=seed)  # fmt: skip
    report["harness"] = block
    report["verdicts"] += [m["verdict"] for m in block["models"][1:]]


def _load_setup(tasks, workload, concurrency, warmup, count, duration, max_tokens, price, gpus,
                gpu_memory) -> dict:  # fmt: skip
    """Pre-flight of the load phase (before any model work): settings and the workload."""
    from omniquant.devices import parse_size
    from omniquant.endpoint.load import (
        check_load_settings,
        read_workload_file,
        workload_from_entries,
    )
    from omniquant.evaluate.tasks import resolve_task_set, validate_task_set

    per_sample = count is None and duration is None  # one request per workload sample
    levels = check_load_settings(concurrency, warmup, 1 if per_sample else count, duration,
                                 max_tokens)  # fmt: skip
    if price is not None and price <= 0:
        raise ReportError("must be > 0 (per GPU-hour).", arg="gpu_hour_price", value=price)
    if gpus < 1:
        raise ReportError("must be >= 1.", arg="gpus", value=gpus)
    settings = {"concurrency": levels, "warmup": warmup, "count": count,
                "duration_s": duration, "max_tokens": max_tokens}  # fmt: skip
    if workload is not None:
        wl = read_workload_file(workload, **settings)
    else:
        task_dir = resolve_task_set(tasks)
        wl = workload_from_entries(validate_task_set(task_dir), task_dir.name, **settings)
    if per_sample:
        from dataclasses import replace

        wl = replace(wl, count=len(wl.requests))
    return {"workload": wl, "price": price, "gpus": gpus,
            "gpu_bytes": parse_size(gpu_memory, arg_ref("gpu_memory"))}  # fmt: skip


def _load_generator(name: str, program: str | None, duration: float | None) -> str | None:
    """The aiperf program when ``name`` is ``aiperf`` (checked before any model work)."""
    if name == "builtin":
        return None
    if name != "aiperf":
        raise ReportError("choose builtin or aiperf.", arg="load_generator", value=name)
    if duration is not None:
        raise ReportError(
            f"the aiperf load generator needs {arg_ref('load_requests')}: with "
            f"{arg_ref('load_duration')}, which bodies were sent would be unknown."
        )
    from omniquant.endpoint.aiperf import find_aiperf

    return find_aiperf(program)


def _throughput_phase(results: Comparison, sources: list, load: dict, out: Path, *, machine,
                      timeout, request_extra, log) -> None:  # fmt: skip
    """Measure every model of ``results`` and record the figures in the results."""
    from omniquant.endpoint.protocol import parse_model_source
    from omniquant.experiments.throughput import measure_throughput

    wl = load["workload"]
    models = [results.baseline, *results.candidates]
    blocks = measure_throughput(
        [parse_model_source(s) for s in sources], [m.description for m in models], wl,
        out / "throughput", machine=machine, gpu_hour_price=load["price"], gpus=load["gpus"],
        gpu_memory_bytes=load["gpu_bytes"], timeout=timeout, request_extra=request_extra,
        aiperf=load["aiperf"], log=log,
    )  # fmt: skip
    for m in models:
        m.description["throughput"] = blocks[m.description["name"]]
    results.throughput = {
        "workload": wl.describe(),
        "gpu_hour_price": load["price"],
        "gpus_per_model": load["gpus"],
        "gpu_memory_bytes": load["gpu_bytes"],
        "chart_concurrency": max(wl.concurrency),
        "order": "one model at a time, report order, same workload and levels",
        "load_generator": "aiperf (raw-payload replay)" if load["aiperf"] else "built-in httpx client",
        "measured": "requests/s, tokens/s, TTFT and latency p50/p99, hours of media per hour",
        "arithmetic": "capacity: concurrent sequences that fit in the stated GPU memory",
    }
