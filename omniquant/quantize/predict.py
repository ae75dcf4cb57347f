"""Predict an export's size and layout from a plan, by arithmetic over shapes.

Policy:
- The prediction is exact, not an estimate: the exporter copies every tensor it
  does not quantize byte for byte and replaces each quantized weight by the
  tensors ``omniquant.formats`` lists (weight + every scale), plus the FP8 KV
  scales. So predicted bytes = source tensor bytes - source bytes of the quantized
  weights + their stored bytes in the target format + KV scale bytes.
- Bytes are *tensor data* bytes: the safetensors headers (8-byte length + JSON,
  a few hundred bytes per shard) and the JSON/tokenizer files beside the shards
  are not counted. ``measured_tensor_bytes`` measures an export the same way.
- Source bytes come from the checkpoint's safetensors headers when weight files
  are present (their dtypes as stored; no weight data is read), else from the
  model built on the meta device from ``config.json`` (every tensor in the load
  dtype, BF16, as the released BF16 checkpoint stores it).
- Layers are counted the way ``hf_quant_config.json``'s ``quantized_layers``
  counts them: a fused expert container counts once per expert and projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from omniquant.formats import (
    DTYPE_BYTES,
    FORMATS,
    KV_CACHE_SCALES,
    NARROWEST_FIRST,
    safetensors_dtype,
)

#: Groups that hold no GEMM weight (not counted as Linear layers).
_NOT_LINEAR = frozenset({"embeddings", "mamba_conv1d"})


@dataclass
class QuantizedWeight:
    """One exported quantized weight: hub module name, format and ``[out, in]``."""

    module: str
    format: str
    out_features: int
    in_features: int


@dataclass
class SizePrediction:
    """Predicted tensor bytes of the export, and what they are made of."""

    predicted_bytes: int
    source_bytes: int
    source_params: int
    #: Where the source bytes came from: ``safetensors headers`` or ``config``.
    source: str
    layers_by_format: dict[str, int]
    #: Format -> weight elements stored in it (quantized formats: their Linear weights;
    #: bf16: every other parameter).
    params_by_format: dict[str, int]
    #: Format -> bytes of weights + scales (bf16: every tensor not quantized).
    bytes_by_format: dict[str, int]
    kv_scale_bytes: int
    arithmetic: list[str] = field(default_factory=list)
    #: Distinct input widths of the NVFP4 weights (each divides the block, or the
    #: plan would have been refused).
    nvfp4_input_widths: list[int] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        """Predicted bytes x 8 / source parameters (scales and KV scales included)."""
        return 8 * self.predicted_bytes / self.source_params if self.source_params else 0.0

    def to_json(self) -> dict:
        return {
            "predicted_bytes": self.predicted_bytes,
            "predicted_gib": round(self.predicted_bytes / 2**30, 3),
            "source_bytes": self.source_bytes,
            "source_params": self.source_params,
            "source": self.source,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "layers_by_format": dict(self.layers_by_format),
            "params_by_format": dict(self.params_by_format),
            "bytes_by_format": dict(self.bytes_by_format),
            "kv_scale_bytes": self.kv_scale_bytes,
            "nvfp4_input_widths": list(self.nvfp4_input_widths),
            "arithmetic": list(self.arithmetic),
        }


def quantized_weights(loaded, plan) -> list[QuantizedWeight]:
    """Every weight the export quantizes, in hub names, with its ``[out, in]`` shape.

    Names are those of ``omniquant.quantize.export.quantized_hub_modules`` (checked equal), so
    the prediction and the export agree on what is quantized.
    """
    from omniquant.quantize.export import quantized_hub_modules

    adapter, model = loaded.adapter, loaded.model
    modules = dict(model.named_modules())
    fused = adapter.fused_expert_groups
    out: list[QuantizedWeight] = []
    for name, fmt in sorted(plan.quantized().items()):
        mod = modules[name]
        if plan.module_group[name] in fused:
            for linear in adapter.expert_linears(name, mod):
                out.append(
                    QuantizedWeight(linear.hub_module, fmt, linear.out_features, linear.in_features)
                )
        else:
            o, n = mod.weight.shape
            out.append(QuantizedWeight(adapter.hub_name(name), fmt, int(o), int(n)))
    names = quantized_hub_modules(loaded, plan)
    if {q.module for q in out} != set(names):  # pragma: no cover - a naming bug
        raise RuntimeError("internal: predicted quantized modules differ from the export's")
    return out


def linear_layer_count(loaded, plan) -> int:
    """GEMM layers of the model (fused experts per expert and projection)."""
    modules = dict(loaded.model.named_modules())
    fused = loaded.adapter.fused_expert_groups
    n = 0
    for name, group in plan.module_group.items():
        if group in _NOT_LINEAR:
            continue
        n += len(loaded.adapter.expert_linears(name, modules[name])) if group in fused else 1
    return n


def source_tensors(loaded) -> tuple[dict[str, tuple[str, tuple[int, ...]]], str]:
    """Tensor name -> (safetensors dtype, shape) of the source checkpoint, and the origin.

    From the safetensors headers when weight files are present (no data read), else
    from the meta model's state dict (native names, load dtype).
    """
    path = Path(loaded.path)
    files = sorted(path.glob("*.safetensors"))
    if files:
        out = {}
        for f in files:
            for name, (dtype, shape) in read_safetensors_header(f).items():
                out[name] = (dtype, shape)
        return out, "safetensors headers"
    out = {}
    for name, tensor in loaded.model.state_dict().items():
        out[name] = (safetensors_dtype(tensor.dtype), tuple(int(d) for d in tensor.shape))
    return out, "config"


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors file's header only (no tensor data
    is read); a truncated file or a lying header is a ``ModelLoadError`` naming the file."""
    from omniquant.checkpoint.verify import open_safetensors
    from omniquant.errors import ModelLoadError, arg_ref

    with open_safetensors(path, ModelLoadError, arg_ref("model")) as fh:
        return {
            k: (fh.get_slice(k).get_dtype(), tuple(fh.get_slice(k).get_shape()))
            for k in fh.keys()  # noqa: SIM118 (a safetensors handle)
        }


