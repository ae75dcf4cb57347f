"""CLI commands beyond make-tiny, one function each, registered on ``omniquant.cli.app``.

Each command parses, calls one stage function and prints. Keep stage imports inside
the function bodies (``import omniquant.cli`` must stay cheap).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from omniquant.cli import _console, _echo, app


@app.command("quantize")
def quantize_cmd(
    model: Annotated[Path, typer.Option(help="Source BF16 checkpoint directory (hub layout).")],
    recipe: Annotated[str, typer.Option(help="Built-in recipe name or path to a recipe YAML.")],
    out: Annotated[Path, typer.Option(help="Output checkpoint directory.")],
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
) -> None:
    """Calibrate on multimodal samples, quantize the backbone with modelopt, export and audit."""
    from omniquant.quantize import quantize

    console = _console()
    res = quantize(
        model, recipe, out, calib=calib, overrides=set_ or [], force=force,
        skip_bad=skip_bad, quiet=quiet, log=console.print,
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
) -> None:
    """Show module groups with precision, parameters, bytes and bits per weight."""
    from omniquant.errors import AuditError, ModelLoadError
    from omniquant.inspect_ckpt import inspect_checkpoint, render_inspect, summary_json
    from omniquant.verify import is_temp_dir, verify_checkpoint

    report = None
    if audit and path.is_dir() and not is_temp_dir(path.resolve()):
        from omniquant.audit import audit_checkpoint

        # The full audit lists every problem (exit 3); the shared check below then passes.
        report = audit_checkpoint(path, raise_on_error=True)
    # An unsound checkpoint under --audit is an audit failure (exit 3).
    unsound = AuditError if audit and path.is_dir() else ModelLoadError
    verify_checkpoint(path, flag="inspect", error=unsound)
    summary = inspect_checkpoint(path)
    if report is not None:
        summary["audit"] = {"ok": report.ok, "checked_weights": report.checked_weights}
    if json_:
        _echo(summary_json(summary))
        return
    console = _console()
    console.print(render_inspect(summary), markup=False)
    if audit:
        console.print(f"audit passed ({summary['audit']['checked_weights']} quantized weights checked)")


recipes_app = typer.Typer(help="List and show built-in recipes.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
def recipes_list(ctx: typer.Context) -> None:
    """List built-in recipes with their descriptions."""
    if ctx.invoked_subcommand is not None:
        return
    from omniquant.recipe import builtin_recipes, load_recipe

    for name, path in builtin_recipes().items():
        rec, _ = load_recipe(path)
        _echo(f"{name:<20} {rec.metadata.description}")


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="Built-in recipe name or path.")]) -> None:
    """Print a recipe file as written (comments included)."""
    from omniquant.recipe import load_recipe

    _, path = load_recipe(name)  # validates
    _echo(path.read_text(), nl=False)


# --- build-engine (issue 7) -------------------------------------------------
# Same names as omniquant.engine.targets.TARGETS, spelt out so the CLI stays cheap to import.
_ENGINE_TARGETS = ("hopper", "blackwell")

from enum import Enum

import typer

_EngineTarget = Enum("_EngineTarget", [(name, name) for name in _ENGINE_TARGETS], type=str)


@app.command("build-engine")
def build_engine_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint directory (omniquant export).")],
    target: Annotated[_EngineTarget, typer.Option(help="GPU generation: hopper (SM90) or blackwell (SM100).")],
    out: Annotated[Path, typer.Option(help="Bundle directory to create.")],
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


# --- report (issue 5) -------------------------------------------------------


@app.command("report")
def report_cmd(
    baseline: Annotated[Path, typer.Option(help="BF16 checkpoint directory: the reference.")],
    candidate: Annotated[
        list[Path], typer.Option(help="Quantized checkpoint directory to compare (repeatable).")
    ],
    tasks: Annotated[
        str, typer.Option(help="Task set: a shipped name (omni-smoke) or a directory with tasks.jsonl.")
    ],
    out: Annotated[Path, typer.Option(help="Directory for report.json, report.md and report.html.")],
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
) -> None:
    """Evaluate exported checkpoints on omni tasks and write the quality-cliff report."""
    from omniquant.report import build_report

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
    )
    say(
        f"{'model':<22}{'precision':<18}{'bits/w':>8}{'size MB':>10}{'accuracy':>10}"
        f"{'min recov':>10}{'KL mean':>11}{'top-1':>8}"
    )
    for m in [report["baseline"], *report["candidates"]]:
        overall = m["overall"]
        recov = min((t["recovery"] for t in m["tasks"].values()), default=1.0)
        say(
            f"{m['name'][:21]:<22}{m['precision'][:17]:<18}{m['bits_per_weight']:>8.3f}"
            f"{m['size_bytes'] / 1e6:>10.3f}{overall['accuracy']:>10.3f}{100 * recov:>9.1f}%"
            f"{overall['kl_mean']:>11.3g}{100 * overall['top1_agreement']:>7.1f}%"
        )
    for line in report["verdicts"]:
        say(line)
    if report.get("sensitivity"):
        say(report["sensitivity"]["suggestion"]["text"])
    say(f"report: {out / 'report.html'} (also report.json, report.md)")


@app.command("cliff")
def cliff_cmd(
    model: Annotated[
        Path | None, typer.Option(help="BF16 checkpoint (default: the bundled demo model).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("omniquant-cliff"),
    recipe: Annotated[
        list[str] | None, typer.Option(help="Recipe (repeatable; default: fp8_omni, nvfp4_omni, nvfp4_aggressive).")
    ] = None,
    calib: Annotated[str | None, typer.Option(help="Calibration set name or directory.")] = None,
    tasks: Annotated[str | None, typer.Option(help="Task set name or directory.")] = None,
    sensitivity: Annotated[bool, typer.Option(help="Also rank module groups by the KL each adds.")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite an existing output directory.")] = False,
) -> None:
    """The main job: quantize with each recipe, evaluate against BF16, report the quality cliff."""
    from omniquant.cliff import DEFAULT_RECIPES, render_cliff_table, run_cliff

    console = _console()
    res = run_cliff(
        model, out, recipes=recipe or DEFAULT_RECIPES, calib=calib, tasks=tasks,
        sensitivity=sensitivity, force=force, log=console.print,
    )
    _echo(render_cliff_table(res.report))
    for c in res.report["candidates"]:
        _echo(c['verdict'])
    console.print(f"report: {res.out / 'report' / 'report.html'}  ({res.seconds:.0f} s)")
