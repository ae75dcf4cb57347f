"""Export a modelopt-quantized omni model in the source checkpoint's (hub) layout.

Policy:
- The source files drive the export: every tensor that is not quantized is
  copied from the source shard under its source name and dtype, byte for byte;
  quantized weights replace their source tensor under the same name with their
  scale tensors beside them (``weight_scale``, ``weight_scale_2``,
  ``input_scale``), and KV-cache scales sit beside their attention projections.
  Sharding follows the source.
- Quantized tensors come from modelopt's exporter (the steps of
  ``_export_transformers_checkpoint`` on the language model, pinned modelopt 0.47,
  run one decoder layer at a time: ``_LayerwiseQuantExport``), and their names are
  mapped back to the hub layout with modelopt's quant-aware reverse conversion scoped
  to the language model (applied to the whole omni model it refuses the scoped converter).
- The export streams: one output shard is assembled, saved and freed before the next,
  so host memory holds one source shard, one output shard and at most one layer's
  quantized tensors beyond the model, whatever the model's size. Bytes are those of the
  former all-at-once export (pinned in tests/test_devices.py).
- ``hf_quant_config.json`` is written from the plan: modelopt's own lists native
  names and omits the vision/audio towers from ``exclude_modules``. Here every
  weight of two or more dimensions that is not quantized is excluded by its hub
  module name, so a loader that targets ``Linear`` cannot mistake a tower, a
  router or a ``conv1d`` for FP8. It keeps modelopt's legacy shape (TensorRT-LLM
  reads it first).
- ``config.json``'s ``quantization_config`` is not written by hand: modelopt's own
  converter (``convert_hf_quant_config_format``) derives it from the same dict, so
  the two cannot disagree; vLLM reads only this block. Both files are written through
  ``omniquant.checkpoint.layout``, the format's owner.
- ``config.json`` is written in the naming serving stacks construct the model from
  (``released`` by default, converted by the model's adapter from the source's values,
  whichever naming the source used; ``source`` keeps the source's file), with the
  processor config beside it; only these JSON files depend on the naming.
- ``omniquant.json`` is written last (by the caller, through the same module): a
  directory without it is not a finished checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch

from omniquant.checkpoint.layout import (
    CONFIG_JSON,
    INDEX_JSON,
    WRITTEN_FILES,
    QuantConfig,
    write_config_json,
    write_json,
)
from omniquant.errors import ExportError
from omniquant.formats import FORMATS, KV_CACHE_FORMAT, KV_SCALE_SUFFIXES
from omniquant.models.mapped_pages import drop_interval, drop_mapped_pages
from omniquant.outdir import OUTPUT_MARKER

#: The processor-config file name hub checkpoints use (written in the export's naming).
PREPROCESSOR_JSON = "preprocessor_config.json"

#: Format name -> ``hf_quant_config`` ``quant_algo``, from the format registry.
QUANT_ALGO = {name: f.hf_quant_algo for name, f in FORMATS.items() if f.quantized}


@dataclass
class SourceIndex:
    """Which shard holds which tensor in a checkpoint directory."""

    path: Path
    shard_of: dict[str, str]  # tensor name -> shard file name
    shards: list[str]
    indexed: bool

    @classmethod
    def read(cls, path: Path) -> SourceIndex:
        from safetensors import safe_open

        index_file = path / INDEX_JSON
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            return cls(path, dict(weight_map), shards, True)
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise ExportError(f"{path}: no *.safetensors files to export from.")
        shard_of = {}
        for f in files:
            with safe_open(path / f, "pt") as fh:
                for k in fh.keys():  # noqa: SIM118 (a safetensors handle)
                    shard_of[k] = f
        return cls(path, shard_of, files, False)


def quantized_hub_modules(loaded, plan) -> dict[str, str]:
    """Hub-layout Linear module name -> format, for every quantized module of the plan.

    A fused expert container expands to one entry per expert and projection.
    """
    adapter, model = loaded.adapter, loaded.model
    modules = dict(model.named_modules())
    out = {}
    for name, fmt in plan.quantized().items():
        if plan.module_group[name] in adapter.fused_expert_groups:
            for linear in adapter.expert_linears(name, modules[name]):
                out[linear.hub_module] = fmt
        else:
            out[adapter.hub_name(name)] = fmt
    return out


def _pointers(modules) -> set[int]:
    """Data pointers of the live (not meta) parameters and buffers of ``modules``."""
    return {
        t.data_ptr()
        for mod in modules
        for t in [*mod.parameters(), *mod.buffers()]
        if t.device.type != "meta"
    }


def _to_meta(modules, keep: set[int] = frozenset()) -> int:
    """Replace each module's own parameters and buffers by meta tensors of the same shape
    and dtype, except those whose data pointer is in ``keep``; a storage is freed with its
    last reference. Returns the bytes of the tensors replaced."""
    freed = 0
    for mod in modules:
        for slots in (mod._parameters, mod._buffers):
            for name, t in list(slots.items()):
                if t is None or t.device.type == "meta":
                    continue
                if t.data_ptr() in keep:
                    continue
                freed += t.numel() * t.element_size()
                empty = torch.empty(t.shape, dtype=t.dtype, device="meta")
                slots[name] = (
                    torch.nn.Parameter(empty, requires_grad=False)
                    if isinstance(t, torch.nn.Parameter)
                    else empty
                )
    return freed


class _LayerwiseQuantExport:
    """modelopt's resident exporter, applied one unit at a time.

    A unit is a decoder layer of the quantized root (or a quantized module outside the
    layers). Model-level preparation runs once, in the order
    ``_export_transformers_checkpoint`` runs it (pinned modelopt 0.47): MoE input
    preparation, resmoothing, quant config, tied input amax. Then each unit runs the same
    per-module export handlers, fused-expert reconstruction, ``postprocess_state_dict``
    and quant-aware reverse conversion on its own state dict only, so the quantized
    tensors of one unit exist at a time outside the model. modelopt's own streaming
    exporter (``_export_transformers_checkpoint_streaming``) refuses NemotronH, whose
    conversion mapping splits fused experts, and writes shards of its own sizing; this
    keeps the source's shards. Offloaded units are materialised with modelopt's
    ``enable_weight_access_and_writeback`` (read-only) while they export.
    """

    def __init__(self, loaded):
        import modelopt.torch.export.unified_export_hf as ueh
        from modelopt.torch.export.model_utils import TiedWeightMap
        from modelopt.torch.export.quant_utils import get_quant_config, sync_tied_input_amax
        from modelopt.torch.export.registry import ExportContext
        from modelopt.torch.quantization.nn import TensorQuantizer
        from modelopt.torch.quantization.utils.core_utils import has_accelerate_offload

        self.adapter_model = loaded.model
        self.source_files = sorted(Path(loaded.path).glob("*.safetensors"))
        self._drop_every, self._freed = drop_interval(self.source_files), 0
        self.root_name = loaded.adapter.quant_root_name()
        self.root = root = loaded.adapter.quant_root(loaded.model)
        self.adapter = loaded.adapter
        dtype = torch.bfloat16
        self.tied_map = TiedWeightMap(root)
        ueh._prepare_moe_inputs(root, dtype, False)
        ueh.requantize_resmooth_fused_llm_layers(root)
        self.offloaded = has_accelerate_offload(root)
        self.quant_config = get_quant_config(root, is_modelopt_qlora=False)
        ueh._add_mtp_exclusions(root, self.quant_config)
        ueh._warn_on_unsynced_moe_gate_up(root)
        sync_tied_input_amax(root, self.tied_map)
        self.ctx = ExportContext(model=root, dtype=dtype, is_modelopt_qlora=False)
        self.kv_format = self.quant_config["quantization"]["kv_cache_quant_algo"]
        self.name_to_module = dict(root.named_modules())

        def has_quantizers(mod) -> bool:
            return any(isinstance(m, TensorQuantizer) and m.is_enabled for m in mod.modules())

        # native name (relative to root) -> module, for units that carry quantizers
        self.units: dict[str, torch.nn.Module] = {}
        layers = self._decoder_layers()
        inside = set()
        for name, mod in layers.items():
            inside.update(id(m) for m in mod.modules())
            if has_quantizers(mod):
                self.units[name] = mod
        for name, mod in root.named_modules():
            if id(mod) in inside or not name:
                continue
            if any(isinstance(c, TensorQuantizer) for c in mod.children()) and has_quantizers(mod):
                self.units[name] = mod
        # hub prefix -> native unit name, longest first for lookups
        hub = {self._hub(n): n for n in self.units}
        self._by_hub = sorted(hub.items(), key=lambda kv: -len(kv[0]))
        self.exported: set[str] = set()

    def _decoder_layers(self) -> dict[str, torch.nn.Module]:
        from modelopt.torch.quantization.utils.layerwise_calib import LayerActivationCollector

        layers = LayerActivationCollector.get_decoder_layers(self.root) or []
        ids = {id(m) for m in layers}
        return {n: m for n, m in self.root.named_modules() if id(m) in ids}

    def _hub(self, native: str) -> str:
        return self.adapter.hub_name(f"{self.root_name}.{native}")

    def unit_of(self, hub_tensor: str) -> str | None:
        """Native name of the unit a hub-layout tensor belongs to (None: no quantizers)."""
        for prefix, native in self._by_hub:
            if hub_tensor.startswith(prefix + "."):
                return native
        return None

    def release(self, native: str) -> None:
        """Free the tensors of exported unit ``native`` (what the export returned lives on
        in the caller's hands): moved to the meta device, shapes and dtypes kept; the
        source shards' mapped pages are dropped (``omniquant.models.mapped_pages``), since a
        freed view of a shard keeps its pages mapped while any tensor of that shard lives."""
        if not self.offloaded:
            # a tensor a unit not yet exported shares (a tied weight) stays
            later = _pointers(u for n, u in self.units.items() if n not in self.exported)
            self._freed += _to_meta(self.units[native].modules(), keep=later)
            if self._freed >= self._drop_every:  # a drop reads /proc/self/pagemap whole
                self._freed = 0
                drop_mapped_pages(self.source_files)

    def release_outside_units(self) -> None:
        """Free the tensors of every module of the model outside the units (towers,
        embeddings, norms: the export copies them from the source files), except tensors
        that share storage with a unit (a tied weight)."""
        if self.offloaded:
            return
        inside = {id(m) for unit in self.units.values() for m in unit.modules()}
        model = self.adapter_model
        keep = _pointers(self.units.values())
        _to_meta((m for m in model.modules() if id(m) not in inside), keep=keep)
        drop_mapped_pages(self.source_files)

    def export(self, native: str) -> dict[str, torch.Tensor]:
        """All tensors of unit ``native`` after modelopt's export, under hub names, on the CPU."""
        from modelopt.torch.export.quant_aware_conversion import (
            revert_weight_conversion_quant_aware,
        )
        from modelopt.torch.export.quant_utils import postprocess_state_dict
        from modelopt.torch.export.unified_export_hf import _dispatch_export_handler
        from modelopt.torch.quantization.plugins.huggingface import _reconstruct_fused_moe_linear
        from modelopt.torch.quantization.utils.core_utils import (
            enable_weight_access_and_writeback,
        )

        module = self.units[native]
        self.exported.add(native)
        window = (
            enable_weight_access_and_writeback(
                module, self.root, self.name_to_module, writeback=False
            )
            if self.offloaded
            else contextlib.nullcontext()
        )
        with window:
            for sub_name, sub in module.named_modules():
                _dispatch_export_handler(
                    f"{native}.{sub_name}" if sub_name else native, sub, self.ctx
                )
            _reconstruct_fused_moe_linear(module)
            state = {f"{native}.{k}": v for k, v in module.state_dict().items()}
            post = postprocess_state_dict(
                state, 448, self.kv_format, False, tied_map=self.tied_map
            )  # 448: modelopt's KV scale bound (amax / 448) for FP8 and NVFP4 KV caches
            hub_sd = revert_weight_conversion_quant_aware(self.root, post)
            return {f"{self.root_name}.{k}": v.detach().cpu() for k, v in hub_sd.items()}


def remote_code_files(remote_code: Path) -> tuple[dict, list[Path]]:
    """``auto_map`` and the ``*.py`` files of a released checkpoint directory (its
    ``config.json`` and code are enough), for an export whose ``model_type`` is remote code.

    Raises:
        ExportError: no ``config.json`` with an ``auto_map``, or no ``*.py`` file it names.
    """
    remote_code = Path(remote_code)
    cfg_file = remote_code / CONFIG_JSON
    try:
        auto_map = json.loads(cfg_file.read_text()).get("auto_map")
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {cfg_file}: {exc}", arg="remote_code", value=remote_code) from exc
    if not isinstance(auto_map, dict) or not auto_map:
        raise ExportError(
            f"{cfg_file} has no auto_map; pass a released checkpoint's directory (its config.json "
            "and *.py files).", arg="remote_code", value=remote_code
        )  # fmt: skip
    files = sorted(remote_code.glob("*.py"))
    names = {f.stem for f in files}
    wanted = {str(v).split("--")[-1].rsplit(".", 1)[0] for v in auto_map.values()}
    if not files or not wanted <= names:
        raise ExportError(
            f"auto_map names module(s) {sorted(wanted - names)} that are not *.py files in the "
            "directory.", arg="remote_code", value=remote_code
        )  # fmt: skip
    return auto_map, files


class _ShardWriter:
    """Writes output shards on a background thread while the caller exports the next
    shard's layers.

    Each shard goes out through ``SafetensorsWriter`` (``omniquant.checkpoint.safetensors_file``):
    direct I/O from two reused chunk buffers, each chunk hashed on a third thread while it
    is written, so no shard is read back to be hashed. The copies into the chunks, the
    writes and hashlib all release the GIL, so they run beside modelopt's export of the
    next shard's layers. At most one shard is being written while the next is assembled
    (``submit`` waits for the previous write first), so memory holds at most two output
    shards. A failure to write is raised by the next ``submit`` or by ``checksums``.
    """

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        from omniquant.checkpoint.safetensors_file import SafetensorsWriter

        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omniquant-writer")
        self._files = SafetensorsWriter()
        self._saves: dict = {}
        self._last = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._saver.shutdown(wait=True)
        self._files.close()

    def submit(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` to ``path`` in the background; the dict is emptied once written."""
        if self._last is not None:
            self._last.result()
        self._last = self._saves[path.name] = self._saver.submit(self._save, path, tensors)

    def _save(self, path: Path, tensors: dict[str, torch.Tensor]) -> str:
        digest = self._files.write(path, tensors, metadata={"format": "pt"})
        tensors.clear()  # the shard's memory goes now, not when the caller's loop moves on
        return digest

    def checksums(self) -> dict[str, str]:
        """``{shard file: sha256}`` of every shard, once all are written."""
        return {name: save.result() for name, save in self._saves.items()}


def write_checkpoint(
    loaded,
    plan,
    out: Path,
    config_naming: str = "released",
    remote_code: Path | None = None,
    progress=None,
    release: bool = False,
) -> dict:
    """Write shards, configs and copied files of the quantized model into ``out``.

    Streams: each output shard is assembled from its source shard (unquantized tensors
    read from the file) and the quantized tensors of the units it holds (exported from
    the model one decoder layer at a time), then written and hashed on a second thread
    (``_ShardWriter``) while the next shard's layers export, so host memory holds at most
    two output shards and one unit's quantized tensors beyond the model itself.

    ``config.json`` (and ``preprocessor_config.json``) are written in ``config_naming``
    (``released``: the naming serving stacks construct the model from, the default;
    ``native``; ``source``: the source's file as is), converted by the adapter; tensors are
    the same bytes whatever the naming. ``remote_code``: a released checkpoint directory
    whose ``*.py`` files are copied and whose ``auto_map`` is written (``remote_code_files``).

    Args:
        progress: ``progress(done_bytes, total_bytes, label)`` after each exported layer
            and each written shard (bytes of the source tensors handled so far), or None.
        release: The model is not used after the export (``quantize``): each unit's
            tensors are freed once exported, and the modules no unit holds (towers,
            embeddings: copied from the source files) at the start, so the export's peak
            memory is the model's, not the model's plus the output. The model is unusable
            afterwards (its tensors are on the meta device).

    Returns:
        ``{"shards": {file: sha256}, "hf_quant_config": {...}, "tensors": n}``;
        ``omniquant.json`` is the caller's to write (last).
    """
    from omniquant.quantize import kernels
    from omniquant.quantize.heap import lean_heap
    from omniquant.quantize.packing import fast_packing
    from omniquant.quantize.plan import weight_elements

    src = SourceIndex.read(loaded.path)
    qmods = quantized_hub_modules(loaded, plan)
    missing = [m for m in qmods if f"{m}.weight" not in src.shard_of]
    if missing:
        raise ExportError(
            f"{loaded.path}: quantized module(s) not found in the source files under their hub "
            f"names (layout mismatch): {', '.join(missing[:5])}"
        )
    out.mkdir(parents=True, exist_ok=True)
    # Per-weight temporaries reuse freed heap memory (omniquant/quantize/heap.py).
    formats = plan.quantized()
    packed: dict[str, int] = {}  # format -> weight elements the export packs
    for name, n in weight_elements(plan, loaded).items():
        packed[formats[name]] = packed.get(formats[name], 0) + n
    compiled = kernels.allowed(kernels.worth_compiling(packed))
    with lean_heap(), fast_packing(), compiled, _ShardWriter() as writer:
        exporter = _LayerwiseQuantExport(loaded)
        if release:
            exporter.release_outside_units()
        shards = _ShardAssembly(src, qmods, exporter, release, progress)
        for shard in src.shards:
            tensors = shards.assemble(shard)
            writer.submit(out / shard, tensors)
            del tensors
        checksums = writer.checksums()
    shards.finish(plan)
    if src.indexed:
        index = {
            "metadata": {"total_size": shards.total},
            "weight_map": dict(sorted(shards.weight_map.items())),
        }
        (out / INDEX_JSON).write_text(json.dumps(index, indent=2) + "\n")
    hf_quant = QuantConfig.from_json(
        build_hf_quant_config(src, qmods, plan, exporter.quant_config)
    )
    hf_quant.write(out)
    _write_configs(loaded, src, out, hf_quant, config_naming, remote_code)
    return {"shards": checksums, "hf_quant_config": hf_quant.to_json(), "tensors": shards.count}


class _ShardAssembly:
    """The tensors of each output shard: quantized ones from the exporter (units exported
    as their first tensor comes up), the rest read from the source shard; KV scales beside
    their attention projections."""

    def __init__(self, src: SourceIndex, qmods: dict[str, str], exporter, release: bool, progress):
        self.src, self.qmods, self.exporter, self.release = src, qmods, exporter, release
        self.report = progress or (lambda _done, _total, _label: None)
        self.by_shard: dict[str, list[str]] = {s: [] for s in src.shards}
        for name, shard in src.shard_of.items():
            self.by_shard[shard].append(name)
        self.shard_bytes = {f: (src.path / f).stat().st_size for f in src.shards}
        self.all_bytes, self.done_bytes = sum(self.shard_bytes.values()), 0
        self.pending: dict[str, torch.Tensor] = {}  # exported, not yet placed in a shard
        self.weight_map: dict[str, str] = {}
        self.total = self.count = self.kv_written = 0

    def _export_units(self, shard: str, label: str) -> None:
        exporter = self.exporter
        for name in self.by_shard[shard]:
            unit = exporter.unit_of(name)
            if unit is None or unit in exporter.exported:
                continue
            exported = exporter.export(unit)
            self.pending.update((k, v) for k, v in exported.items() if _wanted(k, self.qmods))
            del exported
            if self.release:
                exporter.release(unit)
            self.report(
                self.done_bytes, self.all_bytes,
                f"{label}, layer {len(exporter.exported)}/{len(exporter.units)}",
            )  # fmt: skip

    def assemble(self, shard: str) -> dict[str, torch.Tensor]:
        """Every tensor of output shard ``shard`` (the source shard of the same name)."""
        from safetensors import safe_open

        label = f"shard {self.src.shards.index(shard) + 1}/{len(self.src.shards)}"
        self._export_units(shard, label)
        pending, qmods = self.pending, self.qmods
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(self.src.path / shard, "pt") as fh:
            for name in self.by_shard[shard]:
                module, leaf = name.rsplit(".", 1)
                if module not in qmods or leaf != "weight":
                    tensors[name] = fh.get_tensor(name)
                    continue
                if name not in pending:
                    raise ExportError(f"internal: modelopt exported no quantized tensor for {name}.")
                tensors[name] = pending.pop(name).contiguous()
                for suffix in FORMATS[qmods[module]].scale_suffixes:
                    key = f"{module}.{suffix}"
                    if key in pending:
                        tensors[key] = pending.pop(key).contiguous()
        for key in [k for k in pending if k.rsplit(".", 1)[-1] in KV_SCALE_SUFFIXES]:
            anchor = key.rsplit(".", 1)[0] + ".weight"
            if anchor not in self.src.shard_of:
                raise ExportError(f"KV scale {key}: no source tensor {anchor} to place it beside.")
            if self.src.shard_of[anchor] == shard:
                tensors[key] = pending.pop(key).contiguous()
                self.kv_written += 1
        self.weight_map.update(dict.fromkeys(tensors, shard))
        self.total += sum(t.numel() * t.element_size() for t in tensors.values())
        self.count += len(tensors)
        self.done_bytes += self.shard_bytes[shard]
        self.report(self.done_bytes, self.all_bytes, f"{label} assembled")
        return tensors

    def finish(self, plan) -> None:
        """Every exported tensor found its place; the KV scales asked for were exported."""
        if self.pending:
            raise ExportError(
                f"internal: {len(self.pending)} exported tensor(s) have no place in the source "
                f"shards: {', '.join(sorted(self.pending)[:5])}"
            )
        if plan.kv_cache == "fp8" and not self.kv_written:
            raise ExportError("kv_cache: fp8 was requested but modelopt exported no k/v scales.")


def _write_configs(loaded, src: SourceIndex, out: Path, hf_quant, config_naming, remote_code):
    """``config.json`` in ``config_naming`` (with ``auto_map`` and the released code for
    ``remote_code``), the processor config converted with it, the source's other files copied."""
    source_config = json.loads((src.path / CONFIG_JSON).read_text())
    pre_file = src.path / PREPROCESSOR_JSON
    preprocessor = json.loads(pre_file.read_text()) if pre_file.is_file() else None
    config, new_pre = loaded.adapter.serving_config(source_config, config_naming, preprocessor)
    if remote_code is not None:  # the released model_type is built by NVIDIA's code
        auto_map, code = remote_code_files(remote_code)
        config = {**config, "auto_map": auto_map}
        for f in code:
            shutil.copy2(f, out / f.name)
    write_config_json(out, config, hf_quant)
    for f in sorted(src.path.iterdir()):
        copied = f.name not in WRITTEN_FILES and f.name != OUTPUT_MARKER
        if f.is_file() and copied and f.suffix != ".safetensors":
            if f.name == PREPROCESSOR_JSON and new_pre is not None:
                write_json(out / f.name, new_pre)
            else:
                shutil.copy2(f, out / f.name)


def _wanted(hub_key: str, qmods: dict[str, str]) -> bool:
    """Whether an exported tensor goes into the checkpoint: quantized weights with their
    scales, and KV-cache scales (everything else is copied from the source files)."""
    module, leaf = hub_key.rsplit(".", 1)
    return leaf in KV_SCALE_SUFFIXES or (
        module in qmods and (leaf == "weight" or leaf in FORMATS[qmods[module]].scale_suffixes)
    )


def build_hf_quant_config(src: SourceIndex, qmods: dict[str, str], plan, mo_config: dict) -> dict:
    """``hf_quant_config.json`` in hub names, with towers in ``exclude_modules``.

    Every module whose ``weight`` has two or more dimensions and is not quantized is
    excluded, Mamba ``conv1d`` (3-D) included: TensorRT-LLM keeps ``conv1d`` in a
    ``Linear`` that takes the global quant config unless excluded, as modelopt's own
    ``exclude_modules`` (and NVIDIA's released configs) list it.
    """
    from safetensors import safe_open

    formats = sorted(set(qmods.values()))
    excluded = []
    for shard in src.shards:
        with safe_open(src.path / shard, "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 (a safetensors handle)
                module, leaf = k.rsplit(".", 1)
                if (
                    leaf == "weight"
                    and module not in qmods
                    and len(fh.get_slice(k).get_shape()) >= 2
                ):
                    excluded.append(module)
    if len(formats) > 1:
        algo = "MIXED_PRECISION"
    elif formats:
        algo = QUANT_ALGO[formats[0]]
    else:
        raise ExportError(
            "the plan quantizes no module; nothing to export as a quantized checkpoint."
        )
    mo_algo = mo_config.get("quantization", {}).get("quant_algo")
    if mo_algo != algo:
        raise ExportError(
            f"internal: modelopt reports quant_algo {mo_algo!r}, the plan implies {algo!r}."
        )
    quant: dict = {
        "quant_algo": algo,
        "kv_cache_quant_algo": (
            KV_CACHE_FORMAT.hf_quant_algo if plan.kv_cache == KV_CACHE_FORMAT.name else None
        ),
    }
    if len(formats) == 1 and FORMATS[formats[0]].block_size is not None:
        quant["group_size"] = FORMATS[formats[0]].block_size
    quant["exclude_modules"] = sorted(set(excluded))
    if algo == "MIXED_PRECISION":
        layers = {}
        for module, fmt in sorted(qmods.items()):
            entry = {"quant_algo": QUANT_ALGO[fmt]}
            if FORMATS[fmt].block_size is not None:
                entry["group_size"] = FORMATS[fmt].block_size
            layers[module] = entry
        quant["quantized_layers"] = layers
    return {
        "producer": dict(mo_config.get("producer", {"name": "modelopt"})),
        "quantization": quant,
    }
