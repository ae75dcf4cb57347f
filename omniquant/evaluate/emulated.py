"""Load an exported checkpoint so that it computes what a serving engine computes.

Policy (why this is our code, not modelopt's): modelopt's NVFP4 fake-quant forward
needs CUDA, and evaluating the in-memory simulation would not test the artifact we
ship. Here the *files on disk* are the source of truth:
- weights are dequantized from the stored bytes (E4M3 x weight_scale; E2M1
  nibbles x E4M3 block scale x FP32 global scale) with ``omniquant.numerics``;
- FP8 activations are quantized per tensor with the stored ``input_scale``; NVFP4
  activations dynamically per 16-element block under the stored global scale;
- the FP8 KV cache is emulated by quantizing k/v projections with ``k_scale`` /
  ``v_scale`` (per-tensor, the same values a cache would hold).
The dequantized state dict goes through transformers' own ``from_pretrained``
(conversion mapping included; the adapter's ``load_from_state_dict``), which must
report no missing or unexpected keys; hub names map back to modules through the
adapter's ``native_module``.
A BF16 checkpoint loads unchanged. Pure torch: runs on CPU and GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from omniquant.checkpoint.layout import read_quant_config
from omniquant.errors import ModelLoadError
from omniquant.evaluate.shared_input import SharedQuantizers
from omniquant.formats import (
    KV_CACHE_FORMAT,
    KV_SCALE_SUFFIXES,
    SCALE_SUFFIXES,
    by_stored_dtype,
    get_format,
)

# Which stored tensors are scales, and how each format dequantizes and quantizes
# activations, come from the format registry (omniquant.formats).
SCALE_LEAVES = SCALE_SUFFIXES
KV_LEAVES = KV_SCALE_SUFFIXES


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor of a checkpoint directory (hub names), all shards."""
    return _read_tensors(Path(path))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{path}: no *.safetensors files.")
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        out.update(load_file(str(shard)))
    return out


def dequantize_state_dict(tensors: dict[str, torch.Tensor], dtype=torch.bfloat16):
    """Split stored tensors into a high-precision state dict and activation/KV scales.

    Returns:
        ``(state_dict, act_quant, kv_scales)`` where ``act_quant`` maps a hub Linear
        module name to ``(format, input_scale)`` and ``kv_scales`` maps a hub
        projection module name (``...k_proj``) to its scale.
    """
    sd: dict[str, torch.Tensor] = {}
    act: dict[str, tuple[str, torch.Tensor]] = {}
    kv: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        module, leaf = name.rsplit(".", 1)
        if leaf in SCALE_LEAVES:
            continue
        if leaf in KV_LEAVES:
            kv[module] = t.float()
            continue
        fmt = by_stored_dtype(t.dtype) if leaf == "weight" else None
        if fmt is not None and fmt.quantized:
            scales = {s: tensors[f"{module}.{s}"] for s in fmt.weight_scale_suffixes}
            sd[name] = fmt.dequantize(t, scales, dtype=dtype)
            act[module] = (fmt.name, tensors[f"{module}.{fmt.input_scale_suffix}"].float())
        else:
            sd[name] = t
    return sd, act, kv


