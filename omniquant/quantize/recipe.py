"""Recipe files: what stays in which precision, validated before any model work.

Policy:
- A recipe is YAML validated by pydantic models with ``extra="forbid"``. A bad
  recipe fails at load with the file, the field path, the bad value and what is
  allowed. ``--set key=value`` overrides go through the same validation.
- Built-in recipes live in the repository's top-level ``recipes/`` directory
  (``<precision>_<scope>.yaml``), each opening with a comment block that says what
  is kept in which precision and why.
- The recipe's identity (``recipe_sha256``) is the SHA-256 of the effective
  recipe (after overrides) as canonical JSON, so two runs with the same effective
  settings share it whatever the YAML formatting.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_serializer, model_validator

from omniquant.errors import RecipeError, arg_ref
from omniquant.formats import FORMATS
from omniquant.quantize.algorithms import ALGORITHMS, DEFAULT_ALGORITHM, resolve_algorithms
from omniquant.schema import Strict, allowed_fields, field_problems

#: The formats a rule may name: the format registry's (omniquant.formats).
Format = Literal[tuple(FORMATS)]  # type: ignore[valid-type]
MAX_CALIBRATION_SIZE = 65536
MAX_SEED = 2**63 - 1


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (PyYAML keeps the
    last one silently, so a repeated ``rules:`` would drop the first list unseen)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: the base class reports it
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first at line {first.line + 1}); "
                    "remove one of them", key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str):
    """Parse YAML safely, refusing duplicate keys (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


class Metadata(Strict):
    """Who the recipe is for."""

    name: str
    description: str = ""
    model_types: list[str] = Field(default_factory=lambda: ["nemotron_h_omni"])


class ExpertCoverage(Strict):
    """What to do with experts that received few calibration tokens.

    ``error``: fail naming layers and experts under ``min_tokens``. ``warn``: record
    and warn. ``force_all_experts``: route every calibration token through every
    expert for statistics only (outputs unchanged), so every expert is calibrated.
    """

    policy: Literal["error", "warn", "force_all_experts"] = "error"
    min_tokens: int = Field(default=1, ge=0)


class Calibration(Strict):
    """Calibration data and settings."""

    set: str = "synthetic"
    # Upper bound: every sample is processed and held in memory before calibration, and
    # modelopt's recipes calibrate on 512; a larger size is a typo that grows memory
    # until the run is killed.
    size: int = Field(default=32, ge=1, le=MAX_CALIBRATION_SIZE)
    batch_size: Literal[1] = 1
    evs_rate: float | None = Field(default=None, ge=0.0, lt=1.0)
    # A seed feeds torch/numpy generators, which take 64-bit seeds.
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    expert_coverage: ExpertCoverage = Field(default_factory=ExpertCoverage)
    #: modelopt 0.47's layer-by-layer calibration (``layerwise: {enable, checkpoint_dir}``).
    #: Refused: see ``_no_layerwise``. Excluded from dumps so recipe hashes stay as they were.
    layerwise: bool = Field(default=False, exclude=True)

    @model_validator(mode="after")
    def _no_layerwise(self) -> Calibration:
        # Tried on the tiny model (CPU): it runs once the backbone's early stop is tolerated
        # (modelopt's capture pass returns None where transformers' omni forward reads
        # .logits), but modelopt then replays each decoder layer from cached inputs outside
        # omniquant's forward loop, so the calibration probe never sees the MoE layers:
        # expert token counts come out all zero and force_all_experts does not route.
        if self.layerwise:
            raise ValueError(
                "layerwise: true is not supported: modelopt 0.47 calibrates each layer from "
                "cached inputs outside omniquant's forward loop, so expert token counts and "
                "force_all_experts would silently not apply. For a model larger than the GPU, "
                f"use {arg_ref('device')} auto with {arg_ref('max_memory')} (offload to CPU memory, then disk)"
            )
        return self


class Rule(Strict):
    """Select modules by adapter group/selector name or by glob, and set a format."""

    group: str | None = None
    modules: str | None = None
    format: Format
    #: Calibration algorithm for this rule's modules (``omniquant.quantize.algorithms``);
    #: None: the recipe's ``quantization.algorithm``.
    algorithm: str | None = None

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, v: str | None) -> str | None:
        return v if v is None else _check_algorithm_name(v)

    @model_validator(mode="after")
    def _one_selector(self) -> Rule:
        if (self.group is None) == (self.modules is None):
            raise ValueError("a rule needs exactly one of 'group' or 'modules'")
        return self

    @model_serializer(mode="wrap")
    def _omit_default_algorithm(self, handler):
        # A rule without its own algorithm dumps as before, so recipe hashes stay as they were.
        data = handler(self)
        if isinstance(data, dict) and data.get("algorithm") is None:
            data.pop("algorithm", None)
        return data

    def describe(self) -> str:
        sel = f"group: {self.group}" if self.group is not None else f"modules: {self.modules!r}"
        algo = "" if self.algorithm is None else f", algorithm: {self.algorithm}"
        return f"{{{sel}, format: {self.format}{algo}}}"


