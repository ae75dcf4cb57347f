"""Reading a checkpoint directory for bundling: precision, modalities, verified shards.

Policy: everything the bundle needs to know about a checkpoint comes from its own
files, read once, before anything is copied:

* ``config.json`` (required): ``model_type``, ``architectures`` and which encoders
  exist (``vision_config`` means image and video input, ``sound_config`` or
  ``audio_config`` means audio input).
* ``hf_quant_config.json`` (modelopt's export; absent means BF16): the precision.
  Accepted ``quant_algo`` values are FP8 (per-tensor), NVFP4 (block 16) and
  MIXED_PRECISION whose per-layer algorithms are FP8 or NVFP4; accepted
  ``kv_cache_quant_algo`` values are FP8 or null. Anything else is refused, naming
  the file, the field and the allowed values.
* ``omniquant.json`` (written by omniquant's export): the sha256 of every
  ``model*.safetensors`` shard. Shards are hashed while they are copied (or, with
  ``link``, read in place) and must match; a shard on disk that the file does not
  list, or a listed shard that is missing, is an error. A checkpoint without
  ``omniquant.json`` is bundled with the checksums computed here and recorded as
  unverified only when it is BF16 (a source checkpoint); a quantized one without it is
  refused by ``omniquant.checkpoint.verify.verify_checkpoint``, which ``build_engine_bundle`` runs
  first (temporary directories, NaN/Inf scales).

Hidden files and folders (``.git``, ``.cache``) are not part of a bundle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omniquant.checkpoint.layout import (
    CONFIG_JSON,
    INDEX_JSON,
    QUANT_CONFIG_JSON,
    RECORD_JSON,
    SHARD_GLOB,
    QuantConfig,
    read_record,
    sha256_file,
)
from omniquant.checkpoint.layout import (
    read_quant_config as read_quant_config_file,
)
from omniquant.errors import EngineError
from omniquant.formats import FORMATS, KV_CACHE_FORMAT, NVFP4

Precision = Literal["bf16", "fp8", "nvfp4", "mixed"]

#: hf_quant_config ``quant_algo`` -> precision: each quantized format of the registry,
#: and modelopt's name for a checkpoint that mixes them.
_QUANT_ALGOS: dict[str, Precision] = {
    **{f.hf_quant_algo: name for name, f in FORMATS.items() if f.quantized},
    "MIXED_PRECISION": "mixed",
}
_LAYER_ALGOS = tuple(f.hf_quant_algo for f in FORMATS.values() if f.quantized)
_KV_ALGOS = (KV_CACHE_FORMAT.hf_quant_algo,)
NVFP4_GROUP_SIZE = NVFP4.block_size
# Architectures TensorRT-LLM (>= 1.3.0rc13) registers for the Nemotron Nano VL / omni
# family; a checkpoint whose config.json names another fails there with "Unknown architecture".
TRTLLM_ARCHITECTURES = ("NemotronH_Nano_Omni_Reasoning_V3", "NemotronH_Nano_VL_V2")


@dataclass(frozen=True)
class QuantInfo:
    """The quantization a checkpoint carries, from ``hf_quant_config.json``.

    Attributes:
        precision: ``bf16``, ``fp8``, ``nvfp4`` or ``mixed``.
        quant_algo: The file's ``quantization.quant_algo`` (``None`` for BF16).
        kv_cache_quant_algo: ``FP8`` or ``None``.
        group_size: NVFP4 block size, when given.
        layer_algos: For MIXED_PRECISION, the number of layers per algorithm.
        nvfp4_layers: For MIXED_PRECISION, the layers stored in NVFP4 (sorted).
        producer: The file's ``producer`` block, if any.
    """

    precision: Precision
    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int | None = None
    layer_algos: dict[str, int] = field(default_factory=dict)
    nvfp4_layers: tuple[str, ...] = ()
    producer: dict[str, Any] | None = None

    @property
    def uses_nvfp4(self) -> bool:
        """True when any GEMM runs in NVFP4 (needs Blackwell)."""
        return self.precision == "nvfp4" or bool(self.nvfp4_layers)

    @property
    def kv_cache_dtype(self) -> str:
        """The ``kv_cache_config.dtype`` TensorRT-LLM needs: ``fp8`` or ``auto``."""
        return "fp8" if self.kv_cache_quant_algo == "FP8" else "auto"

    def describe(self) -> str:
        """A short phrase for messages, e.g. ``is NVFP4 (hf_quant_config.json ...)``."""
        if self.precision == "nvfp4":
            return f'is NVFP4 ({QUANT_CONFIG_JSON} quantization.quant_algo = "NVFP4")'
        if self.precision == "mixed" and self.nvfp4_layers:
            first = self.nvfp4_layers[0]
            return (
                f"is MIXED_PRECISION with {len(self.nvfp4_layers)} NVFP4 layer(s) "
                f"({QUANT_CONFIG_JSON} quantization.quantized_layers, e.g. {first!r})"
            )
        return f"is {self.precision.upper()}"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a bundle needs to know about a checkpoint directory.

    Attributes:
        path: The checkpoint directory (resolved).
        model_type: ``config.json`` ``model_type``.
        architectures: ``config.json`` ``architectures``.
        modalities: Input modalities, always starting with ``text``.
        quant: The quantization, see ``QuantInfo``.
        shards: ``model*.safetensors`` file names, sorted.
        expected_sha256: Shard checksums from ``omniquant.json``, or ``None`` without it.
        recipe: The ``recipe`` entry of ``omniquant.json``, if any.
    """

    path: Path
    model_type: str | None
    architectures: list[str]
    modalities: tuple[str, ...]
    quant: QuantInfo
    shards: tuple[str, ...]
    expected_sha256: dict[str, str] | None
    recipe: Any = None

    @property
    def has_video(self) -> bool:
        return "video" in self.modalities


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineError(f"{path}: not valid JSON ({exc}); re-export the checkpoint") from None
    except OSError as exc:
        raise EngineError(f"{path}: cannot read ({exc.strerror})") from None


