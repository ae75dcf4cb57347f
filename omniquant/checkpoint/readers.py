"""How serving stacks read an exported checkpoint: the precision each would pick, per module.

Policy: this module re-states, as small pure functions over a checkpoint's files, the
decisions two serving loaders make from ``config.json`` / ``hf_quant_config.json`` and
the safetensors names, so that a checkpoint can be checked against them on a machine
without a GPU, vLLM or TensorRT-LLM (``omniquant inspect DIR --as vllm|trtllm``, and
``tests/test_serving_conformance.py``). It imports neither loader: vLLM needs CUDA
builds and TensorRT-LLM is not installable from the public index. Each rule cites the
source it encodes; where the source could not be pinned down, the rule says so and is
left out rather than guessed.

Pinned sources (read, not copied):

* vLLM 0.33.0 (PyPI wheel, ``vllm/_version.py`` commit ``g4ba787ec9``):
  ``transformers_utils/config.py:951-963`` (``config.json``'s
  ``quantization_config`` wins; ``hf_quant_config.json`` only when it is absent),
  ``model_executor/model_loader/weight_utils.py:240-279`` (the same block builds the
  quant config; ``modelopt_mixed`` without ``quantized_layers`` falls back to the
  file), ``layers/quantization/modelopt.py:324-410`` (``from_config``: the flat shape
  reads ``ignore`` (falling back to ``exclude_modules``), ``kv_cache_scheme`` as a
  dict, top-level ``group_size``), ``:191-226`` (``is_layer_excluded``: exact with
  packed shards, substring, then fnmatch), ``:228-264`` (single-format
  ``get_quant_method``: attention always gets the KV method, exclusion, the
  ``vision_model`` substring, else the checkpoint algo for every ``LinearBase`` and
  ``ParallelLMHead`` and the routed experts), ``:266-285`` (``module*`` wildcards
  split, names mapped), ``:1748-1825`` (``_resolve_quant_algo``), ``:1844-1914``
  (MIXED_PRECISION ``get_quant_method``: the KV method only when
  ``kv_cache_quant_method`` is set), ``utils/torch_utils.py:443-514`` (``auto`` KV
  cache dtype from ``kv_cache_scheme`` or ``kv_cache_quant_algo``),
  ``layers/attention/attention.py:157-226`` (``k_scale``/``v_scale`` parameters exist
  only with a KV method), ``layers/quantization/base_config.py:112-119`` and
  ``:240-241`` (unexpected ``k_scale``/``v_scale`` are dropped silently; NemotronH
  ``mixer.k_proj.k_scale`` maps to ``mixer.attn.k_scale``),
  ``models/nano_nemotron_vl.py:946-950`` (``language_model.backbone`` ->
  ``language_model.model``), ``:1014-1040`` (``mlp1`` is ``nn.Linear``, the sound
  encoder gets no quant config), ``:1602-1690`` (name routing; ``mlp1`` keys must be
  parameters), ``:1721`` (RADIO built without a quant config),
  ``models/nemotron_h.py:159-165`` (router ``GateLinear`` without quant config),
  ``:734-749`` (``backbone`` -> ``model``, ``qkv_proj`` packs q/k/v), ``:842-847``
  (``lm_head`` takes the quant config), ``layers/mamba/mamba_mixer2.py:376-380``
  (``conv1d`` without quant config), ``models/parakeet.py:86-103`` (an unknown sound
  tensor is a load error).
* TensorRT-LLM (PyTorch backend; the file index holds one commit per file):
  ``tensorrt_llm/_torch/model_config.py`` @ ``008e0af8980f`` (``from_pretrained``:
  ``hf_quant_config.json`` is authoritative, the inline block only warns when it
  diverges; ``_build_modelopt_quant_config``: ``exclude_modules``,
  ``kv_cache_quant_algo`` global even for MIXED_PRECISION, ``quantized_layers``),
  ``tensorrt_llm/quantization/modelopt_config.py`` @ ``2edf354d4b92`` (legacy vs flat
  shape readers, divergence fields), ``tensorrt_llm/_torch/models/
  modeling_nemotron_nano.py`` @ ``01a04b9b0f77`` (``NemotronH_Nano_Omni_Reasoning_V3``
  registered; ``_update_config_for_quantization`` strips ``language_model.``; RADIO
  built with ``disable_quantization=True``; ``mlp1`` plain ``nn.Linear`` loaded with
  ``strict=True``; ``ProjectedParakeet`` without quant config),
  ``tensorrt_llm/_torch/models/modeling_nemotron_h.py`` @ ``00620eb025e7``
  (``backbone`` -> ``model`` in ``exclude_modules`` and ``quant_config_dict``; routed
  experts take the first ``model.layers.N.mixer.experts.`` entry), and
  ``mamba2_mixer.py`` (``conv1d`` is a ``Linear`` built with the global quant config).
  Line numbers are not given: no local copy could be made (the repository snapshot
  exceeds the fetch limit); functions are named instead. The weight mapper
  (``tensorrt_llm/_torch/models/checkpoints/hf/nemotron_h_weight_mapper.py`` @
  ``fbbc05dd1445``, ``NemotronHHfWeightMapper.preprocess_weights``: renames, ``_scale``
  pass-through, SSM-parameter routing, the ``in_proj``/``conv1d`` row splits) is checked per
  tensor (``_trtllm_mapper_problems``). Not pinned down, so not checked: how the modules
  load the mapped names after the mapper (``modeling_nemotron_h.py`` ``load_weights``),
  whether its ``lm_head`` and ``Embedding`` take the quant config, and the order in
  which MIXED_PRECISION per-layer configs and ``exclude_modules`` are applied (they are
  disjoint in every omniquant export, so the order does not change a pick).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

from omniquant.checkpoint.layout import read_config_json, read_quant_config
from omniquant.errors import ModelLoadError
from omniquant.formats import FORMATS, KV_SCALE_SUFFIXES, NVFP4, SCALE_SUFFIXES

READERS = ("vllm", "trtllm")
SCALE_LEAVES = SCALE_SUFFIXES
KV_LEAVES = KV_SCALE_SUFFIXES
# The format tables below are views of the registry (omniquant.formats).
#: Scale tensors a quantized Linear (and each routed expert) consumes, by format.
_SCALES_FOR = {name: set(f.scale_suffixes) for name, f in FORMATS.items()}
#: Stored weight dtype -> quantized format name.
_STORED = {f.weight_dtype: name for name, f in FORMATS.items() if f.quantized}
#: ``quant_algo`` -> quantized format name.
_ALGO = {f.hf_quant_algo: name for name, f in FORMATS.items() if f.quantized}

_LAYER = re.compile(r"^language_model\.backbone\.layers\.(\d+)\.mixer\.")
_EXPERT = re.compile(
    r"^(language_model\.backbone\.layers\.\d+\.mixer\.experts)\.\d+\.(up|down)_proj$"
)
_QKV = re.compile(r"^(.*\.mixer)\.([qkv])_proj$")
_TOWERS = ("vision_model.", "mlp1.", "sound_encoder.", "sound_projection.", "vision_projector.")


def _fp8_kv_scheme(scheme) -> str | None:
    """``FP8`` when a flat-shape ``kv_cache_scheme`` is an 8-bit float scheme (how both
    readers turn that dict into a KV-cache format), else None."""
    if isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8:
        return "FP8"
    return None


@dataclass(frozen=True)
class ModulePick:
    """One module as stored and as a reader would build it.

    Attributes:
        module: Hub-layout module name (an attention mixer for ``kind == "kv_cache"``).
        kind: ``linear``, ``expert``, ``router``, ``conv1d``, ``embedding`` or ``kv_cache``.
        stored: ``bf16``, ``fp8`` or ``nvfp4`` (for ``kv_cache``: ``fp8`` when k/v scales
            are stored, else ``bf16``).
        pick: What the reader would build (same vocabulary), or ``None`` where its
            choice could not be pinned down from source.
        why: The rule that decided it.
        declared: What the quantization config declares for the module under the
            reader's own parsing rules, before the loader's hard-coded bypasses (towers,
            routers and ``conv1d`` built without a quant config). A difference here is
            harmless in this loader version but wrong in the file: a loader that applies
            the config to every ``Linear`` would quantize the module.
    """

    module: str
    kind: str
    stored: str
    pick: str | None
    why: str
    declared: str | None = None

    @property
    def differs(self) -> bool:
        return self.pick is not None and self.pick != self.stored

    @property
    def declared_differently(self) -> bool:
        return self.declared is not None and self.declared != self.stored


@dataclass
class ReaderView:
    """A reader's view of one checkpoint directory."""

    reader: str
    source: str
    modules: list[ModulePick] = field(default_factory=list)
    unconsumed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> list[ModulePick]:
        return [m for m in self.modules if m.differs]

    @property
    def misdeclared(self) -> list[ModulePick]:
        """Modules built as stored, but declared otherwise by the config."""
        return [m for m in self.modules if m.declared_differently and not m.differs]

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.unconsumed and not self.misdeclared


