"""modelopt's export with its packing functions replaced: the FP8 division in float32
(single rounding), and NVFP4 packing that gives modelopt's bytes with less memory traffic
(coding by table lookup, the per-block amax in one integer pass, each weight's block
scales computed once), a slice of rows at a time into buffers kept across weights.

Policy: modelopt 0.47 is the quantization engine and its exporter stays in charge of what
is exported (``omniquant.quantize.export`` runs its handlers layer by layer); only the
per-element kernels it calls are swapped, inside ``fast_packing()``. The NVFP4
replacements compute modelopt's own per-element operations on the same dtypes, so their
output is modelopt's byte for byte (tests/test_numerics_fast_paths.py, the export pins).
The FP8 one differs from modelopt on purpose: it divides in float32, where modelopt
rounds the quotient to BF16 first (``fast_packing``). Anything outside the shapes and
dtypes a replacement was written for goes to modelopt's original. On the CPU, weights of
``kernels.MIN_ELEMENTS`` or more are packed by fused compiled kernels
(``omniquant.quantize.kernels``: the same expressions, one pass each); the eager code
here is what they replace where they do not run, and what they are tested against.

Why: on the CPU modelopt's packing allocates several whole-weight temporaries per weight
(float32 upcasts, int32 class indices, packing halves). When the export's mmap threshold
was 128 KiB (``omniquant/quantize/heap.py``) every one of them was a fresh mapping whose
pages the kernel zero-fills: on the real-width slice that was most of the export's time;
a stacked-expert weight's temporaries (hundreds of MiB) still would be, under any
threshold. Mixed-dtype torch ops are avoided too, since on the CPU TensorIterator casts
their inputs to the common dtype up front (a hidden whole-slice temporary).
"""

from __future__ import annotations

import contextlib

import torch

#: ``_reused`` key of the float32 slice buffer FP8 packing and NVFP4 coding share.
_F32 = "float32 slice"