def read_quant_config(checkpoint: Path) -> QuantInfo:
    """Parse ``hf_quant_config.json``; BF16 when the file is absent.

    Raises:
        EngineError: The file is malformed or names an algorithm bundles do not support.
    """
    path = checkpoint / QUANT_CONFIG_JSON
    qc = read_quant_config_file(checkpoint, EngineError)
    if qc is None:
        config = checkpoint / CONFIG_JSON
        if config.exists() and "quantization_config" in _read_json(config):
            raise EngineError(
                f"{config} has a quantization_config but {path} is missing; bundles read the "
                f"precision from modelopt's {QUANT_CONFIG_JSON}: re-export the checkpoint with omniquant"
            )
        return QuantInfo(precision="bf16")
    return quant_info(qc, path)


def quant_info(qc: QuantConfig, path: Path) -> QuantInfo:
    """``QuantInfo`` of ``qc`` (read from ``path``), refusing what bundles do not support.

    Raises:
        EngineError: An algorithm, KV-cache algorithm or group size bundles do not support.
    """
    quant = qc.quantization
    algo = quant.quant_algo
    if algo not in _QUANT_ALGOS:
        raise EngineError(
            f"{path}: quantization.quant_algo = {algo!r} is not supported for engine bundles; "
            f"allowed: {', '.join(_QUANT_ALGOS)}"
        )
    kv = quant.kv_cache_quant_algo
    if kv is not None and kv not in _KV_ALGOS:
        raise EngineError(
            f"{path}: quantization.kv_cache_quant_algo = {kv!r} is not supported; "
            f"allowed: {', '.join(_KV_ALGOS)} or null"
        )
    group_size = quant.group_size
    if algo == "NVFP4" and group_size not in (None, NVFP4_GROUP_SIZE):
        raise EngineError(
            f"{path}: quantization.group_size = {group_size!r}; NVFP4 in TensorRT-LLM uses "
            f"blocks of {NVFP4_GROUP_SIZE}: quantize again with group_size {NVFP4_GROUP_SIZE}"
        )

    layer_algos: dict[str, int] = {}
    nvfp4_layers: list[str] = []
    if algo == "MIXED_PRECISION":
        layers = quant.quantized_layers
        if not layers:
            raise EngineError(
                f"{path}: quant_algo MIXED_PRECISION needs a non-empty "
                f"quantization.quantized_layers object; re-export the checkpoint"
            )
        for name, spec in layers.items():
            layer_algo = spec.quant_algo
            if layer_algo not in _LAYER_ALGOS:
                raise EngineError(
                    f"{path}: quantization.quantized_layers[{name!r}].quant_algo = "
                    f"{layer_algo!r}; allowed: {', '.join(_LAYER_ALGOS)}"
                )
            layer_algos[layer_algo] = layer_algos.get(layer_algo, 0) + 1
            if layer_algo == "NVFP4":
                nvfp4_layers.append(name)

    return QuantInfo(
        precision=_QUANT_ALGOS[algo],
        quant_algo=algo,
        kv_cache_quant_algo=kv,
        group_size=group_size,
        layer_algos=dict(sorted(layer_algos.items())),
        nvfp4_layers=tuple(sorted(nvfp4_layers)),
        producer=qc.producer,
    )


def _modalities(config: dict[str, Any]) -> tuple[str, ...]:
    found = ["text"]
    if "vision_config" in config:
        found += ["image", "video"]
    if "sound_config" in config or "audio_config" in config:
        found.append("audio")
    return tuple(found)


