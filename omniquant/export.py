"""Export a modelopt-quantized omni model in the source checkpoint's (hub) layout.

Policy:
- The source files drive the export: every tensor that is not quantized is
  copied from the source shard under its source name and dtype, byte for byte;
  quantized weights replace their source tensor under the same name with their
  scale tensors beside them (``weight_scale``, ``weight_scale_2``,
  ``input_scale``), and KV-cache scales sit beside their attention projections.
  Sharding follows the source.
- Quantized tensors come from modelopt's exporter (``_export_transformers_checkpoint``
  on the language model, pinned modelopt 0.47), and their names are mapped back to
  the hub layout with modelopt's quant-aware reverse conversion scoped to the
  language model (applied to the whole omni model it refuses the scoped converter).
- ``hf_quant_config.json`` is written from the plan: modelopt's own lists native
  names and omits the vision/audio towers from ``exclude_modules``. Here every
  weight of two or more dimensions that is not quantized is excluded by its hub
  module name, so a loader that targets ``Linear`` cannot mistake a tower, a
  router or a ``conv1d`` for FP8. It keeps modelopt's legacy shape (TensorRT-LLM
  reads it first).
- ``config.json``'s ``quantization_config`` is not written by hand: modelopt's own
  converter (``convert_hf_quant_config_format``) derives it from the same dict, so
  the two cannot disagree; vLLM reads only this block.
- ``omniquant.json`` is written last: a directory without it is not a finished
  checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from omniquant.errors import ExportError

SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")
KV_SUFFIXES = ("k_scale", "v_scale")
_SKIP_COPY = {
    "config.json",
    "hf_quant_config.json",
    "omniquant.json",
    "model.safetensors.index.json",
}
QUANT_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4"}


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

        index_file = path / "model.safetensors.index.json"
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
                for k in fh.keys():
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
        hub = adapter.hub_name(name)
        if plan.module_group[name] in getattr(adapter, "fused_expert_groups", ()):
            mod = modules[name]
            for i in range(mod.num_experts):
                for proj in ("up_proj", "down_proj"):
                    out[f"{hub}.{i}.{proj}"] = fmt
        else:
            out[hub] = fmt
    return out


@contextlib.contextmanager
def _single_rounding_fp8():
    """Make modelopt's FP8 weight packing divide in fp32.

    modelopt 0.47's ``to_quantized_weight`` computes ``weight / scale`` in the
    weight's dtype; for BF16 weights that rounds to BF16 before the cast to E4M3,
    and ties land one FP8 step away from what its own fake-quantized model (and a
    single rounding) gives. Upcasting one weight at a time keeps memory flat.
    """
    import modelopt.torch.export.unified_export_hf as ueh
    from modelopt.torch.export.model_config import QUANTIZATION_FP8

    orig = ueh.to_quantized_weight

    def to_quantized_weight(weight, weights_scaling_factor, quantization, *args, **kwargs):
        if quantization == QUANTIZATION_FP8 and weight.dtype in (torch.bfloat16, torch.float16):
            weight = weight.float()
        return orig(weight, weights_scaling_factor, quantization, *args, **kwargs)

    ueh.to_quantized_weight = to_quantized_weight
    try:
        yield
    finally:
        ueh.to_quantized_weight = orig


def _modelopt_hub_state_dict(loaded) -> tuple[dict[str, torch.Tensor], dict]:
    """Quantized language-model tensors from modelopt, under hub names."""
    from modelopt.torch.export.quant_aware_conversion import revert_weight_conversion_quant_aware
    from modelopt.torch.export.unified_export_hf import _export_transformers_checkpoint

    from omniquant.heap import lean_heap

    root_name = loaded.adapter.quant_root_name()
    root = getattr(loaded.model, root_name)
    # Per-weight temporaries go back to the OS when freed (omniquant/heap.py).
    with lean_heap(), _single_rounding_fp8():
        post_sd, mo_config = _export_transformers_checkpoint(root, torch.bfloat16)
    hub_sd = revert_weight_conversion_quant_aware(root, dict(post_sd))
    return {f"{root_name}.{k}": v for k, v in hub_sd.items()}, mo_config


def write_checkpoint(loaded, plan, out: Path) -> dict:
    """Write shards, configs and copied files of the quantized model into ``out``.

    Returns:
        ``{"shards": {file: sha256}, "hf_quant_config": {...}, "tensors": n}``;
        ``omniquant.json`` is the caller's to write (last).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = SourceIndex.read(loaded.path)
    qmods = quantized_hub_modules(loaded, plan)
    hub_sd, mo_config = _modelopt_hub_state_dict(loaded)

    missing = [m for m in qmods if f"{m}.weight" not in src.shard_of]
    if missing:
        raise ExportError(
            f"{loaded.path}: quantized module(s) not found in the source files under their hub "
            f"names (layout mismatch): {', '.join(missing[:5])}"
        )
    kv_tensors = {k: v for k, v in hub_sd.items() if k.rsplit(".", 1)[-1] in KV_SUFFIXES}
    if plan.kv_cache == "fp8" and not kv_tensors:
        raise ExportError("kv_cache: fp8 was requested but modelopt exported no k/v scales.")

    out.mkdir(parents=True, exist_ok=True)
    shard_tensors: dict[str, dict[str, torch.Tensor]] = {s: {} for s in src.shards}
    handles = {s: safe_open(src.path / s, "pt") for s in src.shards}
    try:
        for name, shard in src.shard_of.items():
            module, leaf = name.rsplit(".", 1)
            if module in qmods and leaf == "weight":
                shard_tensors[shard][name] = hub_sd[name].contiguous()
                for suffix in SCALE_SUFFIXES:
                    key = f"{module}.{suffix}"
                    if key in hub_sd:
                        shard_tensors[shard][key] = hub_sd[key].contiguous()
            else:
                shard_tensors[shard][name] = handles[shard].get_tensor(name)
        for key, value in kv_tensors.items():
            anchor = key.rsplit(".", 1)[0] + ".weight"
            if anchor not in src.shard_of:
                raise ExportError(f"KV scale {key}: no source tensor {anchor} to place it beside.")
            shard_tensors[src.shard_of[anchor]][key] = value.contiguous()
    finally:
        handles.clear()

    checksums = {}
    for shard, tensors in shard_tensors.items():
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        checksums[shard] = sha256_file(out / shard)
    if src.indexed:
        weight_map = {k: s for s, ts in shard_tensors.items() for k in ts}
        total = sum(
            t.numel() * t.element_size() for ts in shard_tensors.values() for t in ts.values()
        )
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    hf_quant = build_hf_quant_config(src, qmods, plan, mo_config)
    _write_json(out / "hf_quant_config.json", hf_quant)
    config = json.loads((src.path / "config.json").read_text())
    config["quantization_config"] = serving_quant_config(hf_quant)
    _write_json(out / "config.json", config)
    for f in sorted(src.path.iterdir()):
        if f.is_file() and f.name not in _SKIP_COPY and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    n = sum(len(t) for t in shard_tensors.values())
    return {"shards": checksums, "hf_quant_config": hf_quant, "tensors": n}