def _reused(scratch: dict | None, key: str, numel: int, dtype, device) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements, kept in ``scratch[key]`` across calls
    (made afresh when the kept one is too small or of another dtype or device; every call
    without ``scratch``). A fresh temporary of 32 MiB or more is a fresh mapping
    (``omniquant/quantize/heap.py``), whose pages the kernel zero-fills: reused, an export
    faults each buffer in once, not once per weight or slice."""
    held = scratch.get(key) if scratch is not None else None
    if held is None or held.numel() < numel or held.dtype != dtype or held.device != device:
        held = torch.empty(numel, dtype=dtype, device=device)
        if scratch is not None:
            scratch[key] = held
    return held


#: Elements per slice when FP8 weights are divided in float32 (16 Mi: 64 MiB of float32).
_FP8_SLICE_ELEMENTS = 1 << 24


def _fp8_single_rounded(
    weight: torch.Tensor, scale: torch.Tensor, scratch: dict | None = None
) -> torch.Tensor:
    """``(weight.float() / scale).to(float8_e4m3fn)``, a slice of leading rows at a time.

    The same elementwise operations as dividing the whole upcast weight, so the same
    bytes, without a float32 copy of the whole weight (4 bytes per element) beside it.
    ``scale`` broadcasts to ``weight``; a per-row or per-expert scale is sliced with it.
    ``scratch``: where its float32 buffer is kept for the next call (``_reused``).
    """
    from omniquant.quantize import kernels

    fused = kernels.run("fp8", weight, scale, elements=weight.numel())
    if fused is not None:  # the same expression in one pass (omniquant.quantize.kernels)
        return fused
    rows = weight.shape[0] if weight.dim() else 1
    if weight.dim() == 0 or rows <= 1:
        return (weight.float() / scale).to(torch.float8_e4m3fn)
    out = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    per_row = max(1, weight[0].numel())
    step = max(1, _FP8_SLICE_ELEMENTS // per_row)
    sliced = scale.dim() == weight.dim() and scale.shape[0] == rows
    # One float32 buffer for every slice (and, with scratch, every weight).
    buf = _reused(scratch, _F32, min(step, rows) * per_row, torch.float32, weight.device)
    for i in range(0, rows, step):
        w = weight[i : i + step]
        f = buf[: w.numel()].view(w.shape)
        f.copy_(w)  # the exact upcast .float() makes
        f.div_(scale[i : i + step] if sliced else scale)  # float32 division, as before
        out[i : i + step].copy_(f)  # the same cast to E4M3 as .to(float8_e4m3fn)
    return out


#: Weight dtypes whose upcast to float32 is exact, so that copying into a float32 buffer
#: and dividing there computes what a mixed-dtype division computes.
_UPCAST_EXACTLY = (torch.bfloat16, torch.float16, torch.float32)

#: Elements per slice when NVFP4 weights are scaled and coded (8 Mi: 32 MiB of float32).
_NVFP4_SLICE_ELEMENTS = 1 << 23


def _nvfp4_sliced(orig, weight, block_scale, quantization, global_scale, block_size, scratch):
    """modelopt's NVFP4 ``to_quantized_weight(weight, block_scale, quantization, global_scale,
    block_size)`` (``NVFP4QTensor.quantize`` with the block scales given), a slice of leading
    rows (or experts) at a time, into buffers reused across slices and weights.

    Its three steps, each per element or per 16-element block along the last dimension,
    with the same torch operations on the same dtypes: divide the weight (viewed as
    blocks) by ``(block_scale.float() * global_scale)`` in float32, E2M1-code it
    (``e2m1_codes``, as ``_cast_fp4`` is replaced for the whole export), pack two codes
    per byte (odd element high nibble). A slice of rows gives that slice's bytes exactly,
    so the output is modelopt's, byte for byte (tests/test_numerics_fast_paths.py, the
    export pins). What this saves: modelopt allocates the float32 quotient, the codes and
    two packing temporaries afresh for each whole weight (6 bytes per element; with the
    export's mmap threshold at 128 KiB every page of it was a fresh zero-filled page:
    13 M page faults and 30 s of system time on the real-width slice). Shapes and dtypes
    it was not written for go to ``orig``.
    """
    per_expert = global_scale is not None and global_scale.dim() != 0
    if (
        weight.dim() < 2
        or weight.shape[-1] % (2 * block_size)
        or block_scale is None
        or block_scale.shape != (*weight.shape[:-1], weight.shape[-1] // block_size)
        or (per_expert and (weight.dim() != 3 or global_scale.numel() != weight.shape[0]))
        or weight.dtype not in _UPCAST_EXACTLY  # a float64 weight would divide in float64
        or global_scale is None
        or global_scale.dtype != torch.float32  # another dtype could promote the product
    ):
        return orig(weight, block_scale, quantization, global_scale, block_size)
    rows = weight.shape[0]
    step = max(1, _NVFP4_SLICE_ELEMENTS // max(1, weight[0].numel()))
    need = min(step, rows) * weight[0].numel()
    eager = None  # the eager path's kept buffers, taken only when a slice needs them
    out = torch.empty(
        (*weight.shape[:-1], weight.shape[-1] // 2), dtype=torch.uint8, device=weight.device
    )
    with torch.no_grad():
        for i in range(0, rows, step):
            scale = global_scale[i : i + step].view(-1, 1, 1) if per_expert else global_scale
            if _nvfp4_slice_fused(weight[i : i + step], block_scale[i : i + step], scale,
                                  block_size, out[i : i + step], weight.numel()):  # fmt: skip
                continue
            if eager is None:
                eager = _eager_buffers(scratch, need, block_size, weight.device)
            _nvfp4_slice(weight[i : i + step], block_scale[i : i + step], scale, block_size,
                         *eager, out[i : i + step])  # fmt: skip
    return out


def _eager_buffers(scratch: dict | None, need: int, block_size: int, device) -> tuple:
    """``_nvfp4_slice``'s quotient, denominators, codes and E2M1 work buffers for slices of
    ``need`` elements, kept in ``scratch`` (``_reused``)."""
    return (
        _reused(scratch, _F32, need, torch.float32, device),
        _reused(scratch, "nvfp4 denominators", need // block_size, torch.float32, device),
        _reused(scratch, "nvfp4 codes", need, torch.uint8, device),
        scratch.setdefault("e2m1 work", {}) if scratch is not None else None,
    )


def _nvfp4_slice_fused(w, block_scale, scale, block_size, packed, elements: int) -> bool:
    """``_nvfp4_slice``'s bytes by the compiled kernels (``omniquant.quantize.kernels``):
    the float32 quotient by ``(block_scale.float() * scale)`` and its E2M1 code in one
    pass, the pairing of codes into bytes in a second. False where they do not run
    (``elements``: the whole weight's, which decides), and nothing was written."""
    from omniquant.quantize import kernels

    blocks = w.view((*w.shape[:-1], -1, block_size))
    per_block = scale.unsqueeze(-1) if scale.dim() else scale  # [e, 1, 1] -> [e, 1, 1, 1]
    coded = kernels.run("nvfp4_codes", blocks, block_scale.unsqueeze(-1), per_block,
                        elements=elements)  # fmt: skip
    if coded is None:
        return False
    pairs = kernels.run("nvfp4_pairs", coded.view(-1).view(torch.int16), elements=elements)
    if pairs is None:
        return False
    packed.copy_(pairs.view(packed.shape))
    return True


def _nvfp4_slice(w, block_scale, scale, block_size, quotient, denominators, codes, work, packed):
    """One slice of ``_nvfp4_sliced``: quotient and codes in the given buffers, packed
    bytes into ``packed``."""
    from omniquant.numerics.nvfp4 import e2m1_codes

    # (block_scale.float() * scale) into a kept float32 buffer: the same float32 products
    # (``_nvfp4_sliced`` only comes here with a float32 scale), no fresh temporaries.
    d = denominators[: block_scale.numel()].view(block_scale.shape)
    d.copy_(block_scale)
    denom = d.mul_(scale).unsqueeze(-1)
    blocks = w.view((*w.shape[:-1], -1, block_size))
    scaled = quotient[: w.numel()].view(blocks.shape)
    # The upcast first, then the float32 division in place: what modelopt's
    # ``blocks / denom`` computes (bf16 -> float32 is exact), without the float32 copy of
    # the slice that a mixed-dtype ``torch.div`` makes on the CPU (TensorIterator casts
    # its inputs to the common dtype up front: a fresh, page-faulted temporary per slice).
    scaled.copy_(blocks)
    scaled.div_(denom)
    coded = e2m1_codes(scaled.view(w.shape), out=codes[: w.numel()], work=work)
    torch.bitwise_left_shift(coded[..., 1::2], 4, out=packed)
    packed.bitwise_or_(coded[..., 0::2])


#: Blocks per chunk in ``_last_dim_block_amax`` (2 Mi elements of 16-element blocks).
_AMAX_CHUNK_BLOCKS = 1 << 17


#: Float dtype -> (integer dtype of its bits, mask clearing the sign bit).
_MAGNITUDE_BITS = {
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
}


def _last_dim_block_amax(original, scratch: dict | None = None):
    """modelopt's ``reduce_block_amax`` for blocks along the last dimension, in one chunked
    pass: ``max(|x|)`` per block equals its ``max(|max|, |min|)`` bit for bit (same dtype),
    without its full clone of the weight and two strided reductions. A block holding NaN
    (whose sign bit differs between the two) and other block layouts go to ``original``.
    ``scratch``: where its chunk buffer is kept across weights (``_reused``)."""

    def reduce_block_amax(input_tensor: torch.Tensor, block_sizes: dict):
        dims = list(block_sizes)
        last = input_tensor.dim() - 1
        if len(dims) != 1 or dims[0] not in (-1, last) or input_tensor.dim() == 0:
            return original(input_tensor, block_sizes)
        bs = block_sizes[dims[0]]
        if input_tensor.shape[-1] % bs:
            return original(input_tensor, block_sizes)
        with torch.no_grad():
            blocks = input_tensor.reshape(-1, bs)
            out = torch.empty(blocks.shape[0], dtype=input_tensor.dtype, device=input_tensor.device)
            # |x| as the bits with the sign cleared, compared as integers: for every value
            # but NaN the same order and the same winner's bits as max(abs(x)) (-0.0 and 0.0
            # both become 0), and an integer max is the faster reduction. NaN bits sort
            # above Inf's, so a NaN block still comes out NaN and goes to modelopt below.
            as_int, mask = _MAGNITUDE_BITS.get(blocks.dtype, (blocks.dtype, None))
            held = _reused(scratch, "block |x|", _AMAX_CHUNK_BLOCKS * bs, as_int, blocks.device)
            out_as = out.view(as_int)
            for i in range(0, blocks.shape[0], _AMAX_CHUNK_BLOCKS):
                chunk = blocks[i : i + _AMAX_CHUNK_BLOCKS]
                magnitude = held[: chunk.numel()].view(chunk.shape)
                if mask is None:
                    torch.abs(chunk, out=magnitude)
                else:
                    torch.bitwise_and(chunk.view(as_int), mask, out=magnitude)
                torch.amax(magnitude, dim=-1, out=out_as[i : i + _AMAX_CHUNK_BLOCKS])
            if torch.isnan(out).any():  # NaN's sign bit follows modelopt's ops: let it decide
                return original(input_tensor, block_sizes)
            return out.view(*input_tensor.shape[:-1], input_tensor.shape[-1] // bs)

    return reduce_block_amax


def _fused_block_scales(original):
    """modelopt 0.47's ``NVFP4QTensor.get_weights_scaling_factor`` (its function, not the
    classmethod) with the common case computed by the compiled ``nvfp4_scales`` kernel
    (``omniquant.quantize.kernels``): a weight of an exactly-upcast dtype, blocks
    along the last dimension, a given float32 ``weights_scaling_factor_2`` of one element,
    E4M3 output. The same expression (block amax, ``/ (E2M1_MAX * wsf2)``, zeros to 1,
    clamp, cast) in one pass; a block holding NaN, and every other case, go to
    ``original``."""

    def get_weights_scaling_factor(cls, input, block_size, weights_scaling_factor_2=None,
                                   keep_high_precision=False):  # fmt: skip
        from omniquant.quantize import kernels

        wsf2 = weights_scaling_factor_2
        if (
            not keep_high_precision
            and isinstance(input, torch.Tensor)
            and isinstance(wsf2, torch.Tensor)
            and input.dtype in _UPCAST_EXACTLY
            and wsf2.dtype == torch.float32
            and wsf2.numel() == 1
            and wsf2.dim() <= input.dim()  # broadcasting adds no leading dimension
            and input.dim() >= 1
            and isinstance(block_size, int)
            and block_size > 0
            and input.shape[-1] % block_size == 0
        ):
            blocks = input.reshape(*input.shape[:-1], -1, block_size)
            fused = kernels.run("nvfp4_scales", blocks, wsf2.reshape(()), elements=input.numel())
            if fused is not None and not bool(fused[1]):
                return fused[0], wsf2
        return original(cls, input, block_size, wsf2, keep_high_precision)

    return get_weights_scaling_factor


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` views the same memory as ``b`` (held alive by the caller, so its address cannot
    have been reused), the same way. Whether it was written since is the caller's check:
    views of one memory share a version counter, so comparing theirs proves nothing."""
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


class _BlockScalesOnce:
    """modelopt 0.47's ``NVFP4QTensor.get_weights_scaling_factor``, computed once per weight.

    ``_export_quantized_weight`` computes an NVFP4 weight's per-block scales twice: through
    ``get_weight_scaling_factor`` (registered as a buffer), then again from the registered
    ``weight_scale_2``, and the second result replaces the first. For a dynamic weight
    quantizer both calls run this function on the same weight with the same block size and
    global scale, so the second gets a copy of the first's result instead of another pass
    over the weight (block amax, float32 upcast, division, cast to E4M3: a third of the
    slice's NVFP4 export). Only an exact repeat hits: the same memory viewed the same way
    and not written since (its version counter), equal block size and flag, and a global
    scale equal in shape, dtype and every value; anything else is computed. The previous
    call's weight is held only until the next call (``clear``: after each packing).
    """

    def __init__(self, original):
        self.original = original  # the classmethod's function
        self.last: tuple | None = None
        self.hits = 0

    def clear(self) -> None:
        self.last = None

    def __call__(self, cls, input, block_size, weights_scaling_factor_2=None, keep_high_precision=False):
        last, self.last = self.last, None
        wsf2 = weights_scaling_factor_2
        key = (block_size, keep_high_precision)
        if last is not None and isinstance(wsf2, torch.Tensor) and isinstance(input, torch.Tensor):
            held, held_wsf2, held_key, scales, version = last
            if (
                held_key == key
                and version == input._version
                and _same_tensor(input, held)
                and held_wsf2.shape == wsf2.shape
                and held_wsf2.dtype == wsf2.dtype
                and held_wsf2.device == wsf2.device
                and torch.equal(held_wsf2, wsf2)
            ):
                self.hits += 1
                return scales.clone(), wsf2
        scales, wsf2_out = self.original(cls, input, block_size, wsf2, keep_high_precision)
        if isinstance(wsf2, torch.Tensor) and isinstance(input, torch.Tensor):
            self.last = (input, wsf2.detach().clone(), key, scales.detach().clone(), input._version)
        return scales, wsf2_out


@contextlib.contextmanager
def fast_packing():
    """Make modelopt's FP8 weight packing divide in fp32, and its NVFP4 rounding one pass.

    modelopt 0.47's ``to_quantized_weight`` computes ``weight / scale`` in the
    weight's dtype; for BF16 weights that rounds to BF16 before the cast to E4M3,
    and ties land one FP8 step away from what its own fake-quantized model (and a
    single rounding) gives. Here the division is in float32, a slice of rows at a time
    (``_fp8_single_rounded``), so memory stays flat.
    NVFP4: ``NVFP4QTensor._cast_fp4`` (eight passes over the scaled weight) is replaced by
    ``omniquant.numerics.nvfp4.e2m1_codes`` (one table lookup, chunks), code for code the same
    (tests/test_numerics_fast_paths.py; the export pins hold the bytes), and its per-block
    amax (``reduce_block_amax``: a clone of the weight plus two reductions) by one
    chunked max over the sign-cleared bits (``_last_dim_block_amax``); its packing goes a
    slice at a time into kept buffers (``_nvfp4_sliced``), and each weight's block scales
    are computed once, not twice (``_BlockScalesOnce``).
    """
    import modelopt.torch.export.unified_export_hf as ueh
    from modelopt.torch.export.model_config import QUANTIZATION_FP8, QUANTIZATION_NVFP4
    from modelopt.torch.quantization.qtensor import nvfp4_tensor as nvfp4_module
    from modelopt.torch.quantization.qtensor.base_qtensor import QTensorWrapper
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from omniquant.numerics.nvfp4 import e2m1_codes

    orig = ueh.to_quantized_weight
    scratch: dict = {}  # buffers the packing and the block amax reuse across weights
    orig_cast = NVFP4QTensor.__dict__["_cast_fp4"]
    orig_block_amax = nvfp4_module.reduce_block_amax
    orig_scales = NVFP4QTensor.__dict__["get_weights_scaling_factor"]
    scales_once = _BlockScalesOnce(_fused_block_scales(orig_scales.__func__))

    def to_quantized_weight(weight, weights_scaling_factor, quantization, *args, **kwargs):
        scales_once.clear()  # both scale computations of this weight are behind it
        if (
            quantization == QUANTIZATION_FP8
            and isinstance(weight, torch.Tensor)
            and not isinstance(weight, QTensorWrapper)
            and weight.dtype in (torch.bfloat16, torch.float16)
            and weights_scaling_factor is not None
        ):
            scale = weights_scaling_factor.to(weight.device)
            if weight.dim() == 3:  # stacked experts: modelopt's per-expert broadcast
                scale = scale.unsqueeze(-1)
            return _fp8_single_rounded(weight, scale, scratch)
        if (
            quantization == QUANTIZATION_NVFP4
            and isinstance(weight, torch.Tensor)
            and not isinstance(weight, QTensorWrapper)
            and len(args) == 2
            and not kwargs
        ):
            return _nvfp4_sliced(
                orig, weight, weights_scaling_factor, quantization, *args, scratch=scratch
            )
        return orig(weight, weights_scaling_factor, quantization, *args, **kwargs)

    ueh.to_quantized_weight = to_quantized_weight
    NVFP4QTensor._cast_fp4 = classmethod(lambda cls, weight: e2m1_codes(weight))
    nvfp4_module.reduce_block_amax = _last_dim_block_amax(orig_block_amax, scratch)
    NVFP4QTensor.get_weights_scaling_factor = classmethod(scales_once)
    try:
        yield
    finally:
        ueh.to_quantized_weight = orig
        NVFP4QTensor._cast_fp4 = orig_cast
        nvfp4_module.reduce_block_amax = orig_block_amax
        NVFP4QTensor.get_weights_scaling_factor = orig_scales
