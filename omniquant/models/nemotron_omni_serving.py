"""What vLLM and TensorRT-LLM read to construct Nemotron 3 Nano Omni, and whether a checkpoint has it.

Policy: each field a serving stack's model class reads from ``config.json`` (and from the
tokenizer) to *construct* the model is listed once, in ``FIELDS``, with the source line
that reads it, and is checked against the checkpoint's files only (no model is built, no
loader is imported): present with a usable type, and consistent with the tensors and the
tokenizer it will meet (patch size and widths against shapes, token ids against the
tokenizer). The quantization side of the same loaders lives in
``omniquant.checkpoint.readers``; this module is the other half of "would it load".

Fields are read as the class that parses ``config.json`` exposes them. For a released
config that is NVIDIA's remote-code class, which stores each key as an attribute (and vLLM
remaps ``llm_config`` to ``text_config``, ``transformers_utils/config.py:195-197, 790-795``).
For a native config it is transformers' ``NemotronH_Omni_Reasoning_V3_Config``, which has
``text_config``/``audio_config``/``image_token_id`` and none of the released-only fields.

Pinned sources (read, not copied):

* vLLM 0.33.0 (PyPI wheel, ``vllm/_version.py`` commit ``g4ba787ec9``):
  ``model_executor/models/nano_nemotron_vl.py`` (``NemotronH_Nano_VL_V2.__init__``
  968-1059, ``get_vit_model_from_radio_config`` 1691-1721),
  ``transformers_utils/processors/nano_nemotron_vl.py`` (placeholders 37-42,
  ``BaseNanoNemotronVLProcessor.__init__`` 585-627, the video/audio processor 795-838),
  ``transformers_utils/configs/radio.py`` (``VIT_TIMM_DIM_BY_NAME`` 10-16, ``RadioConfig``
  81-86), ``model_executor/models/radio.py`` (class and register tokens 55-62, 531-548,
  ``summary_idxs`` 673-680), ``transformers_utils/configs/parakeet.py`` (``ParakeetConfig``
  9-23, ``ExtractorConfig.from_hf_config`` 57-70), ``model_executor/models/parakeet.py:29-38``,
  ``model_executor/models/nemotron_h.py`` (``hybrid_override_pattern`` 591-614,
  ``layer_norm_epsilon`` 316), ``model_executor/models/registry.py:550-553`` (the
  architectures this class serves, the native ``NemotronH_Omni_Reasoning_V3`` among them).
* TensorRT-LLM ``tensorrt_llm/_torch/models/modeling_nemotron_nano.py`` @ ``01a04b9b0f77``
  (line numbers unavailable: the repository snapshot is larger than the fetch limit;
  functions are named): ``NanoV2VLVisionEncoder.__init__`` (``force_image_size //
  patch_size``, ``downsample_ratio``, ``ps_version`` in {v1, v2} else
  ``NotImplementedError``, optional ``norm_mean``/``norm_std``,
  ``vision_config.video_temporal_patch_size``, ``vit_hidden_size``,
  ``projector_hidden_size``, ``llm_config.hidden_size``, ``llm_config.rms_norm_eps`` or
  ``layer_norm_epsilon``), ``NemotronH_Nano_VL_V2.__init__`` (registered for
  ``NemotronH_Nano_Omni_Reasoning_V3`` and ``NemotronH_Nano_VL_V2`` only; ``llm_config``,
  ``img_context_token_id``, ``video_context_token_id``, optional ``sound_context_token_id``)
  and ``load_weights`` (``sound_config``, ``llm_config.hidden_size``). The input processor's
  reads (``img_context_token``, ``img_start_token``, ``img_end_token``,
  ``video_context_token``, ``sound_context_token``, ``max_sequence_length``,
  ``vision_config.args``) are taken from its unit test's mock config
  (``_make_nano_processor``), not from the class, which could not be read in full; they are
  marked so. Not pinned down: what ``RADIOVisionModel`` (``modeling_radio.py``) reads from
  ``vision_config``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omniquant.models.nemotron_omni_naming import (
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    RELEASED_ARCHITECTURE,
    RELEASED_MODEL_TYPE,
    SOUND_CONTEXT,
    SOUND_END,
    SOUND_START,
    VIDEO_CONTEXT,
    VIT_TIMM_DIMS,
    naming_of,
)

VLLM_SRC = "vllm 0.33.0 "
_M = "model_executor/models/nano_nemotron_vl.py"
_P = "transformers_utils/processors/nano_nemotron_vl.py"
TRT_SRC = "TensorRT-LLM modeling_nemotron_nano.py@01a04b9b0f77 "
TRT_TEST = "TensorRT-LLM input processor (per its unit test mock) "


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_triple(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_num(x) for x in v)


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "an integer"),
    "number": (_is_num, "a number"),
    "any": (lambda v: True, "present (null allowed)"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "triple": (_is_triple, "three numbers"),
    "ps": (lambda v: v in ("v1", "v2"), "'v1' or 'v2'"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
}


@dataclass(frozen=True)
class Field:
    """One config field a serving class reads to construct the model.

    Attributes:
        path: Dotted path as the class reads it (``text_config`` stands for the text
            sub-config, stored as ``llm_config`` in released naming).
        kind: A key of ``_KINDS``.
        cite: Where the reader reads it.
        when: ``always``, ``audio`` (only with audio tensors) or ``dynamic`` (only with
            dynamic resolution, i.e. ``min_num_patches`` in ``vision_config.args``).
    """

    path: str
    kind: str
    cite: str
    when: str = "always"


VLLM_FIELDS: tuple[Field, ...] = (
    Field("force_image_size", "int", f"{_M}:968,973 (image_size // patch_size); {_P}:600"),
    Field("patch_size", "int", f"{_M}:969; {_P}:601"),
    Field("template", "any", f"{_M}:971"),
    Field("downsample_ratio", "number", f"{_M}:973-975; {_P}:602"),
    Field("ps_version", "ps", f"{_M}:976, 1072"),
    Field("image_tag_type", "any", f"{_M}:977"),
    Field(
        "text_config",
        "dict",
        f"{_M}:988 (llm_config remapped, transformers_utils/config.py:195-197)",
    ),
    Field("text_config.hidden_size", "int", f"{_M}:1002"),
    Field("text_config.vocab_size", "int", "model_executor/models/nemotron_h.py:582"),
    Field("text_config.layer_norm_epsilon", "number", "model_executor/models/nemotron_h.py:316"),
    Field(
        "text_config.hybrid_override_pattern", "str", "model_executor/models/nemotron_h.py:591-614"
    ),
    Field("vit_hidden_size", "int", f"{_M}:1000"),
    Field("projector_hidden_size", "int", f"{_M}:1001"),
    Field("vision_config.args", "dict", f"{_M}:1693; {_P}:627"),
    Field("vision_config.args.model", "str", f"{_M}:1693-1695 (ValueError when absent)"),
    Field("norm_mean", "triple", f"{_M}:1714; {_P}:609"),
    Field("norm_std", "triple", f"{_M}:1715; {_P}:610"),
    Field("use_thumbnail", "bool", f"{_P}:608"),
    Field("vision_config.args.min_num_patches", "int", f"{_P}:618", "dynamic"),
    Field("vision_config.args.max_num_patches", "int", f"{_P}:619", "dynamic"),
    Field("sound_config", "dict", f"{_M}:1030 (absent: no audio tower is built)", "audio"),
    Field("sound_config.hidden_size", "int", "model_executor/models/parakeet.py:29", "audio"),
    Field(
        "sound_config.projection_hidden_size",
        "int",
        "transformers_utils/configs/parakeet.py:12",
        "audio",
    ),
    Field(
        "sound_config.projection_bias", "bool", "transformers_utils/configs/parakeet.py:13", "audio"
    ),
    Field(
        "sound_config.sampling_rate",
        "int",
        "transformers_utils/configs/parakeet.py:14, 64",
        "audio",
    ),
    Field("sound_config.num_mel_bins", "int", "transformers_utils/configs/parakeet.py:63", "audio"),
    Field(
        "sound_config.subsampling_factor",
        "int",
        "transformers_utils/configs/parakeet.py:65",
        "audio",
    ),
    Field(
        "sound_config.subsampling_conv_kernel_size",
        "int",
        "transformers_utils/configs/parakeet.py:66",
        "audio",
    ),
    Field(
        "sound_config.subsampling_conv_stride",
        "int",
        "transformers_utils/configs/parakeet.py:67",
        "audio",
    ),
)

TRTLLM_FIELDS: tuple[Field, ...] = (
    Field(
        "force_image_size", "int", "NanoV2VLVisionEncoder.__init__ (force_image_size // patch_size)"
    ),
    Field("patch_size", "int", "NanoV2VLVisionEncoder.__init__"),
    Field("downsample_ratio", "number", "NanoV2VLVisionEncoder.__init__"),
    Field("ps_version", "ps", "NanoV2VLVisionEncoder.__init__ (NotImplementedError otherwise)"),
    Field("vit_hidden_size", "int", "NanoV2VLVisionEncoder.__init__"),
    Field("projector_hidden_size", "int", "NanoV2VLVisionEncoder.__init__"),
    Field("llm_config", "dict", "NemotronH_Nano_VL_V2.__init__ (pretrained_config.llm_config)"),
    Field(
        "llm_config.hidden_size",
        "int",
        "NanoV2VLVisionEncoder.__init__; NemotronH_Nano_VL_V2.load_weights",
    ),
    Field("llm_config.vocab_size", "int", "NemotronH_Nano_VL_V2.__init__"),
    Field("img_context_token_id", "int", "NemotronH_Nano_VL_V2.__init__"),
    Field("video_context_token_id", "int", "NemotronH_Nano_VL_V2.__init__"),
    Field("sound_context_token_id", "int", "NemotronH_Nano_VL_V2.__init__ (getattr)", "audio"),
    Field(
        "sound_config",
        "dict",
        "NemotronH_Nano_VL_V2.load_weights (absent: no audio tower)",
        "audio",
    ),
    Field("img_context_token", "str", "NanoV2VLInputProcessor (test mock)"),
    Field("video_context_token", "str", "NanoV2VLInputProcessor (test mock)"),
    Field("img_start_token", "str", "NanoV2VLInputProcessor (test mock)"),
    Field("img_end_token", "str", "NanoV2VLInputProcessor (test mock)"),
    Field("sound_context_token", "str", "NanoV2VLInputProcessor (test mock)", "audio"),
    Field("max_sequence_length", "int", "NanoV2VLInputProcessor (test mock)"),
    Field(
        "vision_config.args", "dict", "NanoV2VLInputProcessor (test mock; dynamic resolution keys)"
    ),
)

FIELDS: dict[str, tuple[Field, ...]] = {"vllm": VLLM_FIELDS, "trtllm": TRTLLM_FIELDS}
#: The class each reader builds, for messages.
CLASS_NAME = {
    "vllm": "vLLM 0.33.0 NemotronH_Nano_VL_V2",
    "trtllm": "TensorRT-LLM NemotronH_Nano_VL_V2 (PyTorch backend)",
}


@dataclass(frozen=True)
class Finding:
    """One reason a reader would not construct the model as the weights need.

    Attributes:
        field: The config field (or ``tokenizer:<token>``, ``config_class``).
        kind: ``missing`` (absent or unusable), ``inconsistent`` (present, but the weights or
            the tokenizer say otherwise) or ``config_class`` (the reader cannot build the
            config object at all).
        detail: What is wrong and how to fix it.
        cite: The source line that reads it.
    """

    field: str
    kind: str
    detail: str
    cite: str


def reader_view(config: dict) -> dict:
    """``config.json`` as the reader's config class exposes it (see the module policy):
    released names as stored plus ``text_config``; native names as transformers keeps them."""
    view = dict(config)
    if "llm_config" in view and "text_config" not in view:
        view["text_config"] = view["llm_config"]
    text = view.get("text_config")
    if (
        isinstance(text, dict)
        and "hybrid_override_pattern" not in text
        and "layers_block_type" in text
    ):
        # transformers' NemotronHConfig derives it as a property
        from omniquant.models.nemotron_omni_naming import _pattern_codec

        to_pattern, _ = _pattern_codec()
        view["text_config"] = {
            **text,
            "hybrid_override_pattern": to_pattern(text["layers_block_type"]),
        }
    return view


def _get(view: dict, path: str):
    node: Any = view
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


_ABSENT = object()


def config_class_finding(reader: str, config: dict, files: set[str]) -> Finding | None:
    """Whether the reader can build the config object: a ``model_type`` transformers
    registers, or remote code named by ``auto_map`` that sits in the directory."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type == "nemotron_h_omni":
        if reader == "trtllm":
            return Finding("config_class", "config_class",
                           f"architectures {archs}: TensorRT-LLM @01a04b9b0f77 registers its class "
                           f"for {RELEASED_ARCHITECTURE} and NemotronH_Nano_VL_V2 only; write the "
                           "released naming (quantize --config-naming released)",
                           "@register_auto_model decorators")  # fmt: skip
        return None  # transformers' own class builds it (vLLM registry.py:553 serves it)
    auto = (config.get("auto_map") or {}).get("AutoConfig")
    if not auto:
        return Finding("config_class", "config_class",
                       f"model_type {model_type!r} is remote code that transformers does not register, "
                       "and config.json has no auto_map: AutoConfig cannot build it. Copy the released "
                       "checkpoint's *.py files and its auto_map beside config.json (hf download "
                       "nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning-BF16 --include '*.py' config.json)",
                       "vllm transformers_utils/config.py:445; transformers AutoConfig")  # fmt: skip
    module = str(auto).split("--")[-1].rsplit(".", 1)[0]
    if f"{module}.py" not in files:
        return Finding("config_class", "config_class",
                       f"auto_map names {auto!r} but {module}.py is not in the directory; copy the "
                       "released checkpoint's *.py files beside config.json",
                       "transformers get_class_from_dynamic_module")  # fmt: skip
    return None


