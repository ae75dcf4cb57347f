"""CLI commands beyond make-tiny, one function each, registered on ``omniquant.cli._app``.

Each command parses, calls one stage function and prints. Keep stage imports inside
the function bodies (``import omniquant.cli`` must stay cheap).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from omniquant.cli._app import _console, _echo, _stdout, app


@app.command("quantize")
def quantize_cmd(
    model: Annotated[Path, typer.Option(help="Source BF16 checkpoint directory (hub layout).")],
    recipe: Annotated[str, typer.Option(help="Built-in recipe name or path to a recipe YAML.")],
    out: Annotated[str, typer.Option(help="Output checkpoint directory.")],
    calib: Annotated[
        str | None,
        typer.Option(help="Calibration set: 'synthetic', a shipped set name, or a directory."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Recipe override key.path=value (repeatable)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing output directory.")] = False,
    skip_bad: Annotated[
        bool, typer.Option(help="Skip unreadable calibration samples (warn with a count).")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    device: Annotated[
        str,
        typer.Option(
            help="Where the model lives: cpu, cuda, cuda:N, or auto (accelerate's placement "
            "over the visible GPUs, then CPU, then disk; the CPU where there is no GPU)."
        ),
    ] = "auto",
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Budget per device for --device auto, e.g. 0=120GiB,1=120GiB,cpu=200GiB; "
            "the rest is offloaded to disk."
        ),
    ] = None,
    config_naming: Annotated[
        str,
        typer.Option(
            help="config.json naming: released (what vLLM and TensorRT-LLM construct the model "
            "from, derived from the source's values), native (transformers' nemotron_h_omni) "
            "or source (the source's file as is)."
        ),
    ] = "released",
    remote_code: Annotated[
        Path | None,
        typer.Option(
            help="A released checkpoint directory (its config.json and *.py, e.g. hf download "
            "nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning-BF16 --include '*.py' config.json): "
            "its code and auto_map go into the export, so serving stacks can build the config."
        ),
    ] = None,
) -> None:
    """Calibrate on multimodal samples, quantize the backbone with modelopt, export and audit."""
    from omniquant.quantize.pipeline import quantize

    console = _console()
    res = quantize(
        model, recipe, out, calib=calib, overrides=set_ or [], force=force,
        skip_bad=skip_bad, quiet=quiet, log=console.print, device=device, max_memory=max_memory,
        config_naming=config_naming, remote_code=remote_code,
    )
    cal = res.manifest["calibration"]
    toks = ", ".join(f"{k} {v}" for k, v in cal["tokens_by_modality"].items())
    console.print(f"calibrated on {cal['samples']} samples ({toks} tokens)")
    console.print(f"audit passed; checkpoint at {res.out}")


@app.command("inspect")
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable JSON.")] = False,
    audit: Annotated[bool, typer.Option(help="Run the integrity audit; non-zero exit on failure.")] = False,
    as_: Annotated[
        str | None,
        typer.Option(
            "--as",
            help="Show what a serving stack (vllm or trtllm) would build per module group and "
            "whether its model class can be constructed from config.json; exit 4 if it would "
            "treat any module or tensor differently from what is stored, or could not "
            "construct the model.",
        ),
    ] = None,
) -> None:
    """Show module groups with precision, parameters, bytes and bits per weight."""
    from omniquant.checkpoint.inspect import inspect_checkpoint, render_inspect, summary_json
    from omniquant.checkpoint.verify import is_temp_dir, unrecorded_note, verify_checkpoint
    from omniquant.errors import AuditError, ModelLoadError

    report = None
    if audit and path.is_dir() and not is_temp_dir(path.resolve()):
        from omniquant.checkpoint.audit import audit_checkpoint

        # The full audit lists every problem (exit 3); the shared check below then passes.
        report = audit_checkpoint(path, raise_on_error=True)
    # An unsound checkpoint under --audit is an audit failure (exit 3).
    unsound = AuditError if audit and path.is_dir() else ModelLoadError
    verified = verify_checkpoint(path, flag="inspect", error=unsound, foreign_ok=not audit)
    summary = inspect_checkpoint(path)
    summary["checksums_verified"] = verified.record is not None
    if verified.record is None:
        summary["note"] = unrecorded_note(verified)
    if report is not None:
        summary["audit"] = {"ok": report.ok, "checked_weights": report.checked_weights}
    view = built = None
    if as_ is not None:
        from omniquant.checkpoint.construction import check_construction
        from omniquant.checkpoint.readers import read_as

        built = check_construction(path, as_)
        summary["construction"] = {
            "reader": built.reader, "ok": built.ok, "missing": built.missing,
            "findings": [f.__dict__ for f in built.findings],
        }  # fmt: skip
        if summary["precision"] != "BF16":  # an unquantized checkpoint has no quant view
            view = read_as(path, as_)
            summary["reader"] = {
                "reader": view.reader, "source": view.source, "ok": view.ok, "notes": view.notes,
                "differs": [m.__dict__ for m in view.mismatches],
                "declared_otherwise": [m.__dict__ for m in view.misdeclared],
                "not_loaded": [{"tensor": n, "why": w} for n, w in view.unconsumed],
            }  # fmt: skip
    if json_:
        _echo(summary_json(summary))
    else:
        console = _console()
        if "note" in summary:
            console.print(summary["note"], markup=False)
        console.print(render_inspect(summary), markup=False)
        if audit:
            console.print(f"audit passed ({summary['audit']['checked_weights']} quantized weights checked)")
        if view is not None:
            from omniquant.checkpoint.readers import render_view
            from omniquant.models import adapter_for

            console.print(render_view(view, adapter_for(path).hub_tensor_group), markup=False)
        if built is not None:
            from omniquant.checkpoint.construction import render_construction

            console.print(render_construction(built), markup=False)
    if (view is not None and not view.ok) or (built is not None and not built.ok):
        raise typer.Exit(code=4)


recipes_app = typer.Typer(help="List and show built-in recipes.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
def recipes_list(ctx: typer.Context) -> None:
    """List built-in recipes with their descriptions."""
    if ctx.invoked_subcommand is not None:
        return
    from omniquant.quantize.recipe import builtin_recipes, load_recipe

    for name, path in builtin_recipes().items():
        rec, _ = load_recipe(path)
        _echo(f"{name:<20} {rec.metadata.description}")


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="Built-in recipe name or path.")]) -> None:
    """Print a recipe file as written (comments included)."""
    from omniquant.errors import RecipeError
    from omniquant.quantize.recipe import load_recipe

    try:
        _, path = load_recipe(name)  # validates
    except RecipeError as err:
        # load_recipe names its `recipe` argument (quantize's --recipe); here it is this
        # command's positional NAME.
        raise (err.with_arg("recipe_name") if err.arg == "recipe" else err) from err
    _echo(path.read_text(), nl=False)


# --- build-engine -----------------------------------------------------------
# Same names as omniquant.engine.targets.TARGETS, spelt out so the CLI stays cheap to import.
_ENGINE_TARGETS = ("hopper", "blackwell")
_EngineTarget = Enum("_EngineTarget", [(name, name) for name in _ENGINE_TARGETS], type=str)


@app.command("build-engine")
def build_engine_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint directory (omniquant export).")],
    target: Annotated[_EngineTarget, typer.Option(help="GPU generation: hopper (SM90) or blackwell (SM100).")],
    out: Annotated[str, typer.Option(help="Bundle directory to create.")],
    max_batch_size: Annotated[int, typer.Option(help="Largest runtime batch (and CUDA graph).")] = 8,
    max_seq_len: Annotated[int, typer.Option(help="Longest request, prompt + output, in tokens.")] = 8192,
    video_pruning_rate: Annotated[
        float | None, typer.Option(help="Efficient Video Sampling rate in [0, 1); unset = off.")
    ] = None,
    link: Annotated[bool, typer.Option(help="Symlink the checkpoint instead of copying it.")] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing bundle directory.")] = False,
    validate: Annotated[
        bool, typer.Option(help="Load and smoke-test the engine when this host can (GPU + tensorrt_llm).")
    ] = True,
) -> None:
    """Build a TensorRT-LLM engine bundle (checkpoint, options YAML, launch scripts, bundle.json)."""
    from omniquant.engine import build_engine_bundle, engine_host_status, validate_engine

    result = build_engine_bundle(
        checkpoint,
        target.value,
        out,
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        video_pruning_rate=video_pruning_rate,
        link=link,
        force=force,
    )
    console = _console()

    def say(text: str) -> None:
        # soft_wrap: paths and commands stay on one line, copy-pastable; no rich markup.
        console.print(text, soft_wrap=True, markup=False, highlight=False)

    say(
        f"bundle for {result.target} (SM{result.sm}): precision {result.precision}, "
        f"KV cache {result.kv_cache_dtype}, MoE backend {result.moe_backend}, "
        f"checkpoint {result.checkpoint_mode}"
    )
    say(f"wrote {result.path}: {', '.join(result.files)}")
    for warning in result.warnings:
        say(f"warning: {warning}")
    ready, reason = engine_host_status()
    if validate and ready:
        report = validate_engine(result.path)
        for smoke in report.smoke:
            say(
                f"  {smoke.modality:<5} {smoke.output_tokens:>3} tokens in {smoke.latency_s:.2f}s: "
                f"{smoke.output_text.strip()[:60]!r}"
            )
        state = "validated" if report.engine_validated else "NOT validated (empty output)"
        say(
            f"engine {state} on {report.device} (load {report.load_s:.1f}s, "
            f"warm-up {report.warmup_s:.2f}s); results in {result.path / 'bundle.json'}"
        )
        if not report.engine_validated:
            raise typer.Exit(code=3)
    else:
        why = "skipped (--no-validate)" if not validate else f"not run here: {reason}"
        say(
            f"engine warm-up and smoke test {why}. They run on the GPU host with tensorrt_llm "
            f"installed: run this command there, or {result.commands['validate']}"
        )
    say(f"serve: {result.path / 'serve.sh'}")


# --- report -----------------------------------------------------------------


def _int_list(text: str, flag: str) -> list[int]:
    from omniquant.errors import ReportError

    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError as err:
        raise ReportError(f"{flag}: write integers separated by commas (e.g. 1,8,32); got {text!r}.") from err


@app.command("report")
def report_cmd(
    baseline: Annotated[
        str,
        typer.Option(
            help="The reference: a BF16 checkpoint directory, or a served model as NAME=URL "
            "(OpenAI-compatible base URL, e.g. bf16=http://127.0.0.1:8000/v1; URL#MODEL_ID picks a model)."
        ),
    ],
    candidate: Annotated[
        list[str],
        typer.Option(
            help="Model to compare (repeatable): a checkpoint directory or NAME=URL; mix freely."
        ),
    ],
    tasks: Annotated[
        str, typer.Option(help="Task set: a shipped name (omni-smoke) or a directory with tasks.jsonl.")
    ],
    out: Annotated[str, typer.Option(help="Directory for report.json, report.md and report.html.")],
    sensitivity: Annotated[
        bool,
        typer.Option(help="Quantize one module group at a time, rank groups by KL, suggest a recipe."),
    ] = False,
    sensitivity_format: Annotated[
        str, typer.Option(help="Format of the sensitivity probes: nvfp4 or fp8.")
    ] = "nvfp4",
    recovery_threshold: Annotated[
        float, typer.Option(help="Verdicts name tasks whose accuracy recovery is below this.")
    ] = 0.95,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy decoding budget per sample.")] = 16,
    force: Annotated[bool, typer.Option(help="Overwrite report files already in --out.")] = False,
    baseline_name: Annotated[
        str | None, typer.Option(help="Name of the baseline in the report (default: its directory).")
    ] = None,
    concurrency: Annotated[
        int, typer.Option(help="Served models: samples in flight at once.")
    ] = 4,
    endpoint_timeout: Annotated[
        float, typer.Option(help="Served models: seconds per request.")
    ] = 300.0,
    endpoint_retries: Annotated[
        int, typer.Option(help="Served models: retries of connection errors, 429 and 5xx (with backoff).")
    ] = 5,
    endpoint_cache: Annotated[
        Path | None,
        typer.Option(help="Served models: resume cache directory (default: OUT/endpoint-cache)."),
    ] = None,
    no_endpoint_cache: Annotated[
        bool, typer.Option("--no-endpoint-cache", help="Served models: ask everything again.")
    ] = False,
    endpoint_topk: Annotated[
        int, typer.Option(help="Served models: log-probabilities per position (top_logprobs, prompt_logprobs).")
    ] = 20,
    request_extra: Annotated[
        str | None,
        typer.Option(
            help='Served models: JSON merged into every request, e.g. \'{"chat_template_kwargs": {"enable_thinking": false}}\'.'
        ),
    ] = None,
    throughput: Annotated[
        bool,
        typer.Option(help="After the quality phase, serve each model (a checkpoint through omniquant serve) and measure throughput, latency, hours of media per hour and cost."),
    ] = False,
    workload: Annotated[
        Path | None,
        typer.Option(help="Load phase: JSON Lines of clips with stated lengths (video_seconds/audio_seconds); default: the task set's video and audio samples."),
    ] = None,
    load_concurrency: Annotated[
        str, typer.Option(help="Load phase: concurrency levels, comma-separated (e.g. 1,8,32).")
    ] = "1",
    warmup: Annotated[int, typer.Option(help="Load phase: uncounted warm-up requests.")] = 1,
    load_requests: Annotated[
        int | None, typer.Option(help="Load phase: requests per level (default: one per workload sample).")
    ] = None,
    load_duration: Annotated[
        float | None, typer.Option(help="Load phase: seconds per level instead of a request count.")
    ] = None,
    load_max_tokens: Annotated[int, typer.Option(help="Load phase: max_tokens per request.")] = 16,
    gpu_hour_price: Annotated[
        float | None, typer.Option(help="Price of one GPU-hour: adds cost per hour of media.")
    ] = None,
    gpus: Annotated[int, typer.Option(help="GPUs each served model occupies (the price is per GPU).")] = 1,
    gpu_memory: Annotated[
        str, typer.Option(help="GPU memory for the capacity arithmetic (concurrent sequences that fit).")
    ] = "80GiB",
    machine: Annotated[
        str | None, typer.Option(help="The served URLs' machine in words (e.g. '1x H100 80GB'), recorded with every figure.")
    ] = None,
    harness: Annotated[
        str | None, typer.Option(help="Also run an evaluation harness on every model's endpoint: lm-eval or lmms-eval.")
    ] = None,
    harness_tasks: Annotated[
        str | None, typer.Option(help="Harness task names, comma-separated (e.g. omni_demo_next_number).")
    ] = None,
    harness_args: Annotated[
        str | None, typer.Option(help="Extra harness command-line arguments, shell-quoted (e.g. '--limit 8').")
    ] = None,
    harness_include: Annotated[
        Path | None, typer.Option(help="Extra harness task folder (default: the shipped tasks/<harness>-demo).")
    ] = None,
    harness_python: Annotated[
        str | None, typer.Option(help="The harness's own Python interpreter (e.g. .venv-lmms/bin/python for lmms-eval; default: OMNIQUANT_LMMS_EVAL_PYTHON / OMNIQUANT_LM_EVAL_PYTHON, else this one).")
    ] = None,
    load_generator: Annotated[
        str, typer.Option(help="Load phase: builtin (the report's httpx client) or aiperf (replays the same bodies; per-request records read back).")
    ] = "builtin",
    aiperf: Annotated[
        str | None, typer.Option(help="Load phase: the aiperf program (default: aiperf on PATH).")
    ] = None,
) -> None:
    """Evaluate exported checkpoints or served models on omni tasks and write the quality-cliff report."""
    import json

    from omniquant.errors import ReportError

    extra = None
    if request_extra:
        try:
            extra = json.loads(request_extra)
        except json.JSONDecodeError as err:
            raise ReportError(f"--request-extra: not valid JSON ({err}).") from err
        if not isinstance(extra, dict):
            raise ReportError("--request-extra: must be a JSON object.")
    from omniquant.experiments.compare import build_report
    from omniquant.report.table import render_summary_table, render_throughput_lines

    console = _console()

    def say(text: str) -> None:
        console.print(text, soft_wrap=True, markup=False, highlight=False)

    report = build_report(
        baseline,
        list(candidate),
        tasks,
        out,
        sensitivity=sensitivity,
        sensitivity_format=sensitivity_format,
        recovery_threshold=recovery_threshold,
        max_new_tokens=max_new_tokens,
        force=force,
        log=say,
        baseline_name=baseline_name,
        concurrency=concurrency,
        endpoint_timeout=endpoint_timeout,
        endpoint_retries=endpoint_retries,
        endpoint_cache=False if no_endpoint_cache else (endpoint_cache or True),
        endpoint_topk=endpoint_topk,
        request_extra=extra,
        throughput=throughput,
        workload=workload,
        load_concurrency=_int_list(load_concurrency, "--load-concurrency"),
        warmup=warmup,
        load_requests=load_requests,
        load_duration=load_duration,
        load_max_tokens=load_max_tokens,
        gpu_hour_price=gpu_hour_price,
        gpus=gpus,
        gpu_memory=gpu_memory,
        machine=machine,
        harness=harness,
        harness_tasks=[t for t in (harness_tasks or "").split(",") if t],
        harness_args=harness_args,
        harness_include=harness_include,
        harness_python=harness_python,
        load_generator=load_generator,
        aiperf=aiperf,
    )

    for line in render_summary_table(report).splitlines():
        say(line)
    for line in render_throughput_lines(report):
        say(line)
    for line in report["verdicts"]:
        say(line)
    if report.get("sensitivity"):
        say(report["sensitivity"]["suggestion"]["text"])
    say(f"report: {Path(out) / 'report.html'} (also report.json, report.md)")


@app.command("cliff")
def cliff_cmd(
    model: Annotated[
        Path | None, typer.Option(help="BF16 checkpoint (default: the bundled demo model).")
    ] = None,
    out: Annotated[str, typer.Option(help="Output directory.")] = "omniquant-cliff",
    recipe: Annotated[
        list[str] | None,
        typer.Option(
            "--recipe", "--recipes",
            help="Recipe (repeatable or comma-separated; NAME:ALGORITHM for another calibration "
            "algorithm, e.g. nvfp4_omni,nvfp4_omni:gptq; default: fp8_omni, nvfp4_omni, nvfp4_aggressive).",
        ),
    ] = None,
    calib: Annotated[str | None, typer.Option(help="Calibration set name or directory.")] = None,
    tasks: Annotated[str | None, typer.Option(help="Task set name or directory.")] = None,
    sensitivity: Annotated[bool, typer.Option(help="Also rank module groups by the KL each adds.")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite an existing output directory.")] = False,
) -> None:
    """The main job: quantize with each recipe, evaluate against BF16, report the quality cliff."""
    from omniquant.experiments.cliff import DEFAULT_RECIPES, run_cliff
    from omniquant.report.table import render_cliff_table, render_front_line

    console = _console()
    res = run_cliff(
        model, out, recipes=[x for r in recipe or () for x in r.split(",") if x] or DEFAULT_RECIPES,
        calib=calib, tasks=tasks, sensitivity=sensitivity, force=force, log=console.print,
    )
    _echo(render_cliff_table(res.report))
    _echo(render_front_line(res.report))
    for c in res.report["candidates"]:
        _echo(c['verdict'])
    console.print(f"report: {res.out / 'report' / 'report.html'}  ({res.seconds:.0f} s)")


# --- serve ------------------------------------------------------------------


@app.command("serve")
def serve_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (BF16, FP8, NVFP4 export).")],
    host: Annotated[
        str, typer.Option(help="Address to bind; loopback by default (anything else exposes the model).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: a free port, printed at start).")] = 8000,
    served_model_name: Annotated[
        str | None, typer.Option(help="Model id in /v1/models (default: the directory name).")
    ] = None,
    max_request_mb: Annotated[
        float, typer.Option(help="Refuse request bodies larger than this (HTTP 413).")
    ] = 32.0,
    max_logprobs: Annotated[
        int, typer.Option(help="Largest top_logprobs / prompt_logprobs a request may ask for.")
    ] = 20,
    max_model_len: Annotated[
        int | None, typer.Option(help="Prompt + completion tokens per request (default: the config's positions).")
    ] = None,
    max_queued_requests: Annotated[
        int, typer.Option(help="Requests that may wait for the model; more get HTTP 429 with Retry-After.")
    ] = 64,
    max_num_seqs: Annotated[int, typer.Option(help="Requests the model steps in turn.")] = 16,
    prefill_chunk: Annotated[
        int, typer.Option(help="Prompt tokens per prefill step (long prompts interleave with short requests).")
    ] = 256,
    allowed_local_media_path: Annotated[
        Path | None, typer.Option(help="Accept file:// URLs and paths of media under this directory (symlinks resolved).")
    ] = None,
    chat_template: Annotated[
        Path | None, typer.Option(help="Jinja chat template file (default: the checkpoint's, if any).")
    ] = None,
) -> None:
    """Serve a checkpoint through an OpenAI-compatible API with the emulated serving numerics."""
    import sys

    from omniquant.checkpoint.verify import verify_checkpoint
    from omniquant.endpoint.server import serve
    from omniquant.errors import ModelLoadError

    verify_checkpoint(checkpoint, flag="serve", error=ModelLoadError)
    if max_request_mb <= 0 or max_logprobs < 0:
        raise ModelLoadError("--max-request-mb must be > 0 and --max-logprobs >= 0.")
    if min(max_queued_requests, max_num_seqs - 1, prefill_chunk - 1) < 0 or (max_model_len or 1) < 1:
        raise ModelLoadError("--max-queued-requests must be >= 0; --max-num-seqs, --prefill-chunk "
                             "and --max-model-len >= 1.")  # fmt: skip
    if allowed_local_media_path is not None and not allowed_local_media_path.is_dir():
        raise ModelLoadError(f"--allowed-local-media-path {allowed_local_media_path}: not a directory.")
    template = None
    if chat_template is not None:
        if not chat_template.is_file():
            raise ModelLoadError(f"--chat-template {chat_template}: no such file.")
        template = chat_template.read_text()
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {host}: the server is reachable beyond this machine", file=sys.stderr)

    def announce(text: str) -> None:
        # omniquant's own stdout: library prints go to the log (omniquant.cli.noise).
        _echo(text)
        _stdout().flush()

    serve(
        checkpoint,
        host=host,
        port=port,
        model_id=served_model_name,
        max_request_bytes=int(max_request_mb * 2**20),
        max_logprobs=max_logprobs,
        max_model_len=max_model_len,
        max_queued_requests=max_queued_requests,
        max_num_seqs=max_num_seqs,
        prefill_chunk=prefill_chunk,
        allowed_local_media_path=allowed_local_media_path,
        chat_template=template,
        announce=announce,
    )
