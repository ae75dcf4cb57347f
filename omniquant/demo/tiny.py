"""Tiny random ``nemotron_h_omni`` checkpoints, built in code and never downloaded.

Policy: a tiny checkpoint has every block type the real Nemotron 3 Nano Omni has
(Mamba2 mixers, MoE with routed + shared experts and a sigmoid router with
``e_score_correction_bias``, attention, RADIO vision with the Conv3D video
embedder, Parakeet audio, both projectors), is written by transformers'
``save_pretrained`` in the hub layout the real checkpoints use, in BF16, with a
byte-level BPE tokenizer carrying the real model's placeholder tokens. Everything
is seeded: the same seed gives byte-identical files.

The released model's configuration lives here too, in one place
(``released_config_dict``): the ``slice`` preset is that configuration with few
layers (every width and the expert count as released), and the plan stage's
tests hold predictions for the full configuration to NVIDIA's releases.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Placeholder tokens: omniquant.data.processing owns their spelling (transformers' own).
from omniquant.data.processing import (
    AUDIO_END,
    AUDIO_START,
    AUDIO_TOKEN,
    IMAGE_END,
    IMAGE_START,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
)
from omniquant.errors import ExportError, arg_ref

SPECIAL_TOKENS = [
    "<pad>", "<s>", "</s>", "<unk>",
    IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN, IMAGE_START, IMAGE_END, AUDIO_START, AUDIO_END,
]  # fmt: skip

# A fixed corpus for the tokenizer's BPE merges: deterministic, no download.
_TOKENIZER_CORPUS = (
    "the quick brown fox jumps over the lazy dog. what colour is the shape? "
    "how many objects are in the image? which way does the square move? "
    "is anything moving in the video? how many beeps do you hear? what is the pitch? "
    "read the number in the document. answer with one word. red green blue yellow "
    "circle square triangle left right up down yes no high low zero one two three four "
    "five six seven eight nine ten. the chart shows sales by month. transcribe the audio."
)


@dataclass(frozen=True)
class TinySize:
    """Widths of one tiny-model preset. ``hidden`` must divide by 16 (NVFP4 blocks)."""

    hidden: int
    layers: tuple[str, ...]
    experts: int
    expert_width: int
    mamba_heads: int
    vision_hidden: int
    vision_layers: int
    audio_hidden: int
    audio_layers: int
    vocab_merges: int = 200


# transformers' layer-type names: "linear_attention" is a Mamba2 mixer.
# Mamba at 0, 2, 6 and attention at 4: layers 2 and 6 are the attention's Mamba
# neighbours (kept BF16 by fp8_omni) while layer 0 is an ordinary Mamba layer.
_HYBRID = (
    "linear_attention", "moe", "linear_attention", "moe",
    "full_attention", "moe", "linear_attention", "moe",
)  # fmt: skip
SIZES: dict[str, TinySize] = {
    # ~1 MB in BF16: the default for tests and the walking skeleton.
    "tiny": TinySize(64, _HYBRID, 8, 64, 8, 32, 2, 32, 2),
    # A few hundred million parameters: for memory/time benchmarks of quantize + export.
    "bench": TinySize(1024, _HYBRID * 2, 32, 512, 32, 256, 4, 256, 4),
}


#: The released text backbone's layer pattern (M = Mamba2, E = MoE, * = attention):
#: 52 layers, 23 Mamba2, 23 MoE, 6 attention (at 5, 12, 19, 26, 33, 42).
RELEASED_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
#: Pattern letters -> transformers' ``layers_block_type`` names.
PATTERN_BLOCK_TYPES = {"M": "linear_attention", "E": "moe", "*": "full_attention"}
#: The ``slice`` preset: the released widths with every block type once or twice
#: (one Mamba2 layer, which is also the attention's neighbour, two MoE layers, one
#: attention layer), two RADIO blocks and two Parakeet layers: ~3.6 B parameters.
SLICE_PATTERN = "ME*E"
SLICE = "slice"
#: Shard size of the ``slice`` preset, as hub checkpoints are split (several
#: ``model-0000i-of-0000n.safetensors`` files and ``model.safetensors.index.json``).
SLICE_MAX_SHARD_SIZE = "2GB"


def released_config_dict(
    pattern: str = RELEASED_PATTERN, vision_layers: int = 32, audio_layers: int = 24
) -> dict[str, Any]:
    """The kwargs of ``NemotronH_Omni_Reasoning_V3_Config`` for the released
    Nemotron 3 Nano Omni 30B-A3B (transformers' native field names).

    Built as released (33.016 B parameters = 61.50 GiB in BF16, FIELD_NOTES): text
    hidden 2688, vocab 131072, untied lm_head; MoE 128 routed experts top-6 of width
    1856 with one shared expert of width 3712; Mamba2 64 heads x 64, 8 groups, state
    128, conv 4, chunk 128; attention 32 heads, 2 KV heads, head_dim 128; C-RADIOv4-H
    vision (1280 wide, 16 heads, MLP 5120, patch 16, Conv3D video embedder over 2
    frames); Parakeet audio (1024 wide, 8 heads, FFN 4096, 128 mel bins, 8x
    subsampling with 256 channels); projectors ``mlp1`` 5120 -> 20480 -> 2688 and
    audio 1024 -> 4096 -> 2688. Token ids are not set (they do not change shapes).

    Args:
        pattern: Text layer pattern (letters of ``PATTERN_BLOCK_TYPES``).
        vision_layers: Number of RADIO blocks (32 released).
        audio_layers: Number of Parakeet layers (24 released).
    """
    text = {
        "vocab_size": 131072,
        "hidden_size": 2688,
        "layers_block_type": [PATTERN_BLOCK_TYPES[c] for c in pattern],
        "tie_word_embeddings": False,
        "num_attention_heads": 32,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "mamba_num_heads": 64,
        "mamba_head_dim": 64,
        "n_groups": 8,
        "ssm_state_size": 128,
        "conv_kernel": 4,
        "chunk_size": 128,
        "expand": 2,
        "n_routed_experts": 128,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": 1856,
        "moe_shared_expert_intermediate_size": 3712,
        "n_shared_experts": 1,
        "intermediate_size": 1856,
        "mlp_hidden_act": "relu2",
        "routed_scaling_factor": 2.5,
        "max_position_embeddings": 262144,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    vision = {
        "hidden_size": 1280,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 16,
        "mlp_ratio": 4.0,
        "patch_size": 16,
        "max_img_size": 2048,
        "patch_dim": 3 * 16 * 16,
        "video_patch_dim": 2 * 3 * 16 * 16,
        "video_temporal_patch_size": 2,
        "num_cls_tokens": 3,
        "num_registers": 7,
        "summary_idxs": [0, 1],
    }
    audio = {
        "hidden_size": 1024,
        "num_hidden_layers": audio_layers,
        "num_attention_heads": 8,
        "intermediate_size": 4096,
        "num_mel_bins": 128,
        "subsampling_factor": 8,
        "subsampling_conv_channels": 256,
        "projection_hidden_size": 4096,
        "projection_bias": False,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "layerdrop": 0.0,
    }
    return {
        "text_config": text,
        "vision_config": vision,
        "audio_config": audio,
        "projector_hidden_size": 20480,
        "vision_hidden_size": 1280,
        "downsample_ratio": 0.5,
        "video_pruning_rate": 0.0,
        "video_temporal_patch_size": 2,
    }


def slice_config_dict() -> dict[str, Any]:
    """The ``slice`` preset: ``released_config_dict`` with ``SLICE_PATTERN``, two RADIO
    blocks and two Parakeet layers."""
    return released_config_dict(SLICE_PATTERN, vision_layers=2, audio_layers=2)


def write_config_only(out: str | Path, kwargs: dict[str, Any] | None = None) -> Path:
    """Write a directory holding only ``config.json`` (``released_config_dict()`` by
    default): what ``omniquant plan`` needs to plan a model before downloading it.

    Returns:
        The directory.
    """
    from transformers.models.nemotron_h_omni.configuration_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3_Config,
    )

    from omniquant.models.nemotron_omni_naming import NATIVE_ARCHITECTURE

    config = NemotronH_Omni_Reasoning_V3_Config(
        **(released_config_dict() if kwargs is None else kwargs)
    )
    config.architectures = [NATIVE_ARCHITECTURE]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    return out


def tiny_config_dict(size: TinySize) -> dict[str, Any]:
    """Return the kwargs of a ``NemotronH_Omni_Reasoning_V3_Config`` for ``size``."""
    vocab = 256 + len(SPECIAL_TOKENS) + size.vocab_merges
    text = {
        "vocab_size": vocab,
        "hidden_size": size.hidden,
        "intermediate_size": 2 * size.hidden,
        "layers_block_type": list(size.layers),
        "mamba_num_heads": size.mamba_heads,
        "mamba_head_dim": 2 * size.hidden // size.mamba_heads,
        "n_groups": 2,
        "ssm_state_size": 16,
        "chunk_size": 16,
        "conv_kernel": 4,
        "expand": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": size.hidden // 4,
        "moe_intermediate_size": size.expert_width,
        "moe_shared_expert_intermediate_size": size.expert_width,
        "n_routed_experts": size.experts,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "max_position_embeddings": 4096,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    vision = {
        "hidden_size": size.vision_hidden,
        "num_hidden_layers": size.vision_layers,
        "num_attention_heads": 2,
        "patch_size": 16,
        "max_img_size": 512,
        "patch_dim": 3 * 16 * 16,
        "video_patch_dim": 2 * 3 * 16 * 16,
        "video_temporal_patch_size": 2,
        "num_cls_tokens": 3,
        "num_registers": 1,
        "summary_idxs": [0, 1],
    }
    audio = {
        "hidden_size": size.audio_hidden,
        "num_hidden_layers": size.audio_layers,
        "num_attention_heads": 2,
        "intermediate_size": 2 * size.audio_hidden,
        "subsampling_conv_channels": 16,
        "num_mel_bins": 128,
        "projection_hidden_size": 2 * size.hidden,
        "projection_bias": False,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "layerdrop": 0.0,
    }
    return {
        "text_config": text,
        "vision_config": vision,
        "audio_config": audio,
        "projector_hidden_size": 2 * size.hidden,
        "vision_hidden_size": size.vision_hidden,
        "downsample_ratio": 0.5,
        "video_pruning_rate": 0.0,
        "video_temporal_patch_size": 2,
    }


def build_tokenizer(merges: int = 200, corpus: Iterable[str] | None = None):
    """Build the byte-level BPE tokenizer with the omni placeholder tokens.

    Special tokens get ids 0..len(SPECIAL_TOKENS)-1, so ``<pad>`` is 0, ``<s>`` 1
    and ``</s>`` 2, matching the text config. Merges are learnt from ``corpus``
    (default: a fixed built-in corpus); deterministic for a given corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + len(SPECIAL_TOKENS) + merges,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [_TOKENIZER_CORPUS] * 4 if corpus is None else list(corpus)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={
            "image_token": IMAGE_TOKEN,
            "video_token": VIDEO_TOKEN,
            "audio_token": AUDIO_TOKEN,
        },
    )


