"""The LLM API options file (``extra_llm_api_options`` YAML) and its schema.

Policy: omniquant writes only the fields below, with the names and types
TensorRT-LLM documents for ``tensorrt_llm.LLM`` / ``TorchLlmArgs`` (>= 1.3.0rc13):
``max_batch_size``, ``max_seq_len``, ``enable_chunked_prefill``,
``kv_cache_config`` (``KvCacheConfig``: ``dtype``, ``mamba_ssm_cache_dtype``,
``enable_block_reuse``, ``free_gpu_memory_fraction``), ``cuda_graph_config``
(``batch_sizes``, ``max_batch_size``, ``enable_padding``) and ``moe_config``
(``MoeConfig``: ``backend``). Every model forbids unknown keys, so a misspelt key
fails here, naming the file and the key path, instead of being shipped. The same schema
validates a bundle's file again before the engine is loaded, so a hand edit that
breaks it is caught too.

The values follow NVIDIA's deployment guidance for NemotronH omni models:

* Mamba SSM state in float32 (lower precision state drifts; vLLM changed its
  default for the same reason).
* KV-cache block reuse off: TensorRT-LLM does not support prefix reuse for the
  Nemotron Nano VL family, nor KV-cache reuse with multimodal inputs.
* ``free_gpu_memory_fraction`` 0.6: the vision and audio encoders allocate
  activations outside the KV-cache pool (NVIDIA's multimodal quick start lowers the
  fraction to 0.6 for the same reason).
* CUDA graphs for batch sizes 1, 2, 4, ... up to ``max_batch_size``, with padding.
* Chunked prefill off when the model takes video: TensorRT-LLM does not support
  chunked prefill with video input.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from omniquant.errors import EngineError
from omniquant.schema import FieldProblem, StrictTyped, allowed_fields, field_problems

FREE_GPU_MEMORY_FRACTION = 0.6
MAMBA_SSM_CACHE_DTYPE = "float32"

# Documented values of MoeConfig.backend (TensorRT-LLM 1.3).
MoeBackend = Literal[
    "AUTO", "CUTLASS", "CUTEDSL", "TRTLLM", "DEEPGEMM", "DENSEGEMM", "VANILLA", "TRITON",
    "MARLIN", "MEGAMOE_DEEPGEMM", "MEGAMOE_CUTEDSL",
]  # fmt: skip


class KvCacheOptions(StrictTyped):
    """``kv_cache_config`` (TensorRT-LLM ``KvCacheConfig``), the fields omniquant sets."""

    dtype: Literal["auto", "fp8"]
    mamba_ssm_cache_dtype: Literal["auto", "float16", "bfloat16", "float32"]
    enable_block_reuse: bool
    free_gpu_memory_fraction: float = Field(gt=0.0, le=1.0)


class CudaGraphOptions(StrictTyped):
    """``cuda_graph_config`` (TensorRT-LLM ``CudaGraphConfig``)."""

    batch_sizes: list[int] = Field(min_length=1)
    max_batch_size: int = Field(ge=1)
    enable_padding: bool

    @model_validator(mode="after")
    def _consistent(self) -> CudaGraphOptions:
        # TensorRT-LLM derives max_batch_size from batch_sizes and rejects a mismatch.
        if any(b < 1 for b in self.batch_sizes) or self.batch_sizes != sorted(
            set(self.batch_sizes)
        ):
            raise ValueError("batch_sizes must be distinct positive integers in ascending order")
        if self.max_batch_size != self.batch_sizes[-1]:
            raise ValueError(
                f"max_batch_size {self.max_batch_size} must equal max(batch_sizes) "
                f"{self.batch_sizes[-1]}"
            )
        return self


class MoeOptions(StrictTyped):
    """``moe_config`` (TensorRT-LLM ``MoeConfig``)."""

    backend: MoeBackend


class LlmApiOptions(StrictTyped):
    """The ``extra_llm_api_options`` YAML omniquant writes (``tensorrt_llm.LLM`` keyword args)."""

    max_batch_size: int = Field(ge=1)
    max_seq_len: int = Field(ge=1)
    enable_chunked_prefill: bool | None = None
    kv_cache_config: KvCacheOptions
    cuda_graph_config: CudaGraphOptions
    moe_config: MoeOptions

    @model_validator(mode="after")
    def _graphs_fit_batch(self) -> LlmApiOptions:
        if self.cuda_graph_config.max_batch_size > self.max_batch_size:
            raise ValueError(
                f"cuda_graph_config.max_batch_size {self.cuda_graph_config.max_batch_size} "
                f"exceeds max_batch_size {self.max_batch_size}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The YAML content: unset optional fields left out, field order kept."""
        return self.model_dump(exclude_none=True)


