"""Inspect a checkpoint directory from its files alone: precision, size and bits per weight per group.

Policy: reads safetensors headers and ``hf_quant_config.json`` only (no model
load), so it works on any machine and on checkpoints of any size. Bits per weight
counts every stored byte of a group (weights and their scales) over the group's
logical weight count (an NVFP4 byte holds two weights). The ``inspect`` command runs
``omniquant.checkpoint.verify.verify_checkpoint`` first; damaged headers and JSON are clean errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omniquant.errors import ModelLoadError
from omniquant.formats import DTYPE_BYTES, KV_SCALE_SUFFIXES, SCALE_SUFFIXES, by_stored_dtype

_SCALE_LEAVES = SCALE_SUFFIXES + KV_SCALE_SUFFIXES


@dataclass
class GroupStats:
    """Size of one module group on disk."""

    params: int = 0
    bytes: int = 0
    formats: dict[str, int] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / self.params if self.params else 0.0

    @property
    def precision(self) -> str:
        fmts = sorted(self.formats)
        return fmts[0] if len(fmts) == 1 else "+".join(fmts) if fmts else "-"


def inspect_checkpoint(path: str | Path) -> dict:
    """Summarise a checkpoint directory.

    Returns:
        ``{"path", "precision", "kv_cache", "groups": {group: {...}}, "total": {...}}``.
    """
    from omniquant.checkpoint.layout import read_quant_config
    from omniquant.checkpoint.verify import open_safetensors
    from omniquant.models import adapter_for

    path = Path(path)
    adapter = adapter_for(path)
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{path}: no *.safetensors files.")
    qc = read_quant_config(path, ModelLoadError)
    quant = qc.quantization if qc is not None else None
    groups: dict[str, GroupStats] = {}
    for shard in shards:
        with open_safetensors(shard, ModelLoadError) as fh:
            for name in fh.keys():  # noqa: SIM118 (a safetensors handle)
                sl = fh.get_slice(name)
                shape, dtype = sl.get_shape(), sl.get_dtype()
                numel = 1
                for d in shape:
                    numel *= d
                nbytes = numel * DTYPE_BYTES.get(dtype, 2)
                g = groups.setdefault(adapter.hub_tensor_group(name), GroupStats())
                g.bytes += nbytes
                leaf = name.rsplit(".", 1)[-1]
                if leaf in _SCALE_LEAVES:
                    continue
                stored = by_stored_dtype(dtype) if leaf == "weight" else None
                if stored is not None and stored.quantized:
                    g.params += stored.values_per_element * numel
                    fmt = stored.name
                else:
                    g.params += numel
                    fmt = dtype.lower()
                if leaf == "weight" and len(shape) >= 2:
                    g.formats[fmt] = g.formats.get(fmt, 0) + 1
    total_params = sum(g.params for g in groups.values())
    total_bytes = sum(g.bytes for g in groups.values())
    return {
        "path": str(path),
        "precision": quant.quant_algo if quant is not None else "BF16",
        "kv_cache": quant.kv_cache_quant_algo if quant is not None else None,
        "groups": {
            name: {
                "precision": g.precision,
                "modules_by_format": dict(sorted(g.formats.items())),
                "params": g.params,
                "bytes": g.bytes,
                "bits_per_weight": round(g.bits_per_weight, 3),
            }
            for name, g in sorted(groups.items())
        },
        "total": {
            "params": total_params,
            "bytes": total_bytes,
            "bits_per_weight": round(8.0 * total_bytes / total_params, 3) if total_params else 0.0,
        },
    }


def render_inspect(summary: dict) -> str:
    """Fixed-width table of ``inspect_checkpoint`` output."""
    lines = [
        f"{summary['path']}  precision={summary['precision']}  kv_cache={summary['kv_cache'] or '-'}",
        f"{'group':<18}{'precision':<14}{'params':>12}{'bytes':>14}{'bits/w':>9}",
    ]
    for name, g in summary["groups"].items():
        lines.append(
            f"{name:<18}{g['precision']:<14}{g['params']:>12,}{g['bytes']:>14,}{g['bits_per_weight']:>9.3f}"
        )
    t = summary["total"]
    lines.append(f"{'total':<18}{'':<14}{t['params']:>12,}{t['bytes']:>14,}{t['bits_per_weight']:>9.3f}")
    return "\n".join(lines)


def summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=2, sort_keys=True)
