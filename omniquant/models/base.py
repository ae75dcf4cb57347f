"""Adapter interface and registry.

Policy: per-architecture knowledge lives in exactly one adapter class per model
family. Nothing outside ``omniquant/models`` branches on ``model_type``, names a
transformers class of the model or one of its module attributes: a stage asks the
adapter. Every method a stage calls is declared here, abstract or with a default that
is correct for a model without the feature (no MoE, no video, no KV cache), so no
stage probes an adapter with ``hasattr``/``getattr``.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omniquant.errors import ModelLoadError

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


@dataclass(frozen=True)
class ExpertLinear:
    """One per-expert GEMM of a fused 3-D expert container, as the hub layout stores it.

    Attributes:
        hub_module: Hub-layout module name of this expert's projection (its ``.weight``
            is the stored tensor).
        projection: The container's projection it belongs to (its quantizers are named
            after it by modelopt's fused-experts wrapper).
        expert: Expert index within the container.
        out_features: Output width of the GEMM.
        in_features: Input width of the GEMM.
    """

    hub_module: str
    projection: str
    expert: int
    out_features: int
    in_features: int


@dataclass(frozen=True)
class MoELayer:
    """One routed-expert (MoE) layer, as calibration statistics see it.

    Attributes:
        name: Module name of the layer; the key of its expert statistics.
        num_experts: Routed experts.
        projections: Per-expert GEMMs of the expert container, in the order their
            statistics are kept.
    """

    name: str
    num_experts: int
    projections: tuple[str, ...]


#: ``fn(layer, projection, expert, x) -> x``: sees (and may replace) the input of one
#: per-expert GEMM (``ModelAdapter.expert_probes``).
ExpertInputFn = Callable[[str, str, int, Any], Any]


@dataclass(frozen=True)
class CalibrationShapes:
    """The shapes that size one calibration forward of a hybrid MoE backbone."""

    hidden: int
    #: Widest GEMM by in + out features (name, in, out): lm_head for this family.
    widest_linear: tuple[str, int, int]
    attention_heads: int
    experts: int
    experts_per_token: int
    expert_width: int
    mamba_heads: int
    mamba_head_dim: int
    ssm_state: int
    chunk: int
    act_bytes: int = 2


@dataclass(frozen=True)
class ServingStateShapes:
    """The per-sequence serving state of a hybrid backbone (KV cache of the attention
    layers, Mamba conv and SSM state), read from a ``config.json`` dict in either naming
    (``ModelAdapter.serving_state_shapes``), without building the model.

    ``omniquant.quantize.serving_memory.state_terms`` turns them into bytes; both the
    serving-memory estimate (``ServingShapes.state``) and the report's capacity column
    read them.
    """

    attention_layers: int
    kv_heads: int
    head_dim: int
    mamba_layers: int
    mamba_heads: int
    mamba_head_dim: int
    ssm_state: int
    groups: int
    conv_kernel: int


@dataclass(frozen=True)
class ServingShapes:
    """What a serving engine holds beside the weights, per sequence and per token
    (``omniquant.quantize.serving_memory``): the backbone's state shapes plus the
    encoders' widths."""

    state: ServingStateShapes
    #: The config's ``mamba_ssm_cache_dtype`` (None: not set).
    ssm_cache_dtype: str | None
    #: Vision encoder: width, MLP width, extra (cls + register) tokens.
    vision_hidden: int
    vision_mlp: int
    vision_extra_tokens: int
    #: Audio encoder: width and FFN width.
    audio_hidden: int
    audio_ffn: int
    act_bytes: int = 2


