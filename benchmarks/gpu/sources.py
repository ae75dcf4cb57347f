"""Source checkpoints for the GPU check: random omni models at the released widths (or
the tiny preset for the CPU rehearsal), built in code and saved in the hub layout.

- Built on the GPU where there is one (seconds, where the CPU takes minutes), under
  ``with torch.device(...)``: ``omniquant.demo.tiny`` draws its router biases from a
  CPU generator on the CPU for exactly this case.
- BF16 on disk always: ``quantize/export.py`` casts weights to bfloat16 before
  quantizing them, while modelopt's fake quant sees the loaded weights; a float32 source
  loaded as float32 makes the two quantize different numbers and every comparison of
  them meaningless. A BF16 source loaded as float32 gives both the same values.
- Sizes come from a build on the meta device (no memory, no weights), per text layer, so
  the disk pre-flight can drop trailing layers until the run fits.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path


def config_kwargs(
    scale: str,
    layers: int,
    pattern: str | None = None,
    encoder_layers: tuple[int, int] | None = None,
) -> dict:
    """Config kwargs: the released widths (``real``) or the tiny preset (``tiny``).

    ``pattern`` (letters of ``tiny.PATTERN_BLOCK_TYPES``) replaces the first ``layers`` of
    the released pattern; ``encoder_layers`` is ``(vision, audio)`` depth at ``real`` scale
    (default half the released depth, 16 and 12).
    """
    from omniquant.demo import tiny

    if scale == "tiny":
        kwargs = tiny.tiny_config_dict(tiny.SIZES["tiny"])
        if pattern:
            kwargs["text_config"]["layers_block_type"] = [
                tiny.PATTERN_BLOCK_TYPES[c] for c in pattern
            ]
        return kwargs
    vision, audio = encoder_layers or (16, 12)
    return tiny.released_config_dict(
        pattern or tiny.RELEASED_PATTERN[:layers], vision_layers=vision, audio_layers=audio
    )


def _with_tokenizer_vocab(kwargs: dict, tokenizer) -> dict:
    kwargs = json.loads(json.dumps(kwargs))
    kwargs["text_config"]["vocab_size"] = max(kwargs["text_config"]["vocab_size"], len(tokenizer))
    return kwargs


def build_model(kwargs: dict, device: str, dtype: str, seed: int = 0):
    """``(model, tokenizer)``: a seeded random omni model built on ``device``."""
    import torch

    from omniquant.demo import tiny

    tokenizer = tiny.build_tokenizer()
    with torch.device(device):
        model = tiny._build_from_kwargs(
            _with_tokenizer_vocab(kwargs, tokenizer), tokenizer, seed, dtype=dtype
        )
    return model, tokenizer


def bytes_by_layer(kwargs: dict, dtype_bytes: int = 2) -> dict:
    """Parameter bytes per text layer and for the rest, from a meta-device build."""
    model, _ = build_model(kwargs, "meta", "bfloat16")
    per: dict = {"rest": 0, "layers": []}
    layers: dict[int, int] = {}
    for name, p in model.named_parameters():
        m = re.search(r"language_model\.(?:model\.)?layers\.(\d+)\.", name)
        if m:
            layers[int(m.group(1))] = layers.get(int(m.group(1)), 0) + p.numel() * dtype_bytes
        else:
            per["rest"] += p.numel() * dtype_bytes
    per["layers"] = [layers.get(i, 0) for i in range(max(layers, default=-1) + 1)]
    return per


def build(out: Path, kwargs: dict, device: str, dtype: str = "bfloat16", seed: int = 0) -> dict:
    """Build on ``device``, save to ``out`` in 5 GB shards; what it built and how long it took."""
    from omniquant.demo import tiny

    t0 = time.perf_counter()
    model, tokenizer = build_model(kwargs, device, dtype, seed)
    params = sum(p.numel() for p in model.parameters())
    built = time.perf_counter() - t0
    model.save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    tiny._write_preprocessor_config(out, model.config)
    del model
    return {
        "parameters": params,
        "dtype": dtype,
        "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
        "shards": len(list(out.glob("*.safetensors"))),
        "build_seconds": round(built, 2),
        "save_seconds": round(time.perf_counter() - t0 - built, 2),
    }
