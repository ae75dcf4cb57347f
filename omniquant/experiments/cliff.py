"""The main job: BF16 -> FP8 -> NVFP4 on one model, evaluated and reported.

Policy: ``cliff`` is composition only. It quantizes the model with each recipe
(``quantize``), evaluates the exported checkpoints against the BF16 source with the
report (``omniquant.experiments.compare.build_report``: serving numerics from the
files on disk) and returns the report; the CLI prints its accuracy/recovery table
(``omniquant.report.table.render_cliff_table``) and says where the report is. With
no ``--model`` it uses the bundled demo model with its shipped calibration and task
sets.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RECIPES = ("fp8_omni", "nvfp4_omni", "nvfp4_aggressive")
#: The report's name for the source checkpoint (the table's first column says the same).
BASELINE_NAME = "bf16"


@dataclass
class CliffResult:
    """Where things went and what they say."""

    out: Path
    report: dict
    checkpoints: dict[str, Path]
    seconds: float


def run_cliff(
    model: str | Path | None = None,
    out: str | Path = "omniquant-cliff",
    *,
    recipes: tuple[str, ...] | list[str] = DEFAULT_RECIPES,
    calib: str | None = None,
    tasks: str | None = None,
    sensitivity: bool = False,
    force: bool = False,
    quiet: bool = True,
    log: Callable[[str], None] | None = None,
) -> CliffResult:
    """Quantize ``model`` with every recipe and report the quality cliff.

    Args:
        model: BF16 checkpoint directory; ``None`` uses the bundled demo model.
        out: Output directory (``checkpoints/<recipe>/`` and ``report/``).
        recipes: Recipe names or files, in cliff order; ``NAME:ALGORITHM`` is the recipe
            calibrated with another algorithm (``nvfp4_omni:gptq``), side by side.
        calib: Calibration set; default: the demo's set for the demo model, else each
            recipe's own.
        tasks: Task set; default: the demo's evaluation set.
        sensitivity: Also rank module groups by the KL each adds alone.
        force: Replace an existing ``out``.
        quiet: No progress bars.
        log: Receives progress lines.
    """
    from omniquant.demo import DEMO_CALIB, DEMO_TASKS, demo_model_dir
    from omniquant.experiments.compare import build_report
    from omniquant.models.base import read_config
    from omniquant.outdir import CLIFF, check_out, mark_output, out_path
    from omniquant.quantize.pipeline import quantize
    from omniquant.quantize.recipe import load_recipe

    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    is_demo = model is None
    model_dir = demo_model_dir() if is_demo else Path(model)
    read_config(model_dir)  # fail early on a bad --model
    for r in recipes:
        load_recipe(r)  # fail early on a bad recipe
    out = out_path(out).absolute()
    check_out(out, force=force, spares=((model_dir, "model checkpoint"),), kind=CLIFF)
    if out.exists():
        shutil.rmtree(out)
    (out / "checkpoints").mkdir(parents=True)
    mark_output(out, CLIFF, also=("report",))
    if calib is None and is_demo:
        calib = DEMO_CALIB
    tasks = tasks or DEMO_TASKS

    checkpoints: dict[str, Path] = {}
    for r in recipes:
        # ``nvfp4_omni:gptq`` (recipe:algorithm, omniquant.quantize.recipe) gets its own directory.
        name = Path(str(r)).stem.replace(":", "-")
        say(f"quantizing with {name} ...")
        res = quantize(model_dir, r, out / "checkpoints" / name, calib=calib, quiet=quiet)
        checkpoints[name] = res.out
    say("evaluating BF16 and candidates with serving numerics ...")
    report = build_report(
        model_dir,
        list(checkpoints.values()),
        tasks,
        out / "report",
        sensitivity=sensitivity,
        log=say,
        baseline_name=BASELINE_NAME,
    )
    return CliffResult(
        out=out, report=report, checkpoints=checkpoints, seconds=time.perf_counter() - t0
    )
