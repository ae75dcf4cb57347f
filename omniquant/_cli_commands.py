"""CLI commands beyond make-tiny, one function each, registered on ``omniquant.cli.app``.

Each command parses, calls one stage function and prints. Keep stage imports inside
the function bodies (``import omniquant.cli`` must stay cheap).
"""

from __future__ import annotations

from omniquant.cli import app, _console  # noqa: F401


# --- build-engine (issue 7) -------------------------------------------------
from enum import Enum  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402


class _EngineTarget(str, Enum):
    hopper = "hopper"
    blackwell = "blackwell"


@app.command("build-engine")
def build_engine_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint directory (omniquant export).")],
    target: Annotated[_EngineTarget, typer.Option(help="GPU generation: hopper (SM90) or blackwell (SM100).")],
    out: Annotated[Path, typer.Option(help="Bundle directory to create.")],
    max_batch_size: Annotated[int, typer.Option(help="Largest runtime batch (and CUDA graph).")] = 8,
    max_seq_len: Annotated[int, typer.Option(help="Longest request, prompt + output, in tokens.")] = 8192,
    video_pruning_rate: Annotated[
        Optional[float], typer.Option(help="Efficient Video Sampling rate in [0, 1); unset = off.")
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