def _check_algorithm_name(name: str) -> str:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm; known algorithms: {', '.join(ALGORITHMS)}")
    return name


class Quantization(Strict):
    """Ordered rules (later rules win), KV cache format and calibration algorithm."""

    rules: list[Rule] = Field(min_length=1)
    kv_cache: Literal["fp8", "none"] = "none"
    #: Calibration algorithm (``omniquant.quantize.algorithms``): applies to every rule
    #: whose format it refines, unless a rule names its own.
    algorithm: str = DEFAULT_ALGORITHM
    nvfp4_block_size: Literal[16] = 16

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, v: str) -> str:
        return _check_algorithm_name(v)

    @model_validator(mode="after")
    def _algorithms_apply(self) -> Quantization:
        # Which rule runs which algorithm, checked at load (the formats are known here).
        resolve_algorithms(self)
        return self


class Export(Strict):
    """How the checkpoint is written."""

    dtype: Literal["bfloat16"] = "bfloat16"


class Recipe(Strict):
    """A whole recipe file."""

    metadata: Metadata
    calibration: Calibration = Field(default_factory=Calibration)
    quantization: Quantization
    export: Export = Field(default_factory=Export)

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def formats(self) -> set[str]:
        return {r.format for r in self.quantization.rules}


def builtin_recipe_dir() -> Path:
    """The shipped ``recipes/`` directory (checkout or wheel, see ``omniquant.data.shipped``)."""
    from omniquant.data.shipped import shipped_dir

    return shipped_dir("recipes")


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe name -> file."""
    d = builtin_recipe_dir()
    return {p.stem: p for p in sorted(d.glob("*.yaml"))} if d.is_dir() else {}


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A built-in name (``fp8_omni``) or a path to a YAML file.

    A bare built-in name always means the built-in, even when a file or directory of
    that name sits in the working directory (``--out fp8_omni`` is a natural output
    name); write a path (``./fp8_omni``, ``x.yaml``) to use a local file.
    """
    text = str(name_or_path)
    builtins = builtin_recipes()
    looks_like_path = (
        isinstance(name_or_path, Path) or "/" in text or text.endswith((".yaml", ".yml"))
    )
    if text in builtins and not looks_like_path:
        return builtins[text]
    p = Path(name_or_path)
    if looks_like_path or p.exists():
        if p.is_dir():
            raise RecipeError(
                f"no such recipe file (it is a directory); pass a "
                f"recipe .yaml file or a built-in name ({', '.join(sorted(builtins)) or 'none found'}).",
                arg="recipe",
                value=name_or_path,
            )
        if not p.is_file():
            raise RecipeError("no such recipe file.", arg="recipe", value=name_or_path)
        return p
    raise RecipeError(
        f"unknown recipe name; built-in recipes are "
        f"{', '.join(sorted(builtins)) or '(none found)'}, or pass a path to a .yaml file.",
        arg="recipe",
        value=name_or_path,
    )


def load_recipe(
    name_or_path: str | Path | Recipe, overrides: list[str] | None = None
) -> tuple[Recipe, Path | None]:
    """Load, override and validate a recipe.

    Args:
        name_or_path: Built-in recipe name, YAML path, or a ``Recipe`` object (as
            llm-compressor's ``oneshot`` takes a recipe object: a composition such as
            the sensitivity sweep builds recipes in code and writes no file).
        overrides: ``key.path=value`` strings; values are parsed as YAML scalars/lists.

    Returns:
        ``(recipe, path)``; ``path`` is ``None`` for a ``Recipe`` object, whose returned
        copy is validated again with the overrides (the caller's object is never changed).

    Raises:
        RecipeError: naming the file, the field path, the bad value and what is allowed.
    """
    variant = None
    if not isinstance(name_or_path, Recipe):
        name_or_path, variant = split_algorithm_variant(name_or_path)
    if isinstance(name_or_path, Recipe):
        path = None
        where = f"recipe {name_or_path.metadata.name!r} (in memory)"
        data = name_or_path.model_dump(mode="json")
    else:
        path = where = resolve_recipe_path(name_or_path)
        data = _read_recipe_file(path)
    if variant is not None and isinstance(data.get("quantization"), dict):
        # ``RECIPE:ALGORITHM``: the recipe with its global algorithm replaced, named so.
        data["quantization"]["algorithm"] = variant
        if isinstance(data.get("metadata"), dict) and isinstance(data["metadata"].get("name"), str):
            data["metadata"]["name"] += f":{variant}"
    overridden: dict[tuple[str, ...], str] = {}
    for item in overrides or []:
        overridden[_apply_override(data, item, where)] = item
    try:
        return Recipe.model_validate(data), path
    except ValidationError as exc:
        raise RecipeError(_format_validation_error(where, exc, data, overridden)) from exc


