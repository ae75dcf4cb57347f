"""What the files of a checkpoint say about it, as a model block of a comparison.

Policy: the description is read from the checkpoint directory alone (``config.json``,
the shards' headers, ``omniquant.json``), after ``omniquant.checkpoint.verify``
accepts it; no weight is loaded. The report, and ``omniquant serve`` (which announces
its checkpoint in ``/v1/models``), describe a checkpoint the same way: here. Errors
name the caller's role as a flag (``--baseline``, ``--candidate``, ``--model``).
"""

from __future__ import annotations

from pathlib import Path

from omniquant.errors import OmniquantError, ReportError


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
