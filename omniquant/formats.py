"""The storage formats omniquant writes: one registry entry per format.

Policy: what a format *is* lives here, once: its recipe name, its ``quant_algo``
name in ``hf_quant_config.json``, the dtype and shape of the stored weight, every
scale tensor modelopt's exporter writes beside it (suffix, dtype, shape, role), its
block size, the modelopt quantizer config that produces it, and the
``omniquant.numerics`` functions that emulate it (dequantize the stored weight,
fake-quantize an activation). Every stage asks this registry instead of keeping
its own table or dtype branch: plan (modelopt config, size prediction), export
(which scales to write, ``quant_algo``, ``group_size``), audit (which scales to
check, with what dtype and shape), verify (which scales must be positive), inspect
(format of a stored weight, elements per byte), the reader models
(``omniquant.checkpoint.readers``) and the emulated loader (``omniquant.evaluate.emulated``).
Adding a format is one ``Format`` entry here plus its numerics.

Lookups: ``get_format`` (recipe name), ``by_quant_algo`` (``hf_quant_config``
name), ``by_stored_dtype`` (safetensors dtype name or torch dtype of a stored
``weight``). This follows torchao's config -> handler registry
(``quantization/transform_module.py``) in spirit: one place maps a format to
everything that handles it. It is not torchao's code because torchao registers
module-swapping handlers; here a format is data read by stages that work on files.

``import omniquant.formats`` stays cheap: torch and ``omniquant.numerics`` are
imported only by the methods that need them.

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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: safetensors dtype name -> (bytes per element, ``torch`` dtype attribute name).
#: The one dtype table: safetensors names are what headers say, torch names what
#: loaded tensors say.
_DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "I16": (2, "int16"),
    "I32": (4, "int32"),
    "I64": (8, "int64"),
    "BOOL": (1, "bool"),
}

#: Bytes per element of the safetensors dtype names used by the exports.
DTYPE_BYTES: dict[str, int] = {name: nbytes for name, (nbytes, _) in _DTYPES.items()}


def torch_dtype(name: str) -> Any:
    """The ``torch.dtype`` of a safetensors dtype name (``F8_E4M3`` -> ``torch.float8_e4m3fn``).

    Raises:
        KeyError: naming the known dtype names.
    """
    import torch

    try:
        return getattr(torch, _DTYPES[name][1])
    except KeyError:
        raise KeyError(f"unknown safetensors dtype {name!r}; known: {', '.join(_DTYPES)}") from None


def safetensors_dtype(dtype: Any) -> str:
    """The safetensors dtype name of a ``torch.dtype`` (``torch.uint8`` -> ``U8``).

    Raises:
        KeyError: the dtype has no safetensors name here.
    """
    attr = str(dtype).removeprefix("torch.")
    for name, (_, torch_name) in _DTYPES.items():
        if torch_name == attr:
            return name
    raise KeyError(f"{dtype} has no safetensors dtype name; known: {', '.join(_DTYPES)}")


@dataclass(frozen=True)
class ScaleTensor:
    """One tensor written beside a quantized weight."""

    suffix: str
    dtype: str
    #: ``"scalar"`` (shape ``[]``) or ``"per_block"`` (shape ``[out, in / block]``).
    kind: str
    #: ``"weight"``: an argument of the format's dequantize function, in declaration
    #: order; ``"input"``: the activation scale its fake-quant function takes.
    role: str = "weight"

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
    #: Name in ``omniquant.numerics`` of ``fn(weight, *weight scales, dtype=...)`` that
    #: dequantizes the stored weight (None: stored in high precision).
    dequantize_fn: str | None = None
    #: Name in ``omniquant.numerics`` of ``fn(x, input_scale)`` that fake-quantizes an
    #: activation as the serving kernel does (None: activations stay high precision).
    activation_quantizer_fn: str | None = None
    #: Name in ``omniquant.numerics`` of ``factory(input_scale, ...) -> (x -> fn(x, input_scale))``:
    #: the same function with the scale checked once, for hooks called on every forward.
    activation_quantizer_factory: str | None = None

    @property
    def quantized(self) -> bool:
        """Whether ``hf_quant_config.json`` names this format (False for bf16)."""
        return self.hf_quant_algo is not None

    @property
    def scale_suffixes(self) -> tuple[str, ...]:
        """Suffixes of every scale tensor stored beside a weight, in declaration order."""
        return tuple(s.suffix for s in self.scales)

    @property
    def weight_scale_suffixes(self) -> tuple[str, ...]:
        """Scales the dequantize function takes after the weight, in its argument order."""
        return tuple(s.suffix for s in self.scales if s.role == "weight")

    @property
    def input_scale_suffix(self) -> str | None:
        """The activation scale's suffix (None for bf16)."""
        return next((s.suffix for s in self.scales if s.role == "input"), None)

    @property
    def values_per_element(self) -> int:
        """Weight values held by one stored element (2 for NVFP4's U8 bytes)."""
        return 8 * DTYPE_BYTES[self.weight_dtype] // self.element_bits

    @property
    def weight_torch_dtype(self) -> Any:
        """The ``torch.dtype`` of the stored weight."""
        return torch_dtype(self.weight_dtype)

    def _numerics(self, attr: str) -> Callable:
        import omniquant.numerics

        return getattr(omniquant.numerics, attr)

    def _block_kwargs(self) -> dict[str, int]:
        return {} if self.block_size is None else {"block_size": self.block_size}

    def dequantize(self, weight: Any, scales: Mapping[str, Any], dtype: Any) -> Any:
        """The high-precision weight from its stored tensor and ``scales`` (suffix -> tensor).

        Raises:
            ValueError: bf16 has nothing to dequantize.
            KeyError: a weight scale is missing from ``scales``.
        """
        if self.dequantize_fn is None:
            raise ValueError(
                f"format {self.name} is stored in high precision; nothing to dequantize"
            )
        args = [scales[suffix] for suffix in self.weight_scale_suffixes]
        return self._numerics(self.dequantize_fn)(
            weight, *args, dtype=dtype, **self._block_kwargs()
        )

    def activation_quantizer(self, input_scale: Any) -> Callable[[Any], Any]:
        """``x -> fake-quantized x`` under the stored ``input_scale``, as serving computes it.

        Raises:
            ValueError: bf16 activations are not quantized.
        """
        if self.activation_quantizer_fn is None:
            raise ValueError(f"format {self.name} does not quantize activations")
        kwargs = self._block_kwargs()
        if self.activation_quantizer_factory is not None:
            return self._numerics(self.activation_quantizer_factory)(input_scale, **kwargs)
        fn = self._numerics(self.activation_quantizer_fn)
        return lambda x: fn(x, input_scale, **kwargs)

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
        per_byte = self.values_per_element
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
        ScaleTensor("input_scale", "F32", _SCALAR_F32, role="input"),
    ),
    modelopt_cfg={"num_bits": (4, 3), "axis": None},
    dequantize_fn="dequantize_fp8",
    activation_quantizer_fn="fake_quant_fp8",
    activation_quantizer_factory="fp8_activation_quantizer",
)
#: NVFP4 elements per E4M3 block scale (the modelopt config and the stored layout share it).
_NVFP4_BLOCK = 16
NVFP4 = Format(
    name="nvfp4",
    hf_quant_algo="NVFP4",
    weight_dtype="U8",
    element_bits=4,
    scales=(
        ScaleTensor("weight_scale", "F8_E4M3", "per_block"),
        ScaleTensor("weight_scale_2", "F32", _SCALAR_F32),
        ScaleTensor("input_scale", "F32", _SCALAR_F32, role="input"),
    ),
    modelopt_cfg={
        "num_bits": (2, 1),
        "block_sizes": {-1: _NVFP4_BLOCK, "type": "dynamic", "scale_bits": (4, 3)},
    },
    block_size=_NVFP4_BLOCK,
    dequantize_fn="dequantize_nvfp4",
    activation_quantizer_fn="fake_quant_nvfp4_activation",
    activation_quantizer_factory="nvfp4_activation_quantizer",
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

#: Format names, fewest stored bits first (the column order of tables).
NARROWEST_FIRST: tuple[str, ...] = tuple(sorted(FORMATS, key=lambda n: FORMATS[n].element_bits))

#: Every weight-scale suffix any format stores (weight_scale, weight_scale_2, input_scale).
SCALE_SUFFIXES: tuple[str, ...] = tuple(
    dict.fromkeys(s.suffix for f in FORMATS.values() for s in f.scales)
)

#: FP8 KV cache: one F32 scalar per attention layer beside each of these projections.
KV_CACHE_SCALES: dict[str, tuple[str, str]] = {
    "k_scale": ("k_proj", "F32"),
    "v_scale": ("v_proj", "F32"),
}
#: The format the KV cache is quantized to (``kv_cache: fp8``): its activation
#: quantizer emulates the cache and its ``quant_algo`` is ``kv_cache_quant_algo``.
KV_CACHE_FORMAT = FP8
KV_SCALE_SUFFIXES: tuple[str, ...] = tuple(KV_CACHE_SCALES)

#: Suffixes that are a per-tensor scalar wherever they are stored (so must be > 0):
#: a suffix that is per-block in any format (NVFP4's weight_scale) is not one.
SCALAR_SCALE_SUFFIXES: tuple[str, ...] = (
    tuple(
        suffix
        for suffix in SCALE_SUFFIXES
        if all(s.kind == "scalar" for f in FORMATS.values() for s in f.scales if s.suffix == suffix)
    )
    + KV_SCALE_SUFFIXES
)


def get_format(name: str) -> Format:
    """The registry entry of ``name`` (``fp8``, ``nvfp4`` or ``bf16``).

    Raises:
        KeyError: naming the known formats.
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None


def by_quant_algo(algo: str | None) -> Format | None:
    """The format whose ``hf_quant_config`` ``quant_algo`` is ``algo`` (case-insensitive).

    None for an unknown name, None, and ``MIXED_PRECISION`` (not one format).
    """
    if not isinstance(algo, str):
        return None
    return next(
        (f for f in FORMATS.values() if f.quantized and f.hf_quant_algo == algo.upper()), None
    )


def by_stored_dtype(dtype: Any) -> Format | None:
    """The format whose stored ``weight`` has ``dtype`` (a safetensors name or a torch dtype).

    None for a dtype no format stores its weights in (F32, F16: high precision, but not
    the bf16 format).
    """
    if not isinstance(dtype, str):
        try:
            dtype = safetensors_dtype(dtype)
        except KeyError:
            return None
    return next((f for f in FORMATS.values() if f.weight_dtype == dtype), None)
