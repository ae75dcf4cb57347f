"""What the files of a checkpoint say about it, as a model block of a comparison.

Policy: the description is read from the checkpoint directory alone (``config.json``,
the shards' headers, ``omniquant.json``), after ``omniquant.checkpoint.verify``
accepts it; no weight is loaded. The report, and ``omniquant serve`` (which announces
its checkpoint in ``/v1/models``), describe a checkpoint the same way: here. Errors
name the caller's role as a flag (``--baseline``, ``--candidate``, ``--model``).
"""

from __future__ import annotations

from pathlib import Path

from omniquant.errors import OmniquantError, ReportError, arg_ref

#: The report's arguments by the role a checkpoint plays.
_ARG_OF_ROLE = {"baseline": "baseline", "candidate": "candidates"}


def describe_checkpoint(path: Path, role: str) -> dict:
    """What the files of a checkpoint say: name, precision, size, recipe, calibration.

    Raises:
        ReportError: Not a readable checkpoint directory (names the flag and the fix).
    """
    from omniquant.checkpoint.inspect import inspect_checkpoint

    path = Path(path)
    arg = _ARG_OF_ROLE.get(role, role)
    if not path.is_dir():
        raise ReportError(
            "no such directory; pass a checkpoint directory (the BF16 source "
            "or an `omniquant quantize` output).",
            arg=arg,
            value=path,
        )
    from omniquant.checkpoint.verify import verify_checkpoint

    verified = verify_checkpoint(path, flag=arg_ref(arg), error=ReportError)
    try:
        summary = inspect_checkpoint(path)
    except OmniquantError as err:
        if err.arg is not None:  # the reader's argument is this report's baseline/candidate
            raise err.with_arg(arg, ReportError) from err
        reason = str(err).removeprefix(f"{path}: ")
        raise ReportError(reason, arg=arg, value=path) from err
    record = verified.record
    recipe = record.recipe.name if record is not None and record.recipe is not None else None
    # The calibration algorithm (omniquant.json["algorithm"]; max before it was recorded).
    algorithm = None
    if record is not None:
        algorithm = (record.algorithm or {}).get("name", "max")
    name = recipe or path.resolve().name  # "." has no name of its own
    if recipe and algorithm not in (None, "max") and not recipe.endswith(f":{algorithm}"):
        name = f"{recipe}:{algorithm}"  # recipe files that differ only in the algorithm
    return {
        "_meta": record,
        "name": name,
        "path": str(path.resolve()),
        "recipe": recipe,
        "algorithm": algorithm,
        "precision": summary["precision"],
        "kv_cache": summary["kv_cache"],
        "bits_per_weight": summary["total"]["bits_per_weight"],
        "size_bytes": summary["total"]["bytes"],
        "params": summary["total"]["params"],
        "group_precision": {g: v["precision"] for g, v in summary["groups"].items()},
        "calibration": record.calibration if record is not None else None,
    }