def construction_findings(
    reader: str,
    config: dict,
    tensors: dict[str, tuple[str, tuple[int, ...]]],
    token_ids: Callable[[str], list[int]] | None,
    files: set[str],
) -> list[Finding]:
    """Everything that would stop ``reader`` constructing this checkpoint's model as its
    tensors need (empty: it constructs).

    Args:
        reader: ``vllm`` or ``trtllm``.
        config: ``config.json``.
        tensors: Tensor name -> (dtype, shape), from the safetensors headers.
        token_ids: Encodes a string with the checkpoint's tokenizer, no special tokens
            added (None: no tokenizer in the directory).
        files: File names in the directory.
    """
    out: list[Finding] = []
    cls = config_class_finding(reader, config, files)
    if cls is not None:
        out.append(cls)
    view = reader_view(config)
    has_audio = any(n.startswith(("sound_encoder.", "sound_projection.")) for n in tensors)
    args = _get(view, "vision_config.args")
    dynamic = isinstance(args, dict) and "min_num_patches" in args
    for f in FIELDS[reader]:
        if (f.when == "audio" and not has_audio) or (f.when == "dynamic" and not dynamic):
            continue
        value = _get(view, f.path)
        check, want = _KINDS[f.kind]
        if value is _ABSENT:
            extra = ""
            if f.path == "sound_config":
                extra = "; the sound_encoder/sound_projection tensors would not be loaded"
            out.append(Finding(f.path, "missing", f"absent ({want} needed){extra}", f.cite))
        elif not check(value):
            out.append(Finding(f.path, "missing", f"{value!r} is not {want}", f.cite))
    missing = {f.field for f in out}
    shape = _shape_findings(reader, view, tensors, missing)
    covered = {f.field for f in shape if f.kind == "missing"}
    out = [f for f in out if not (f.kind == "missing" and f.field in covered)] + shape
    if token_ids is not None:
        out += _token_findings(reader, view, token_ids, has_audio)
    else:
        out.append(Finding("tokenizer", "missing", "no tokenizer in the directory",
                           f"{_M}:1047 cached_tokenizer_from_config"))  # fmt: skip
    return out


