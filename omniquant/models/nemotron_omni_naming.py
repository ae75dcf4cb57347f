"""The two config namings of Nemotron 3 Nano Omni checkpoints, and the converter between them.

``native``: what transformers (>= 5.x, class ``NemotronH_Omni_Reasoning_V3``, ``model_type:
nemotron_h_omni``) writes with ``save_pretrained``: ``text_config``, ``audio_config``,
``image_token_id``, ``vision_hidden_size``, RADIO fields in ``vision_config``. A fine-tune
made with transformers has this naming, and so do ``make-tiny`` and the demo model.

``released``: what NVIDIA's hub checkpoints use and what the serving stacks' classes read
(vLLM's ``NemotronH_Nano_VL_V2``, TensorRT-LLM's ``NemotronH_Nano_VL_V2``; the fields and
their sources are listed in ``omniquant.models.nemotron_omni_serving``): architecture and
``model_type`` ``NemotronH_Nano_Omni_Reasoning_V3``, ``llm_config`` (NemotronH with
``hybrid_override_pattern``), ``sound_config`` (``model_type: parakeet`` with
``sampling_rate``), ``vision_config.args`` (the RADIO construction arguments), and the
top-level ``patch_size``, ``force_image_size``, ``template``, ``ps_version``,
``image_tag_type``, ``vit_hidden_size``, ``norm_mean``/``norm_std``, ``use_thumbnail``,
``img_context_token_id`` and the placeholder strings.

Policy:
- Every released value is derived from the source, whichever naming it uses: the source is
  first brought to native naming (transformers' own legacy-field map, its own
  pattern <-> layer-type conversion), then written in released naming. A released source
  keeps its own values (they win over derived ones, one level into the sub-configs); only
  fields it lacks are added.
- Fields the native config has no counterpart for take the released family's value, named
  in ``RELEASED_ONLY``, each with where it was seen. Values no reader uses (``template``)
  are written as null rather than guessed.
- ``to_native(to_released(c)) == c`` for a native ``c`` (tested), but for
  ``force_image_size``, which the native config carries as null and the readers need as a
  number: the converter drops exactly the other fields it adds.
- The released ``model_type`` is remote code: neither transformers nor vLLM/TensorRT-LLM
  registers a config class for it, so a serving stack builds the config only through an
  ``auto_map`` whose files sit beside ``config.json`` (NVIDIA's ``*.py``). omniquant cannot
  ship that code; a released source's ``auto_map`` is kept, and the construction check
  (``omniquant.checkpoint.construction``) says when the files are missing.
"""

from __future__ import annotations

import copy
from typing import Any

NATIVE, RELEASED = "native", "released"
NAMINGS = (NATIVE, RELEASED)
#: Keep the source's config.json as it is (``quantize --config-naming source``).
SOURCE = "source"
CONFIG_NAMINGS = (SOURCE, RELEASED, NATIVE)

NATIVE_MODEL_TYPE = "nemotron_h_omni"
#: transformers' class of the model, as ``config.json``'s ``architectures`` names it.
NATIVE_ARCHITECTURE = "NemotronH_Omni_Reasoning_V3"
#: The released checkpoints' class and ``model_type`` (FIELD_NOTES; vLLM 0.33.0
#: ``model_executor/models/registry.py:551``; TensorRT-LLM ``modeling_nemotron_nano.py`` @
#: ``01a04b9b0f77`` ``@register_auto_model("NemotronH_Nano_Omni_Reasoning_V3")``).
RELEASED_ARCHITECTURE = "NemotronH_Nano_Omni_Reasoning_V3"
RELEASED_MODEL_TYPE = RELEASED_ARCHITECTURE

#: Placeholder strings the serving processors hard-code or read from the released config
#: (vLLM 0.33.0 ``transformers_utils/processors/nano_nemotron_vl.py:37-42``); omniquant's
#: processor spells them the same (``omniquant.data.processing``).
IMG_CONTEXT, VIDEO_CONTEXT, IMG_START, IMG_END = "<image>", "<video>", "<img>", "</img>"
SOUND_CONTEXT, SOUND_START, SOUND_END = "<so_embedding>", "<so_start>", "<so_end>"

