"""Serving memory beside the weights, by stated arithmetic: what a GPU must hold to serve
``batch`` sequences of ``context`` tokens, and so how many bytes the weights may take.

Policy:
- A pure function of the model's serving shapes (``ModelAdapter.serving_shapes``), the
  processor settings, and the serving knobs; it loads nothing. Every term is returned
  with its formula, as ``omniquant.quantize.memory`` does for calibration.
- Terms, as vLLM sizes them for this model family:
  - KV cache: attention layers x 2 (K, V) x KV heads x head_dim x context x batch x the
    KV dtype's bytes (fp8: 1, bf16: 2); the per-tensor FP8 scales are not counted.
  - Mamba state, one per sequence (no prefix caching of Mamba state): the conv state
    ``(conv_kernel - 1) x (heads x head_dim + 2 x n_groups x state)`` in the model dtype
    and the SSM state ``heads x head_dim x state`` in the SSM cache dtype. Shapes are
    vLLM's ``MambaStateShapeCalculator.mamba2_state_shape``
    (vllm/model_executor/layers/mamba/mamba_utils.py); the dtype is the config's
    ``mamba_ssm_cache_dtype``, float32 when unset, as vLLM's
    ``NemotronHForCausalLMConfig.update_mamba_ssm_cache_dtype``
    (vllm/model_executor/models/config.py, ``DEFAULT_MAMBA_SSM_CACHE_DTYPE = "float32"``:
    "Only float32 is known to have no accuracy issues by default").
  - Encoder activations of the largest media input, one encoder layer's live tensors
    (residual + q/k/v + attention output, or residual + MLP hidden + output; attention by
    a fused kernel, no N^2 scores): an image at the processor's ``max_num_patches``; a
    video of as many tubelets as the context holds (EVS prunes after the encoder, so it
    does not shrink this); audio of as many encoder frames as the context holds. The
    largest of the three counts (requests are encoded one at a time).
  - A runtime reserve of 10% of the GPU: vLLM's default ``--gpu-memory-utilization 0.9``
    leaves it to the CUDA context, cuBLAS/NCCL workspaces and CUDA graphs.
- ``concurrent_sequences`` (the report's capacity column): how many sequences of a
  length fit in a GPU beside the weights, from KV + Mamba state alone (an upper bound,
  labelled arithmetic); its shapes come from ``config.json`` in either naming
  (``ModelAdapter.serving_state_shapes``), so it also sizes a served released checkpoint.
  Both compute the KV/Mamba terms with ``state_terms`` over the same ``ServingStateShapes``
  (``ServingShapes.state``).
- Not counted: the backbone's own prefill activations (vLLM measures them in its profile
  run; chunked prefill bounds them by ``max_num_batched_tokens``), allocator fragmentation.
  Weights take their exported tensor bytes (``omniquant.quantize.predict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from omniquant.errors import PlanError

if TYPE_CHECKING:
    from omniquant.models.base import ServingStateShapes

KV_DTYPE_BYTES = {"fp8": 1, "bf16": 2}
SSM_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: The SSM cache dtype vLLM uses for NemotronH when the config does not name one.
DEFAULT_SSM_CACHE_DTYPE = "float32"
RESERVE_FRACTION = 0.10
#: Context of ``plan --gpu-memory`` without ``--context``.
DEFAULT_CONTEXT = 32768


def parse_size_arg(text: str | int, arg: str) -> int:
    """``24GiB`` / ``25GB`` / ``512MiB`` / a byte count (or an int) -> bytes, > 0.

    Raises:
        PlanError: naming the argument and listing the accepted units.
    """
    from omniquant.devices import SIZE_UNITS, parse_size
    from omniquant.errors import OmniquantError

    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        try:
            size = parse_size(str(text), where="")
        except OmniquantError:
            raise PlanError(
                f"not a size; write a number with one of the units {', '.join(SIZE_UNITS)} "
                "(case-insensitive; KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of "
                "1024) or a byte count, e.g. 24GiB.",
                arg=arg,
                value=repr(text),
            ) from None
    if size <= 0:
        raise PlanError("must be a positive size.", arg=arg, value=repr(text))
    return size


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class ServingMemory:
    """GPU memory of serving, term by term, and the room left for weights."""

    gpu_memory: int | None
    context: int
    batch: int
    kv_cache: str
    terms: dict[str, int]
    arithmetic: list[str] = field(default_factory=list)
    weights_bytes: int | None = None

    @property
    def state_bytes(self) -> int:
        """KV cache + Mamba conv + SSM state (what grows with context and batch)."""
        return sum(self.terms[k] for k in ("kv_cache", "mamba_conv_state", "mamba_ssm_state"))

    @property
    def beside_weights(self) -> int:
        return sum(self.terms.values())

    @property
    def weights_budget(self) -> int | None:
        """Bytes left for the weights (None without a GPU size)."""
        return None if self.gpu_memory is None else self.gpu_memory - self.beside_weights

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory is None or self.weights_bytes is None:
            return None
        return self.weights_bytes <= self.weights_budget

    def label(self) -> str:
        gpu = gib(self.gpu_memory) if self.gpu_memory is not None else "?"
        return (f"{gpu} GPU, context {self.context}, batch {self.batch}, "
                f"KV {self.kv_cache}")  # fmt: skip

    def to_json(self) -> dict:
        return {
            "gpu_memory": self.gpu_memory,
            "context": self.context,
            "batch": self.batch,
            "kv_cache": self.kv_cache,
            "terms": dict(self.terms),
            "beside_weights": self.beside_weights,
            "weights_budget": self.weights_budget,
            "weights_bytes": self.weights_bytes,
            "fits": self.fits,
            "arithmetic": list(self.arithmetic),
        }


def state_terms(
    s: ServingStateShapes, tokens: int, batch: int, kv_bytes: int, ssm_bytes: int, conv_bytes: int
) -> dict[str, int]:
    """KV cache, Mamba conv state and SSM state bytes of ``batch`` sequences of ``tokens``
    (the formulas of the module docstring)."""
    conv_dim = s.mamba_heads * s.mamba_head_dim + 2 * s.groups * s.ssm_state
    return {
        "kv_cache": s.attention_layers * 2 * s.kv_heads * s.head_dim * tokens * batch * kv_bytes,
        "mamba_conv_state": s.mamba_layers * batch * (s.conv_kernel - 1) * conv_dim * conv_bytes,
        "mamba_ssm_state": s.mamba_layers * batch * s.mamba_heads * s.mamba_head_dim
        * s.ssm_state * ssm_bytes,
    }  # fmt: skip


def _encoder_terms(s, settings, context: int) -> tuple[dict[str, int], list[str]]:
    a = s.act_bytes
    vis_width = max(5 * s.vision_hidden, 2 * s.vision_hidden + s.vision_mlp)
    aud_width = max(5 * s.audio_hidden, 2 * s.audio_hidden + s.audio_ffn)
    image_n = settings.max_num_patches + s.vision_extra_tokens
    per_tubelet = settings.video_target_num_patches + s.vision_extra_tokens
    tubelet_tokens = max(1, settings.video_target_num_patches // settings.merge_size**2)
    tubelets = max(1, context // tubelet_tokens)
    terms = {
        "image": image_n * vis_width * a,
        "video": tubelets * per_tubelet * vis_width * a,
        "audio": context * aud_width * a if s.audio_hidden else 0,
    }
    width_text = (f"max(5 x {s.vision_hidden}, 2 x {s.vision_hidden} + MLP {s.vision_mlp}) = "
                  f"{vis_width}")  # fmt: skip
    text = [
        (
            f"image: ({settings.max_num_patches} patches + {s.vision_extra_tokens} cls/register) x "
            f"{width_text} x {a} B = {terms['image']:,}"
        ),
        (
            f"video: {tubelets} tubelets (context {context} / {tubelet_tokens} tokens each) x "
            f"({settings.video_target_num_patches} + {s.vision_extra_tokens}) patches x {vis_width} "
            f"x {a} B = {terms['video']:,}"
        ),
        (
            f"audio: {context} frames (the context) x max(5 x {s.audio_hidden}, 2 x {s.audio_hidden} "
            f"+ FFN {s.audio_ffn}) = {aud_width} x {a} B = {terms['audio']:,}"
        ),
    ]
    return terms, text


def estimate_serving_memory(
    shapes,
    settings,
    *,
    context: int,
    batch: int,
    kv_cache: str = "fp8",
    gpu_memory: int | None = None,
    weights_bytes: int | None = None,
) -> ServingMemory:
    """Serving memory beside the weights for ``batch`` sequences of ``context`` tokens.

    Args:
        shapes: ``ServingShapes`` (``adapter.serving_shapes(model)``).
        settings: ``ProcessorSettings`` of the checkpoint.
        context: Tokens per sequence (prompt + output, media tokens included).
        batch: Sequences served at once.
        kv_cache: ``fp8`` or ``bf16``.
        gpu_memory: GPU bytes; with it, the weights budget and the refusals below.
        weights_bytes: Exported tensor bytes of the weights, to say whether they fit.

    Raises:
        PlanError: bad context/batch/kv_cache; KV cache and Mamba state alone exceed the GPU.
    """
    if context < 1:
        raise PlanError("must be at least 1.", arg="context", value=context)
    if batch < 1:
        raise PlanError("must be at least 1.", arg="batch", value=batch)
    if kv_cache not in KV_DTYPE_BYTES:
        raise PlanError(f"use one of {', '.join(KV_DTYPE_BYTES)}.", arg="kv_cache",
                        value=repr(kv_cache))  # fmt: skip
    kvb = KV_DTYPE_BYTES[kv_cache]
    ssm_dtype = shapes.ssm_cache_dtype or DEFAULT_SSM_CACHE_DTYPE
    ssm_bytes = SSM_DTYPE_BYTES.get(ssm_dtype, 4)
    s, act_bytes = shapes.state, shapes.act_bytes
    terms = state_terms(s, context, batch, kvb, ssm_bytes, act_bytes)
    enc, enc_text = _encoder_terms(shapes, settings, context)
    largest = max(enc, key=enc.get)
    terms["encoder_activations"] = enc[largest]
    lines = [
        f"context {context} tokens x batch {batch}; KV cache {kv_cache}; SSM cache {ssm_dtype}"
        + ("" if shapes.ssm_cache_dtype else " (vLLM's NemotronH default)"),
        (
            f"kv_cache: {s.attention_layers} attention layers x 2 (K, V) x {s.kv_heads} KV heads x "
            f"head_dim {s.head_dim} x context {context} x batch {batch} x {kvb} B = "
            f"{terms['kv_cache']:,} ({gib(terms['kv_cache'])})"
        ),
        (
            f"mamba_conv_state: {s.mamba_layers} Mamba layers x batch {batch} x (conv {s.conv_kernel} "
            f"- 1) x ({s.mamba_heads} x {s.mamba_head_dim} + 2 x {s.groups} x {s.ssm_state}) x "
            f"{act_bytes} B = {terms['mamba_conv_state']:,} ({gib(terms['mamba_conv_state'])})"
        ),
        (
            f"mamba_ssm_state: {s.mamba_layers} Mamba layers x batch {batch} x {s.mamba_heads} heads x "
            f"{s.mamba_head_dim} x state {s.ssm_state} x {ssm_bytes} B ({ssm_dtype}) = "
            f"{terms['mamba_ssm_state']:,} ({gib(terms['mamba_ssm_state'])})"
        ),
        "encoder activations, one layer's live tensors for the largest input:",
        *[f"  {t}" for t in enc_text],
        (
            f"encoder_activations = the largest ({largest}) = {terms['encoder_activations']:,} "
            f"({gib(terms['encoder_activations'])})"
        ),
    ]
    mem = ServingMemory(gpu_memory, context, batch, kv_cache, terms, lines, weights_bytes)
    if gpu_memory is None:
        lines.append(f"beside the weights (no GPU size given, no reserve): {mem.beside_weights:,} "
                     f"({gib(mem.beside_weights)})")  # fmt: skip
        return mem
    terms["runtime_reserve"] = int(gpu_memory * RESERVE_FRACTION)
    lines.append(
        f"runtime_reserve: {RESERVE_FRACTION:.0%} of {gib(gpu_memory)} (vLLM's default "
        f"--gpu-memory-utilization 0.9) = {terms['runtime_reserve']:,}"
    )
    if mem.state_bytes > gpu_memory:
        raise PlanError(
            f"KV cache and Mamba state alone need {mem.state_bytes:,} bytes "
            f"({gib(mem.state_bytes)}) for context {context} x batch {batch}, more than the GPU's "
            f"{gib(gpu_memory)}: kv_cache {gib(terms['kv_cache'])} + mamba_conv_state "
            f"{gib(terms['mamba_conv_state'])} + mamba_ssm_state {gib(terms['mamba_ssm_state'])}; "
            "lower the context or the batch"
            + (", or use an FP8 KV cache." if kv_cache != "fp8" else "."),
            arg="gpu_memory",
            value=gib(gpu_memory),
        )
    budget = mem.weights_budget
    lines.append(
        f"weights budget = {gib(gpu_memory)} - "
        + " - ".join(f"{k} {gib(v)}" for k, v in terms.items())
        + f" = {budget:,} ({gib(budget)})"
    )
    if weights_bytes is not None:
        verdict = "fits" if weights_bytes <= budget else "does NOT fit"
        lines.append(f"weights {weights_bytes:,} ({gib(weights_bytes)}) {verdict}")
    return mem


def serving_memory_for(loaded, **kwargs) -> ServingMemory:
    """``estimate_serving_memory`` for a loaded (meta or real) model directory."""
    import json
    from pathlib import Path

    from omniquant.data.processing import settings_from_configs

    pre = Path(loaded.path) / "preprocessor_config.json"
    try:
        preprocessor = json.loads(pre.read_text()) if pre.is_file() else {}
    except (OSError, json.JSONDecodeError):
        preprocessor = {}
    settings = settings_from_configs(dict(loaded.config_dict), preprocessor)
    return estimate_serving_memory(loaded.adapter.serving_shapes(loaded.model), settings, **kwargs)


def sequence_bytes(shapes: ServingStateShapes, tokens: int, kv_bytes: int) -> tuple[int, str]:
    """Bytes of serving state one sequence of ``tokens`` holds, and the formula as text."""
    s = shapes
    t = state_terms(s, tokens, 1, kv_bytes, SSM_DTYPE_BYTES[DEFAULT_SSM_CACHE_DTYPE], 2)
    kv, ssm, conv = t["kv_cache"], t["mamba_ssm_state"], t["mamba_conv_state"]
    conv_dim = s.mamba_heads * s.mamba_head_dim + 2 * s.groups * s.ssm_state
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
