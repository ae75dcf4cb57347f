"""Adapter interface and registry.

Policy: per-architecture knowledge lives in exactly one adapter class per model
family. Nothing outside ``omniquant/models`` branches on ``model_type``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omniquant.errors import ModelLoadError, arg_ref

_REGISTRY: dict[str, type[ModelAdapter]] = {}


_BY_ARCHITECTURE: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: register ``cls`` for its ``model_types`` and ``hub_architectures``."""
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    for arch in cls.hub_architectures:
        _BY_ARCHITECTURE[arch] = cls
    return cls


@dataclass
class LoadedModel:
    """A model in memory with everything stages need next to it."""

    model: Any
    tokenizer: Any
    path: Path
    adapter: ModelAdapter
    config_dict: dict = field(default_factory=dict)
    #: Set when the model emulates serving numerics of a quantized checkpoint.
    emulation: dict | None = None
    #: What the loader decided about placement beyond accelerate's map (devices.py).
    placement_notes: list[str] = field(default_factory=list)


class ModelAdapter(ABC):
    """What a stage may ask about a model family."""

    model_types: ClassVar[tuple[str, ...]] = ()
    #: ``architectures`` names of released (remote-code) checkpoints whose config.json
    #: carries another ``model_type``; transformers' native class loads them.
    hub_architectures: ClassVar[tuple[str, ...]] = ()
    #: Module groups that are encoders/projectors: a rule may quantize them only by
    #: naming the group explicitly (the field's most common silent failure).
    guarded_groups: ClassVar[frozenset[str]] = frozenset()
    #: Groups whose modules are fused 3-D expert containers (one module, E experts, each
    #: with ``up_proj``/``down_proj``); the export and the size prediction expand them.
    fused_expert_groups: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def load(
        self,
        path: Path,
        dtype: str = "bfloat16",
        weights: bool = True,
        placement: dict | None = None,
    ) -> LoadedModel:
        """Load a checkpoint directory; ``placement`` are ``from_pretrained`` device kwargs
        (``device_map``, ``max_memory``, ``offload_folder``; see ``omniquant.devices``).

        With ``weights=False`` the model is built from ``config.json`` alone on the meta
        device (shapes, no storage; no weight file is opened), for planning.
        """

    @abstractmethod
    def quant_root_name(self) -> str:
        """Attribute name of the submodule handed to ``mtq.quantize``."""

    @abstractmethod
    def module_groups(self, model) -> dict[str, list[str]]:
        """Map group name -> quantizable module names (full names in ``model``)."""

    @abstractmethod
    def forward(self, model, sample, **kwargs):
        """Run the whole model on one ``Sample``; returns the model output."""

    @abstractmethod
    def hub_name(self, native_name: str) -> str:
        """On-disk (hub layout) name of a native tensor or module name."""

    @abstractmethod
    def hub_tensor_group(self, name: str) -> str:
        """Group of an on-disk tensor name (``other`` for norms, SSM parameters, ...)."""

    @abstractmethod
    def placeholder_ids(self, model) -> dict[str, int]:
        """Token ids whose positions receive encoder features, per modality."""

    @abstractmethod
    def video_pruning(self, model, rate: float | None):
        """Context manager: the video token pruning (EVS) rate while it is open (None: the
        config's)."""

    @abstractmethod
    def calibration_shapes(self, model):
        """``omniquant.quantize.memory.CalibrationShapes``: what sizes one calibration forward."""

    @abstractmethod
    def placement_units(self, model) -> list[tuple[str, int]]:
        """``(name, bytes)`` in module order, as a device map may place them."""

    def selectors(self, model) -> dict[str, list[str]]:
        """Named subsets of groups that recipes may select besides the groups (none by
        default)."""
        return {}

    def resident_modules(self) -> tuple[str, ...]:
        """Modules ``--device auto`` never offloads (none by default)."""
        return ()


def read_config(path: Path) -> dict:
    """Read ``path/config.json`` with errors that name the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(
            "directory does not exist; pass a checkpoint directory.", arg="model", value=path
        )
    if not path.is_dir():
        raise ModelLoadError(
            "not a directory; pass a checkpoint directory.", arg="model", value=path
        )
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(
            "no config.json; this is not a Hugging Face checkpoint directory "
            "(create one with `omniquant make-tiny --out DIR` or download a nemotron_h_omni checkpoint).",
            arg="model",
            value=path,
        )
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg_file}: invalid JSON ({exc}).") from exc


def adapter_for(path: Path | str) -> ModelAdapter:
    """Return the adapter for the checkpoint at ``path``: by its ``model_type``, else by a
    released checkpoint's ``architectures`` name."""
    cfg = read_config(Path(path))
    model_type = cfg.get("model_type")
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]()
    archs = cfg.get("architectures") or []
    for arch in archs if isinstance(archs, list) else []:
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]()
    raise ModelLoadError(
        f"{Path(path) / 'config.json'}: model_type {model_type!r} (architectures {archs!r}) is "
        f"not supported; omniquant supports model types {sorted(_REGISTRY)} and released "
        f"architectures {sorted(_BY_ARCHITECTURE)}."
    )


def load_model(
    path: Path | str,
    dtype: str = "bfloat16",
    weights: bool = True,
    placement: dict | None = None,
) -> LoadedModel:
    """Load the checkpoint at ``path`` with its registered adapter.

    ``weights=False`` builds the model from ``config.json`` alone on the meta device
    (a directory holding only ``config.json`` is enough); no weight is read.
    ``placement``: see ``ModelAdapter.load``.
    """
    return adapter_for(path).load(Path(path), dtype=dtype, weights=weights, placement=placement)