#: Top-level released fields with no native counterpart: value, and where it was seen.
RELEASED_ONLY: dict[str, tuple[Any, str]] = {
    "force_image_size": (
        512,
        (
            "the tile size of the released family (TensorRT-LLM's Nano VL processor tests, "
            "the Nano 12B VL config class defaults); both readers compute force_image_size "
            "// patch_size, so null fails construction"
        ),
    ),
    "template": (
        None,
        "stored by vLLM (nano_nemotron_vl.py:971) and never used; released value not found",
    ),
    "ps_version": (
        "v2",
        (
            "transformers' native pixel shuffle transposes back (modeling_nemotron_h_omni "
            "pixel_shuffle), which is the readers' 'v2'; 'v1' would transpose images"
        ),
    ),
    "image_tag_type": (
        "internvl",
        "the remote config classes' default; stored by vLLM, never used",
    ),
    "use_thumbnail": (
        True,
        "read by vLLM's processor (processors/nano_nemotron_vl.py:608); released family value",
    ),
    "img_context_token": (IMG_CONTEXT, "TensorRT-LLM's input processor reads it"),
    "video_context_token": (VIDEO_CONTEXT, "TensorRT-LLM's input processor reads it"),
    "img_start_token": (IMG_START, "TensorRT-LLM's input processor reads it"),
    "img_end_token": (IMG_END, "TensorRT-LLM's input processor reads it"),
    "sound_context_token": (SOUND_CONTEXT, "TensorRT-LLM's input processor reads it"),
}
#: Released top-level fields derived from native values (dropped again by ``to_native``).
_DERIVED_TOP = ("patch_size", "norm_mean", "norm_std", "max_sequence_length", "torch_dtype")
#: Released ``vision_config`` fields beside the native RADIO ones.
_VISION_EXTRA = ("args", "separate_video_embedder", "max_resolution", "preferred_resolution")
#: Released ``sound_config`` fields beside the native Parakeet ones.
_SOUND_EXTRA = ("sampling_rate",)
#: Native Parakeet fields vLLM passes itself beside ``**sound_config.to_dict()`` (vLLM 0.33.0
#: ``transformers_utils/configs/parakeet.py:30-35``: a second value is a TypeError), with
#: the value a released config means by leaving them out (transformers'
#: ``NemotronH_Omni_Reasoning_V3_Config`` supplies False for the first two; None: the
#: Parakeet class default). Dropped when they hold that value.
_SOUND_PASSED_BY_VLLM = {"attention_bias": False, "scale_input": False, "max_position_embeddings": None}

#: timm ViT widths vLLM builds RADIO from, by ``vision_config.args["model"]`` (vLLM 0.33.0
#: ``transformers_utils/configs/radio.py:10-16``): hidden, blocks, heads, MLP width.
VIT_TIMM_DIMS: dict[str, tuple[int, int, int, int]] = {
    "vit_small_patch16_224": (384, 12, 6, 1536),
    "vit_base_patch16_224": (768, 12, 12, 3072),
    "vit_large_patch16_224": (1024, 24, 16, 4096),
    "vit_huge_patch16_224": (1280, 32, 16, 5120),
    "vit_so400m_patch16_224": (1152, 27, 16, 4304),
}


def naming_of(config: dict) -> str:
    """``released`` for a config with the released class or legacy keys, else ``native``."""
    archs = config.get("architectures") or []
    if "llm_config" in config or RELEASED_ARCHITECTURE in archs:
        return RELEASED
    return NATIVE


def _legacy_names() -> dict[str, str]:
    """transformers' own map of released field names to native ones."""
    from transformers.models.nemotron_h_omni.configuration_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3_Config,
    )

    return dict(NemotronH_Omni_Reasoning_V3_Config._legacy_field_names)


def _pattern_codec():
    from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig

    return NemotronHConfig._list_to_pattern, NemotronHConfig._pattern_to_list


def _parakeet_default(key: str):
    from transformers import ParakeetEncoderConfig

    return getattr(ParakeetEncoderConfig(), key)


def timm_model_for(hidden: int, blocks: int, heads: int, mlp: int) -> str | None:
    """The timm ViT name vLLM would build for these RADIO widths (None: no such name)."""
    for name, dims in VIT_TIMM_DIMS.items():
        if dims == (hidden, blocks, heads, mlp):
            return name
    return None


