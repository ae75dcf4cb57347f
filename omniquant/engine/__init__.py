"""TensorRT-LLM engine bundles for Hopper and Blackwell.

Policy: a bundle is everything a GPU host needs to bring up the TensorRT-LLM
engine of one checkpoint for one GPU generation (see ``bundle`` for its layout).
Building a bundle (``build_engine_bundle``) runs anywhere and never imports
``tensorrt_llm``. Loading the engine, warming it up and the text/image/video/audio
smoke test (``validate_engine``) run only on a GPU host with ``tensorrt_llm``
>= 1.3.0rc13 installed; there ``tensorrt_llm`` is imported inside that function.
Importing this package imports neither tensorrt_llm nor torch.
"""

from __future__ import annotations

from omniquant.engine.bundle import (
    TENSORRT_LLM_MIN_VERSION,
    BundleResult,
    build_engine_bundle,
    check_compatibility,
)
from omniquant.engine.checkpoint import CheckpointInfo, QuantInfo, read_checkpoint
from omniquant.engine.options import (
    LlmApiOptions,
    load_llm_api_options,
    validate_llm_api_options,
)
from omniquant.engine.targets import TARGETS, Target
from omniquant.engine.validate import ValidationReport, engine_host_status, validate_engine

__all__ = [
    "TARGETS",
    "TENSORRT_LLM_MIN_VERSION",
    "BundleResult",
    "CheckpointInfo",
    "LlmApiOptions",
    "QuantInfo",
    "Target",
    "ValidationReport",
    "build_engine_bundle",
    "check_compatibility",
    "engine_host_status",
    "load_llm_api_options",
    "read_checkpoint",
    "validate_engine",
    "validate_llm_api_options",
]