def _read_manifest(checkpoint: Path, shards: tuple[str, ...]) -> tuple[dict[str, str] | None, Any]:
    record = read_record(checkpoint, EngineError)
    if record is None:
        return None, None
    listed = record.shards
    missing = sorted(set(listed) - set(shards))
    if missing:
        raise EngineError(
            f"{checkpoint / missing[0]}: listed in {RECORD_JSON} but missing; "
            f"copy the complete checkpoint"
        )
    unlisted = sorted(set(shards) - set(listed))
    if unlisted:
        raise EngineError(
            f"{checkpoint / unlisted[0]}: not listed in {RECORD_JSON} shards; the "
            f"directory changed after export: remove the file or re-export the checkpoint"
        )
    return dict(listed), record.recipe.to_json() if record.recipe is not None else None


def _check_index(checkpoint: Path, shards: tuple[str, ...]) -> None:
    index = checkpoint / INDEX_JSON
    if not index.exists():
        return
    weight_map = _read_json(index).get("weight_map", {})
    missing = sorted(set(weight_map.values()) - set(shards))
    if missing:
        raise EngineError(f"{index}: weight_map names {missing[0]!r}, which is missing")


def read_checkpoint(checkpoint: str | Path) -> CheckpointInfo:
    """Read and check everything a bundle needs from ``checkpoint``, without hashing shards.

    Raises:
        EngineError: A required file is missing or malformed, or the precision is unsupported.
    """
    path = Path(checkpoint).expanduser().resolve()
    if not path.is_dir():
        raise EngineError(f"{path}: checkpoint directory not found")
    config_path = path / CONFIG_JSON
    if not config_path.exists():
        raise EngineError(f"{config_path}: missing; is {path} a Hugging Face checkpoint?")
    config = _read_json(config_path)
    shards = tuple(sorted(p.name for p in path.glob(SHARD_GLOB) if p.is_file()))
    if not shards:
        raise EngineError(f"{path}: no {SHARD_GLOB} files; is the export complete?")
    _check_index(path, shards)
    quant = read_quant_config(path)
    expected, recipe = _read_manifest(path, shards)
    architectures = config.get("architectures") or []
    return CheckpointInfo(
        path=path,
        model_type=config.get("model_type"),
        architectures=list(architectures),
        modalities=_modalities(config),
        quant=quant,
        shards=shards,
        expected_sha256=expected,
        recipe=recipe,
    )


def serving_warnings(info: CheckpointInfo) -> list[str]:
    """Problems that do not stop bundling but will stop the engine on the GPU host."""
    warnings = []
    if not set(info.architectures) & set(TRTLLM_ARCHITECTURES):
        warnings.append(
            f"{info.path / CONFIG_JSON}: architectures {info.architectures} has none of "
            f"{', '.join(TRTLLM_ARCHITECTURES)}, the names TensorRT-LLM registers for this model "
            f"family; loading will fail with 'Unknown architecture' unless the checkpoint carries "
            f"the hub config.json"
        )
    if info.quant.uses_nvfp4 and info.quant.kv_cache_dtype != "fp8":
        warnings.append(
            f"{info.path}: NVFP4 without FP8 KV scales; vllm_serve.sh still passes "
            "--kv-cache-dtype fp8 (vLLM's NVFP4 path needs an FP8 KV cache), so vLLM uses "
            "unit k/v scales, while llm_api_options.yaml keeps the KV cache in the model dtype. "
            "Quantize with quantization.kv_cache=fp8 for calibrated KV scales"
        )
    return warnings


def _files(root: Path) -> list[Path]:
    """Regular files under ``root`` (following links), relative, hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                found.append((Path(dirpath) / name).relative_to(root))
    return found


def place_checkpoint(info: CheckpointInfo, dest: Path, *, link: bool) -> dict[str, str]:
    """Copy (or symlink) the checkpoint to ``dest`` and verify its shards.

    With ``link`` the bundle's ``dest`` becomes a symlink to the checkpoint directory
    and the shards are hashed in place; otherwise every file is copied and hashed in
    one pass, so the checksums describe the bytes in the bundle.

    Returns:
        sha256 of every file, keyed by path relative to the checkpoint.

    Raises:
        EngineError: A shard's sha256 differs from ``omniquant.json``.
    """
    if link:
        dest.symlink_to(info.path, target_is_directory=True)
    else:
        dest.mkdir()
    checksums: dict[str, str] = {}
    for rel in _files(info.path):
        target = None
        if not link:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
        checksums[rel.as_posix()] = sha256_file(info.path / rel, copy_to=target)
    if info.expected_sha256 is not None:
        for name, expected in sorted(info.expected_sha256.items()):
            actual = checksums[name]
            if actual != expected:
                raise EngineError(
                    f"{info.path / name}: sha256 {actual} does not match {expected} recorded in "
                    f"{RECORD_JSON}; the shard changed or was copied incompletely: "
                    f"copy it again or re-export the checkpoint"
                )
    return checksums