def to_native(config: dict) -> dict:
    """``config`` in native naming (a copy; a native config is returned unchanged)."""
    if naming_of(config) == NATIVE:
        return copy.deepcopy(config)
    out = copy.deepcopy(config)
    for legacy, name in _legacy_names().items():
        if legacy in out:
            value = out.pop(legacy)
            out.setdefault(name, value)
    for key in (*RELEASED_ONLY, *_DERIVED_TOP, "auto_map"):
        if key != "force_image_size":  # a native field too (unused by transformers' model)
            out.pop(key, None)
    out["model_type"] = NATIVE_MODEL_TYPE
    out["architectures"] = [NATIVE_ARCHITECTURE]
    text = out.get("text_config")
    if isinstance(text, dict):
        _, to_list = _pattern_codec()
        if "hybrid_override_pattern" in text:
            text["layers_block_type"] = to_list(text.pop("hybrid_override_pattern"))
            text.pop("num_hidden_layers", None)
        if "mtp_hybrid_override_pattern" in text:
            text["mtp_layers_block_type"] = to_list(text.pop("mtp_hybrid_override_pattern"))
        text.pop("architectures", None)
    audio = out.get("audio_config")
    if isinstance(audio, dict):
        if audio.get("model_type") == "parakeet":
            audio["model_type"] = "parakeet_encoder"
        for key in _SOUND_EXTRA:
            audio.pop(key, None)
        for key, value in _SOUND_PASSED_BY_VLLM.items():
            audio.setdefault(key, _parakeet_default(key) if value is None else value)
    vision = out.get("vision_config")
    if isinstance(vision, dict):
        for key in _VISION_EXTRA:
            vision.pop(key, None)
    return out


def to_released(config: dict, preprocessor: dict | None = None) -> dict:
    """``config`` in released naming with every field the serving classes read.

    Args:
        config: ``config.json`` of the source, either naming.
        preprocessor: The source's ``preprocessor_config.json`` (image budgets, audio
            sampling rate), if any.
    """
    native = to_native(config)
    derived = _released_from_native(native, preprocessor or {})
    if naming_of(config) == NATIVE:
        return derived
    out = copy.deepcopy(config)  # a released source's own values win
    for key, value in derived.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = {**value, **out[key]}
    return out


def _released_from_native(native: dict, preprocessor: dict) -> dict:
    legacy = {name: legacy for legacy, name in _legacy_names().items()}
    out: dict[str, Any] = {}
    for key, value in native.items():
        out[legacy.get(key, key)] = copy.deepcopy(value)
    out["architectures"] = [RELEASED_ARCHITECTURE]
    out["model_type"] = RELEASED_MODEL_TYPE
    vision = out.get("vision_config") or {}
    text = out.get("llm_config") or {}
    audio = out.get("sound_config") or {}
    for key, (value, _why) in RELEASED_ONLY.items():
        out[key] = copy.deepcopy(value)
    if native.get("force_image_size") is not None:
        out["force_image_size"] = native["force_image_size"]
    out["patch_size"] = vision.get("patch_size", preprocessor.get("patch_size", 16))
    out["norm_mean"] = list(vision.get("norm_mean") or preprocessor.get("image_mean") or [])
    out["norm_std"] = list(vision.get("norm_std") or preprocessor.get("image_std") or [])
    out["max_sequence_length"] = int(
        preprocessor.get("max_model_len") or text.get("max_position_embeddings") or 131072
    )
    if "dtype" in out:
        out["torch_dtype"] = out["dtype"]
    if text:
        to_pattern, _ = _pattern_codec()
        text = dict(text)
        if "layers_block_type" in text:
            blocks = text.pop("layers_block_type")
            text["hybrid_override_pattern"] = to_pattern(blocks)
            text["num_hidden_layers"] = len(blocks)
        if "mtp_layers_block_type" in text:
            text["mtp_hybrid_override_pattern"] = to_pattern(text.pop("mtp_layers_block_type"))
        text.setdefault("architectures", ["NemotronHForCausalLM"])
        out["llm_config"] = text
    if audio:
        audio = dict(audio)
        audio["model_type"] = "parakeet"
        audio["sampling_rate"] = int(preprocessor.get("sampling_rate", 16000))
        for key, value in _SOUND_PASSED_BY_VLLM.items():
            if key in audio and audio[key] == (_parakeet_default(key) if value is None else value):
                del audio[key]
        out["sound_config"] = audio
    if vision:
        out["vision_config"] = _released_vision(dict(vision), preprocessor)
    return out