def build_omni_model(spec: TinySize, tokenizer, seed: int = 0):
    """A seeded random ``nemotron_h_omni`` of widths ``spec`` for ``tokenizer`` (float32).

    The placeholder token ids come from the tokenizer; the router correction bias is
    made non-zero so the bias path of the real router is exercised.
    """
    kwargs = tiny_config_dict(spec)
    kwargs["text_config"]["vocab_size"] = len(tokenizer)
    return _build_from_kwargs(kwargs, tokenizer, seed)


def _build_from_kwargs(kwargs: dict[str, Any], tokenizer, seed: int, dtype: str | None = None):
    """Build a seeded random omni model from config kwargs; ``dtype`` (e.g. ``"bfloat16"``)
    initialises it in that dtype directly (a float32 copy of the slice would need 14 GB)."""
    import torch
    from transformers.models.nemotron_h_omni.configuration_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3_Config,
    )

    from omniquant.models.nemotron_omni import new_model
    from omniquant.models.nemotron_omni_naming import NATIVE_ARCHITECTURE

    config = NemotronH_Omni_Reasoning_V3_Config(
        **kwargs,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
    )
    # modelopt's exporter and serving loaders both need architectures set.
    config.architectures = [NATIVE_ARCHITECTURE]
    torch.manual_seed(seed)
    model = new_model(config, dtype)
    _randomize_router_bias(model, seed)
    return model


