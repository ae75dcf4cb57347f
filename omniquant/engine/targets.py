"""GPU generations an engine bundle can target, and what each one can run.

Policy: a bundle is built for exactly one GPU generation. The checkpoint's
precision is checked against it before anything is copied: NVFP4 GEMMs need
Blackwell (SM100+), so an NVFP4 checkpoint, or a MIXED_PRECISION one with any
NVFP4 layer, is refused for Hopper with a message that points at the FP8 recipe.
FP8 per-tensor weights, an FP8 KV cache and BF16 run on both generations.

The MoE backend is chosen per target: TensorRT-LLM's TRTLLM-gen kernels on
Blackwell (the backend NVIDIA deploys this model with on B200), CUTLASS on Hopper
(the TRTLLM-gen kernels are built for SM100/SM103 only).
"""

from __future__ import annotations

from dataclasses import dataclass

from omniquant.errors import EngineError

# The recipe to suggest when a checkpoint cannot run on Hopper.
FP8_RECIPE = "fp8_omni"


@dataclass(frozen=True)
class Target:
    """One GPU generation.

    Attributes:
        name: ``hopper`` or ``blackwell``.
        sm: Minimum compute capability as an integer (90, 100).
        moe_backend: ``moe_config.backend`` value for this generation.
        nvfp4: Whether NVFP4 GEMMs run natively.
    """

    name: str
    sm: int
    moe_backend: str
    nvfp4: bool


TARGETS: dict[str, Target] = {
    "hopper": Target(name="hopper", sm=90, moe_backend="CUTLASS", nvfp4=False),
    "blackwell": Target(name="blackwell", sm=100, moe_backend="TRTLLM", nvfp4=True),
}


def get_target(name: str) -> Target:
    """Return the ``Target`` called ``name``.

    Raises:
        EngineError: ``name`` is not a known target.
    """
    try:
        return TARGETS[name]
    except KeyError:
        raise EngineError(
            f"unknown engine target {name!r}; choose one of: {', '.join(TARGETS)}"
        ) from None


def nvfp4_on_hopper_message(checkpoint: str, what: str) -> str:
    """The refusal for an NVFP4-bearing checkpoint on Hopper (kept in one place for tests)."""
    return (
        f"{checkpoint}: {what}, and NVFP4 GEMMs need Blackwell (SM100+); target hopper is SM90. "
        f"Build with --target blackwell, or quantize again with the FP8 recipe "
        f"(--recipe {FP8_RECIPE}), which runs on Hopper and Blackwell."
    )
