"""Serving memory by arithmetic: how many concurrent sequences of a length fit in a GPU.

Policy:
- Pure arithmetic over a checkpoint's ``config.json`` (no weight is read): per
  sequence, the K/V cache of the attention layers (``2 x kv_heads x head_dim x tokens
  x KV bytes``, FP8 = 1 byte when the checkpoint quantizes the KV cache, else 2) plus
  the Mamba state of the Mamba layers, which does not grow with length (SSM state
  ``heads x head_dim x state x 4 B``, float32 as vLLM keeps it, and the conv state
  ``(kernel - 1) x (heads x head_dim + 2 x groups x state) x 2 B``).
- Capacity = ``floor((GPU memory - weight bytes) / bytes per sequence)``. Nothing else
  is counted (activations, CUDA graphs, the allocator, the encoders' working memory,
  a serving engine's memory fraction): it is an upper bound, labelled as arithmetic,
  never shown as a measurement.
- The shapes come from the model family's adapter
  (``ModelAdapter.serving_state_shapes``, which reads ``config.json``); this module
  only does the arithmetic.

Note for the merge: the budget issue adds ``plan --context --batch`` serving-memory
arithmetic; this is the minimal per-sequence term the report's capacity column needs,
and should share one function with it.
"""

from __future__ import annotations

from pathlib import Path

from omniquant.models.base import ServingStateShapes


def sequence_bytes(shapes: ServingStateShapes, tokens: int, kv_bytes: int) -> tuple[int, str]:
    """Bytes of serving state one sequence of ``tokens`` holds, and the formula as text."""
    s = shapes
    kv = s.attention_layers * 2 * s.kv_heads * s.head_dim * tokens * kv_bytes
    ssm = s.mamba_layers * s.mamba_heads * s.mamba_head_dim * s.ssm_state * 4
    conv_dim = s.mamba_heads * s.mamba_head_dim + 2 * s.groups * s.ssm_state
    conv = s.mamba_layers * (s.conv_kernel - 1) * conv_dim * 2
    formula = (
        f"KV {s.attention_layers} attention layers x 2 x {s.kv_heads} heads x {s.head_dim} x "
        f"{tokens} tokens x {kv_bytes} B = {kv:,} B; Mamba {s.mamba_layers} layers x "
        f"({s.mamba_heads} x {s.mamba_head_dim} x {s.ssm_state} x 4 B SSM + "
        f"{s.conv_kernel - 1} x {conv_dim} x 2 B conv) = {ssm + conv:,} B"
    )
    return kv + ssm + conv, formula


def concurrent_sequences(
    checkpoint: Path, tokens: int, kv_cache: str | None, weight_bytes: int, gpu_bytes: int
) -> dict:
    """How many sequences of ``tokens`` fit in ``gpu_bytes`` beside the weights (arithmetic).

    Args:
        checkpoint: Directory holding ``config.json``.
        tokens: Sequence length (prompt + generated tokens).
        kv_cache: The checkpoint's KV-cache format (``FP8``, as its ``kv_cache_quant_algo``
            says, is 1 byte; anything else, ``None`` included, 2 bytes).
        weight_bytes: The checkpoint's weight bytes (its size on disk).
        gpu_bytes: The stated GPU memory.

    Returns:
        ``{"sequences", "bytes_per_sequence", "weight_bytes", "gpu_bytes", "tokens",
        "kv_bytes", "formula", "kind": "arithmetic"}``; ``sequences`` is 0 when the weights
        alone do not fit.

    Raises:
        ValueError: No readable ``config.json``, an unsupported model, or a field the
            formula needs.
    """
    from omniquant.errors import OmniquantError
    from omniquant.models.base import adapter_for, read_config

    try:
        shapes = adapter_for(checkpoint).serving_state_shapes(read_config(Path(checkpoint)))
    except OmniquantError as err:
        raise ValueError(str(err)) from err
    kv_bytes = 1 if str(kv_cache or "").upper() == "FP8" else 2
    per_seq, formula = sequence_bytes(shapes, tokens, kv_bytes)
    free = gpu_bytes - weight_bytes
    return {
        "kind": "arithmetic",
        "sequences": max(0, free // per_seq) if per_seq else None,
        "bytes_per_sequence": per_seq,
        "weight_bytes": weight_bytes,
        "gpu_bytes": gpu_bytes,
        "tokens": tokens,
        "kv_bytes": kv_bytes,
        "formula": f"floor(({gpu_bytes:,} B GPU - {weight_bytes:,} B weights) / {per_seq:,} B); "
        + formula,
        "not_counted": "activations, CUDA graphs, allocator overhead, encoder working memory, "
        "the engine's memory fraction",
    }