def build_tiny_model(seed: int = 0, size: str = "tiny"):
    """Build a seeded random omni model and its tokenizer (in memory, BF16).

    Returns:
        ``(model, tokenizer)``.
    """
    import torch

    if size == SLICE:
        tokenizer = build_tokenizer()
        # The released vocabulary (131072) stays: the tokenizer's ids are a prefix of it.
        model = _build_from_kwargs(slice_config_dict(), tokenizer, seed, dtype="bfloat16")
        return model.eval(), tokenizer
    spec = SIZES[size]
    tokenizer = build_tokenizer(spec.vocab_merges)
    model = build_omni_model(spec, tokenizer, seed)
    return model.to(torch.bfloat16).eval(), tokenizer


def _randomize_router_bias(model, seed: int) -> None:
    """Give ``e_score_correction_bias`` small non-zero values (it initialises to zeros)
    so that a tiny checkpoint exercises the bias path the real router uses."""
    import torch

    # The generator is a CPU one and the draw names the CPU: under a default device
    # (``with torch.device("cuda")``) torch refuses a CPU generator for a CUDA tensor, and
    # CPU draws keep the values the same whatever device the model is built on.
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn(buf.shape, generator=gen, device="cpu") * 0.01)


def make_tiny(
    out: str | Path, seed: int = 0, size: str = "tiny", force: bool = False, naming: str = "native"
) -> Path:
    """Write a tiny random ``nemotron_h_omni`` checkpoint to ``out``.

    Args:
        out: Output directory; must not exist unless ``force``.
        seed: RNG seed; the same seed gives byte-identical files.
        size: A key of ``SIZES``, or ``"slice"`` (released widths, few layers, ~3.6 B
            parameters, ~7 GB written in 2 GB shards; needs ~8 GB of RAM).
        force: Overwrite an existing directory.
        naming: ``native``: ``config.json`` as transformers' ``save_pretrained`` writes it
            (what a fine-tune has); ``released``: the released checkpoints' naming
            (``omniquant.models.nemotron_omni_naming``), same tensors.

    Returns:
        The output directory.
    """
    from omniquant.models.nemotron_omni_naming import NAMINGS
    from omniquant.outdir import (
        TINY_MODEL,
        check_removable,
        clean_stale_temp_dirs,
        default_permissions,
        out_lock,
        out_path,
        staged_dir,
    )

    out = out_path(out).absolute()
    if size not in SIZES and size != SLICE:
        raise ExportError(
            f"make-tiny: unknown {arg_ref('size')} {size!r}; choose one of {sorted([*SIZES, SLICE])}."
        )
    if naming not in NAMINGS:
        raise ExportError(
            f"make-tiny: unknown {arg_ref('naming')} {naming!r}; choose one of {list(NAMINGS)}."
        )
    if out.exists() or out.is_symlink():
        if not force:
            raise ExportError(
                f"make-tiny: output directory {out} already exists; pass {arg_ref('force')} to overwrite it."
            )
        if not out.is_dir():
            raise ExportError(f"make-tiny: {arg_ref('out')} {out} exists and is not a directory.")
        check_removable(out, TINY_MODEL)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_tiny_model(seed, size)
    # Written beside ``out`` and renamed into place: a killed run leaves no half model that
    # looks complete, and ``force`` replaces only a previous make-tiny model.
    with out_lock(out):
        clean_stale_temp_dirs(out, lambda _m: None)
        with staged_dir(out, replace=force, kind=TINY_MODEL) as tmp:
            if size == SLICE:
                model.save_pretrained(tmp, max_shard_size=SLICE_MAX_SHARD_SIZE)
            else:
                model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _write_preprocessor_config(tmp, model.config)
            if naming != "native":
                _rename_config(tmp, naming)
            default_permissions(tmp)
    return out


