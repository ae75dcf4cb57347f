"""Build the untrained demo model and its tokenizer (used by ``scripts/train_demo.py``).

Policy: the demo model is built exactly as ``omniquant.demo.tiny`` builds its tiny models
(``tiny_config_dict``, the same placeholder tokens and special-token ids, routers with a
non-zero ``e_score_correction_bias``, ``architectures`` set), only wider, and with a BPE
tokenizer trained on the demo tasks' own text so that every answer is one or two tokens.
Every block type of the real model is present: Mamba2, MoE with routed + shared experts,
attention, RADIO vision with the Conv3D video embedder, Parakeet audio, both projectors.
Every linear input width of the backbone divides by 16 (NVFP4 blocks).
"""

from __future__ import annotations

from collections.abc import Iterable

from omniquant.demo.tiny import (
    _HYBRID,
    TinySize,
    build_omni_model,
    build_tokenizer,
)
from omniquant.models.nemotron_omni import reset_audio_convolutions

#: The demo model's widths: hidden 128, the tiny hybrid layer pattern (Mamba at 0, 2, 6;
#: attention at 4; MoE at 1, 3, 5, 7), 8 routed experts of width 64 + 1 shared expert,
#: a 2-layer RADIO (width 64) and a 2-layer Parakeet (width 64). About 1.7 M parameters.
DEMO_SIZE = TinySize(
    hidden=128, layers=_HYBRID, experts=8, expert_width=64, mamba_heads=8,
    vision_hidden=64, vision_layers=2, audio_hidden=64, audio_layers=2, vocab_merges=400,
)  # fmt: skip


def build_demo_tokenizer(corpus: Iterable[str], merges: int = DEMO_SIZE.vocab_merges):
    """Byte-level BPE with the omni placeholder tokens, merges learnt from ``corpus``.

    ``omniquant.demo.tiny.build_tokenizer`` (special tokens first, so
    ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2); only the merge corpus differs. Deterministic for
    a given corpus.
    """
    return build_tokenizer(merges, corpus)


def build_demo_model(tokenizer, seed: int = 0, size: TinySize = DEMO_SIZE):
    """A seeded, untrained demo model in float32 (train in float32, save in BF16)."""
    model = build_omni_model(size, tokenizer, seed)
    reset_audio_convolutions(model)
    return model.float()