class ModelAdapter(ABC):
    """What a stage may ask about a model family."""

    model_types: ClassVar[tuple[str, ...]] = ()
    #: ``architectures`` names of released (remote-code) checkpoints whose config.json
    #: carries another ``model_type``; transformers' native class loads them.
    hub_architectures: ClassVar[tuple[str, ...]] = ()
    #: ``config.json`` namings the export can write (``serving_config``); ``source`` keeps
    #: the source's file.
    config_namings: ClassVar[tuple[str, ...]] = ("source",)
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
        """``CalibrationShapes``: what sizes one calibration forward (``omniquant.quantize.memory``
        turns them into bytes)."""

    def serving_state_shapes(self, config: dict) -> ServingStateShapes:
        """``ServingStateShapes`` from a checkpoint's ``config.json`` (no weight read).

        Raises:
            ValueError: The family does not say, or the config lacks a field (named).
        """
        raise ValueError(f"{type(self).__name__} does not describe its serving state")

    @abstractmethod
    def layer_index(self, name: str) -> int | None:
        """Backbone layer index of a module name, or None outside the backbone layers."""
        return None

    def serving_shapes(self, model) -> ServingShapes:
        """Shapes of the serving state (KV cache, recurrent state, encoder activations)."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its serving state")

    def placement_units(self, model) -> list[tuple[str, int]]:
        """``(name, bytes)`` in module order, as a device map may place them."""

    def selectors(self, model) -> dict[str, list[str]]:
        """Named subsets of groups that recipes may select besides the groups (none by
        default)."""
        return {}

    def resident_modules(self) -> tuple[str, ...]:
        """Modules ``--device auto`` never offloads (none by default)."""
        return ()

    def kernel_report(self, placement_devices: list[str]) -> dict:
        """Which compute kernels the model's forward runs with on ``placement_devices``,
        for ``omniquant.json`` (``mamba_path``: a line for the log). A model whose forward
        has no kernel choice to report: the framework's own path."""
        return {"mamba_path": "n/a (no Mamba layers)"}

    # ------------------------------------------------------------ the backbone
    def quant_root(self, model):
        """The submodule handed to ``mtq.quantize`` (``quant_root_name``): the backbone."""
        return model.get_submodule(self.quant_root_name())

    @contextlib.contextmanager
    def backbone_inputs(self, model, fn: Callable[[Any], None]) -> Iterator[None]:
        """Context manager: ``fn(inputs_embeds)`` each time the backbone is entered.

        ``inputs_embeds`` is what the backbone receives after the encoders ran and their
        features were scattered (EVS applied), or ``None`` when it is called with token
        ids. ``fn`` may raise to stop the forward there; the hook is removed either way.
        This default fits a backbone that takes ``inputs_embeds`` as a keyword, as
        transformers' causal LMs do.
        """

        def pre_hook(_mod, _args, kwargs):
            fn(kwargs.get("inputs_embeds"))

        handle = self.quant_root(model).register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def audio_tokens(self, model, input_features_mask) -> int:
        """Audio embeddings the model scatters for one clip of mel features whose mask is
        ``input_features_mask`` ``(1, frames)``. Only called for a model with audio."""
        raise NotImplementedError(f"{type(self).__name__}: the model has no audio encoder")

    def evs_rate(self, model) -> float:
        """The video token pruning (EVS) rate the model applies now (0 without EVS)."""
        return 0.0

    def max_positions(self, model) -> int | None:
        """The longest sequence the backbone is configured for: ``max_position_embeddings``
        of the text config (or of the config itself); None when the config states none."""
        cfg = model.config
        text = getattr(cfg, "text_config", None) or cfg
        n = getattr(text, "max_position_embeddings", None)
        return n if isinstance(n, int) and n > 0 else None

    def kv_cache_modules(self, model) -> list[str]:
        """Attention modules whose K/V a serving engine caches, as modelopt names its
        ``k_bmm_quantizer``/``v_bmm_quantizer`` parents (none by default: no attention)."""
        return []

    # ----------------------------------------------------------- fused experts
    def expert_linears(self, name: str, module) -> list[ExpertLinear]:
        """The per-expert GEMMs of fused expert container ``name`` (a module of a
        ``fused_expert_groups`` group), expert-major, in hub names.

        Only called for modules of ``fused_expert_groups``, which is empty by default.
        """
        raise NotImplementedError(
            f"{type(self).__name__} declares fused_expert_groups but not expert_linears"
        )

    def moe_layers(self, model) -> list[MoELayer]:
        """The model's routed-expert layers, in module order (none by default)."""
        return []

    def expert_probes(
        self,
        model,
        on_routed: Callable[[str, Any], None],
        on_expert_input: ExpertInputFn,
        force_all_experts: bool = False,
    ):
        """Context manager over ``moe_layers``: ``on_routed(layer, expert_indices)`` after
        each routing decision (the chosen experts of every token), ``on_expert_input``
        on every per-expert GEMM input; with ``force_all_experts`` every token also runs
        through every expert with zero routing weight (statistics only: outputs are
        unchanged). A model without MoE layers has nothing to probe (this default).
        """
        return contextlib.nullcontext()

    # ------------------------------------------------------ emulated loading
    def load_from_state_dict(self, path: Path, state_dict: dict, dtype: str = "bfloat16"):
        """The model of checkpoint ``path`` (its config) holding ``state_dict`` (hub
        names), in eval mode; every model tensor must be in ``state_dict`` and every
        entry must fit one. Per-expert GEMMs run one call per expert so that
        ``patch_expert_inputs`` sees them (``omniquant.evaluate.emulated``).

        Raises:
            ModelLoadError: the tensors do not fit the model.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot load a state dict")

    def native_module(self, hub_module: str) -> tuple[str, tuple[str, int] | None]:
        """Inverse of ``hub_name`` for a module: its native name and, for a per-expert
        GEMM of a fused container (``expert_linears``), ``(projection, expert)`` in it.

        Raises:
            ValueError: ``hub_module`` is not a module of the quantized backbone.
        """
        raise ValueError(f"{hub_module}: {type(self).__name__} maps no hub name back")

    def serving_config(
        self, config: dict, naming: str, preprocessor: dict | None = None
    ) -> tuple[dict, dict | None]:
        """``config.json`` (and ``preprocessor_config.json``, None: unchanged) in ``naming``
        (``source``: as is). Families with one naming keep the source's files."""
        return config, None

    def construction_findings(
        self, reader: str, config: dict, tensors: dict, token_ids, files: set[str]
    ) -> list:
        """What would stop serving stack ``reader`` constructing the model from these files
        (``omniquant.checkpoint.construction``); empty when the family declares nothing."""
        return []

    def patch_expert_inputs(
        self, module, fn: Callable[[str, int, Any], Any], shared: dict | None = None
    ) -> Callable[[], None]:
        """Route every per-expert GEMM input of fused container ``module`` through
        ``fn(projection, expert, x)``; returns the undo. Only called for modules of
        ``fused_expert_groups``. ``shared`` (optional) maps a projection to a row-wise
        ``g`` equal to ``fn`` for every expert of it; a family may then run ``g`` once on
        the container's input instead of once per expert (same values, fewer calls)."""
        raise NotImplementedError(
            f"{type(self).__name__} declares fused_expert_groups but not patch_expert_inputs"
        )


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