def load_emulated(
    path: str | Path, dtype: str = "bfloat16", tensors: dict[str, torch.Tensor] | None = None
):
    """Load a BF16, FP8, NVFP4 or mixed checkpoint for evaluation with serving numerics.

    Args:
        path: The checkpoint directory (config, tokenizer and, unless ``tensors`` is
            given, the safetensors shards).
        dtype: Compute dtype of the dequantized weights.
        tensors: Stored tensors (hub names) to use instead of the shards: a layout
            composed in memory from exports of the same model (``omniquant fit`` scores
            one unit at a time this way); read with the same serving numerics.

    Returns:
        A ``LoadedModel`` whose ``emulation`` records the formats found.
    """
    from transformers import AutoTokenizer

    from omniquant.models.base import LoadedModel, adapter_for, read_config

    path = Path(path)
    adapter = adapter_for(path)
    cfg_dict = read_config(path)
    stored = _read_tensors(path) if tensors is None else tensors
    sd, act, kv = dequantize_state_dict(stored, getattr(torch, dtype))
    model = adapter.load_from_state_dict(path, sd, dtype)
    installed = install_serving_numerics(model, adapter, act, kv)
    tokenizer = AutoTokenizer.from_pretrained(path)
    formats = sorted({f for f, _ in act.values()})
    qc = read_quant_config(path, ModelLoadError)
    emulation = {
        "formats": formats,
        "quantized_linears": len(act),
        "kv_cache": KV_CACHE_FORMAT.name if kv else None,
        "hooks": installed,
        "quant_algo": qc.quantization.quant_algo if qc is not None else "BF16",
    }
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=path,
        adapter=adapter,
        config_dict=cfg_dict,
        emulation=emulation,
    )


def _native(adapter, hub_module: str) -> tuple[str, tuple[str, int] | None]:
    """The adapter's ``native_module``, with this module's error for a module outside the
    backbone."""
    try:
        return adapter.native_module(hub_module)
    except ValueError:
        raise ModelLoadError(
            f"quantized module {hub_module}: outside the backbone; omniquant cannot emulate it."
        ) from None


def _act_fn(fmt: str, scale: torch.Tensor):
    return get_format(fmt).activation_quantizer(scale)


def install_serving_numerics(model, adapter, act: dict, kv: dict) -> int:
    """Install activation and KV quantization hooks; returns how many were installed.

    GEMM inputs under equal (format, input scale) share one remembering quantizer
    (``omniquant.evaluate.shared_input``): q/k/v, or a MoE's experts and shared expert,
    quantize their common input once per forward.
    """
    modules = dict(model.named_modules())
    experts: dict[str, dict[tuple[str, int], tuple[str, torch.Tensor]]] = {}
    shared = SharedQuantizers(_act_fn)
    n = 0
    for hub, (fmt, scale) in act.items():
        native, expert = _native(adapter, hub)
        if expert is not None:
            experts.setdefault(native, {})[expert] = (fmt, scale)
            continue
        quant = shared.get(fmt, scale)
        modules[native].register_forward_pre_hook(lambda _m, args, q=quant: (q(args[0]), *args[1:]))
        n += 1
    for native, table in experts.items():
        _wrap_experts(adapter, native, modules[native], table, shared)
        n += 1
    for hub, scale in kv.items():
        mod = modules[_native(adapter, hub)[0]]
        quant = _act_fn(KV_CACHE_FORMAT.name, scale)
        mod.register_forward_hook(lambda _m, _a, out, q=quant: q(out))
        n += 1
    return n


def _wrap_experts(adapter, name: str, mod, table: dict, shared_quantizers) -> None:
    """Quantize the inputs of a fused-experts module's per-expert GEMMs.

    A projection whose every expert has the same format and the same stored input scale
    (modelopt's export writes one input scale per projection of a container) gets one
    quantizer from ``shared_quantizers``, passed as ``shared``: the adapter may then quantize
    the container's input once instead of once per routed expert (activation quantizers
    act on each row alone).
    """
    quant = {key: _act_fn(fmt, scale) for key, (fmt, scale) in table.items()}

    def fn(proj: str, idx: int, x: torch.Tensor) -> torch.Tensor:
        q = quant.get((proj, idx))
        return x if q is None else q(x)

    by_proj: dict[str, list] = {}
    for e in adapter.expert_linears(name, mod):
        by_proj.setdefault(e.projection, []).append(table.get((e.projection, e.expert)))
    shared = {}
    for proj, entries in by_proj.items():
        first = entries[0]
        if first is not None and all(
            e is not None and e[0] == first[0] and torch.equal(e[1], first[1]) for e in entries
        ):
            shared[proj] = shared_quantizers.get(*first)
    adapter.patch_expert_inputs(mod, fn, shared)