def cuda_graph_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two below ``max_batch_size``, then ``max_batch_size`` itself."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


def _describe(problem: FieldProblem) -> str:
    path = problem.where or "<top level>"
    if problem.kind == "unknown":
        allowed = allowed_fields(LlmApiOptions, problem.loc[:-1])
        close = difflib.get_close_matches(str(problem.loc[-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{path}: unknown key{hint} (allowed here: {', '.join(allowed)})"
    if problem.kind == "missing":
        return f"{path}: required key missing"
    return f"{path}: {problem.message} (got {problem.input!r})"


def validate_llm_api_options(data: Any, source: str | Path) -> LlmApiOptions:
    """Validate an options mapping against the schema.

    Args:
        data: The parsed YAML (or the dict about to be written).
        source: The file the data came from or goes to, named in errors.

    Raises:
        EngineError: Naming ``source``, each bad key path and what is wrong with it.
    """
    if not isinstance(data, dict):
        raise EngineError(
            f"{source}: expected a mapping of LLM API options, got {type(data).__name__}"
        )
    try:
        return LlmApiOptions.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(p) for p in field_problems(exc))
        raise EngineError(
            f"{source}: invalid LLM API options: {problems}. Fix the key (names as in "
            f"TensorRT-LLM's LLM API reference) or rebuild the bundle"
        ) from None


def load_llm_api_options(path: str | Path) -> LlmApiOptions:
    """Read and validate an options YAML file.

    Raises:
        EngineError: The file is missing, not YAML, or fails the schema.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise EngineError(f"{path}: cannot read ({exc.strerror}); rebuild the bundle") from None
    except yaml.YAMLError as exc:
        raise EngineError(f"{path}: not valid YAML ({exc})") from None
    return validate_llm_api_options(data, path)


def build_llm_api_options(
    *,
    kv_cache_dtype: str,
    moe_backend: str,
    max_batch_size: int,
    max_seq_len: int,
    video: bool,
    source: str | Path = "llm_api_options.yaml",
) -> LlmApiOptions:
    """The options for one target and precision, validated.

    Args:
        kv_cache_dtype: ``fp8`` for an FP8 KV cache, else ``auto``.
        moe_backend: ``moe_config.backend`` for the target.
        max_batch_size: Largest runtime batch; also the largest CUDA graph.
        max_seq_len: Longest request (prompt + output) in tokens.
        video: Whether the model takes video (turns chunked prefill off).
        source: File name used in error messages.
    """
    data: dict[str, Any] = {
        "max_batch_size": max_batch_size,
        "max_seq_len": max_seq_len,
        "kv_cache_config": {
            "dtype": kv_cache_dtype,
            "mamba_ssm_cache_dtype": MAMBA_SSM_CACHE_DTYPE,
            "enable_block_reuse": False,
            "free_gpu_memory_fraction": FREE_GPU_MEMORY_FRACTION,
        },
        "cuda_graph_config": {
            "batch_sizes": cuda_graph_batch_sizes(max_batch_size),
            "max_batch_size": max_batch_size,
            "enable_padding": True,
        },
        "moe_config": {"backend": moe_backend},
    }
    if video:
        data["enable_chunked_prefill"] = False
    return validate_llm_api_options(data, source)


def dump_llm_api_options(options: LlmApiOptions) -> str:
    """YAML text for ``options``, keys in schema order."""
    return yaml.safe_dump(options.to_dict(), sort_keys=False, default_flow_style=False)