def serving_quant_config(hf_quant: dict) -> dict:
    """``config.json``'s ``quantization_config``: modelopt's converter applied to ``hf_quant``.

    The same converter modelopt's own exporter uses (``convert_hf_quant_config_format``,
    pinned modelopt 0.47) turns the legacy ``hf_quant_config.json`` shape into the one
    serving stacks read from ``config.json`` (``ignore``, ``kv_cache_scheme``,
    ``config_groups``, ``quantized_layers``, ``quant_method: modelopt``); vLLM reads
    only this block when it exists. A deep copy keeps the two files independent.
    """
    import copy

    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    return convert_hf_quant_config_format(copy.deepcopy(hf_quant))


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
            for k in fh.keys():
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
        "kv_cache_quant_algo": "FP8" if plan.kv_cache == "fp8" else None,
    }
    if algo == "NVFP4":
        quant["group_size"] = 16
    quant["exclude_modules"] = sorted(set(excluded))
    if algo == "MIXED_PRECISION":
        layers = {}
        for module, fmt in sorted(qmods.items()):
            entry = {"quant_algo": QUANT_ALGO[fmt]}
            if fmt == "nvfp4":
                entry["group_size"] = 16
            layers[module] = entry
        quant["quantized_layers"] = layers
    return {
        "producer": dict(mo_config.get("producer", {"name": "modelopt"})),
        "quantization": quant,
    }


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_permissions(root: Path) -> None:
    """Give every file under ``root`` the mode a plain ``open()`` would: ``0o666 & ~umask``.

    safetensors' ``save_file`` (and so ``save_pretrained``) creates its file through a
    private temporary, mode 0600, while the JSON files beside it get 0644: a server running
    as another user could read the configs but not the weights.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
