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
- Layer kinds come from the NemotronH text config (``layers_block_type``, or the hub's
  ``hybrid_override_pattern``: ``M`` Mamba, ``*`` attention), under ``text_config``
  or ``llm_config``.

Note for the merge: the budget issue adds ``plan --context --batch`` serving-memory
arithmetic; this is the minimal per-sequence term the report's capacity column needs,
and should share one function with it.
"""

from __future__ import annotations

import json
from pathlib import Path

MAMBA_KINDS = frozenset({"mamba", "linear_attention", "M"})
ATTENTION_KINDS = frozenset({"attention", "full_attention", "*"})


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config.get("llm_config") or config


def _layer_kinds(text: dict) -> list[str]:
    kinds = text.get("layers_block_type")
    if isinstance(kinds, list):
        return [str(k) for k in kinds]
    pattern = text.get("hybrid_override_pattern")
    if isinstance(pattern, str):
        return list(pattern)
    raise ValueError("config states neither layers_block_type nor hybrid_override_pattern")


def sequence_bytes(config: dict, tokens: int, kv_bytes: int) -> tuple[int, str]:
    """Bytes of serving state one sequence of ``tokens`` holds, and the formula as text.

    Raises:
        ValueError: The config lacks a field the formula needs (named).
    """
    text = _text_config(config)
    kinds = _layer_kinds(text)
    attention = sum(k in ATTENTION_KINDS for k in kinds)
    mamba = sum(k in MAMBA_KINDS for k in kinds)
    try:
        kv_heads = int(text.get("num_key_value_heads") or text["num_attention_heads"])
        head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
        heads, hdim = int(text["mamba_num_heads"]), int(text["mamba_head_dim"])
        state, groups = int(text["ssm_state_size"]), int(text.get("n_groups", 1))
        kernel = int(text.get("conv_kernel", 4))
    except KeyError as err:
        raise ValueError(f"config has no {err.args[0]}") from err
    kv = attention * 2 * kv_heads * head_dim * tokens * kv_bytes
    ssm = mamba * heads * hdim * state * 4
    conv = mamba * (kernel - 1) * (heads * hdim + 2 * groups * state) * 2
    formula = (
        f"KV {attention} attention layers x 2 x {kv_heads} heads x {head_dim} x {tokens} tokens "
        f"x {kv_bytes} B = {kv:,} B; Mamba {mamba} layers x ({heads} x {hdim} x {state} x 4 B "
        f"SSM + {kernel - 1} x {heads * hdim + 2 * groups * state} x 2 B conv) = {ssm + conv:,} B"
    )
    return kv + ssm + conv, formula


def concurrent_sequences(
    checkpoint: Path, tokens: int, kv_cache: str | None, weight_bytes: int, gpu_bytes: int
) -> dict:
    """How many sequences of ``tokens`` fit in ``gpu_bytes`` beside the weights (arithmetic).

    Args:
        checkpoint: Directory holding ``config.json``.
        tokens: Sequence length (prompt + generated tokens).
        kv_cache: ``fp8`` when the checkpoint quantizes the KV cache (1 byte), else 2 bytes.
        weight_bytes: The checkpoint's weight bytes (its size on disk).
        gpu_bytes: The stated GPU memory.

    Returns:
        ``{"sequences", "bytes_per_sequence", "weight_bytes", "gpu_bytes", "tokens",
        "kv_bytes", "formula", "kind": "arithmetic"}``; ``sequences`` is 0 when the weights
        alone do not fit.

    Raises:
        ValueError: No readable ``config.json`` or a field the formula needs.
    """
    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"no readable config.json in {checkpoint}: {err}") from err
    kv_bytes = 1 if kv_cache == "fp8" else 2
    per_seq, formula = sequence_bytes(config, tokens, kv_bytes)
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
