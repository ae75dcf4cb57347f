"""One check that every consumer of a checkpoint runs before trusting it.

Policy: ``inspect``, ``build-engine`` and ``report`` call ``verify_checkpoint`` before
they read anything else from a checkpoint directory, and refuse it with an
``OmniquantError`` naming the flag, the file and the fix when:

- it is not a directory, or it is a temporary directory of a quantize run
  (``.omniquant-tmp-*``, ``.omniquant-old-*``): those are never finished, whatever
  they hold;
- it is quantized (``hf_quant_config.json``, or a ``quantization_config`` in
  ``config.json``) but has no ``omniquant.json``: an interrupted run, or a checkpoint
  omniquant cannot vouch for. A plain BF16 directory without ``omniquant.json`` (a
  source checkpoint) is accepted: it is what quantize reads and report compares to;
- ``omniquant.json`` is not valid JSON, a shard it lists is missing, a
  ``model*.safetensors`` shard is not listed, or a shard's sha256 differs from it;
- a safetensors header is truncated or lies (safetensors' own parser, errors turned
  into a clean message);
- a scale tensor (``weight_scale``, ``weight_scale_2``, ``input_scale``, ``k_scale``,
  ``v_scale``) holds NaN or Inf, or a per-tensor scale is not > 0 (the audit's scale
  rule; a zero block scale of an all-zero NVFP4 block is legal, so block scales are
  only checked for finiteness here; ``inspect --audit`` runs the full audit).

``source_fingerprint`` identifies a source model by its bytes without reading all
of them (header, size and three 1 MiB windows of every shard), so ``report`` can
tell, before any evaluation, that a candidate was quantized from another model than
the baseline. It is recorded by ``quantize`` in ``omniquant.json`` (``source.fingerprint``).

Nothing here loads a model; a checkpoint is read shard by shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniquant.checkpoint.layout import (
    CONFIG_JSON,
    QUANT_CONFIG_JSON,
    RECORD_JSON,
    SHARD_GLOB,
    OmniquantRecord,
    read_json_file,
    read_record,
    sha256_file,
)
from omniquant.errors import OmniquantError, arg_ref
from omniquant.formats import KV_SCALE_SUFFIXES, SCALAR_SCALE_SUFFIXES, SCALE_SUFFIXES

# Name prefixes of quantize's temporary directories (the new output, and the old one
# moved aside by ``--force``): a directory so named is never a finished checkpoint.
from omniquant.outdir import TEMP_PREFIXES

#: Every stored scale suffix (omniquant.formats), and those that are per-tensor scalars
#: in every format that stores them (so must be > 0; a per-block scale may be 0).
SCALE_LEAVES = SCALE_SUFFIXES + KV_SCALE_SUFFIXES
_SCALAR_LEAVES = SCALAR_SCALE_SUFFIXES
_WINDOW = 1 << 20


@dataclass
class VerifiedCheckpoint:
    """What ``verify_checkpoint`` established.

    Attributes:
        path: The directory.
        record: ``omniquant.json`` (None for a BF16 source checkpoint without it).
        quantized: The directory carries a quantization config.
        shards: ``*.safetensors`` file names, sorted.
    """

    path: Path
    record: OmniquantRecord | None
    quantized: bool
    shards: list[str]


def is_temp_dir(path: str | Path) -> bool:
    """True for a quantize run's temporary directory (by name)."""
    return Path(path).name.startswith(TEMP_PREFIXES)


@contextlib.contextmanager
def open_safetensors(path: Path, error: type[OmniquantError], what: str = "") -> Iterator[Any]:
    """``safetensors.safe_open`` whose parse errors (truncated file, header length or
    offsets that lie, bad JSON) raise ``error`` naming the file instead of a traceback."""
    from safetensors import SafetensorError, safe_open

    prefix = f"{what} " if what else ""
    try:
        handle = safe_open(str(path), "pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(
            f"{prefix}{path}: not a readable safetensors file ({exc}); the file is truncated "
            "or damaged: copy it again or re-export the checkpoint."
        ) from None
    with handle as fh:
        yield fh


