"""The export's per-element packing as fused CPU kernels, compiled by ``torch.compile``.

What: three kernels, each one pass over a weight, computing what the eager packing in
``omniquant.quantize.packing`` computes op by op:

- ``fp8``: ``(weight.float() / scale).to(float8_e4m3fn)``;
- ``nvfp4_scales``: modelopt 0.47's ``NVFP4QTensor.get_weights_scaling_factor`` for a
  last-dimension block: block amax, ``/ (6 * weight_scale_2)``, zero -> 1, clamp to
  ``[2**-9, 448]``, cast to E4M3;
- ``nvfp4_codes`` and ``nvfp4_pairs``: the E2M1 code of ``weight / (block_scale *
  weight_scale_2)`` (``omniquant.numerics.nvfp4.e2m1_codes``' rule, written as
  comparisons), then two codes per byte, odd element in the high nibble.

Why compiled, not eager: every eager torch op is a pass over memory with its own
temporary. FP8 packing is three (upcast, divide, cast), the NVFP4 block scales five, the
NVFP4 coding and packing nine; on the 2-core machine the real-width slice's NVFP4 export
was bound by them (17.6 s, of which packing 8.4 s and block scales 5.2 s). Inductor fuses
each into one loop (measured on one 160 M-element bf16 weight: FP8 0.06 s against 0.40 s
eager; block scales 0.05 s against 0.26 s; coding and packing 0.17 s against 0.6 s).
``torch.compile`` is the library built for this; no kernel is written here by hand.

Exactness: each kernel is the eager expression, on the same dtypes, with every rounded
intermediate written in float32 explicitly (inductor does not round a bf16 intermediate
as eager does: a bf16 ``weight / scale`` would be single-rounded there and double-rounded
eagerly). Inductor's C++ keeps
IEEE semantics for what is used here (no unsafe-math or FP contraction:
``torch/_inductor/cpp_builder.py``): a correctly rounded float32 division, exact
comparisons, round-to-nearest-even casts. tests/test_kernels.py holds them to the eager
ops bit for bit: every E2M1 rounding class (ties, subnormals, +-0, Inf, NaN), every
bf16 value through FP8, blocks of zeros, tiny and huge blocks; the export pins hold the
bytes of whole checkpoints.

When they do not run (the caller then runs the eager ops, which give the same bytes):
an export they would not pay for (``worth_compiling``: each process pays about 3.5 s to
import dynamo and inductor and load the kernels from inductor's on-disk cache, about
10 s more the first time on a machine, to build them); a weight of fewer than
``MIN_ELEMENTS`` elements; ``OMNIQUANT_COMPILE=0`` in the environment; or a compile that
fails (inductor needs a C++ compiler: ``g++``), which is warned about once, naming the
cause, after which the process stays on the eager ops.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

#: Weights with fewer elements use the eager ops (tests lower it to 0).
MIN_ELEMENTS = 1 << 20

#: What compiling costs a process with inductor's cache warm (seconds; measured on the
#: 2-core machine: imports about 1.7 s, the four kernels' first calls about 1.8 s).
FIXED_SECONDS = 3.5
#: Export wall seconds the kernels save per weight element packed, by format (measured
#: on the 2-core machine on the real-width slice's 1856 x 2688 expert weights: NVFP4
#: block scales and packing about 10 ms eager, 4-6 ms compiled in the export; FP8
#: 2.5 ms against 0.66 ms). On the slice an NVFP4 export gains (2.6 G elements: about
#: 5 s), an FP8 one does not (about 1 s); the released model's gain either way.
SECONDS_SAVED_PER_ELEMENT = {"nvfp4": 2.0e-9, "fp8": 0.37e-9}


def worth_compiling(elements_by_format: dict[str, int]) -> bool:
    """Whether an export packing these weight elements (format -> count) saves more with
    the kernels than the process pays to compile them (``FIXED_SECONDS``)."""
    saved = sum(
        SECONDS_SAVED_PER_ELEMENT.get(fmt, 0.0) * n for fmt, n in elements_by_format.items()
    )
    return saved > FIXED_SECONDS


_allowed = [True]


@contextlib.contextmanager
def allowed(flag: bool):
    """Within it, ``run`` runs kernels only if ``flag`` (an export's ``worth_compiling``)."""
    _allowed.append(bool(flag))
    try:
        yield
    finally:
        _allowed.pop()


#: modelopt 0.47's ``E2M1_MAX`` and ``E4M3_MAX`` (``modelopt.torch.quantization.utils.
#: numeric_utils``; tests/test_kernels.py checks they are still modelopt's).
E2M1_MAX = 6.0
E4M3_MAX = 448.0
#: The smallest block scale modelopt keeps (``_cast_per_block_scale_to_fp8``).
MIN_BLOCK_SCALE = 2.0**-9

_F8 = torch.float8_e4m3fn


def _fp8(weight, scale):
    return (weight.float() / scale).to(_F8)


def _nvfp4_scales(blocks, weight_scale_2):
    # blocks [..., block]: modelopt's per-block amax (in the weight's dtype, then float32),
    # per_block_amax / (E2M1_MAX * weight_scale_2), zeros to 1.0, clamp, E4M3.
    amax = blocks.abs().amax(-1).float()
    scale = amax / (E2M1_MAX * weight_scale_2)
    scale = torch.where(scale == 0, 1.0, scale)
    has_nan = torch.isnan(amax).any()
    return scale.clamp(min=MIN_BLOCK_SCALE, max=E4M3_MAX).to(_F8), has_nan


def _e2m1(q):
    # The magnitude code is the number of rounding boundaries below |q|: a tie that rounds
    # to the even code nearer zero (0.25, 1.25, 2.5, 5) is not past its boundary (>), one
    # that rounds away (0.75, 1.75, 3.5) is (>=); saturating at 6 (code 7). The sign bit is
    # q < 0, so -0.0 gives code 0 and a small negative value code 8. NaN gets code 7, as in
    # modelopt's searchsorted. Summed in float32, one conversion at the end: inductor
    # vectorizes that; uint8 masks summed as uint8 it did not.
    a = q.abs()
    f = torch.float32
    code = (
        (a > 0.25).to(f) + (a >= 0.75).to(f) + (a > 1.25).to(f) + (a >= 1.75).to(f)
        + (a > 2.5).to(f) + (a >= 3.5).to(f) + (a > 5.0).to(f) + (q < 0).to(f) * 8.0
    )  # fmt: skip
    return torch.where(torch.isnan(q), 7.0, code)


def _nvfp4_codes(blocks, block_scale, weight_scale_2):
    # blocks [..., block], block_scale [..., 1] E4M3, weight_scale_2 broadcasting to it:
    # the float32 quotient by (block_scale.float() * weight_scale_2), coded.
    return _e2m1(blocks.float() / (block_scale.float() * weight_scale_2)).to(torch.uint8)


def _nvfp4_pairs(pairs):
    # pairs: the codes viewed as int16, even element in the low byte (little-endian), both
    # below 16: (v | v >> 4)'s low byte is even | odd << 4.
    return (pairs | (pairs >> 4)).to(torch.uint8)


_KERNELS = {
    "fp8": _fp8,
    "nvfp4_scales": _nvfp4_scales,
    "nvfp4_codes": _nvfp4_codes,
    "nvfp4_pairs": _nvfp4_pairs,
}
_compiled: dict = {}
#: Why the kernels are off for this process (None: on, as far as known).
_off: list[str] = []


def disabled_reason() -> str | None:
    """Why the compiled kernels are not used in this process, or None."""
    if os.environ.get("OMNIQUANT_COMPILE", "1").strip() == "0":
        return "OMNIQUANT_COMPILE=0"
    return _off[0] if _off else None


def run(name: str, *args, elements: int):
    """``name``'s compiled kernel on ``args``, or None where it does not run (too few
    ``elements``, not ``allowed`` for this export, switched off, a tensor off the CPU, or
    its compile failed: warned once); the caller then runs the eager ops."""
    if elements < MIN_ELEMENTS or not _allowed[-1] or disabled_reason() is not None:
        return None
    if any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
        return None  # written and tested for inductor's CPU code only
    fn = _compiled.get(name)
    if fn is None:
        fn = _compiled[name] = torch.compile(_KERNELS[name], dynamic=True, fullgraph=True)
    # Plain tensors: dynamo compiles an nn.Parameter with static shapes (one compile per
    # weight shape); a detached view of it is compiled once for every shape.
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    try:
        with torch.no_grad():
            return fn(*args)
    except Exception as err:  # noqa: BLE001 - any failure to build: the eager ops instead
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        _off.append(f"{type(err).__name__}: {first}")
        warnings.warn(
            f"omniquant.quantize.kernels: compiling the export's packing kernel {name!r} "
            f"failed ({_off[0]}); the export goes on with the eager torch ops (the same "
            "bytes, several times slower on large weights). Inductor needs a C++ compiler "
            "(g++) on PATH; set OMNIQUANT_COMPILE=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