def measured_tensor_bytes(ckpt: Path) -> int:
    """Tensor-data bytes of a checkpoint: each shard's size minus its header (8 + n)."""
    total = 0
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
        total += f.stat().st_size - 8 - n
    return total


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPE_BYTES[dtype]


def predict_size(loaded, plan) -> SizePrediction:
    """Predict the exported tensor bytes of ``plan`` applied to ``loaded`` (exact).

    Works on a meta-device model (``load_model(..., weights=False)``).
    """
    tensors, origin = source_tensors(loaded)
    source_bytes = sum(_nbytes(d, s) for d, s in tensors.values())
    source_params = sum(math.prod(s) for _, s in tensors.values())
    qweights = quantized_weights(loaded, plan)

    if origin == "safetensors headers":
        # The same words as the adapter's load check: quantize predicts before it loads.
        bad = []
        for q in qweights:
            name, want = f"{q.module}.weight", (q.out_features, q.in_features)
            if name not in tensors:
                bad.append(name)
            elif tensors[name][1] != want:
                bad.append(f"{name} (file {tensors[name][1]}, config {want})")
        if bad:
            from omniquant.errors import ModelLoadError

            raise ModelLoadError(
                f"{len(bad)} tensor(s) of the model are missing from the "
                f"safetensors files or have the wrong shape: {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}; the shards are incomplete or belong to "
                "another config.json.",
                arg="model",
                value=loaded.path,
            )
    removed = 0
    layers: dict[str, int] = {}
    params: dict[str, int] = {}
    fmt_bytes: dict[str, int] = {}
    for q in qweights:
        fmt = FORMATS[q.format]
        n = q.out_features * q.in_features
        if origin == "safetensors headers":
            dtype, shape = tensors[f"{q.module}.weight"]
            removed += _nbytes(dtype, shape)
        else:
            removed += n * DTYPE_BYTES[_load_dtype(tensors)]
        layers[q.format] = layers.get(q.format, 0) + 1
        params[q.format] = params.get(q.format, 0) + n
        fmt_bytes[q.format] = fmt_bytes.get(q.format, 0) + fmt.stored_bytes(
            q.out_features, q.in_features
        )
    kv_bytes = 0
    for _anchor, dtype in KV_CACHE_SCALES.values():
        kv_bytes += len(plan.kv_modules) * DTYPE_BYTES[dtype]
    kept = source_bytes - removed
    predicted = kept + sum(fmt_bytes.values()) + kv_bytes
    layers["bf16"] = linear_layer_count(loaded, plan) - sum(layers.values())
    params["bf16"] = source_params - sum(params.values())
    fmt_bytes["bf16"] = kept

    arithmetic = [f"source tensor bytes ({origin}): {source_bytes:,}"]
    for name in NARROWEST_FIRST:
        if name not in fmt_bytes or not FORMATS[name].quantized:
            continue
        parts = FORMATS[name].layout_text()
        arithmetic.append(
            f"{name}: {layers[name]:,} weights, {params[name]:,} elements -> "
            f"{fmt_bytes[name]:,} bytes (per [out, in] weight: {parts})"
        )
    arithmetic.append(f"bf16/unchanged: {fmt_bytes['bf16']:,} bytes copied from the source")
    if kv_bytes:
        arithmetic.append(
            f"kv cache scales: {len(plan.kv_modules)} attention layers x "
            f"({' + '.join(KV_CACHE_SCALES)}) x 4 bytes = {kv_bytes}"
        )
    arithmetic.append(
        f"predicted = {source_bytes:,} - {removed:,} (source bytes of quantized weights) + "
        f"{sum(fmt_bytes[f] for f in fmt_bytes if f != 'bf16'):,} + {kv_bytes} = {predicted:,} "
        f"bytes of tensor data (safetensors headers not counted)"
    )
    order = [f for f in NARROWEST_FIRST if f in layers]
    return SizePrediction(
        predicted_bytes=predicted,
        source_bytes=source_bytes,
        source_params=source_params,
        source=origin,
        layers_by_format={f: layers[f] for f in order},
        params_by_format={f: params[f] for f in order},
        bytes_by_format={f: fmt_bytes[f] for f in order},
        kv_scale_bytes=kv_bytes,
        arithmetic=arithmetic,
        nvfp4_input_widths=sorted({q.in_features for q in qweights if q.format == "nvfp4"}),
    )


def _load_dtype(tensors: dict) -> str:
    # The meta model is built in one dtype; its floating tensors all carry it.
    for dtype, _shape in tensors.values():
        if dtype.startswith(("BF", "F")):
            return dtype
    return "BF16"
