"""The quality-cliff report: evaluate exported checkpoints and write JSON, Markdown and HTML.

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
- The three files are written to temporary names and renamed into place, so a
  failed run never leaves a report that mixes two runs.
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
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from omniquant.checkpoint.layout import OmniquantRecord, SourceRecord
from omniquant.errors import OmniquantError, ReportError

REPORT_FILES = ("report.json", "report.md", "report.html")
FORMAT_VERSION = 1


def _check_args(
    sensitivity_format: str,
    evs_rates,
    recovery_threshold: float,
    bootstrap: int,
    max_new_tokens: int,
) -> tuple[float, ...]:
    if sensitivity_format not in ("nvfp4", "fp8"):
        raise ReportError(f"--sensitivity-format {sensitivity_format!r}: choose nvfp4 or fp8.")
    rates = tuple(sorted({float(r) for r in evs_rates}))
    bad = [r for r in rates if not 0.0 <= r < 1.0]
    if bad:
        raise ReportError(
            f"evs_rates {list(evs_rates)}: every EVS rate must be in [0, 1); got {bad}."
        )
    if not 0.0 < recovery_threshold <= 1.0:
        raise ReportError(
            f"--recovery-threshold {recovery_threshold}: must be in (0, 1] (e.g. 0.95)."
        )
    if bootstrap < 0:
        raise ReportError(f"--bootstrap {bootstrap}: must be >= 0 (0 disables the intervals).")
    if max_new_tokens < 1:
        raise ReportError(f"--max-new-tokens {max_new_tokens}: must be >= 1.")
    return rates


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: exists and is not a directory.")
    existing = [f for f in REPORT_FILES if (out / f).exists()]
    if existing and not force:
        raise ReportError(
            f"--out {out}: already holds {', '.join(existing)}; pass --force to overwrite, "
            "or choose another directory."
        )
    if not out.exists() and not out.parent.is_dir():
        raise ReportError(f"--out {out}: parent directory {out.parent} does not exist.")


def describe_checkpoint(path: Path, role: str) -> dict:
    """What the files of a checkpoint say: name, precision, size, recipe, calibration.

    Raises:
        ReportError: Not a readable checkpoint directory (names the flag and the fix).
    """
    from omniquant.checkpoint.inspect import inspect_checkpoint

    path = Path(path)
    if not path.is_dir():
        raise ReportError(
            f"--{role} {path}: no such directory; pass a checkpoint directory (the BF16 source "
            "or an `omniquant quantize` output)."
        )
    from omniquant.checkpoint.verify import verify_checkpoint

    verified = verify_checkpoint(path, flag=f"--{role}", error=ReportError)
    try:
        summary = inspect_checkpoint(path)
    except OmniquantError as err:
        reason = str(err).removeprefix(f"--model {path}: ").removeprefix(f"{path}: ")
        raise ReportError(f"--{role} {path}: {reason}") from err
    record = verified.record
    recipe = record.recipe.name if record is not None and record.recipe is not None else None
    return {
        "_meta": record,
        "name": recipe or path.resolve().name,  # "." has no name of its own
        "path": str(path.resolve()),
        "recipe": recipe,
        "precision": summary["precision"],
        "kv_cache": summary["kv_cache"],
        "bits_per_weight": summary["total"]["bits_per_weight"],
        "size_bytes": summary["total"]["bytes"],
        "params": summary["total"]["params"],
        "group_precision": {g: v["precision"] for g, v in summary["groups"].items()},
        "calibration": record.calibration if record is not None else None,
    }


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
            f"--candidate {candidate}: quantized from another model ({cand_src}) than the "
            f"baseline {baseline} (weights differ); a report compares exports of one model. "
            "Pass the checkpoint it was quantized from as --baseline."
        )


def _check_same_processing(processor, candidate: Path) -> None:
    from omniquant.data.processing import OmniProcessor

    other = OmniProcessor.from_pretrained(candidate)
    if (
        other.settings != processor.settings
        or other.tokenizer.get_vocab() != processor.tokenizer.get_vocab()
    ):
        raise ReportError(
            f"--candidate {candidate}: its tokenizer or processing settings differ from the "
            "baseline's; a report compares exports of one model. Pass the checkpoint it was "
            "quantized from as --baseline."
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


def describe_endpoint(client, role: str) -> dict:
    """What a served model says about itself, in ``describe_checkpoint``'s fields.

    ``omniquant serve`` reports its checkpoint in ``/v1/models`` (field ``omniquant``);
    another server whose ``root`` is a checkpoint directory on this machine (vLLM or
    trtllm-serve started by a bundle's ``eval.sh``) is described from those files;
    otherwise precision, size and bits per weight are not available (``None``).

    Raises:
        EndpointError: The server is unreachable or does not serve the model.
    """
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


def _evaluation_block(ev, loaded_s: float) -> dict:
    return {
        "samples": len(ev.samples),
        "seconds": round(ev.seconds, 3),
        "samples_per_s": round(ev.samples_per_s, 3),
        "load_seconds": round(loaded_s, 3),
    }


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

    Returns:
        The report as written to ``report.json``.

    Raises:
        ReportError: Bad arguments, output directory, checkpoints or (with
            ``sensitivity``) a baseline that is not BF16.
        DataError: A bad task set (every bad line listed).
    """
    from omniquant.data.processing import OmniProcessor
    from omniquant.endpoint.protocol import parse_model_source
    from omniquant.evaluate.emulated import load_emulated
    from omniquant.evaluate.evs import evs_sweep
    from omniquant.evaluate.runner import evaluate_model
    from omniquant.evaluate.tasks import prepare_task_items, resolve_task_set, validate_task_set
    from omniquant.quantize.plan import QUANTIZABLE_GROUPS
    from omniquant.report.render import write_html, write_markdown
    from omniquant.report.stats import summarize, verdict

    say = log or (lambda _m: None)
    started = time.time()
    # ---------------------------------------------------------------- pre-flight
    rates = _check_args(
        sensitivity_format, evs_rates, recovery_threshold, bootstrap, max_new_tokens
    )
    out = Path(out)
    _check_out(out, force)
    if not candidates:
        raise ReportError(
            "no --candidate given; pass one or more quantized checkpoint directories."
        )
    task_dir = resolve_task_set(tasks)
    entries = validate_task_set(task_dir)
    if concurrency < 1 or endpoint_topk < 1 or endpoint_retries < 0 or endpoint_timeout <= 0:
        raise ReportError(
            "--concurrency and --endpoint-topk must be >= 1, --endpoint-retries >= 0 and "
            "--endpoint-timeout > 0."
        )
    base_src = parse_model_source(baseline)
    cand_srcs = [parse_model_source(c) for c in candidates]
    if sensitivity and base_src.is_endpoint:
        raise ReportError(
            f"--baseline {base_src}: --sensitivity quantizes module groups of the baseline's "
            "files; pass the BF16 checkpoint directory, not a served model."
        )
    if endpoint_cache is True:
        endpoint_cache = out / "endpoint-cache"
    clients: dict[int, object] = {}

    def describe(src, role: str) -> dict:
        if not src.is_endpoint:
            info = describe_checkpoint(src.path, role)
            if src.name:
                info["name"] = src.name
            return info
        from omniquant.endpoint.client import EndpointClient

        client = EndpointClient(
            src,
            timeout=endpoint_timeout,
            retries=endpoint_retries,
            cache_dir=Path(endpoint_cache) if endpoint_cache else None,
            concurrency=concurrency,
            request_extra=request_extra,
        )
        clients[id(src)] = client
        return describe_endpoint(client, role)

    base_info = describe(base_src, "baseline")
    if baseline_name:
        base_info["name"] = baseline_name
    cand_infos = [describe(c, "candidate") for c in cand_srcs]
    _unique_names([base_info, *cand_infos])
    if sensitivity and base_info["precision"] != "BF16":
        raise ReportError(
            f"--baseline {baseline}: --sensitivity quantizes groups from the baseline, which must be "
            f"a BF16 checkpoint (it is {base_info['precision']})."
        )

    def served(src, info: dict, role: str, reference, keep: bool):
        from omniquant.endpoint.evaluate import evaluate_endpoint

        client = clients[id(src)]
        say(f"{role} {info['name']}: {len(entries)} samples from {client.base_url} "
            f"(model {client.model_id}, concurrency {concurrency})")  # fmt: skip
        ev, missing = evaluate_endpoint(
            client,
            entries,
            reference=reference,
            keep_spans=keep,
            max_new_tokens=max_new_tokens,
            topk=endpoint_topk,
            concurrency=concurrency,
        )
        info["evaluation"] = _evaluation_block(ev, 0.0)
        info["endpoint"].update(
            not_available={k: v for k, v in missing.items() if v},
            requests_sent=client.requests_sent,
            cache_hits=client.cache_hits,
            cache=str(client.cache_dir) if client.cache_dir else None,
            topk=endpoint_topk,
        )
        info["evs"] = None  # EVS is a server setting; the API cannot sweep it
        client.close()
        say(f"{role} {info['name']}: {ev.samples_per_s:.2f} samples/s "
            f"({client.requests_sent} requests, {client.cache_hits} from the cache)")  # fmt: skip
        return ev

    # Same model and tokenizer as the baseline: checked now, not after its evaluation.
    metas = [info.pop("_meta", None) for info in (base_info, *cand_infos)]
    processor = items = None
    local = [s for s in (base_src, *cand_srcs) if not s.is_endpoint]
    if local:
        # Samples are processed once, with the baseline's processor when it is local.
        processor = OmniProcessor.from_pretrained(local[0].path)
        for src, meta in zip(cand_srcs, metas[1:]):
            if src.is_endpoint:
                continue
            if not base_src.is_endpoint:
                _check_same_source(Path(base_src.path), metas[0], Path(src.path), meta)
            _check_same_processing(processor, Path(src.path))
        items = prepare_task_items(processor, entries)

    # ---------------------------------------------------------------- baseline
    groups_present: list[str] = []
    if base_src.is_endpoint:
        base_eval = served(base_src, base_info, "baseline", None, True)
        evs_reference = None
        reuse_main = False
        if set(base_eval.spans) != {e.id for e in entries}:
            reason = base_info["endpoint"]["not_available"].get("fidelity", "no spans")
            say(f"baseline {base_info['name']}: fidelity not available ({reason})")
    else:
        say(f"baseline {base_info['name']}: loading {base_src.path}")
        t0 = time.perf_counter()
        loaded = load_emulated(base_src.path)
        load_s = time.perf_counter() - t0
        groups_present = sorted(
            g
            for g, mods in loaded.adapter.module_groups(loaded.model).items()
            if mods and g in QUANTIZABLE_GROUPS
        )
        base_eval = evaluate_model(
            loaded, items, keep_spans=True, max_new_tokens=max_new_tokens, topk=topk
        )
        base_info["emulation"] = loaded.emulation
        base_info["evaluation"] = _evaluation_block(base_eval, load_s)
        say(
            f"baseline {base_info['name']}: {len(items)} samples at {base_eval.samples_per_s:.2f} samples/s"
        )
        base_evs, evs_reference = evs_sweep(
            loaded, items, rates, max_new_tokens=max_new_tokens, topk=topk, main=base_eval
        )
        base_info["evs"] = base_evs
        # A candidate's main evaluation doubles as its lowest-rate sweep row only when its
        # KL was taken against that same reference: the baseline's main run at that rate.
        base_rates = {s.evs_rate for s in base_eval.samples}
        reuse_main = bool(rates) and base_rates == {min(rates)}
        del loaded
        gc.collect()
    for s in base_eval.samples:  # the baseline against itself, by definition
        s.kl, s.top1 = 0.0, 1.0
    spans = base_eval.spans
    complete_spans = set(spans) == {e.id for e in entries}

    # ---------------------------------------------------------------- candidates
    cand_evals = []
    for src, info in zip(cand_srcs, cand_infos):
        if src.is_endpoint:
            cand_evals.append(served(src, info, "candidate", spans or None, False))
            continue
        path = src.path
        say(f"candidate {info['name']}: loading {path}")
        t0 = time.perf_counter()
        loaded = load_emulated(path)
        load_s = time.perf_counter() - t0
        ev = evaluate_model(
            loaded,
            items,
            reference=spans if complete_spans else None,
            max_new_tokens=max_new_tokens,
            topk=topk,
        )
        info["emulation"] = loaded.emulation
        info["evaluation"] = _evaluation_block(ev, load_s)
        say(f"candidate {info['name']}: {ev.samples_per_s:.2f} samples/s")
        if evs_reference is None:  # a served baseline: no reference to sweep against
            info["evs"] = None
        else:
            info["evs"], _ = evs_sweep(
                loaded,
                items,
                rates,
                reference=evs_reference,
                max_new_tokens=max_new_tokens,
                topk=topk,
                main=ev if reuse_main else None,
            )
        del loaded
        gc.collect()
        cand_evals.append(ev)

    # ---------------------------------------------------------------- sensitivity
    sens = None
    if sensitivity:
        from omniquant.experiments.sensitivity import group_sensitivity

        scratch = out.parent if out.parent.is_dir() else None
        with tempfile.TemporaryDirectory(prefix=".omniquant-sensitivity-", dir=scratch) as tmp:
            sens = group_sensitivity(
                Path(base_src.path),
                items,
                spans,
                groups_present,
                sensitivity_format,
                Path(tmp),
                calib=sensitivity_calib,
                topk=topk,
                log=say,
            )

    # ---------------------------------------------------------------- aggregate
    base_summary = summarize(base_eval.samples, None, resamples=bootstrap, seed=seed)
    base_info.update(base_summary)
    base_info["samples"] = [s.to_json() for s in base_eval.samples]
    base_info["verdict"] = "baseline (reference for recovery and fidelity)"
    verdicts = []
    for info, ev in zip(cand_infos, cand_evals):
        summary = summarize(ev.samples, base_eval.samples, resamples=bootstrap, seed=seed)
        info.update(summary)
        info["samples"] = [s.to_json() for s in ev.samples]
        info["verdict"], info["tasks_below_threshold"] = verdict(
            info["name"], summary, recovery_threshold
        )
        verdicts.append(info["verdict"])

    task_meta = {
        task: {"metric": t["metric"], "modalities": t["modalities"], "n": t["n"]}
        for task, t in base_summary["tasks"].items()
    }
    report = {
        "format_version": FORMAT_VERSION,
        "created_unix": int(started),
        "task_set": {
            "path": str(task_dir),
            "name": task_dir.name,
            "samples": len(entries),
            "tasks": task_meta,
            "modalities": {m: v["n"] for m, v in base_summary["modalities"].items()},
        },
        "settings": {
            "recovery_threshold": recovery_threshold,
            "bootstrap": bootstrap,
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy with the model cache (K/V, Mamba states), stop at EOS",
            "multiple_choice": "highest mean log-probability per choice token",
            "fidelity": {
                "span": "reference answer tokens + EOS, teacher-forced",
                "kl": "KL(baseline || candidate), nats, mean over span then over samples",
                "distribution": _distribution_note(spans),
            },
            "evs_rates": list(rates),
            "sensitivity": sensitivity,
            "sensitivity_format": sensitivity_format if sensitivity else None,
            **({"endpoints": _endpoint_note(endpoint_topk, concurrency)} if clients else {}),
        },
        "baseline": base_info,
        "candidates": cand_infos,
        "verdicts": verdicts,
        "evs": {
            "rates": list(rates),
            "video_samples": sum(1 for e in entries if e.video is not None),
            "reference": (
                f"baseline at EVS rate {rates[0]}" if rates and evs_reference is not None else None
            ),
        },
        "sensitivity": sens,
        "peak_rss_mb": _peak_rss_mb(),
        "versions": _versions(),
    }
    _check_finite(report)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    _write_atomic(out / "report.md", write_markdown(report))
    _write_atomic(out / "report.html", write_html(report))
    say(f"wrote {out / 'report.html'}")
    return report


def _endpoint_note(topk: int, concurrency: int) -> dict:
    return {
        "requests": "chat completions, temperature 0; media as image_url / video_url / "
        "audio_url data URIs",
        "fidelity": f"prompt_logprobs and top_logprobs, top-{topk}: KL over the tokens both "
        "sides know plus the rest (lower bound)",
        "multiple_choice": "prompt_logprobs of each choice as a continued assistant message",
        "concurrency": concurrency,
        "not_available": "video token counts and EVS sweeps (server settings)",
    }


def _distribution_note(spans: dict) -> str:
    first = next(iter(spans.values()), None)
    if first is None or first.indices is None:
        return "full vocabulary (exact KL)"
    return f"baseline top-{first.indices.shape[-1]} + tail mass (KL lower bound)"


def _versions() -> dict:
    import torch
    import transformers

    import omniquant

    return {
        "omniquant": omniquant.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _check_finite(obj, where: str = "report") -> None:
    """JSON has no NaN/inf; a non-finite number here is a bug, caught before writing."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} is {obj}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