def is_quantized_dir(path: Path, error: type[OmniquantError], what: str = "") -> bool:
    """True when ``path`` carries modelopt's quantization config (either file)."""
    if (path / QUANT_CONFIG_JSON).exists():
        return True
    config = path / CONFIG_JSON
    if config.is_file():
        data = read_json_file(config, what, error)
        return isinstance(data, dict) and "quantization_config" in data
    return False


def shard_problems(path: Path, record: OmniquantRecord, *, checksums: bool = True) -> list[str]:
    """Problems of the shards ``omniquant.json`` lists: missing, unlisted, changed."""
    problems = []
    listed = record.shards
    for shard, digest in sorted(listed.items()):
        f = path / shard
        if not f.is_file():
            problems.append(f"{f}: listed in {RECORD_JSON} but missing")
        elif checksums and sha256_file(f) != digest:
            problems.append(f"{f}: sha256 does not match {RECORD_JSON} (file changed or corrupt)")
    on_disk = sorted(p.name for p in path.glob(SHARD_GLOB) if p.is_file())
    for name in on_disk:
        if name not in listed:
            problems.append(
                f"{path / name}: not listed in {RECORD_JSON} shards (the directory changed "
                "after export)"
            )
    return problems


def scale_problem(name: str, tensor) -> str | None:
    """The audit's scale rule for one tensor: finite, and > 0 for a per-tensor scale."""
    import torch

    values = tensor.float()
    bad = ~torch.isfinite(values)
    if bad.any():
        return f"{name}: {int(bad.sum())} NaN/Inf scale value(s)"
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _SCALAR_LEAVES and (values <= 0).any():
        return f"{name}: scale {float(values.min())} (must be > 0)"
    return None


def unrecorded_note(checked: VerifiedCheckpoint) -> str:
    """The one line ``inspect`` prints above the table of a directory without
    ``omniquant.json``: what it may be, and that nothing vouches for its shards."""
    what = (
        "a checkpoint another tool wrote (e.g. a released one), or an unfinished omniquant run"
        if checked.quantized
        else "a source checkpoint (not written by `omniquant quantize`), or an unfinished run"
    )
    return f"note: no {RECORD_JSON}: {what}; shard checksums not verified."


def verify_checkpoint(
    path: str | Path,
    *,
    flag: str,
    error: type[OmniquantError],
    checksums: bool = True,
    foreign_ok: bool = False,
) -> VerifiedCheckpoint:
    """Refuse a checkpoint directory that is unfinished, changed or carries bad scales.

    Args:
        path: The directory.
        flag: How the user named it, for messages (``--candidate``, ``inspect``).
        error: The error class of the calling stage.
        checksums: Hash the shards against ``omniquant.json``. ``build-engine`` passes
            False because it hashes every shard while copying it and compares there.
        foreign_ok: Accept a quantized checkpoint without ``omniquant.json`` (one written by
            another tool, e.g. NVIDIA's released FP8/NVFP4 checkpoints): its headers and
            scales are still checked, but there are no checksums to check. Only ``inspect``
            passes True: it reads a checkpoint to show it, and ``--as`` is for any checkpoint.

    Raises:
        error: Naming the directory, the file and the fix.
    """
    path = Path(path)
    where = f"{flag} {path}"
    if not path.exists():
        raise error(f"{where}: no such directory; pass a checkpoint directory.")
    if not path.is_dir():
        raise error(f"{where}: not a directory; pass a checkpoint directory.")
    if is_temp_dir(path.resolve()):
        raise error(
            f"{where}: a temporary directory of an unfinished `omniquant quantize` run, never a "
            "finished checkpoint; run quantize again (stale ones are removed by the next run "
            f"to the same {arg_ref('out')})."
        )
    if not (path / CONFIG_JSON).is_file():
        raise error(f"{where}: no config.json; this is not a Hugging Face checkpoint directory.")
    quantized = is_quantized_dir(path, error, flag)
    # Version first, then fields: a newer omniquant's record is refused by version.
    record = read_record(path, error, flag)
    if record is None and quantized and not foreign_ok:
        raise error(
            f"{where}: quantized but has no {RECORD_JSON}; it is not a finished omniquant "
            "checkpoint (an interrupted run, or written by another tool). Quantize it again "
            "with `omniquant quantize`."
        )
    shards = sorted(p.name for p in path.glob("*.safetensors") if p.is_file())
    problems = shard_problems(path, record, checksums=checksums) if record is not None else []
    if not problems:
        for shard in shards:
            with open_safetensors(path / shard, error, flag) as fh:
                for key in fh.keys():  # noqa: SIM118 (a safetensors handle)
                    if key.rsplit(".", 1)[-1] in SCALE_LEAVES:
                        problem = scale_problem(key, fh.get_tensor(key))
                        if problem:
                            problems.append(f"{shard}: {problem}")
    if problems:
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise error(
            f"{where}: refused, the checkpoint is not sound ({len(problems)} problem(s)):\n  "
            + "\n  ".join(shown)
            + more
            + "\nRe-export it with `omniquant quantize` (or copy it again if it was copied)."
        )
    return VerifiedCheckpoint(path=path, record=record, quantized=quantized, shards=shards)


