"""The storage formats omniquant writes: one registry entry per format.

Policy: what a format *is* lives here, once: its ``quant_algo`` name in
``hf_quant_config.json``, the dtype and shape of the stored weight, every scale
tensor modelopt's exporter writes beside it (suffix, dtype, shape), and the
modelopt quantizer config that produces it. The plan stage predicts checkpoint
sizes from this table and ``omniquant.quantize.plan`` builds its modelopt config from it.
Other modules still keep their own small tables; they move here in a later
refactor.

The shapes are those modelopt 0.47's ``_export_transformers_checkpoint`` writes for
a ``[out, in]`` weight (checked against exported files by the plan tests):

- ``fp8``: ``weight`` F8_E4M3 ``[out, in]``; ``weight_scale`` F32 ``[]``;
  ``input_scale`` F32 ``[]``.
- ``nvfp4``: ``weight`` U8 ``[out, in / 2]`` (two E2M1 values per byte);
  ``weight_scale`` F8_E4M3 ``[out, in / 16]`` (one per 16-element block, unpadded);
  ``weight_scale_2`` F32 ``[]``; ``input_scale`` F32 ``[]``.
- ``bf16``: ``weight`` BF16 ``[out, in]``, no scales.
- FP8 KV cache: ``k_scale`` and ``v_scale``, F32 ``[]``, beside ``k_proj`` and
  ``v_proj`` of every attention layer.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Bytes per element of the safetensors dtype names used by the exports.
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U8": 1,
    "I8": 1,
    "I16": 2,
    "I32": 4,
    "I64": 8,
    "BOOL": 1,
}


@dataclass(frozen=True)
class ScaleTensor:
    """One tensor written beside a quantized weight."""

    suffix: str
    dtype: str
    #: ``"scalar"`` (shape ``[]``) or ``"per_block"`` (shape ``[out, in / block]``).
    kind: str

    def shape(self, out_features: int, in_features: int, block: int | None) -> tuple[int, ...]:
        if self.kind == "scalar":
            return ()
        return (out_features, in_features // block)


@dataclass(frozen=True)
class Format:
    """A weight storage format."""

    name: str
    #: ``quant_algo`` in ``hf_quant_config.json`` (None: not quantized).
    hf_quant_algo: str | None
    weight_dtype: str
    #: Stored bits per weight element (4 for NVFP4: two values per U8 byte).
    element_bits: int
    scales: tuple[ScaleTensor, ...]
    #: modelopt quantizer attribute dict (``cfg`` of a ``quant_cfg`` entry), or None.
    modelopt_cfg: dict | None
    #: Elements per scale block along the input dimension (None: per tensor).
    block_size: int | None = None

    def tensors(
        self, out_features: int, in_features: int
    ) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Suffix -> (dtype, shape) of every tensor stored for one ``[out, in]`` weight."""
        weight_in = in_features * self.element_bits // (8 * DTYPE_BYTES[self.weight_dtype])
        out = {"weight": (self.weight_dtype, (out_features, weight_in))}
        for scale in self.scales:
            out[scale.suffix] = (
                scale.dtype,
                scale.shape(out_features, in_features, self.block_size),
            )
        return out

    def stored_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of tensor data stored for one ``[out, in]`` weight and its scales."""
        total = 0
        for dtype, shape in self.tensors(out_features, in_features).values():
            n = 1
            for d in shape:
                n *= d
            total += n * DTYPE_BYTES[dtype]
        return total

    def layout_text(self) -> str:
        """The stored tensors of one ``[out, in]`` weight, symbolically."""
        per_byte = 8 * DTYPE_BYTES[self.weight_dtype] // self.element_bits
        parts = [f"weight {self.weight_dtype} [out, in{'' if per_byte == 1 else f' / {per_byte}'}]"]
        for scale in self.scales:
            shape = "[]" if scale.kind == "scalar" else f"[out, in / {self.block_size}]"
            parts.append(f"{scale.suffix} {scale.dtype} {shape}")
        return ", ".join(parts)

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Stored bits per weight element, scales included."""
        return 8 * self.stored_bytes(out_features, in_features) / (out_features * in_features)


_SCALAR_F32 = "scalar"
FP8 = Format(
    name="fp8",
    hf_quant_algo="FP8",
    weight_dtype="F8_E4M3",
    element_bits=8,
    scales=(
        ScaleTensor("weight_scale", "F32", _SCALAR_F32),
        ScaleTensor("input_scale", "F32", _SCALAR_F32),
    ),
    modelopt_cfg={"num_bits": (4, 3), "axis": None},
)
NVFP4 = Format(
    name="nvfp4",
    hf_quant_algo="NVFP4",
    weight_dtype="U8",
    element_bits=4,
    scales=(
        ScaleTensor("weight_scale", "F8_E4M3", "per_block"),
        ScaleTensor("weight_scale_2", "F32", _SCALAR_F32),
        ScaleTensor("input_scale", "F32", _SCALAR_F32),
    ),
    modelopt_cfg={
        "num_bits": (2, 1),
        "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)},
    },
    block_size=16,
)
BF16 = Format(
    name="bf16",
    hf_quant_algo=None,
    weight_dtype="BF16",
    element_bits=16,
    scales=(),
    modelopt_cfg=None,
)

FORMATS: dict[str, Format] = {f.name: f for f in (FP8, NVFP4, BF16)}

#: FP8 KV cache: one F32 scalar per attention layer beside each of these projections.
KV_CACHE_SCALES: dict[str, tuple[str, str]] = {
    "k_scale": ("k_proj", "F32"),
    "v_scale": ("v_proj", "F32"),
}


def get_format(name: str) -> Format:
    """The registry entry of ``name`` (``fp8``, ``nvfp4`` or ``bf16``).

    Raises:
        KeyError: naming the known formats.
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None
