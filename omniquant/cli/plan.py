"""The ``plan`` command, registered on ``omniquant.cli._app.app`` (kept apart from
``commands`` so the stage stays one small file; imports inside the body)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from omniquant.cli._app import _console, _echo, app


@app.command("plan")
def plan_cmd(
    model: Annotated[
        Path, typer.Option(help="Checkpoint directory, or a directory holding only config.json.")
    ],
    recipe: Annotated[str, typer.Option(help="Built-in recipe name or path to a recipe YAML.")],
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    device: Annotated[
        str | None,
        typer.Option(
            help="Calibration device(s): cpu, cuda, cuda:0 or cuda:0,cuda:1 "
            "(default: cpu, or the devices --max-memory names)."
        ),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(help="Memory per device, e.g. 0=120GiB,1=120GiB,cpu=200GiB."),
    ] = None,
    tokens: Annotated[
        int, typer.Option(help="Backbone tokens of the longest calibration sample.")
    ] = 4096,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Recipe override key.path=value (repeatable)."),
    ] = None,
    context: Annotated[
        int | None,
        typer.Option(
            help="Tokens per served sequence: print the serving memory beside the weights."
        ),
    ] = None,
    batch: Annotated[int, typer.Option(help="Sequences served at once (with --context).")] = 1,
    gpu_memory: Annotated[
        str | None, typer.Option(help="GPU size, e.g. 80GiB: whether the export fits beside them.")
    ] = None,
    kv_cache: Annotated[
        str | None,
        typer.Option(help="KV cache dtype for serving: fp8 or bf16 (default: the recipe's)."),
    ] = None,
) -> None:
    """Plan a recipe from the model's config alone: layout, size and calibration memory."""
    from omniquant.quantize.planner import plan_model

    report = plan_model(
        model, recipe, overrides=set_, device=device, max_memory=max_memory, tokens=tokens,
        context=context, batch=batch, gpu_memory=gpu_memory, kv_cache=kv_cache,
    )  # fmt: skip
    if json_:
        _echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
        return
    _console().print(report.render())