def source_fingerprint(path: str | Path) -> str:
    """A sha256 that identifies a source checkpoint's weights without reading them all.

    Covers, per ``*.safetensors`` shard in name order: the name, the size, the header
    and three 1 MiB windows of the data (start, middle, end). Two different models (other
    weights, other seed) differ in those bytes; a 60 GB checkpoint costs a few MiB of reads.
    """
    path = Path(path)
    h = hashlib.sha256()
    for shard in sorted(p for p in path.glob("*.safetensors") if p.is_file()):
        size = shard.stat().st_size
        h.update(f"{shard.name}\0{size}\0".encode())
        with open(shard, "rb") as fh:
            head = fh.read(8)
            h.update(head)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
            header_len = min(header_len, max(size - 8, 0))
            h.update(fh.read(header_len))
            for start in {8 + header_len, max(size // 2, 0), max(size - _WINDOW, 0)}:
                fh.seek(start)
                h.update(fh.read(_WINDOW))
    return h.hexdigest()


def check_writable_out(out: Path, need_bytes: int, error: type[OmniquantError]) -> None:
    """Refuse an output whose parent is read-only or lacks ``need_bytes`` of free space
    (the export size predicted from the plan, ``omniquant.quantize.predict``).

    Checked by writing and removing a probe file (``os.access`` is wrong on read-only
    mounts for root), then ``shutil.disk_usage``.
    """
    import shutil
    import tempfile

    parent = out.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".omniquant-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise error(
            f"cannot write in {parent} ({exc.strerror}); choose a writable {arg_ref('out')}.",
            arg="out",
            value=out,
        ) from None
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise error(
            f"{parent} has {free / 2**20:.1f} MiB free; the checkpoint needs about "
            f"{need_bytes / 2**20:.1f} MiB (the predicted export size: the tensors the "
            f"recipe's plan writes; configs add kilobytes). Free space or choose another "
            f"{arg_ref('out')}.",
            arg="out",
            value=out,
        )


_FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
_CHUNK_ELEMS = 1 << 24


def _non_finite(chunk) -> int:
    """NaN/Inf values in ``chunk``. One ``aminmax`` pass decides (NaN propagates into both,
    an Inf is the min or the max): a finite chunk costs one read, not the three passes and
    full-size masks of counting, which made this check 11 s of a 40 s quantize of the slice."""
    import torch

    if chunk.numel() == 0:
        return 0
    lo, hi = torch.aminmax(chunk)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return 0
    return int((~torch.isfinite(chunk)).sum())


def check_finite_source(path: str | Path, error: type[OmniquantError]) -> None:
    """Refuse a source checkpoint whose floating-point tensors hold NaN or Inf.

    Streams every shard tensor by tensor (large tensors in row chunks of about 16 M
    values), so memory stays flat. ``check_finite_loaded`` calls it when the loaded model
    holds NaN/Inf, so that a bad source fails before calibration (modelopt then stops
    with "detected nan values in amax", naming no tensor) with the files' own names.

    Raises:
        error: Naming the shard and up to five tensors with their NaN/Inf counts.
    """

    path = Path(path)
    found: list[str] = []
    for shard in sorted(p for p in path.glob("*.safetensors") if p.is_file()):
        with open_safetensors(shard, error, arg_ref("model")) as fh:
            for key in fh.keys():  # noqa: SIM118 (a safetensors handle)
                sl = fh.get_slice(key)
                if sl.get_dtype() not in _FLOAT_DTYPES:
                    continue
                shape = sl.get_shape()
                numel = math.prod(shape)
                if numel <= _CHUNK_ELEMS or not shape:
                    chunks = [fh.get_tensor(key)]
                else:
                    step = max(1, _CHUNK_ELEMS // max(1, numel // shape[0]))
                    chunks = (sl[i : i + step] for i in range(0, shape[0], step))
                bad = sum(_non_finite(c) for c in chunks)
                if bad:
                    found.append(f"{shard.name}: {key}: {bad} NaN/Inf value(s)")
    if found:
        shown = "\n  ".join(found[:5]) + (
            f"\n  ... and {len(found) - 5} more" if len(found) > 5 else ""
        )
        raise error(
            f"the source weights hold NaN/Inf, so calibration cannot produce "
            f"finite scales:\n  {shown}\nFix or re-download the checkpoint.",
            arg="model",
            value=path,
        )


def check_finite_loaded(model, path: str | Path, error: type[OmniquantError]) -> None:
    """Refuse a loaded source model holding NaN or Inf, before calibration.

    Checks the tensors already in memory (one ``aminmax`` pass each) instead of reading
    every shard file again: for the released model that second read is another 61.5 GiB
    from disk before calibration starts; on the real-width slice it was 2.6 s of a run.
    Only when a tensor is bad (or some live off the host, offloaded) are the shards
    scanned (``check_finite_source``), so the message names the shard and tensors as the
    files spell them; a value that only overflowed when loading (a float32 source weight
    beyond bfloat16's range) is named by its parameter.

    Raises:
        error: Naming the shard and tensors (or the parameters) with NaN/Inf.
    """
    import torch

    bad: list[str] = []
    unreadable = False
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():  # what the files filled
            if t.device.type == "meta":
                unreadable = True
            elif t.is_floating_point() and _non_finite_any(t):
                bad.append(name)
    if not bad and not unreadable:
        return
    check_finite_source(path, error)  # raises, naming the shards' tensors, if they hold it
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise error(
            f"the loaded weights hold NaN/Inf although the files do not: {shown} (a value "
            "beyond the load dtype's range); load in a wider dtype or fix the checkpoint.",
            arg="model",
            value=path,
        )


def _non_finite_any(t) -> bool:
    """Whether ``t`` holds a NaN or Inf: ``_non_finite`` over chunks of ``_CHUNK_ELEMS``
    values, stopping at the first bad one, so no full-size mask is made."""
    flat = t.detach().reshape(-1)
    chunks = (flat[i : i + _CHUNK_ELEMS] for i in range(0, flat.numel(), _CHUNK_ELEMS))
    return any(_non_finite(c) for c in chunks)


def preflight_source(model: Path, rec, recipe_path: Path) -> None:
    """Checks of ``--model`` that read only its config: a supported, unquantized
    checkpoint of a type the recipe is written for.

    Raises:
        ModelLoadError: Quantized already.
        RecipeError: ``metadata.model_types`` does not include the model.
    """
    from omniquant.errors import ModelLoadError, RecipeError
    from omniquant.models import adapter_for
    from omniquant.models.base import read_config

    adapter = adapter_for(model)
    if is_quantized_dir(model, ModelLoadError, arg_ref("model")) or (model / RECORD_JSON).exists():
        raise ModelLoadError(
            f"already quantized ({QUANT_CONFIG_JSON} or a quantization_config "
            "in config.json); quantize the BF16 checkpoint it was made from.",
            arg="model",
            value=model,
        )
    model_type = read_config(model).get("model_type")
    allowed = list(rec.metadata.model_types)
    if model_type not in allowed and not set(adapter.model_types) & set(allowed):
        raise RecipeError(
            f"{recipe_path}: metadata.model_types {allowed} does not include the model type "
            f"{model_type!r} of {arg_ref('model')} {model}; use a recipe written for this model, or add "
            "the type to metadata.model_types if the recipe fits it."
        )
    from omniquant.data.processing import OmniProcessor

    # Placeholder token ids of config.json against the tokenizer (a mismatch would fail
    # every calibration sample as if its prompt held placeholder tokens).
    OmniProcessor.from_pretrained(model)