def _released_vision(vision: dict, preprocessor: dict) -> dict:
    """RADIO's construction arguments (``args``) from the native RADIO fields.

    vLLM builds the tower from ``args`` alone (``nano_nemotron_vl.py:1691-1721``,
    ``models/radio.py:531-548``): ``model`` names the timm widths, ``cls_token_per_teacher``
    with one teacher per class token gives ``num_cls_tokens``, ``register_multiple`` pads
    class tokens to a multiple (``radio.py:55-62``: ``num_registers = register_multiple -
    num_cls_tokens % register_multiple``), ``teachers[i].use_summary`` gives
    ``summary_idxs`` (``radio.py:673-680``), ``cpe_max_size`` the largest position grid.
    The native config names none of the teachers: they are numbered (only their count and
    ``use_summary`` are read).
    """
    hidden = int(vision.get("hidden_size", 0))
    blocks = int(vision.get("num_hidden_layers", 0))
    heads = int(vision.get("num_attention_heads", 0))
    mlp = round(hidden * float(vision.get("mlp_ratio", 4.0)))
    n_cls = int(vision.get("num_cls_tokens", 1))
    n_reg = int(vision.get("num_registers", 0))
    summary = list(vision.get("summary_idxs") or [])
    args: dict[str, Any] = {
        "teachers": [{"name": f"teacher_{i}", "use_summary": i in summary} for i in range(n_cls)],
        "cls_token_per_teacher": True,
        "register_multiple": (n_cls + n_reg) if n_reg else None,
        "cpe_max_size": int(vision.get("max_img_size", 2048)),
        "min_num_patches": int(
            preprocessor.get(
                "min_num_patches", min(1024, preprocessor.get("max_num_patches", 1024))
            )
        ),
        "max_num_patches": int(preprocessor.get("max_num_patches", 13312)),
    }
    model = timm_model_for(hidden, blocks, heads, mlp)
    if model is not None:
        args["model"] = model
    vision["args"] = args
    temporal = vision.get("video_temporal_patch_size")
    vision["separate_video_embedder"] = bool(temporal and temporal > 1)
    vision["max_resolution"] = int(vision.get("max_img_size", 2048))
    image = int(vision.get("image_size", 224))
    vision["preferred_resolution"] = [image, image]
    return vision


def released_preprocessor(preprocessor: dict, config: dict) -> dict:
    """``preprocessor_config.json`` with the keys a released-naming reader looks for
    (``norm_mean``/``norm_std``, ``min_num_patches``/``max_num_patches``, ``patch_size``,
    ``downsample_ratio``) beside the source's own keys (which win)."""
    released = to_released(config, preprocessor)
    args = (released.get("vision_config") or {}).get("args") or {}
    extra = {
        "patch_size": released.get("patch_size"),
        "downsample_ratio": released.get("downsample_ratio"),
        "norm_mean": released.get("norm_mean"),
        "norm_std": released.get("norm_std"),
        "min_num_patches": args.get("min_num_patches"),
        "max_num_patches": args.get("max_num_patches"),
        "sampling_rate": (released.get("sound_config") or {}).get("sampling_rate"),
    }
    return {**{k: v for k, v in extra.items() if v is not None}, **preprocessor}


def convert(config: dict, naming: str, preprocessor: dict | None = None) -> dict:
    """``config`` in ``naming`` (``released``, ``native``, or ``source``: unchanged)."""
    if naming == SOURCE:
        return copy.deepcopy(config)
    if naming == RELEASED:
        return to_released(config, preprocessor)
    if naming == NATIVE:
        return to_native(config)
    raise ValueError(f"unknown naming {naming!r}; choose one of {CONFIG_NAMINGS}")