def _vision_shapes(tensors) -> dict[str, Any]:
    t = {k: v[1] for k, v in tensors.items()}
    pre = "vision_model.radio_model.model."
    blocks = {int(m.group(1)) for k in t if (m := re.match(re.escape(pre) + r"blocks\.(\d+)\.", k))}
    out: dict[str, Any] = {"blocks": len(blocks)}
    emb = t.get(pre + "patch_generator.embedder.weight")
    if emb is not None:
        out["hidden"], out["patch_dim"] = emb[0], emb[1]
    vid = t.get(pre + "patch_generator.video_embedder.weight")
    if vid is not None:
        out["video_patch_dim"] = vid[1]
    cls = t.get(pre + "patch_generator.cls_token.token")
    if cls is not None:
        out["cls_rows"] = cls[0]
    fc1 = t.get(pre + "blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        out["mlp"] = fc1[0]
    qkv = t.get(pre + "blocks.0.attn.qkv.weight")
    if qkv is not None:
        out["qkv"] = qkv[0]
    summary = t.get("vision_model.radio_model.summary_idxs")
    if summary is not None:
        out["summary"] = summary[0] if summary else 0
    return out


def _shape_findings(reader: str, view: dict, tensors, missing: set[str]) -> list[Finding]:
    out: list[Finding] = []
    shapes = {k: v[1] for k, v in tensors.items()}

    def bad(field: str, detail: str, cite: str) -> None:
        out.append(Finding(field, "inconsistent", detail, cite))

    def val(path: str):
        v = _get(view, path)
        return None if v is _ABSENT or path in missing else v

    vs = _vision_shapes(tensors)
    patch = val("patch_size")
    if patch and "patch_dim" in vs and vs["patch_dim"] != 3 * patch * patch:
        bad("patch_size", f"{patch}, but the patch embedder takes {vs['patch_dim']} inputs "
            f"(3 x {patch}^2 = {3 * patch * patch})", f"{_M}:969, 1245")  # fmt: skip
    temporal = _get(view, "vision_config.video_temporal_patch_size")
    temporal = 1 if temporal is _ABSENT or temporal is None else temporal
    if patch and "video_patch_dim" in vs and vs["video_patch_dim"] != temporal * 3 * patch * patch:
        bad("vision_config.video_temporal_patch_size",
            f"{temporal}, but the video embedder takes {vs['video_patch_dim']} inputs", f"{_M}:980-983")  # fmt: skip
    vit = val("vit_hidden_size")
    if vit and "hidden" in vs and vs["hidden"] != vit:
        bad(
            "vit_hidden_size", f"{vit}, but the RADIO embedder is {vs['hidden']} wide", f"{_M}:1000"
        )
    ratio = val("downsample_ratio")
    proj = val("projector_hidden_size")
    text_hidden = (
        val("text_config.hidden_size") if reader == "vllm" else val("llm_config.hidden_size")
    )
    if vit and ratio:
        merged = vit * round(1 / ratio) ** 2
        if "mlp1.0.weight" in shapes and shapes["mlp1.0.weight"] != (merged,):
            bad("downsample_ratio", f"vit_hidden_size x (1/{ratio})^2 = {merged}, but mlp1.0 is "
                f"{shapes['mlp1.0.weight']}", f"{_M}:1015-1019")  # fmt: skip
        if proj and "mlp1.1.weight" in shapes and shapes["mlp1.1.weight"] != (proj, merged):
            bad("projector_hidden_size", f"mlp1.1 would be ({proj}, {merged}); stored "
                f"{shapes['mlp1.1.weight']}", f"{_M}:1001, 1020-1024")  # fmt: skip
    if (
        proj
        and text_hidden
        and "mlp1.3.weight" in shapes
        and shapes["mlp1.3.weight"] != (text_hidden, proj)
    ):
        bad("projector_hidden_size", f"mlp1.3 would be ({text_hidden}, {proj}); stored "
            f"{shapes['mlp1.3.weight']}", f"{_M}:1026")  # fmt: skip
    emb = shapes.get("language_model.backbone.embeddings.weight")
    vocab = val("text_config.vocab_size") if reader == "vllm" else val("llm_config.vocab_size")
    if emb and text_hidden and emb[1] != text_hidden:
        bad("text_config.hidden_size", f"{text_hidden}, but the embeddings are {emb[1]} wide",
            "model_executor/models/nemotron_h.py")  # fmt: skip
    if emb and vocab and emb[0] != vocab:
        bad("text_config.vocab_size", f"{vocab}, but the embeddings hold {emb[0]} rows",
            "model_executor/models/nemotron_h.py:582")  # fmt: skip
    pattern = val("text_config.hybrid_override_pattern")
    layers = {int(m.group(1)) for k in shapes
              if (m := re.match(r"^language_model\.backbone\.layers\.(\d+)\.", k))}  # fmt: skip
    if isinstance(pattern, str) and layers and len(pattern) != len(layers):
        bad("text_config.hybrid_override_pattern", f"{len(pattern)} layers, the tensors hold "
            f"{len(layers)}", "model_executor/models/nemotron_h.py:614")  # fmt: skip
    if reader == "vllm":
        out += _vllm_radio_findings(view, vs)
    sound = _get(view, "sound_config")
    if reader == "vllm" and isinstance(sound, dict):
        for key in ("attention_bias", "scale_input", "max_position_embeddings", "llm_hidden_size"):
            if key in sound:
                bad(f"sound_config.{key}", "vLLM passes it itself beside **sound_config.to_dict(): "
                    "TypeError (multiple values for keyword argument); leave it out",
                    "transformers_utils/configs/parakeet.py:30-35")  # fmt: skip
    if "sound_projection.linear1.weight" in shapes:
        s_hidden, s_proj = (
            val("sound_config.hidden_size"),
            val("sound_config.projection_hidden_size"),
        )
        lin1 = shapes["sound_projection.linear1.weight"]
        if s_hidden and s_proj and lin1 != (s_proj, s_hidden):
            bad("sound_config.projection_hidden_size", f"sound_projection.linear1 would be "
                f"({s_proj}, {s_hidden}); stored {lin1}", "model_executor/models/parakeet.py:35")  # fmt: skip
        if (
            _get(view, "sound_config.projection_bias") is False
            and "sound_projection.linear1.bias" in shapes
        ):
            bad("sound_config.projection_bias", "false, but sound_projection.linear1.bias is stored",
                "model_executor/models/parakeet.py:32, 35")  # fmt: skip
    return out


def _vllm_radio_findings(view: dict, vs: dict) -> list[Finding]:
    """vLLM builds RADIO from ``vision_config.args`` alone (``nano_nemotron_vl.py:1691-1721``)."""
    out: list[Finding] = []
    args = _get(view, "vision_config.args")
    if not isinstance(args, dict):
        return out
    model = args.get("model")
    dims = (vs.get("hidden"), vs.get("blocks"), (vs.get("qkv") or 0) // 3 or None, vs.get("mlp"))
    if model is None and vs.get("hidden"):
        out.append(Finding("vision_config.args.model", "missing",
                           f"vLLM builds RADIO from a timm name alone; the stored tower (hidden {dims[0]}, "
                           f"{dims[1]} blocks, MLP {dims[3]}) matches none of {sorted(VIT_TIMM_DIMS)}, so "
                           "vLLM cannot build this vision tower",
                           "transformers_utils/configs/radio.py:10-16, 81-86"))  # fmt: skip
    elif model is not None and model not in VIT_TIMM_DIMS:
        out.append(Finding("vision_config.args.model", "missing", f"{model!r} is not a name vLLM knows "
                           f"({sorted(VIT_TIMM_DIMS)})", "transformers_utils/configs/radio.py:81-86"))  # fmt: skip
    elif model is not None:
        hidden, blocks, _heads, mlp = VIT_TIMM_DIMS[model]
        stored = (vs.get("hidden"), vs.get("blocks"), vs.get("mlp"))
        if stored != (hidden, blocks, mlp) and None not in stored:
            out.append(Finding("vision_config.args.model", "inconsistent",
                               f"{model} is hidden {hidden}, {blocks} blocks, MLP {mlp}; the stored "
                               f"tower is {stored[0]}, {stored[1]} blocks, MLP {stored[2]}",
                               "transformers_utils/configs/radio.py:10-16"))  # fmt: skip
    teachers = args.get("teachers") or []
    n_cls = len({t.get("name") for t in teachers}) if args.get("cls_token_per_teacher") else 1
    rm = args.get("register_multiple")
    n_reg = (rm - n_cls % rm) if rm else 0
    if "cls_rows" in vs and n_cls + n_reg != vs["cls_rows"]:
        out.append(Finding("vision_config.args.register_multiple", "inconsistent",
                           f"teachers/cls_token_per_teacher/register_multiple give {n_cls} class + {n_reg} "
                           f"register tokens, the stored cls_token has {vs['cls_rows']} rows",
                           "model_executor/models/radio.py:55-62, 545-546"))  # fmt: skip
    n_summary = sum(1 for t in teachers if t.get("use_summary", True)) if teachers else None
    if n_summary is not None and "summary" in vs and n_summary != vs["summary"]:
        out.append(Finding("vision_config.args.teachers", "inconsistent",
                           f"{n_summary} teachers with use_summary, summary_idxs holds {vs['summary']}",
                           "model_executor/models/radio.py:673-680"))  # fmt: skip
    return out


def _token_findings(reader: str, view: dict, token_ids, has_audio: bool) -> list[Finding]:
    """Placeholder ids in the config against the tokenizer, and each placeholder one token."""
    out: list[Finding] = []
    strings = [IMG_CONTEXT, VIDEO_CONTEXT, IMG_START, IMG_END]
    if has_audio:
        strings += [SOUND_CONTEXT, SOUND_START, SOUND_END]
    ids: dict[str, int | None] = {}
    for s in strings:
        enc = list(token_ids(s))
        ids[s] = enc[0] if len(enc) == 1 else None
        if len(enc) != 1:
            out.append(Finding(f"tokenizer:{s}", "inconsistent",
                               f"{s!r} encodes to {len(enc)} tokens {enc[:6]}; the processors expect one "
                               "special token", f"{_P}:37-42, 832-838"))  # fmt: skip
    pairs = [("img_context_token_id", IMG_CONTEXT), ("video_context_token_id", VIDEO_CONTEXT)]
    if has_audio:
        pairs.append(("sound_context_token_id", SOUND_CONTEXT))
    if reader == "vllm":
        return out  # vLLM takes every placeholder id from the tokenizer (processors :868)
    for field, s in pairs:
        v = _get(view, field)
        if v is _ABSENT or v is None or ids.get(s) is None:
            continue
        if v != ids[s]:
            out.append(Finding(field, "inconsistent", f"{v}, but the tokenizer gives {s!r} id {ids[s]}",
                               "NemotronH_Nano_VL_V2.__init__"))  # fmt: skip
    return out


def is_released(config: dict) -> bool:
    """Whether ``config`` is in released naming with the released class and model type."""
    return naming_of(config) == "released" and config.get("model_type") == RELEASED_MODEL_TYPE
