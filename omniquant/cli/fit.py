"""The ``fit`` command, registered on ``omniquant.cli._app.app`` (its own small file, like
``plan``; imports inside the body)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from omniquant.cli._app import _console, _echo, app


@app.command("fit")
def fit_cmd(
    model: Annotated[Path, typer.Option(help="Source BF16 checkpoint directory (hub layout).")],
    out: Annotated[Path, typer.Option(help="Recipe YAML file to write.")],
    budget: Annotated[
        str | None, typer.Option(help="Exported tensor bytes allowed, e.g. 24GiB or 25GB.")
    ] = None,
    gpu_memory: Annotated[
        str | None,
        typer.Option(help="Fit to a GPU instead: its size, e.g. 32GiB (with --context, --batch)."),
    ] = None,
    context: Annotated[
        int, typer.Option(help="Tokens per served sequence (with --gpu-memory).")
    ] = 32768,
    batch: Annotated[int, typer.Option(help="Sequences served at once (with --gpu-memory).")] = 1,
    kv_cache: Annotated[str, typer.Option(help="KV cache: fp8 or bf16.")] = "fp8",
    calib: Annotated[
        str | None,
        typer.Option(
            help="Calibration set (default: the demo's for the demo model, else omni-mix)."
        ),
    ] = None,
    granularity: Annotated[
        str, typer.Option(help="Units: group (module groups) or layer (each layer's groups).")
    ] = "group",
    formats: Annotated[
        str, typer.Option(help="Formats a unit may take, comma-separated.")
    ] = "bf16,fp8,nvfp4",
    samples: Annotated[int, typer.Option(help="Calibration samples each unit is scored on.")] = 8,
    candidates: Annotated[
        int,
        typer.Option(
            help="Best layouts by summed KL to compose and score whole; the least measured wins."
        ),
    ] = 5,
    algorithms: Annotated[
        str,
        typer.Option(
            help="Calibration algorithms to try (max always), comma-separated, or all; "
            "the bytes are the same under each, the least measured layout wins."
        ),
    ] = "max,mse",
    force: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Fit the least-damage mixed-precision recipe whose export fits a budget."""
    from omniquant.experiments.fit import fit, write_recipe

    serving = None
    if gpu_memory is not None:
        from omniquant.models import load_model
        from omniquant.quantize.serving_memory import parse_size_arg, serving_memory_for

        meta = load_model(model, weights=False)
        serving = serving_memory_for(
            meta, context=context, batch=batch, kv_cache=kv_cache,
            gpu_memory=parse_size_arg(gpu_memory, "gpu_memory"),
        )  # fmt: skip
    console = _console()
    log = None if json_ else console.print
    result = fit(model, budget, calib=calib, granularity=granularity, formats=formats,
                 samples=samples, kv_cache=kv_cache, serving=serving,
                 candidates=candidates, algorithms=algorithms, log=log)  # fmt: skip
    written = None
    if result.recipe_yaml is not None:
        written = write_recipe(result, out, force=force)
    if json_:
        payload = result.to_json()
        payload["out"] = str(written) if written else None
        _echo(json.dumps(payload, indent=2, sort_keys=True, default=str))
        return
    if serving is not None:
        console.print("serving memory beside the weights:")
        for line in serving.arithmetic:
            console.print(f"  {line}")
    if written is None:
        console.print(
            f"BF16 fits: {result.bf16_bytes:,} bytes <= {result.budget_bytes:,} "
            f"({result.budget_text}); no quantization needed, no recipe written."
        )
        return
    console.print(result.recipe_yaml.rstrip())
    console.print(f"wrote {written}")
