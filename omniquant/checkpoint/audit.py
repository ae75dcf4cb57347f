"""Post-export audit: a checkpoint that cannot lie.

Policy: runs at the end of every quantize (before the output is moved into
place) and as ``omniquant inspect DIR --audit``. It reads only the files on disk
and checks:
- every quantized weight has all its scales, with the right dtypes and shapes;
- no NaN, Inf or zero per-tensor scale; no NaN/Inf E4M3 block scale, none outside
  the E4M3 range, and no zero block scale on a block that holds non-zero codes;
- every weight of two or more dimensions is either quantized or listed in
  ``exclude_modules``, and no quantized weight is excluded;
- KV-cache scales are present when ``kv_cache_quant_algo`` is FP8;
- ``config.json``'s ``quantization_config`` equals modelopt's converter output
  for ``hf_quant_config.json`` (the block vLLM reads says what TensorRT-LLM's
  file says);
- shard checksums match ``omniquant.json``.
A failed audit names every offending tensor. When a listed shard is missing, the tensor
checks are skipped: what they would find is that shard's absence again.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import torch

from omniquant.checkpoint.layout import (
    CONFIG_JSON,
    QUANT_CONFIG_JSON,
    RECORD_JSON,
    Quantization,
    read_config_json,
    read_quant_config,
    read_record,
    serving_quant_config,
)
from omniquant.errors import AuditError
from omniquant.formats import (
    DTYPE_BYTES,
    KV_CACHE_FORMAT,
    KV_SCALE_SUFFIXES,
    SCALE_SUFFIXES,
    Format,
    by_stored_dtype,
    torch_dtype,
)

E4M3_MAX = 448.0


@dataclass
class AuditReport:
    """Audit outcome."""

    path: Path
    problems: list[str] = field(default_factory=list)
    checked_weights: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def layer_format(module: str, quant: Quantization | None) -> str | None:
    """'fp8' / 'nvfp4' for a quantized hub module, None if excluded or unquantized."""
    algo = quant.quant_algo if quant is not None else None
    if not algo:
        return None
    if algo == "MIXED_PRECISION":
        entry = (quant.quantized_layers or {}).get(module)
        return entry.quant_algo.lower() if entry and entry.quant_algo else None
    if is_excluded(module, quant.exclude_modules):
        return None
    return algo.lower()


def is_excluded(module: str, patterns: list[str]) -> bool:
    return any(module == p or fnmatch.fnmatchcase(module, p) for p in patterns)


def audit_checkpoint(
    path: str | Path, raise_on_error: bool = False, progress=None, *, checksums: bool = True
) -> AuditReport:
    """Audit a checkpoint directory written by omniquant.

    Args:
        path: The checkpoint directory.
        raise_on_error: Raise instead of returning a report with problems.
        progress: ``progress(done_bytes, total_bytes, label)`` after each quantized
            weight is checked (bytes of the stored weights), or None.
        checksums: Hash every shard against ``omniquant.json``. ``False`` only for the
            writer's own audit, whose checksums were just taken from the written files
            (every shard is still checked to exist and be listed).

    Raises:
        AuditError: if ``raise_on_error`` and the audit found problems.
    """
    path = Path(path)
    report = AuditReport(path=path)
    record = read_record(path, AuditError)  # a newer format_version: refused here
    if record is None:
        report.problems.append(
            f"{path / RECORD_JSON}: missing; this is not a finished omniquant checkpoint "
            "(an interrupted run, or not written by omniquant)."
        )
        return _finish(report, raise_on_error)
    from omniquant.checkpoint.verify import shard_problems

    qc = read_quant_config(path, AuditError)
    quant = qc.quantization if qc is not None else None

    # The same shard rule as every consumer (omniquant.checkpoint.verify), messages relative to path.
    report.problems += [
        p.removeprefix(f"{path}/") for p in shard_problems(path, record, checksums=checksums)
    ]
    if any(not (path / shard).is_file() for shard in record.shards):
        # The tensors of a missing shard are gone: the tensor checks below would report
        # their absence again as faults of their own (no k_scale/v_scale, a scale without
        # its weight, missing scales). The missing shard is the one fault.
        _check_config_block(path, report)
        return _finish(report, raise_on_error)

    with _ShardTensors(path, record.shards) as tensors:
        weights = tensors.weight_modules()
        _check_weights(tensors, weights, quant, report, progress)
        for k in tensors.index:
            module, leaf = k.rsplit(".", 1)
            if leaf in SCALE_SUFFIXES and module not in weights:
                report.problems.append(f"{k}: scale without a weight beside it")
        if quant is not None and quant.kv_cache_quant_algo == KV_CACHE_FORMAT.hf_quant_algo:
            kv = [k for k in tensors.index if k.rsplit(".", 1)[-1] in KV_SCALE_SUFFIXES]
            if not kv:
                report.problems.append(
                    "kv_cache_quant_algo is FP8 but no k_scale/v_scale tensors exist"
                )
            for k in kv:
                _check_scalar(k, tensors.load(k), report)
    _check_config_block(path, report)
    return _finish(report, raise_on_error)


class _ShardTensors:
    """The tensors of a checkpoint's shards, by name: headers read up front, tensors one
    at a time (a 30B checkpoint must not be loaded whole to be audited)."""

    def __init__(self, path: Path, shards):
        from safetensors import safe_open

        from omniquant.checkpoint.verify import open_safetensors

        self.path = path
        #: tensor name -> (shard, safetensors dtype, shape)
        self.index: dict[str, tuple[str, str, tuple[int, ...]]] = {}
        self.handles = {}
        for shard in sorted(shards):
            f = path / shard
            if not f.is_file():
                continue
            with open_safetensors(f, AuditError):  # a damaged header: a clean error, not a traceback
                pass
            self.handles[shard] = fh = safe_open(f, "pt")
            for k in fh.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                sl = fh.get_slice(k)
                self.index[k] = (shard, sl.get_dtype(), tuple(sl.get_shape()))
        # Weights are read only for their block scales, one at a time, straight from the
        # disk into one reused buffer: a fresh export is not in the page cache
        # (omniquant.checkpoint.safetensors_file).
        self.readers: dict = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        for reader in self.readers.values():
            reader.close()

    def load(self, name: str) -> torch.Tensor | None:
        return self.handles[self.index[name][0]].get_tensor(name) if name in self.index else None

    def load_weight(self, module: str) -> torch.Tensor:
        """``module.weight``, valid until the next ``load_weight``."""
        from omniquant.checkpoint.safetensors_file import DirectTensorReader

        shard = self.index[f"{module}.weight"][0]
        if shard not in self.readers:
            self.readers[shard] = DirectTensorReader(self.path / shard)
        return self.readers[shard].read(f"{module}.weight")

    def weight_modules(self) -> set[str]:
        """Modules with a weight of two or more dimensions."""
        return {
            k[: -len(".weight")]
            for k, (_, _, shape) in self.index.items()
            if k.endswith(".weight") and len(shape) >= 2
        }

    def stored_bytes(self, name: str) -> int:
        _, dtype, shape = self.index[name]
        return DTYPE_BYTES.get(dtype, 1) * math.prod(shape)


def _check_weights(
    tensors: _ShardTensors, weights: set[str], quant: Quantization | None, report: AuditReport,
    progress,
) -> None:  # fmt: skip
    """Each weight against ``hf_quant_config``: stored as declared, excluded when not
    quantized, and every scale its format declares."""
    excluded_patterns = quant.exclude_modules if quant is not None else []
    todo = sorted(weights)
    all_bytes = sum(tensors.stored_bytes(f"{m}.weight") for m in todo)
    done_bytes = 0
    for i, module in enumerate(todo, start=1):
        _, dtype, _ = tensors.index[f"{module}.weight"]
        stored = by_stored_dtype(dtype)
        fmt = stored.name if stored is not None and stored.quantized else None
        done_bytes += tensors.stored_bytes(f"{module}.weight")
        if progress is not None:
            progress(done_bytes, all_bytes, f"weight {i}/{len(todo)}")
        declared = layer_format(module, quant)
        if fmt is None:  # high-precision weight
            if declared is not None:
                report.problems.append(
                    f"{module}.weight: stored as {dtype} but hf_quant_config declares it {declared}"
                )
            elif quant is not None and not is_excluded(module, excluded_patterns):
                report.problems.append(
                    f"{module}: unquantized weight missing from exclude_modules (a loader "
                    "targeting Linear would treat it as quantized)"
                )
            continue
        report.checked_weights += 1
        if declared is not None and is_excluded(module, excluded_patterns):
            # MIXED_PRECISION lists formats per layer; a loader that applies
            # exclude_modules first would read these codes as plain weights.
            report.problems.append(
                f"{module}.weight: stored as {fmt} and listed in quantized_layers, but "
                "exclude_modules also matches it (remove it from exclude_modules)"
            )
        if declared != fmt:
            report.problems.append(
                f"{module}.weight: stored as {fmt} but hf_quant_config declares "
                f"{declared or 'it unquantized/excluded'}"
            )
        _check_scales(module, stored, lambda m=module: tensors.load_weight(m), tensors.load, report)


def _check_config_block(path: Path, report: AuditReport) -> None:
    """``config.json``'s ``quantization_config`` must be the converter's output for
    ``hf_quant_config.json`` (omniquant.checkpoint.layout.serving_quant_config)."""
    qc, config = read_quant_config(path, AuditError), read_config_json(path, AuditError)
    if qc is None or config is None:
        return
    cfg_file = path / CONFIG_JSON
    block = config.get("quantization_config")
    want = serving_quant_config(qc)
    if block is None:
        report.problems.append(
            f"{cfg_file}: no quantization_config; vLLM would read {QUANT_CONFIG_JSON}'s legacy "
            "shape instead (re-export, or write modelopt's converter output there)"
        )
    elif block != want:
        differ = sorted(k for k in set(block) | set(want) if block.get(k) != want.get(k))
        report.problems.append(
            f"{cfg_file}: quantization_config differs from modelopt's converter output for "
            f"{QUANT_CONFIG_JSON} in {', '.join(differ)} (re-export, or replace it with "
            "omniquant.checkpoint.layout.serving_quant_config(hf_quant_config))"
        )


def _check_scalar(name: str, t: torch.Tensor | None, report: AuditReport) -> None:
    if t is None:
        report.problems.append(f"{name}: missing")
        return
    if t.dtype != torch.float32 or t.numel() != 1:
        report.problems.append(f"{name}: expected a float32 scalar, got {t.dtype} {tuple(t.shape)}")
        return
    v = float(t)
    if not math.isfinite(v):
        report.problems.append(f"{name}: scale is {v}")
    elif v <= 0:
        report.problems.append(f"{name}: scale is {v} (must be > 0)")


def _check_scales(module: str, fmt: Format, weight, load, report: AuditReport) -> None:
    """Every scale ``fmt`` declares beside ``module``'s weight (omniquant.formats).

    ``weight()`` reads the stored weight; only per-block scales need it (which blocks hold
    non-zero codes), so a per-tensor format's weights are never read: a freshly written
    checkpoint is not in the page cache (direct I/O), and reading the FP8 slice's weights
    back for nothing took 2 s.

    Order of the checks (and so of the messages): the activation scale, then the other
    per-tensor scales, then the per-block scales.
    """
    order = sorted(fmt.scales, key=lambda s: (s.role != "input", s.kind == "per_block"))
    for scale in order:
        name = f"{module}.{scale.suffix}"
        if scale.kind == "scalar":
            _check_scalar(name, load(name), report)
        else:
            _check_block_scales(name, fmt, scale.dtype, weight(), load(name), report)


def _check_block_scales(
    name: str,
    fmt: Format,
    dtype: str,
    w: torch.Tensor,
    bs: torch.Tensor | None,
    report: AuditReport,
) -> None:
    """A per-block E4M3 scale tensor ``[out, in / block]`` beside packed weight ``w``."""
    out_f, packed_in = w.shape
    want = (out_f, packed_in * fmt.values_per_element // fmt.block_size)
    if bs is None:
        report.problems.append(f"{name}: missing")
        return
    want_dtype = torch_dtype(dtype)
    if bs.dtype != want_dtype or tuple(bs.shape) != want:
        report.problems.append(
            f"{name}: expected {str(want_dtype).removeprefix('torch.')} {want}, "
            f"got {bs.dtype} {tuple(bs.shape)}"
        )
        return
    f = bs.float()
    bad = ~torch.isfinite(f)
    if bad.any():
        report.problems.append(f"{name}: {int(bad.sum())} NaN/Inf block scale(s)")
    if (f.abs() > E4M3_MAX).any():
        report.problems.append(f"{name}: block scale(s) outside the E4M3 range")
    # Stored elements per block (8 packed NVFP4 bytes = 16 values).
    per_block = fmt.block_size // fmt.values_per_element
    nonzero_blocks = _nonzero_blocks(w, out_f, per_block)
    zero_on_data = (f == 0) & nonzero_blocks
    if zero_on_data.any():
        report.problems.append(
            f"{name}: {int(zero_on_data.sum())} zero block scale(s) on non-zero blocks"
        )


#: A block of this many stored bytes is one integer: non-zero exactly when a byte is.
_BLOCK_AS_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _nonzero_blocks(w: torch.Tensor, out_f: int, per_block: int) -> torch.Tensor:
    """``[out, blocks]``: which blocks of ``per_block`` stored bytes hold a non-zero byte.

    An NVFP4 block is 8 bytes, read as one int64 (one compare per block instead of eight
    and a reduction); where the tensor's offset does not allow that view, bytewise.
    """
    wide = _BLOCK_AS_INT.get(per_block * w.element_size())
    if wide is not None and w.is_contiguous():
        try:
            return w.view(wide).view(out_f, -1) != 0
        except RuntimeError:  # storage offset not a multiple of the wider element
            pass
    return (w.view(out_f, -1, per_block) != 0).any(-1)


def _finish(report: AuditReport, raise_on_error: bool) -> AuditReport:
    if raise_on_error and report.problems:
        shown = report.problems[:50]
        more = len(report.problems) - len(shown)
        raise AuditError(
            f"audit of {report.path} failed ({len(report.problems)} problem(s)):\n  "
            + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else "")
        )
    return report
