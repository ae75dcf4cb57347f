"""The layouts ``omniquant fit`` scores, composed in place on one resident BF16 model.

Policy:
- One emulated BF16 model (``load_emulated``) stays loaded for the whole fit. A probe
  swaps in each of its units' weights, dequantized from that unit's exported tensors
  exactly as ``load_emulated`` dequantizes an export (``FORMATS[fmt].dequantize``), and
  activates that unit's activation (and, asked for, KV) quantizers; afterwards each
  swapped parameter gets its original BF16 weight back, read again from the source
  checkpoint on disk (no backup copy in memory), and the quantizers are switched off.
  Peak host memory is therefore the BF16 model plus a few copies of the largest single
  weight in flight, not a second model plus every export (which the earlier in-memory
  composition held: ~196 GiB for the released model with ``max,mse``).
- Quantizers are installed once, as switchable hooks on every module a unit can
  quantize (``register_forward_pre_hook``; fused experts through the adapter's
  ``patch_expert_inputs``; KV through forward hooks on the K/V projections), with the
  serving numerics of ``omniquant.evaluate.emulated`` (``Format.activation_quantizer``).
- Exported tensors are read from the export directories on disk when a probe needs them
  (``safetensors.safe_open``), never all at once.
- ``tensors`` builds the whole stored-tensor dict of a layout (as an export of it would
  hold): the tests compare it with the real ``quantize`` export byte for byte, and
  ``load_emulated`` of it with the in-place score.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from omniquant.formats import FORMATS, KV_CACHE_FORMAT, KV_SCALE_SUFFIXES, get_format


def calibrated_formats(algorithm: str, formats: list[str] | set[str]) -> set[str]:
    """The formats fit calibrates (and scores) with ``algorithm`` when units may take
    ``formats``: those it refines in a recipe using all of them (mse with NVFP4 leaves
    FP8 at max, so fit does not use mse's FP8-only search)."""
    from omniquant.quantize.algorithms import get_algorithm

    quantized = set(formats) - {"bf16"}
    return (
        quantized if algorithm == "max" else get_algorithm(algorithm).effective_formats(quantized)
    )


def layout_algorithm(
    algorithm: str, formats_used: set[str], calibrated: set[str] | None = None
) -> tuple[str, set[str]]:
    """The algorithm a recipe of ``formats_used`` under ``algorithm`` really runs, and the
    formats it refines there: ``max`` and no format when it refines none of them, or
    (given ``calibrated``, the formats fit calibrated with it) when it would refine one
    fit did not calibrate with it."""
    from omniquant.quantize.algorithms import get_algorithm

    if algorithm == "max":
        return "max", set()
    refined = get_algorithm(algorithm).effective_formats(set(formats_used))
    if not refined or (calibrated is not None and not refined <= calibrated):
        return "max", set()
    return algorithm, refined


class LazyTensors:
    """Stored tensors of a checkpoint directory, read one by one from its shards."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self._handles = [
            safe_open(str(p), framework="pt") for p in sorted(self.path.glob("*.safetensors"))
        ]
        self._where = {k: h for h in self._handles for k in h.keys()}  # noqa: SIM118

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def __iter__(self):
        return iter(self._where)


class Composer:
    """Layouts scored in place on one resident emulated BF16 model (see the module)."""

    def __init__(self, model_dir: Path, exports: dict[tuple[str, str], Path], hubs: dict,
                 samples: list, reference: list) -> None:  # fmt: skip
        from omniquant.evaluate.emulated import load_emulated

        self.model_dir = Path(model_dir)
        self.exported = {key: LazyTensors(path) for key, path in exports.items()}
        self.source = LazyTensors(self.model_dir)
        self.hubs = hubs
        self.samples = samples
        self.reference = reference
        self.loaded = load_emulated(self.model_dir)
        self.adapter = self.loaded.adapter
        self._modules = dict(self.loaded.model.named_modules())
        self._act: dict[str, object] = {}  # native module -> activation quantizer
        self._expert_act: dict[str, dict] = {}  # native container -> {(proj, idx): quantizer}
        self._kv: dict[str, object] = {}  # native module -> KV quantizer
        self._install(sorted({h for hs in hubs.values() for h in hs}))

    def _install(self, hubs: list[str]) -> None:
        seen: set[str] = set()
        for hub in hubs:
            native, expert = self.adapter.native_module(hub)
            if native in seen:
                continue
            seen.add(native)
            mod = self._modules[native]
            if expert is not None:
                table = self._expert_act.setdefault(native, {})

                def fn(proj, idx, x, table=table):
                    q = table.get((proj, idx))
                    return x if q is None else q(x)

                self.adapter.patch_expert_inputs(mod, fn)
                continue

            def pre(_m, args, native=native):
                q = self._act.get(native)
                return None if q is None else (q(args[0]), *args[1:])

            mod.register_forward_pre_hook(pre)
        stored = self._kv_source()
        for name in [] if stored is None else stored:
            if name.rsplit(".", 1)[-1] in KV_SCALE_SUFFIXES:
                native = self.adapter.native_module(name.rsplit(".", 1)[0])[0]

                def post(_m, _a, out, native=native):
                    q = self._kv.get(native)
                    return None if q is None else q(out)

                self._modules[native].register_forward_hook(post)

    def _kv_source(self) -> LazyTensors | None:
        return next((v for (a, _f), v in self.exported.items() if a == "max"), None)

    def _source(self, unit: str, fmt: str, algorithm: str, refined: set[str]) -> LazyTensors:
        return self.exported[(algorithm if fmt in refined else "max", fmt)]

    def _refined(self, assignment: dict[str, str], algorithm: str) -> set[str]:
        used = {f for f in assignment.values() if f != "bf16"}
        have = {f for a, f in self.exported if a == algorithm}
        return layout_algorithm(algorithm, used, have)[1]

    def tensors(self, assignment: dict[str, str], kv_cache: bool, algorithm: str = "max") -> dict:
        """Stored tensors of the layout (unit name -> format) calibrated with
        ``algorithm``, as an export would hold."""
        from omniquant.evaluate.emulated import read_tensors

        refined = self._refined(assignment, algorithm)
        out = read_tensors(self.model_dir)
        for unit, fmt in assignment.items():
            if fmt == "bf16":
                continue
            stored = self._source(unit, fmt, algorithm, refined)
            for hub in self.hubs[(unit, fmt)]:
                for leaf in ("weight", *FORMATS[fmt].scale_suffixes):
                    out[f"{hub}.{leaf}"] = stored[f"{hub}.{leaf}"]
        if kv_cache and (stored := self._kv_source()) is not None:
            for name in stored:
                if name.rsplit(".", 1)[-1] in KV_SCALE_SUFFIXES:
                    out[name] = stored[name]
        return out

    def _param(self, hub: str) -> torch.Tensor:
        native, expert = self.adapter.native_module(hub)
        mod = self._modules[native]
        if expert is None:
            return mod.weight.data
        proj, idx = expert
        return getattr(mod, proj).data[idx]

    def kl(self, assignment: dict[str, str], kv_cache: bool, algorithm: str = "max") -> float:
        """Mean KL of the final logits of the layout against BF16, scored in place."""
        from omniquant.evaluate.logit_kl import mean_kl, sample_logprobs

        refined = self._refined(assignment, algorithm)
        swapped: list[tuple[torch.Tensor, str]] = []
        try:
            for unit, fmt in assignment.items():
                if fmt == "bf16":
                    continue
                f, stored = FORMATS[fmt], self._source(unit, fmt, algorithm, refined)
                for hub in self.hubs[(unit, fmt)]:
                    scales = {s: stored[f"{hub}.{s}"] for s in f.weight_scale_suffixes}
                    param = self._param(hub)
                    swapped.append((param, hub))
                    param.copy_(f.dequantize(stored[f"{hub}.weight"], scales, dtype=param.dtype))
                    scale = stored[f"{hub}.{f.input_scale_suffix}"].float()
                    quant = get_format(f.name).activation_quantizer(scale)
                    native, expert = self.adapter.native_module(hub)
                    if expert is None:
                        self._act[native] = quant
                    else:
                        self._expert_act[native][expert] = quant
            if kv_cache and (stored := self._kv_source()) is not None:
                kvf = get_format(KV_CACHE_FORMAT.name)
                for name in stored:
                    if name.rsplit(".", 1)[-1] in KV_SCALE_SUFFIXES:
                        native = self.adapter.native_module(name.rsplit(".", 1)[0])[0]
                        self._kv[native] = kvf.activation_quantizer(stored[name].float())
            return mean_kl(self.reference, sample_logprobs(self.loaded, self.samples))
        finally:
            for param, hub in swapped:
                param.copy_(self.source[f"{hub}.weight"])
            self._act.clear()
            self._kv.clear()
            for table in self._expert_act.values():
                table.clear()
            gc.collect()
