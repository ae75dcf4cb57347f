"""Adapter for transformers' ``nemotron_h_omni`` (Nemotron 3 Nano Omni).

Policy:
- Only ``language_model`` (the NemotronH hybrid backbone) is handed to modelopt;
  the forward loop drives the whole omni model so the backbone sees real image,
  video and audio embeddings. Quantizing the whole omni model crashes in modelopt
  0.47 (it wraps Parakeet attention for KV quantization and breaks its signature).
- Module groups partition every Linear-like module of the model; selectors are
  named subsets (e.g. the Mamba layers next to attention) that recipes may use.
- Video goes through ``get_video_features`` and ``mm_encoder_outputs``:
  ``forward(pixel_values_videos=...)`` is broken in transformers 5.23.
- On-disk names follow the hub layout (``language_model.backbone.*``), which is
  what ``save_pretrained`` writes and serving stacks read.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import ClassVar

from omniquant.errors import ModelLoadError
from omniquant.models.base import (
    ExpertLinear,
    LoadedModel,
    ModelAdapter,
    MoELayer,
    read_config,
    register_adapter,
)
from omniquant.models.nemotron_omni_naming import CONFIG_NAMINGS, RELEASED_ARCHITECTURE

_LAYER_RE = re.compile(r"^language_model\.model\.layers\.(\d+)\.mixer\.")
#: A per-expert GEMM of a fused container in hub names: container, expert, projection.
_HUB_EXPERT_RE = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)$")
#: The fused container's 3-D projections (``NemotronHExperts``), in export order.
_EXPERT_PROJECTIONS = ("up_proj", "down_proj")
#: Text-config keys ``serving_state_shapes`` reads (beside the layer kinds).
_STATE_KEYS = ("num_key_value_heads", "num_attention_heads", "head_dim", "hidden_size",
               "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel")  # fmt: skip

#: Group names in the order they are reported.
GROUPS = (
    "mamba_in_out",
    "mamba_conv1d",
    "routed_experts",
    "shared_experts",
    "router",
    "moe_latent",
    "dense_mlp",
    "attention_qkv",
    "attention_o",
    "embeddings",
    "lm_head",
    "vision_tower",
    "vision_projector",
    "audio_tower",
    "audio_projector",
)


def load_config(path: Path):
    """transformers' ``NemotronH_Omni_Reasoning_V3_Config`` of the checkpoint at ``path``.

    Released checkpoints use legacy field names, which the config class maps itself, and
    store ``model_type: parakeet`` in their audio sub-config. transformers 5.23 means to
    drop that unregistered type (``__post_init__`` pops it from a copy) but then spreads
    the original dict, so loading fails with "Unrecognized model type for subconfig:
    parakeet". The type is replaced by ``parakeet_encoder`` (the class the sub-config
    spec names) before the config is built.

    Raises:
        ModelLoadError: transformers cannot read or build the config.
    """
    from transformers.models.nemotron_h_omni.configuration_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3_Config as Config,
    )

    try:
        config_dict, _ = Config.get_config_dict(str(path))
        for key in ("audio_config", "sound_config"):
            audio = config_dict.get(key)
            if isinstance(audio, dict) and audio.get("model_type") == "parakeet":
                config_dict[key] = {**audio, "model_type": "parakeet_encoder"}
        return Config.from_dict(config_dict)
    except Exception as exc:  # transformers raises many types; name the file
        raise ModelLoadError(
            f"{Path(path) / 'config.json'}: transformers cannot build the config: {exc}"
        ) from exc


def new_model(config, dtype: str | None = None):
    """A randomly initialised model of ``config`` (transformers' init under the caller's
    seed): float32 through ``__init__``, or built directly in ``dtype``."""
    import torch
    from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3,
    )

    if dtype is None:
        return NemotronH_Omni_Reasoning_V3(config)
    return NemotronH_Omni_Reasoning_V3._from_config(config, dtype=getattr(torch, dtype))


def reset_audio_convolutions(model) -> None:
    """Give the Parakeet convolutions PyTorch's fan-in scaled init (the demo trainer's).

    transformers initialises every weight from N(0, 0.02) (harmless for a checkpoint that
    is loaded, not trained). The subsampling stack's convolutions have fan-ins of 9 to 16,
    so six of them shrink the signal by ~1e-6 and the LayerNorm that follows turns that
    into gradients of ~1e5, which (through global gradient clipping) stalls training of
    the whole model.
    """
    from torch import nn

    for module in model.audio_tower.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) or (
            isinstance(module, nn.Linear) and module is model.audio_tower.subsampling.linear
        ):
            module.reset_parameters()


@register_adapter
class NemotronOmniAdapter(ModelAdapter):
    """Nemotron 3 Nano Omni: NemotronH backbone + RADIO vision + Parakeet audio."""

    model_types: ClassVar[tuple[str, ...]] = ("nemotron_h_omni",)
    # The hub checkpoints' remote-code class (FIELD_NOTES); their config.json uses legacy
    # field names (llm_config, sound_config, img_context_token_id, ...) that transformers'
    # NemotronH_Omni_Reasoning_V3_Config maps itself.
    hub_architectures: ClassVar[tuple[str, ...]] = (RELEASED_ARCHITECTURE,)
    config_namings: ClassVar[tuple[str, ...]] = CONFIG_NAMINGS
    guarded_groups: ClassVar[frozenset[str]] = frozenset(
        {"vision_tower", "vision_projector", "audio_tower", "audio_projector"}
    )
    #: Groups whose modules are fused 3-D expert containers (one module, E experts).
    fused_expert_groups: ClassVar[frozenset[str]] = frozenset({"routed_experts"})

    # ------------------------------------------------------------------ loading
    def load(
        self,
        path: Path,
        dtype: str = "bfloat16",
        weights: bool = True,
        placement: dict | None = None,
    ) -> LoadedModel:
        """Load model and tokenizer from a checkpoint directory (hub layout), placed as
        ``placement`` says (``from_pretrained`` device kwargs; None: the CPU).

        ``weights=False``: build the model from ``config.json`` alone on the meta
        device in ``dtype`` (no weights, no tokenizer), e.g. to plan the released model
        before downloading it.
        """
        import torch
        from transformers import AutoTokenizer
        from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (
            NemotronH_Omni_Reasoning_V3,
        )

        path = Path(path)
        cfg = read_config(path)
        if not weights:
            return self._load_meta(path, cfg, dtype)
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError("no *.safetensors weights in the directory.", arg="model", value=path)
        config = load_config(path)
        placement = dict(placement or {})
        notes: list[str] = []
        if placement.get("device_map") == "auto":
            from accelerate import init_empty_weights

            from omniquant.devices import auto_device_map

            with init_empty_weights():
                empty = NemotronH_Omni_Reasoning_V3(config)
            placement["device_map"], notes = auto_device_map(
                empty, placement.pop("max_memory", None), self.resident_modules()
            )
            del empty
        from omniquant.models.mapped_pages import released_while_loading

        try:
            # eager experts: modelopt intercepts their per-expert F.linear calls. Mapped
            # shard pages a conversion has read go back as the load proceeds (the module).
            with released_while_loading(sorted(path.glob("*.safetensors"))):
                model, info = NemotronH_Omni_Reasoning_V3.from_pretrained(
                    path,
                    config=config,
                    dtype=getattr(torch, dtype),
                    experts_implementation="eager",
                    output_loading_info=True,
                    # Load through shape mismatches so they are listed below by name (else
                    # transformers stops with a hint to set this flag, naming no tensor).
                    ignore_mismatched_sizes=True,
                    **(placement or {}),
                )
        except Exception as exc:  # transformers raises many types; name the directory
            if "ignore_mismatched_sizes" in str(exc):  # its hint is for fine-tuning, not here
                raise ModelLoadError(
                    f"a tensor's shape in the safetensors files does not match "
                    f"config.json ({str(exc).splitlines()[0]}); the weights and the config come "
                    "from different checkpoints.", arg="model", value=path
                ) from exc
            raise ModelLoadError(f"transformers could not load it: {exc}", arg="model", value=path) from exc
        # transformers initialises missing tensors randomly with only a log line; a source
        # checkpoint must hold every tensor of its model.
        missing = sorted(info.get("missing_keys") or [])
        mismatched = sorted(
            f"{self._disk_name(m[0])} (file {tuple(m[1])}, config {tuple(m[2])})"
            if isinstance(m, tuple) and len(m) == 3
            else str(m)
            for m in info.get("mismatched_keys") or []
        )
        if missing or mismatched:
            names = [self._disk_name(k) for k in missing] + mismatched
            raise ModelLoadError(
                f"{len(names)} tensor(s) of the model are missing from the "
                f"safetensors files or have the wrong shape: {', '.join(names[:5])}"
                f"{' ...' if len(names) > 5 else ''}; the shards are incomplete or belong to "
                "another config.json.", arg="model", value=path
            )
        model.eval()
        # modelopt's exporter needs architectures on the sub-config it exports.
        if not model.language_model.config.architectures:
            model.language_model.config.architectures = ["NemotronHForCausalLM"]
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:
            raise ModelLoadError(
                f"no usable tokenizer ({exc}); the directory needs tokenizer.json "
                "and tokenizer_config.json.", arg="model", value=path
            ) from exc
        return LoadedModel(
            model=model, tokenizer=tokenizer, path=path, adapter=self, config_dict=cfg,
            placement_notes=notes,
        )

    def kernel_report(self, placement_devices: list[str]) -> dict:
        """Fast Mamba kernels: importable, resolved by transformers, and whether they run.

        transformers binds mamba-ssm / causal-conv1d at import when they are installed;
        their kernels are CUDA/Triton only, so on a CPU-placed backbone the reference
        PyTorch scan runs.
        """
        import importlib.util
        import inspect

        importable = {
            pkg: importlib.util.find_spec(pkg) is not None for pkg in ("mamba_ssm", "causal_conv1d")
        }
        resolved = {}
        try:
            from transformers.models.nemotron_h import modeling_nemotron_h as nh

            for fn in ("mamba2_chunk_scan", "mamba2_split_conv1d_scan_combined", "causal_conv1d_fn"):
                f = getattr(nh, fn, None)
                if f is not None:
                    resolved[fn] = bool(
                        inspect.getclosurevars(f).nonlocals.get("is_new_implementation")
                    )
        except (ImportError, AttributeError, TypeError, ValueError):
            # a transformers without these names: report importability only
            resolved = {}
        on_cuda = any(d.startswith("cuda") for d in placement_devices)
        fast = bool(resolved) and all(resolved.values()) and on_cuda
        return {
            "importable": importable,
            "transformers_resolved_fast": resolved,
            "mamba_path": "mamba-ssm/causal-conv1d CUDA kernels"
            if fast
            else "PyTorch reference scan (transformers fallback)",
        }

    @staticmethod
    def resident_modules() -> tuple[str, ...]:
        """Modules never offloaded by ``--device auto``: the encoders and projectors
        (transformers moves their inputs to their parameters' device; see
        ``omniquant.devices.auto_device_map``) and the backbone's embeddings (the first
        parameter, so ``language_model.device``, where modelopt's export puts its dummy
        input)."""
        return (
            "language_model.model.embeddings",
            "vision_model",
            "multi_modal_projector",
            "audio_tower",
            "embed_audio",
        )

    def _load_meta(self, path: Path, cfg: dict, dtype: str) -> LoadedModel:
        import torch
        from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (
            NemotronH_Omni_Reasoning_V3,
        )

        config = load_config(path)
        try:
            with torch.device("meta"):
                model = NemotronH_Omni_Reasoning_V3._from_config(
                    config, dtype=getattr(torch, dtype), experts_implementation="eager"
                )
        except Exception as exc:  # transformers raises many types; name the file
            raise ModelLoadError(
                f"{path / 'config.json'}: transformers cannot build the model from it: {exc}"
            ) from exc
        model.eval()
        return LoadedModel(model=model, tokenizer=None, path=path, adapter=self, config_dict=cfg)

    def _disk_name(self, native_name: str) -> str:
        """The hub (on-disk) name of a native tensor name, for messages."""
        try:
            return self.hub_name(native_name)
        except ValueError:  # towers keep their source names
            return native_name

    def quant_root_name(self) -> str:
        return "language_model"

    # ------------------------------------------------------------ serving files
    def serving_config(
        self, config: dict, naming: str, preprocessor: dict | None = None
    ) -> tuple[dict, dict | None]:
        """See ``omniquant.models.nemotron_omni_naming``: released (the default of the
        export), native, or the source's file unchanged."""
        from omniquant.models import nemotron_omni_naming as naming_mod

        out = naming_mod.convert(config, naming, preprocessor)
        if naming != naming_mod.RELEASED or preprocessor is None:
            return out, None
        return out, naming_mod.released_preprocessor(preprocessor, config)

    def construction_findings(
        self, reader: str, config: dict, tensors: dict, token_ids, files: set[str]
    ) -> list:
        """See ``omniquant.models.nemotron_omni_serving``."""
        from omniquant.models.nemotron_omni_serving import construction_findings

        return construction_findings(reader, config, tensors, token_ids, files)

    # ------------------------------------------------------------ module groups
    def module_groups(self, model) -> dict[str, list[str]]:
        """Partition the model's weight-carrying modules into named groups.

        Leaf ``nn.Linear`` modules, the fused expert containers, ``conv1d``,
        embeddings and routers each land in exactly one group.
        """
        from torch import nn

        groups: dict[str, list[str]] = {g: [] for g in GROUPS}
        for name, module in model.named_modules():
            group = self._group_of(name, module, nn)
            if group is not None:
                groups[group].append(name)
        return groups

    def _group_of(self, name: str, module, nn) -> str | None:
        cls = type(module).__name__
        if name.startswith("language_model."):
            if name == "language_model.lm_head":
                return "lm_head"
            if name == "language_model.model.embeddings":
                return "embeddings"
            if cls == "NemotronHExperts":
                return "routed_experts"
            if cls == "NemotronHTopkRouter":
                return "router"
            if not isinstance(module, (nn.Linear, nn.Conv1d)):
                return None
            leaf = name.rsplit(".", 1)[-1]
            if ".mixer.shared_experts." in name:
                return "shared_experts"
            if leaf == "conv1d":
                return "mamba_conv1d"
            if leaf in ("in_proj", "out_proj"):
                return "mamba_in_out"
            if leaf in ("q_proj", "k_proj", "v_proj"):
                return "attention_qkv"
            if leaf == "o_proj":
                return "attention_o"
            if leaf in ("fc1_latent_proj", "fc2_latent_proj"):
                return "moe_latent"
            if leaf in ("up_proj", "down_proj"):
                return "dense_mlp"
            return None
        if not isinstance(module, (nn.Linear,)):
            return None
        if name.startswith("vision_model."):
            return "vision_tower"
        if name.startswith("multi_modal_projector."):
            return "vision_projector"
        if name.startswith("audio_tower."):
            return "audio_tower"
        if name.startswith("embed_audio."):
            return "audio_projector"
        return None

    def selectors(self, model) -> dict[str, list[str]]:
        """Named subsets of groups that recipes may select.

        ``attention_neighbours``: Mamba in/out projections of the nearest Mamba layer
        before and after each attention layer (NVIDIA keeps these BF16 in its FP8
        Nano recipe, next to the BF16 attention layers).
        """
        types = list(model.config.text_config.layers_block_type)
        mamba = [i for i, t in enumerate(types) if t == "linear_attention"]
        neighbours: set[int] = set()
        for i, t in enumerate(types):
            if t != "full_attention":
                continue
            before = [m for m in mamba if m < i]
            after = [m for m in mamba if m > i]
            if before:
                neighbours.add(before[-1])
            if after:
                neighbours.add(after[0])
        groups = self.module_groups(model)
        picked = [n for n in groups["mamba_in_out"] if self.layer_index(n) in neighbours]
        return {"attention_neighbours": picked}

    def serving_state_shapes(self, config: dict):
        """Layer kinds from ``layers_block_type`` (native) or the hub's
        ``hybrid_override_pattern`` (``M`` Mamba, ``*`` attention), under ``text_config``
        or ``llm_config``."""
        from omniquant.models.base import ServingStateShapes

        text = config.get("text_config") or config.get("llm_config") or config
        kinds = text.get("layers_block_type") or list(text.get("hybrid_override_pattern") or "")
        if not kinds:
            raise ValueError("config states neither layers_block_type nor hybrid_override_pattern")
        try:
            return ServingStateShapes(
                attention_layers=sum(k in ("attention", "full_attention", "*") for k in kinds),
                kv_heads=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
                head_dim=int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]),
                mamba_layers=sum(k in ("mamba", "linear_attention", "M") for k in kinds),
                mamba_heads=int(text["mamba_num_heads"]),
                mamba_head_dim=int(text["mamba_head_dim"]),
                ssm_state=int(text["ssm_state_size"]),
                groups=int(text.get("n_groups", 1)),
                conv_kernel=int(text.get("conv_kernel", 4)),
            )
        except KeyError as err:
            raise ValueError(f"config has no {err.args[0]}") from err

    def calibration_shapes(self, model):
        """The shapes that size one calibration forward (``omniquant.quantize.memory``)."""
        from omniquant.models.base import CalibrationShapes

        text = model.config.text_config
        widest = ("", 0, 0)
        for name, module in model.language_model.named_modules():
            width = getattr(module, "in_features", 0) + getattr(module, "out_features", 0)
            if hasattr(module, "in_features") and width > widest[1] + widest[2]:
                widest = (f"language_model.{name}", module.in_features, module.out_features)
        return CalibrationShapes(
            hidden=text.hidden_size,
            widest_linear=widest,
            attention_heads=text.num_attention_heads,
            experts=text.n_routed_experts,
            experts_per_token=text.num_experts_per_tok,
            expert_width=text.moe_intermediate_size,
            mamba_heads=text.mamba_num_heads,
            mamba_head_dim=text.mamba_head_dim,
            ssm_state=text.ssm_state_size,
            chunk=text.chunk_size,
        )

    def serving_shapes(self, model):
        """KV, Mamba state and encoder widths for ``omniquant.quantize.serving_memory``."""
        from omniquant.models.base import ServingShapes

        text = model.config.text_config
        types = list(text.layers_block_type)
        vision = model.config.vision_config
        audio = getattr(model.config, "audio_config", None)
        mlp = getattr(vision, "intermediate_size", None) or int(
            vision.hidden_size * getattr(vision, "mlp_ratio", 4.0)
        )
        return ServingShapes(
            # The backbone's state shapes by the one reader of them (config.json's keys).
            state=self.serving_state_shapes(
                {"layers_block_type": types, **{k: getattr(text, k) for k in _STATE_KEYS}}
            ),
            ssm_cache_dtype=getattr(text, "mamba_ssm_cache_dtype", None),
            vision_hidden=vision.hidden_size,
            vision_mlp=mlp,
            vision_extra_tokens=getattr(vision, "num_cls_tokens", 0)
            + getattr(vision, "num_registers", 0),
            audio_hidden=audio.hidden_size if audio is not None else 0,
            audio_ffn=audio.intermediate_size if audio is not None else 0,
        )

    def placement_units(self, model) -> list[tuple[str, int]]:
        """``(name, bytes)`` of the model's tensors in module order, grouped as a device
        map may place them: one backbone layer, or one top-level module."""
        units: dict[str, int] = {}
        for name, tensor in model.state_dict().items():
            m = re.match(r"^(language_model\.model\.layers\.\d+)\.", name)
            if m:
                key = m.group(1)
            elif name.startswith("language_model."):
                key = ".".join(name.split(".")[:3 if name.startswith("language_model.model.") else 2])
            else:
                key = name.split(".", 1)[0]
            units[key] = units.get(key, 0) + tensor.numel() * tensor.element_size()
        return list(units.items())

    @staticmethod
    def layer_index(name: str) -> int | None:
        """Backbone layer index of a module name, or None outside the backbone layers."""
        m = _LAYER_RE.match(name)
        return int(m.group(1)) if m else None

    # ---------------------------------------------------------------- naming
    def hub_name(self, native_name: str) -> str:
        """Map a native name under ``language_model`` to its hub-layout name.

        transformers' ``nemotron_h`` conversion mapping renames ``backbone.`` to
        ``model.`` on load (and merges per-expert tensors, which modelopt's export
        splits again), so the reverse for per-expert or plain names is the prefix.
        Tower names are never renamed by omniquant: their tensors are copied from
        the source files under their source names.
        """
        if native_name.startswith("language_model.model."):
            return "language_model.backbone." + native_name[len("language_model.model.") :]
        if native_name.startswith("language_model."):
            return native_name
        raise ValueError(f"hub_name: {native_name!r} is outside language_model")

    _HUB_GROUPS = (
        (
            re.compile(r"^language_model\.backbone\.layers\.\d+\.mixer\.(in_proj|out_proj)\."),
            "mamba_in_out",
        ),
        (re.compile(r"^language_model\.backbone\.layers\.\d+\.mixer\.conv1d\."), "mamba_conv1d"),
        (re.compile(r"^language_model\.backbone\.layers\.\d+\.mixer\.experts\."), "routed_experts"),
        (
            re.compile(r"^language_model\.backbone\.layers\.\d+\.mixer\.shared_experts\."),
            "shared_experts",
        ),
        (re.compile(r"^language_model\.backbone\.layers\.\d+\.mixer\.gate\."), "router"),
        (
            re.compile(r"^language_model\.backbone\.layers\.\d+\.mixer\.fc[12]_latent_proj\."),
            "moe_latent",
        ),
        (
            re.compile(r"^language_model\.backbone\.layers\.\d+\.mixer\.(q_proj|k_proj|v_proj)\."),
            "attention_qkv",
        ),
        (re.compile(r"^language_model\.backbone\.layers\.\d+\.mixer\.o_proj\."), "attention_o"),
        (
            re.compile(r"^language_model\.backbone\.layers\.\d+\.mixer\.(up_proj|down_proj)\."),
            "dense_mlp",
        ),
        (re.compile(r"^language_model\.backbone\.embeddings\."), "embeddings"),
        (re.compile(r"^language_model\.lm_head\."), "lm_head"),
        (re.compile(r"^vision_model\."), "vision_tower"),
        (re.compile(r"^mlp1\."), "vision_projector"),
        (re.compile(r"^sound_encoder\."), "audio_tower"),
        (re.compile(r"^sound_projection\."), "audio_projector"),
    )

    def hub_tensor_group(self, name: str) -> str:
        """Group of an on-disk tensor name; norms, SSM parameters etc. are ``other``."""
        for pattern, group in self._HUB_GROUPS:
            if pattern.match(name):
                return group
        return "other"

    # ---------------------------------------------------------------- forward
    @contextlib.contextmanager
    def video_pruning(self, model, rate: float | None):
        """Temporarily set the EVS pruning rate (None keeps the config's rate)."""
        if rate is None:
            yield
            return
        old = model.video_pruning_rate
        model.video_pruning_rate = float(rate)
        try:
            yield
        finally:
            model.video_pruning_rate = old

    def forward(self, model, sample, **kwargs):
        """Run the omni model on one ``Sample`` (batch size 1)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inputs = {"input_ids": sample.input_ids}
        if sample.pixel_values is not None:
            inputs["pixel_values"] = sample.pixel_values
            inputs["image_grid_hw"] = sample.image_grid_hw
        if sample.pixel_values_videos is not None:
            feats = model.get_video_features(sample.pixel_values_videos).pooler_output
            inputs["mm_encoder_outputs"] = {
                "video": BaseModelOutputWithPooling(pooler_output=(feats,))
            }
        if sample.input_features is not None:
            inputs["input_features"] = sample.input_features
            inputs["input_features_mask"] = sample.input_features_mask
        inputs.update(kwargs)
        inputs.setdefault("use_cache", False)
        return model(**inputs)

    def placeholder_ids(self, model) -> dict[str, int]:
        """Token ids whose positions receive encoder features, per modality.

        Video uses the image token id (see ``omniquant.data.batch``).
        """
        cfg = model.config
        return {"image": cfg.image_token_id, "audio": cfg.audio_token_id}

    def audio_tokens(self, model, input_features_mask) -> int:
        """The Parakeet encoder's output length, cut at the length transformers derives
        from the mask (``sum + 1``)."""
        import torch

        tower = model.audio_tower
        n_frames = torch.tensor([input_features_mask.shape[-1]])
        produced = int(tower._get_subsampling_output_length(n_frames)[0])
        kept = int(tower._get_subsampling_output_length(input_features_mask.sum(-1) + 1)[0])
        return min(produced, kept)

    def evs_rate(self, model) -> float:
        """The EVS pruning rate the model applies now (its ``video_pruning_rate``)."""
        return float(model.video_pruning_rate)

    def kv_cache_modules(self, model) -> list[str]:
        """The attention mixers (the parents of the ``attention_o`` projections)."""
        return [n.rsplit(".", 1)[0] for n in self.module_groups(model).get("attention_o", [])]

    # ---------------------------------------------------------- fused experts
    def expert_linears(self, name: str, module) -> list[ExpertLinear]:
        """``NemotronHExperts``: ``up_proj``/``down_proj`` are ``[E, out, in]``; the hub
        layout stores expert ``i``'s as ``<container>.<i>.<projection>``."""
        hub = self.hub_name(name)
        out = []
        for i in range(module.num_experts):
            for proj in _EXPERT_PROJECTIONS:
                _, o, n = getattr(module, proj).shape
                out.append(ExpertLinear(f"{hub}.{i}.{proj}", proj, i, int(o), int(n)))
        return out

    def patch_expert_inputs(self, module, fn, shared=None):
        """See ``omniquant.models.fused_experts.patch_expert_linears``."""
        from omniquant.models.fused_experts import patch_expert_linears

        return patch_expert_linears(module, fn, _EXPERT_PROJECTIONS, shared)

    @staticmethod
    def _is_expert_container(name: str, module) -> bool:
        # By shape, not class: under mtq.quantize the container is modelopt's subclass.
        return (
            hasattr(module, "up_proj") and hasattr(module, "num_experts") and name.endswith("experts")
        )

    def moe_layers(self, model) -> list[MoELayer]:
        """One entry per ``NemotronHTopkRouter``, named by its MoE mixer."""
        return [
            MoELayer(name.rsplit(".", 1)[0], int(mod.num_experts), _EXPERT_PROJECTIONS)
            for name, mod in model.named_modules()
            if type(mod).__name__ == "NemotronHTopkRouter"
        ]

    @contextlib.contextmanager
    def expert_probes(self, model, on_routed, on_expert_input, force_all_experts=False):
        """Routers report their top-k indices (the third output of ``NemotronHTopkRouter``);
        expert inputs are read per ``F.linear`` call (``fused_experts``); forcing calls the
        container again with every expert and zero routing weights (its output is
        discarded), inside the container's forward hook."""
        handles, undo = [], []
        forcing = [False]

        def router_hook(layer):
            def hook(_mod, _args, output):
                if not forcing[0]:
                    on_routed(layer, output[2])

            return hook

        def force_hook(mod, args, output):
            import torch

            if forcing[0]:
                return
            hidden = args[0]
            n_tok = hidden.shape[0]
            idx = torch.arange(mod.num_experts, device=hidden.device).expand(n_tok, -1)
            weights = torch.zeros(n_tok, mod.num_experts, dtype=torch.float32, device=hidden.device)
            forcing[0] = True
            try:
                mod(hidden, idx, weights)  # statistics only: output discarded
            finally:
                forcing[0] = False

        try:
            for name, mod in model.named_modules():
                layer = name.rsplit(".", 1)[0]  # ...mixer
                if type(mod).__name__ == "NemotronHTopkRouter":
                    handles.append(mod.register_forward_hook(router_hook(layer)))
                elif self._is_expert_container(name, mod):
                    undo.append(
                        self.patch_expert_inputs(
                            mod, lambda proj, i, x, layer=layer: on_expert_input(layer, proj, i, x)
                        )
                    )
                    if force_all_experts:
                        handles.append(mod.register_forward_hook(force_hook))
            yield
        finally:
            for h in handles:
                h.remove()
            for fn in reversed(undo):
                fn()

    # ------------------------------------------------------ emulated loading
    def load_from_state_dict(self, path: Path, state_dict: dict, dtype: str = "bfloat16"):
        """Build ``NemotronH_Omni_Reasoning_V3`` from the checkpoint's config with
        ``state_dict`` through transformers' own ``from_pretrained`` (conversion mapping
        included), eager experts: the per-expert ``F.linear`` calls are where activations
        get quantized; the grouped_mm kernel transformers picks by default would bypass
        them."""
        import torch
        from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (
            NemotronH_Omni_Reasoning_V3,
        )

        config = load_config(path)
        # The weights come dequantized; transformers must not dispatch to a quantizer.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model, info = NemotronH_Omni_Reasoning_V3.from_pretrained(
            None,
            config=config,
            state_dict=state_dict,
            output_loading_info=True,
            dtype=getattr(torch, dtype),
            experts_implementation="eager",
        )
        if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
            raise ModelLoadError(
                f"{path}: dequantized tensors do not fit nemotron_h_omni: missing "
                f"{sorted(info['missing_keys'])[:5]}, unexpected {sorted(info['unexpected_keys'])[:5]}, "
                f"mismatched {sorted(info['mismatched_keys'])[:5]}"
            )
        model.eval()
        return model

    def native_module(self, hub_module: str) -> tuple[str, tuple[str, int] | None]:
        """Inverse of ``hub_name`` for backbone modules (``backbone.`` -> ``model.``)."""
        m = _HUB_EXPERT_RE.match(hub_module)
        if m:
            return self._native_name(m.group(1)), (m.group(3), int(m.group(2)))
        return self._native_name(hub_module), None

    def _native_name(self, hub_module: str) -> str:
        native_prefix, hub_prefix = "language_model.model.", "language_model.backbone."
        if hub_module.startswith(hub_prefix):
            native = native_prefix + hub_module[len(hub_prefix) :]
            if self.hub_name(native) == hub_module:
                return native
        raise ValueError(f"{hub_module}: outside the backbone")