def split_algorithm_variant(name_or_path: str | Path) -> tuple[str | Path, str | None]:
    """``nvfp4_omni:gptq`` -> ``("nvfp4_omni", "gptq")``; anything else -> ``(it, None)``.

    A name with a colon is a variant when the part after the last colon is not a path of
    its own (an existing file wins).

    Raises:
        RecipeError: the part after the colon is not a known algorithm.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or ":" not in text or Path(text).exists():
        return name_or_path, None
    base, algo = text.rsplit(":", 1)
    if algo not in ALGORITHMS:
        raise RecipeError(
            f"unknown algorithm {algo!r} after ':'; write RECIPE:ALGORITHM with one of "
            f"{', '.join(ALGORITHMS)}.",
            arg="recipe",
            value=name_or_path,
        )
    return base, algo


def _read_recipe_file(path: Path) -> dict:
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the recipe as UTF-8."
        ) from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror}).") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    except RecursionError:
        raise RecipeError(f"{path}: not valid YAML: nested too deeply.") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping with 'metadata' and 'quantization'.")
    return data


def _apply_override(data: dict, item: str, path: Path | str) -> tuple[str, ...]:
    """Apply one ``key.path=value`` to ``data``; returns the key path (for messages)."""
    if "=" not in item:
        raise RecipeError(
            "expected key.path=value (e.g. calibration.size=16).", arg="overrides", value=repr(item)
        )
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise RecipeError(
            f"the key {key!r} has an empty part; expected key.path=value "
            "(e.g. calibration.size=16).",
            arg="overrides",
            value=repr(item),
        )
    parts = [p.strip() for p in parts]
    try:
        value = load_yaml_text(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(
            f"value is not valid YAML ({exc}).", arg="overrides", value=repr(item)
        ) from exc
    except RecursionError:
        raise RecipeError(
            "value is not valid YAML (nested too deeply).", arg="overrides", value=repr(item)
        ) from None
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(
                    f"{'.'.join(parts[:i])} is a list of {len(node)} "
                    f"items; {part!r} is not an index into it.",
                    arg="overrides",
                    value=repr(item),
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise RecipeError(
                f"{'.'.join(parts[:i])} is not a section.", arg="overrides", value=repr(item)
            )
    return tuple(parts)


def _allowed_fields(loc: tuple, data: dict) -> list[str]:
    """Field names allowed at the parent of ``loc`` (for 'extra field' errors), sorted."""
    return sorted(allowed_fields(Recipe, loc[:-1]))


def _format_validation_error(
    path: Path | str, exc: ValidationError, data: dict, overridden: dict | None = None
) -> str:
    overridden = overridden or {}

    def source(loc: tuple) -> str | None:
        """The --set item that wrote the field at ``loc`` (or a section above it)."""
        text = tuple(str(p) for p in loc)
        for key, item in overridden.items():
            if text[: len(key)] == key or key[: len(text)] == text:
                return item
        return None

    problems = field_problems(exc)
    from_set = [source(p.loc) for p in problems]
    if all(from_set):
        lines = [f"invalid {arg_ref('overrides')} override(s) for recipe {path}:"]
    else:
        lines = [f"{path}: invalid recipe:"]
    for problem, item in zip(problems, from_set):
        before = len(lines)
        loc, where, value = problem.loc, problem.where or "(top level)", problem.input
        if problem.kind == "unknown":
            allowed = _allowed_fields(loc, data)
            lines.append(
                f"  {where}: unknown field {loc[-1]!r}; allowed fields here: {', '.join(allowed)}"
            )
        elif problem.kind == "missing":
            lines.append(f"  {where}: required field is missing")
        elif isinstance(value, dict):  # a check across fields of one section
            lines.append(f"  {where}: {problem.message}")
        else:
            try:
                shown = json.dumps(value, default=str)
            except ValueError:  # a structure that refers to itself (YAML anchors)
                shown = "..."
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            lines.append(f"  {where}: bad value {shown}: {problem.message}")
        if item is not None and len(lines) > before:
            lines[-1] += f" (from {arg_ref('overrides')} {item!r})"
    return "\n".join(lines)


def recipe_header(path: Path) -> str:
    """The leading comment block of a recipe file (its description for humans)."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        out.append(line.lstrip("# ").rstrip())
    return "\n".join(out).strip()