@dataclass(frozen=True)
class _Checkpoint:
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape)
    config_block: dict | None  # config.json's quantization_config
    hf_quant: dict | None  # hf_quant_config.json, as stored
    config: dict | None = None  # config.json, as stored


def read_checkpoint_files(path: str | Path) -> _Checkpoint:
    """Safetensors headers and the two quantization configs of ``path`` (no tensor data)."""
    from safetensors import safe_open

    path = Path(path)
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{path}: no *.safetensors files to read.")
    tensors = {}
    for shard in shards:
        with safe_open(shard, "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 (a safetensors handle)
                sl = fh.get_slice(k)
                tensors[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    config = read_config_json(path, ModelLoadError)
    block = config.get("quantization_config") if config is not None else None
    qc = read_quant_config(path, ModelLoadError)
    hf_quant = qc.to_json() if qc is not None else None
    return _Checkpoint(tensors, block, hf_quant, config)


def read_as(path: str | Path, reader: str) -> ReaderView:
    """The view ``reader`` (``vllm`` or ``trtllm``) would take of checkpoint ``path``."""
    if reader not in READERS:
        raise ModelLoadError(
            f"unknown reader; choose one of {', '.join(READERS)}.", arg="reader", value=repr(reader)
        )
    ckpt = read_checkpoint_files(path)
    return vllm_view(ckpt) if reader == "vllm" else trtllm_view(ckpt)


# ------------------------------------------------------------------ shared helpers
def _stored_modules(ckpt: _Checkpoint) -> dict[str, str]:
    """Module -> stored format, for every weight of >= 2 dims."""
    return {
        k[: -len(".weight")]: _STORED.get(dtype, "bf16")
        for k, (dtype, shape) in ckpt.tensors.items()
        if k.endswith(".weight") and len(shape) >= 2
    }


def _kind(module: str) -> str:
    if _EXPERT.match(module):
        return "expert"
    if module.endswith(".mixer.gate"):
        return "router"
    if module.endswith(".mixer.conv1d"):
        return "conv1d"
    if module == "language_model.backbone.embeddings":
        return "embedding"
    return "linear"


def _attention_mixers(ckpt: _Checkpoint) -> dict[str, str]:
    """Attention mixer -> stored KV format (``fp8`` iff both k/v scales are stored)."""
    out = {}
    for k in ckpt.tensors:
        m = re.match(r"^(language_model\.backbone\.layers\.\d+\.mixer)\.q_proj\.weight$", k)
        if m:
            mixer = m.group(1)
            has_kv = (
                f"{mixer}.k_proj.k_scale" in ckpt.tensors
                and f"{mixer}.v_proj.v_scale" in ckpt.tensors
            )
            out[mixer] = "fp8" if has_kv else "bf16"
    return out


def _is_tower(module: str) -> bool:
    return module.startswith(_TOWERS)


# ------------------------------------------------------------------------- vLLM
@dataclass
class _VllmConfig:
    algo: str
    kv_fp8_method: bool  # kv_cache_quant_method is FP8 (from_config)
    cache_fp8: bool  # `--kv-cache-dtype auto` resolves to fp8
    ignore: list[str]
    layers: dict[str, str]  # vLLM prefix -> algo (MIXED_PRECISION)


def _vllm_map_name(name: str) -> str:
    """The rename mapper vLLM applies to quant-config names (nano_nemotron_vl.py:946-950,
    then nemotron_h.py:734-741 without its stacked and ``None`` entries)."""
    if name.startswith("language_model.backbone"):
        name = "language_model.model" + name[len("language_model.backbone") :]
    for old, new in (("A_log", "A"), ("embeddings", "embed_tokens")):
        name = name.replace(old, new, 1)
    return name


def _vllm_config(ckpt: _Checkpoint) -> tuple[_VllmConfig, str]:
    block = ckpt.config_block
    source = "config.json quantization_config"
    if block is None or (
        str(block.get("quant_algo", "")).upper() == "MIXED_PRECISION"
        and "quantized_layers" not in block
    ):
        if ckpt.hf_quant is None:
            raise ModelLoadError("no quantization config: vLLM would load this checkpoint as BF16.")
        block, source = ckpt.hf_quant, "hf_quant_config.json (legacy shape)"
    if "quantization" in block:  # legacy shape (modelopt.py:326-341)
        q = block["quantization"]
        algo, kv, ignore = (
            q.get("quant_algo"),
            q.get("kv_cache_quant_algo"),
            q.get("exclude_modules", []),
        )
        layers = q.get("quantized_layers", {})
    else:  # flat shape (modelopt.py:342-360)
        algo = block.get("quant_algo")
        kv = _fp8_kv_scheme(block.get("kv_cache_scheme"))
        ignore = block.get("ignore", block.get("exclude_modules", []))
        layers = block.get("quantized_layers", {})
    # utils/torch_utils.py:443-495: `auto` resolves from either key, shape-agnostic.
    inner = block.get("quantization", block)
    kv_algo = inner.get("kv_cache_scheme") or inner.get("kv_cache_quant_algo")
    if isinstance(kv_algo, dict):
        cache_fp8 = (
            kv_algo.get("dynamic") is False
            and kv_algo.get("num_bits") == 8
            and kv_algo.get("type") == "float"
        )
    else:
        cache_fp8 = isinstance(kv_algo, str) and kv_algo.lower() == "fp8"
    split = []  # modelopt.py:266-285: "a.b*" -> "a.b", "a.b.*"
    for e in ignore:
        if len(e) >= 2 and e[-1] == "*" and e[-2] != ".":
            split += [e[:-1], e[:-1] + ".*"]
        else:
            split.append(e)
    return (
        _VllmConfig(
            algo=str(algo or "").upper(),
            kv_fp8_method=str(kv or "").upper() == "FP8",
            cache_fp8=cache_fp8,
            ignore=[_vllm_map_name(e) for e in split],
            layers={_vllm_map_name(k): str(v["quant_algo"]).upper() for k, v in layers.items()},
        ),
        source,
    )


def _vllm_excluded(prefix: str, ignore: list[str]) -> bool:
    """modelopt.py:191-226 with quant_utils.py:619-690 (``qkv_proj`` packs q/k/v)."""
    if not ignore:
        return False
    proj = prefix.rsplit(".", 1)[-1]
    if proj == "qkv_proj" and prefix not in ignore:
        shards = [prefix[: -len(proj)] + s for s in ("q_proj", "k_proj", "v_proj")]
        hits = {s in ignore for s in shards}
        if len(hits) > 1:
            raise ValueError(f"vLLM raises: q/k/v shards of {prefix} disagree on exclusion")
        if hits.pop():
            return True
    elif prefix in ignore:
        return True
    for e in ignore:
        if e != prefix and (
            e in prefix
            or (
                prefix.startswith("language_model.") and e in prefix.removeprefix("language_model.")
            )
        ):
            return True
    return any(fnmatch.fnmatch(prefix, e) for e in ignore)


def _vllm_resolve(prefix: str, layers: dict[str, str]) -> str | None:
    """modelopt.py:1748-1825 (direct, packed q/k/v, then child-prefix lookup)."""
    if prefix in layers:
        return layers[prefix]
    proj = prefix.rsplit(".", 1)[-1]
    if proj == "qkv_proj":
        algos = {
            layers[p]
            for s in ("q_proj", "k_proj", "v_proj")
            if (p := prefix[: -len(proj)] + s) in layers
        }
        if len(algos) > 1:
            raise ValueError(f"vLLM raises: mixed quant_algo within fused layer {prefix}")
        if algos:
            return algos.pop()
    for key, algo in layers.items():
        if key.startswith(prefix + "."):
            return algo
    return None


def vllm_view(ckpt: _Checkpoint) -> ReaderView:
    """What vLLM 0.33.0's ``nano_nemotron_vl`` loader would build from ``ckpt``."""
    cfg, source = _vllm_config(ckpt)
    view = ReaderView("vllm", source)
    mixed = cfg.algo == "MIXED_PRECISION"
    if not mixed and cfg.algo not in _ALGO:
        view.notes.append(
            f"quant_algo {cfg.algo!r}: not a format omniquant writes; vLLM picks not modelled"
        )
        return view

    def pick_lm(vprefix: str) -> tuple[str, str]:
        try:
            if _vllm_excluded(vprefix, cfg.ignore):
                return "bf16", "excluded (ignore)"
            if mixed:
                algo = _vllm_resolve(vprefix, cfg.layers)
                if algo is None:
                    return "bf16", "not in quantized_layers"
                return _ALGO.get(algo, algo.lower()), "quantized_layers"
        except ValueError as err:
            return "error", str(err)
        return _ALGO[cfg.algo], f"global quant_algo {cfg.algo} (not excluded)"

    picks: dict[str, str] = {}
    for module, stored in sorted(_stored_modules(ckpt).items()):
        kind = _kind(module)
        vprefix = _vllm_map_name(module)
        if m := _EXPERT.match(module):
            vprefix = _vllm_map_name(m.group(1))
        elif m := _QKV.match(module):
            vprefix = _vllm_map_name(m.group(1)) + ".qkv_proj"
        declared, why = pick_lm(vprefix)
        bypassed = any(
            t in vprefix for t in ("vision_tower", "vision_model", "vit_large_projector")
        )
        if bypassed and declared not in ("bf16", "error"):
            declared, why = "bf16", "vision_model substring bypass (modelopt.py:246-251)"
        if _is_tower(module):
            pick, why = "bf16", "tower/projector built without a quant config"
        elif kind == "router":
            pick, why = "bf16", "GateLinear built without a quant config"
        elif kind == "conv1d":
            pick, why = "bf16", "conv1d built with quant_config=None"
        elif kind == "embedding":
            pick, why = "bf16", "embedding: no ModelOpt method"
        elif not module.startswith("language_model."):
            pick, why = None, "not a module the nano_nemotron_vl loader routes"
        else:
            pick = declared
        picks[module] = pick or "bf16"
        view.modules.append(ModulePick(module, kind, stored, pick, why, declared))

    kv_method = (not mixed) or cfg.kv_fp8_method
    for mixer, stored in sorted(_attention_mixers(ckpt).items()):
        pick = "fp8" if cfg.cache_fp8 else "bf16"
        why = "kv cache dtype auto -> " + ("fp8" if cfg.cache_fp8 else "model dtype")
        if cfg.cache_fp8 and not kv_method:
            why += "; no KV method (MIXED_PRECISION without kv_cache_scheme): scales stay 1.0"
        view.modules.append(ModulePick(mixer, "kv_cache", stored, pick, why))

    for name in sorted(ckpt.tensors):
        reason = _vllm_unconsumed(name, picks, kv_method)
        if reason:
            view.unconsumed.append((name, reason))
    return view


def _vllm_unconsumed(name: str, picks: dict[str, str], kv_method: bool) -> str | None:
    """Why vLLM would not load tensor ``name`` (None when it would)."""
    module, leaf = name.rsplit(".", 1) if "." in name else ("", name)
    if name.startswith(
        ("mlp1.", "vision_model.radio_model.", "sound", "vision_projector.vision_final_layernorm.")
    ):
        if leaf in SCALE_LEAVES + KV_LEAVES:
            return "tower/projector has no quantized parameter of this name (load error)"
        return None
    if not name.startswith("language_model."):
        return "no loader route for this prefix (nano_nemotron_vl.py:1614-1673): dropped"
    if leaf in KV_LEAVES:
        if not re.search(r"\.mixer\.[kv]_proj\.[kv]_scale$", name):
            return "KV scale under an unexpected name: dropped"
        return None if kv_method else "no KV-cache method on the attention: dropped silently"
    if leaf in SCALE_LEAVES:
        owner = picks.get(module)
        if owner is None:
            return "scale without a weight"
        if leaf not in _SCALES_FOR.get(owner, set()):
            return f"module built as {owner}: no parameter {leaf} (load error)"
    return None


# ---------------------------------------------------------------- TensorRT-LLM
def _trtllm_name(name: str) -> str:
    """``_update_config_for_quantization`` then NemotronHForCausalLM's ``backbone`` rename."""
    name = name.removeprefix("language_model.")
    return re.sub(r"(model\.layers\.)?backbone", "model", name)


def _trtllm_excluded(name: str, patterns: list[str]) -> bool:
    """``QuantConfig.is_module_excluded_from_quantization``: fnmatchcase on the name and
    its ancestors."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if any(fnmatch.fnmatchcase(cand, p) for p in patterns):
            return True
    return False


def _trtllm_struct(raw: dict) -> dict:
    """modelopt_config.py: legacy (``quantization`` wrapper) or flat shape."""
    if "quantization" in raw:
        q = raw["quantization"]
        return {"quant_algo": q.get("quant_algo"), "kv": q.get("kv_cache_quant_algo"),
                "group_size": q.get("group_size"), "exclude": list(q.get("exclude_modules") or []),
                "layers": q.get("quantized_layers") or {}}  # fmt: skip
    kv = _fp8_kv_scheme(raw.get("kv_cache_scheme"))
    return {"quant_algo": raw.get("quant_algo"), "kv": kv, "group_size": raw.get("group_size"),
            "exclude": list(raw.get("ignore") or []), "layers": raw.get("quantized_layers") or {}}  # fmt: skip


def trtllm_view(ckpt: _Checkpoint) -> ReaderView:
    """What TensorRT-LLM's PyTorch backend (``NemotronH_Nano_Omni_Reasoning_V3``) would build."""
    if ckpt.hf_quant is not None:
        q, source = _trtllm_struct(ckpt.hf_quant), "hf_quant_config.json (authoritative)"
        if ckpt.config_block is not None:
            inline = _trtllm_struct(ckpt.config_block)
            diff = [k for k in ("quant_algo", "kv", "group_size") if q[k] != inline[k]]
            if set(q["exclude"]) != set(inline["exclude"]):
                diff.append("exclude_modules")
            if len(q["layers"]) != len(inline["layers"]):
                diff.append("quantized_layers")
            if diff:
                source += f"; would log that config.json's block diverges in {', '.join(diff)}"
    elif ckpt.config_block is not None:
        q, source = _trtllm_struct(ckpt.config_block), "config.json quantization_config"
    else:
        raise ModelLoadError(
            "no quantization config: TensorRT-LLM would load this checkpoint as BF16."
        )
    view = ReaderView("trtllm", source)
    algo = str(q["quant_algo"] or "").upper()
    mixed = algo == "MIXED_PRECISION"
    if not mixed and algo not in _ALGO:
        view.notes.append(f"quant_algo {algo!r}: not a format omniquant writes; picks not modelled")
        return view
    exclude = [_trtllm_name(e) for e in q["exclude"]]
    layers = {_trtllm_name(k): str(v["quant_algo"]).upper() for k, v in q["layers"].items()}
    block = NVFP4.block_size
    if not mixed and algo == NVFP4.hf_quant_algo and q.get("group_size") not in (None, block):
        view.notes.append(f"group_size {q['group_size']}: TensorRT-LLM NVFP4 needs {block}")

    for module, stored in sorted(_stored_modules(ckpt).items()):
        kind = _kind(module)
        tname = _trtllm_name(module)
        if _trtllm_excluded(tname, exclude):
            declared, why = "bf16", "excluded (exclude_modules)"
        elif mixed:
            key = tname
            if m := _EXPERT.match(module):
                prefix = _trtllm_name(m.group(1)) + "."
                key = next((k for k in layers if k.startswith(prefix)), None)
            a = layers.get(key) if key else None
            declared = _ALGO.get(a, a.lower()) if a else "bf16"
            why = (
                "quantized_layers"
                if a
                else "not in quantized_layers (MIXED_PRECISION global = none)"
            )
        else:
            declared, why = _ALGO[algo], f"global quant_algo {algo} (not excluded)"
        if module.startswith("vision_model."):
            pick, why = "bf16", "RADIO built with disable_quantization=True"
        elif module.startswith(("mlp1.", "vision_projector.")):
            pick, why = "bf16", "projector is a plain nn.Linear"
        elif module.startswith(("sound_encoder.", "sound_projection.")):
            pick, why = "bf16", "ProjectedParakeet built without a quant config"
        elif kind == "router":
            pick, why = "bf16", "DeepseekV3Gate router"
        elif module == "language_model.lm_head":
            pick, why = "bf16", "LMHead built without a QuantConfig (modeling_utils.py)"
        elif kind == "embedding":
            pick, why = None, "Embedding quantization not pinned down from source"
        elif not module.startswith("language_model."):
            pick, why = None, "not a module the loader routes"
        else:
            pick = declared
        view.modules.append(ModulePick(module, kind, stored, pick, why, declared))

    kv_pick = "fp8" if str(q["kv"] or "").upper() == "FP8" else "bf16"
    for mixer, stored in sorted(_attention_mixers(ckpt).items()):
        view.modules.append(
            ModulePick(mixer, "kv_cache", stored, kv_pick, f"kv_cache_quant_algo {q['kv']}")
        )

    for name in sorted(ckpt.tensors):
        module, leaf = name.rsplit(".", 1)
        if not name.startswith(
            ("language_model.", "vision_model.", "mlp1.", "sound_encoder.", "sound_projection.")
        ):
            view.unconsumed.append((name, "no loader route for this prefix: dropped"))
        elif _is_tower(name) and leaf in SCALE_LEAVES + KV_LEAVES:
            view.unconsumed.append((name, "towers are never quantized (mlp1 loads strict=True)"))
    view.unconsumed += _trtllm_mapper_problems(ckpt)
    view.notes.append(
        "language-model tensor names checked against NemotronHHfWeightMapper.preprocess_weights "
        "(renames, in_proj/conv1d splits); module-level loading after the mapper not pinned down"
    )
    return view


def _text_config(config: dict | None) -> dict:
    config = config or {}
    text = config.get("llm_config") or config.get("text_config")
    return text if isinstance(text, dict) else {}


def _trtllm_mapper_problems(ckpt: _Checkpoint) -> list[tuple[str, str]]:
    """What ``NemotronHHfWeightMapper.preprocess_weights`` (``tensorrt_llm/_torch/models/
    checkpoints/hf/nemotron_h_weight_mapper.py`` @ ``fbbc05dd1445``) would do wrong with each
    ``language_model.*`` tensor (after ``load_weights`` strips ``language_model.``).

    The mapper renames ``backbone`` -> ``model``, ``embeddings`` -> ``embed_tokens``,
    ``A_log`` -> ``A``; passes every key containing ``_scale`` through unchanged; routes a
    key containing ``A`` (then ``D``, ``dt_bias``) to float32 SSM-parameter handling; splits
    ``mixer.in_proj`` rows into z, x, B, C, dt of ``[d_inner, d_inner, n_groups * d_state,
    n_groups * d_state, nheads]`` and ``conv1d`` rows into ``[d_inner, n_groups * d_state,
    n_groups * d_state]`` (``torch.split`` raises on any other row count).
    """
    text = _text_config(ckpt.config)
    try:
        d_inner = int(text["mamba_head_dim"]) * int(text["mamba_num_heads"])
        gs = int(text["n_groups"]) * int(text["ssm_state_size"])
        nheads = int(text["mamba_num_heads"])
    except (KeyError, TypeError, ValueError):
        return [("config.json", "no Mamba sizes in the text config: the mapper's splits cannot run")]
    out = []
    for name, (_dtype, shape) in sorted(ckpt.tensors.items()):
        if not name.startswith("language_model."):
            continue
        key = name.removeprefix("language_model.").replace("backbone", "model")
        key = key.replace("embeddings", "embed_tokens").replace("A_log", "A")
        leaf = key.rsplit(".", 1)[-1]
        if "_scale" in key:
            continue
        if ("A" in key and leaf != "A") or ("D" in key and leaf not in ("A", "D")):
            out.append((name, "the mapper would treat it as an SSM A/D parameter (float32, -exp)"))
        elif "mixer.in_proj" in key and leaf == "weight":
            rows = 2 * d_inner + 2 * gs + nheads
            if shape and shape[0] != rows:
                out.append((name, f"in_proj has {shape[0]} rows; the mapper splits {rows}"))
        elif "conv1d" in key:
            rows = d_inner + 2 * gs
            if shape and shape[0] != rows:
                out.append((name, f"conv1d has {shape[0]} rows; the mapper splits {rows}"))
    return out


# --------------------------------------------------------------------- rendering
def group_summary(view: ReaderView, group_of) -> dict[str, dict]:
    """Per module group: ``{stored: {fmt: n}, reader: {fmt: n}, differs: n, declared: n}``."""
    out: dict[str, dict] = {}
    for m in view.modules:
        g = "kv_cache" if m.kind == "kv_cache" else group_of(m.module + ".weight")
        row = out.setdefault(g, {"stored": {}, "reader": {}, "differs": 0, "declared": 0})
        row["stored"][m.stored] = row["stored"].get(m.stored, 0) + 1
        key = m.pick or "?"
        row["reader"][key] = row["reader"].get(key, 0) + 1
        row["differs"] += m.differs
        row["declared"] += m.declared_differently and not m.differs
    return dict(sorted(out.items()))


def render_view(view: ReaderView, group_of, limit: int = 20) -> str:
    """Fixed-width table of a reader's view per group, then every flagged module/tensor."""

    def fmt(counts: dict) -> str:
        return "+".join(f"{k}:{v}" for k, v in sorted(counts.items()))

    lines = [f"as {view.reader}: quantization read from {view.source}",
             f"{'group':<18}{'stored':<22}{'reader picks':<22}flag"]  # fmt: skip
    for g, row in group_summary(view, group_of).items():
        flag = (
            ", ".join(
                f"{row[k]} {label}"
                for k, label in (("differs", "differ"), ("declared", "declared otherwise"))
                if row[k]
            )
            or "ok"
        )
        lines.append(f"{g:<18}{fmt(row['stored']):<22}{fmt(row['reader']):<22}{flag}")
    for m in view.mismatches[:limit]:
        lines.append(
            f"  DIFFERS {m.module}: stored {m.stored}, {view.reader} builds {m.pick} ({m.why})"
        )
    for m in view.misdeclared[:limit]:
        lines.append(
            f"  DECLARED {m.module}: stored {m.stored}, the config declares {m.declared} to "
            f"{view.reader} (built {m.pick} only because {m.why})"
        )
    for name, why in view.unconsumed[:limit]:
        lines.append(f"  NOT LOADED {name}: {why}")
    hidden = sum(
        max(0, len(x) - limit) for x in (view.mismatches, view.misdeclared, view.unconsumed)
    )
    if hidden:
        lines.append(f"  ... and {hidden} more")
    lines += [f"  note: {n}" for n in view.notes]
    lines.append(
        f"{view.reader}: {'reads the checkpoint as stored' if view.ok else 'would NOT read the checkpoint as stored'}"
        f" ({len(view.mismatches)} module(s) differ, {len(view.misdeclared)} declared otherwise,"
        f" {len(view.unconsumed)} tensor(s) not loaded)"
    )
    return "\n".join(lines)
