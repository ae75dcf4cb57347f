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
(conversion mapping included), which must report no missing or unexpected keys.
A BF16 checkpoint loads unchanged. Pure torch: runs on CPU and GPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from omniquant.checkpoint.layout import read_quant_config
from omniquant.errors import ModelLoadError

SCALE_LEAVES = ("weight_scale", "weight_scale_2", "input_scale")
KV_LEAVES = ("k_scale", "v_scale")
_EXPERT_RE = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)$")


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
    from omniquant.numerics import dequantize_fp8, dequantize_nvfp4

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
        if leaf == "weight" and t.dtype == torch.float8_e4m3fn:
            sd[name] = dequantize_fp8(t, tensors[f"{module}.weight_scale"], dtype=dtype)
            act[module] = ("fp8", tensors[f"{module}.input_scale"].float())
        elif leaf == "weight" and t.dtype == torch.uint8:
            sd[name] = dequantize_nvfp4(
                t,
                tensors[f"{module}.weight_scale"],
                tensors[f"{module}.weight_scale_2"],
                dtype=dtype,
            )
            act[module] = ("nvfp4", tensors[f"{module}.input_scale"].float())
        else:
            sd[name] = t
    return sd, act, kv


def load_emulated(path: str | Path, dtype: str = "bfloat16"):
    """Load a BF16, FP8, NVFP4 or mixed checkpoint for evaluation with serving numerics.

    Returns:
        A ``LoadedModel`` whose ``emulation`` records the formats found.
    """
    from transformers import AutoTokenizer
    from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3,
    )

    from omniquant.models.base import LoadedModel, adapter_for, read_config
    from omniquant.models.nemotron_omni import load_config

    path = Path(path)
    adapter = adapter_for(path)
    cfg_dict = read_config(path)
    config = load_config(path)
    # The weights are dequantized here; transformers must not dispatch to a quantizer.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tdtype = getattr(torch, dtype)
    sd, act, kv = dequantize_state_dict(_read_tensors(path), tdtype)
    model, info = NemotronH_Omni_Reasoning_V3.from_pretrained(
        None,
        config=config,
        state_dict=sd,
        output_loading_info=True,
        dtype=tdtype,
        # The per-expert F.linear calls are where activations get quantized; the
        # grouped_mm kernel transformers picks by default would bypass them.
        experts_implementation="eager",
    )
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ModelLoadError(
            f"{path}: dequantized tensors do not fit nemotron_h_omni: missing "
            f"{sorted(info['missing_keys'])[:5]}, unexpected {sorted(info['unexpected_keys'])[:5]}, "
            f"mismatched {sorted(info['mismatched_keys'])[:5]}"
        )
    model.eval()
    installed = install_serving_numerics(model, adapter, act, kv)
    tokenizer = AutoTokenizer.from_pretrained(path)
    formats = sorted({f for f, _ in act.values()})
    qc = read_quant_config(path, ModelLoadError)
    emulation = {
        "formats": formats,
        "quantized_linears": len(act),
        "kv_cache": "fp8" if kv else None,
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


def _native(adapter, hub_module: str) -> str:
    """Inverse of ``adapter.hub_name`` for backbone modules."""
    for native_prefix, hub_prefix in (("language_model.model.", "language_model.backbone."),):
        if hub_module.startswith(hub_prefix):
            native = native_prefix + hub_module[len(hub_prefix) :]
            if adapter.hub_name(native) != hub_module:
                break
            return native
    raise ModelLoadError(
        f"quantized module {hub_module}: outside the backbone; omniquant cannot emulate it."
    )


def _act_fn(fmt: str, scale: torch.Tensor):
    from omniquant.numerics import fake_quant_fp8, fake_quant_nvfp4_activation

    if fmt == "fp8":
        return lambda x: fake_quant_fp8(x, scale)
    return lambda x: fake_quant_nvfp4_activation(x, scale)


def install_serving_numerics(model, adapter, act: dict, kv: dict) -> int:
    """Install activation and KV quantization hooks; returns how many were installed."""
    modules = dict(model.named_modules())
    experts: dict[str, dict[tuple[str, int], tuple[str, torch.Tensor]]] = {}
    n = 0
    for hub, (fmt, scale) in act.items():
        m = _EXPERT_RE.match(hub)
        if m:
            experts.setdefault(_native(adapter, m.group(1)), {})[(m.group(3), int(m.group(2)))] = (
                fmt,
                scale,
            )
            continue
        mod = modules[_native(adapter, hub)]
        quant = _act_fn(fmt, scale)
        mod.register_forward_pre_hook(lambda _m, args, q=quant: (q(args[0]), *args[1:]))
        n += 1
    for native, table in experts.items():
        _wrap_experts(modules[native], table)
        n += 1
    for hub, scale in kv.items():
        mod = modules[_native(adapter, hub)]
        quant = _act_fn("fp8", scale)
        mod.register_forward_hook(lambda _m, _a, out, q=quant: q(out))
        n += 1
    return n


def _wrap_experts(mod, table: dict) -> None:
    """Quantize the inputs of a fused-experts module's per-expert ``F.linear`` calls."""
    from omniquant.models.fused_experts import patch_expert_linears

    quant = {key: _act_fn(fmt, scale) for key, (fmt, scale) in table.items()}

    def fn(proj: str, idx: int, x: torch.Tensor) -> torch.Tensor:
        q = quant.get((proj, idx))
        return x if q is None else q(x)

    patch_expert_linears(mod, fn)