def _rename_config(out: Path, naming: str) -> None:
    """Rewrite ``config.json`` and ``preprocessor_config.json`` in ``naming``."""
    from omniquant.models.nemotron_omni import NemotronOmniAdapter

    config = json.loads((out / "config.json").read_text())
    pre = json.loads((out / "preprocessor_config.json").read_text())
    config, pre = NemotronOmniAdapter().serving_config(config, naming, pre)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if pre is not None:
        (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True) + "\n")


def _write_preprocessor_config(out: Path, config) -> None:
    """Record the processing parameters omniquant's processors read (patch size,
    normalisation, audio sampling rate), in the processor-config file name hub
    checkpoints use."""
    vision = config.vision_config
    payload = {
        "processor_class": "NemotronH_Omni_Reasoning_V3Processor",
        "patch_size": vision.patch_size,
        "downsample_ratio": config.downsample_ratio,
        "image_mean": list(vision.norm_mean),
        "image_std": list(vision.norm_std),
        "max_num_patches": 64,
        "video_temporal_patch_size": config.video_temporal_patch_size,
        "sampling_rate": 16000,
        "feature_size": config.audio_config.num_mel_bins,
    }
    (out / "preprocessor_config.json").write_text(
        json.dumps(payload, indent=2, sort_keys=True) + "\n"
    )
