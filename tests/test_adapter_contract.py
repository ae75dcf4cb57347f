"""The adapter contract: stages ask the adapter, never the model's classes or modules.

A scan over the source of ``omniquant/`` outside ``omniquant/models/`` (Python's own
parser, so comments and docstrings do not count and string literals do). The names it
looks for are taken from the model itself, built on the meta device from a tiny
config: the transformers classes its modules are instances of (and every class their
modeling modules define), and the attribute names of its submodules.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

import omniquant
from omniquant.models.base import ModelAdapter

PACKAGE = Path(omniquant.__file__).parent
MODELS = PACKAGE / "models"

#: Submodule attribute names that omniquant's own objects also use for their own
#: things (``CalibrationShapes.experts``, ``TinySize.layers``...): as attribute accesses
#: they cannot be told apart from the model's, so only their use as string literals
#: (``getattr(m, "experts")``, ``name.endswith("experts")``) is checked.
AMBIGUOUS_ATTRIBUTES = frozenset({"layers", "experts"})
#: ``model`` (the backbone's ``language_model.model``) is also every LoadedModel's
#: ``.model`` and a JSON key in manifests and reports: not checked at all.
UNCHECKED = frozenset({"model"})

#: (file relative to omniquant/, name) pairs that may stay, and why.
ALLOWED = {
    # The on-disk format: modelopt's exporter (and every vLLM/TensorRT-LLM loader) puts
    # FP8 KV-cache scales beside the k/v projection weights, for any model.
    ("formats.py", "k_proj"): "format",
    ("formats.py", "v_proj"): "format",
    # `omniquant fit --granularity layer`: the command's word for "per backbone layer"
    # (the adapter's layer_index says which layer), not a module attribute.
    ("experiments/fit.py", "layer"): "granularity",
}
#: Files whose model knowledge is another program's: the serving readers model what
#: vLLM's and TensorRT-LLM's loaders do with hub tensor names (cited line by line in
#: their module docstring); that is the reader's knowledge of the serving stack.
ALLOWED_FILES = {"checkpoint/readers.py"}


@pytest.fixture(scope="module")
def model_names(tmp_path_factory):
    """(transformers class names, submodule attribute names, group names) of the model."""
    from omniquant.demo.tiny import SIZES, tiny_config_dict, write_config_only
    from omniquant.models import load_model

    path = write_config_only(tmp_path_factory.mktemp("meta") / "cfg", tiny_config_dict(SIZES["tiny"]))
    loaded = load_model(path, weights=False)
    classes: set[str] = set()
    attributes: set[str] = set()
    modules = set()
    for name, mod in loaded.model.named_modules():
        cls = type(mod)
        if cls.__module__.startswith("transformers.models."):
            modules.add(cls.__module__)
        leaf = name.rsplit(".", 1)[-1]
        if name and not leaf.isdigit():
            attributes.add(leaf)
    for modname in modules:
        module = importlib.import_module(modname)
        classes.update(
            n for n, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == modname
        )
    groups = set(loaded.adapter.module_groups(loaded.model))
    return classes, attributes, groups


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _stage_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if MODELS not in p.parents)


def _hits(path: Path, rel: str, classes: set[str], strings: set[str], attrs: set[str]) -> list[str]:
    """``"<rel>:<line>: <what> <name>"`` for every name of the model in ``path``'s code."""
    tree = ast.parse(path.read_text(), str(path))
    docs = _docstrings(tree)
    word = re.compile(r"\b(" + "|".join(map(re.escape, sorted(classes))) + r")\b")
    found = []

    def hit(node, name, what):
        if (rel, name) not in ALLOWED:
            found.append(f"{rel}:{node.lineno}: {what} {name!r}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in classes:
            hit(node, node.id, "transformers class")
        elif isinstance(node, ast.alias) and node.name in classes:
            hit(node, node.name, "transformers class import")
        elif isinstance(node, ast.Attribute):
            if node.attr in classes:
                hit(node, node.attr, "transformers class")
            elif node.attr in attrs:
                hit(node, node.attr, "model module attribute")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if node.value in strings:
                hit(node, node.value, "model module attribute name")
            for m in word.finditer(node.value):
                hit(node, m.group(1), "transformers class named in a string")
    return found


def test_the_scan_sees_the_model(model_names):
    """The names come from the model: the scan is not vacuous."""
    classes, attributes, _ = model_names
    assert {"NemotronH_Omni_Reasoning_V3", "NemotronHTopkRouter", "NemotronHExperts"} <= classes
    assert {"language_model", "mixer", "experts", "up_proj", "down_proj", "lm_head"} <= attributes
    assert {"vision_model", "audio_tower", "embed_audio", "multi_modal_projector"} <= attributes


def test_the_scan_finds_what_it_looks_for(model_names, tmp_path):
    """Each kind of leak the stages used to have is reported on a planted file."""
    classes, attributes, groups = model_names
    planted = tmp_path / "leak.py"
    planted.write_text(
        '"""NemotronHTopkRouter in a docstring is fine."""\n'
        "# NemotronHExperts in a comment is fine\n"
        "from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (\n"
        "    NemotronH_Omni_Reasoning_V3,\n"
        ")\n"
        "def f(model, mod, name):\n"
        "    lm = model.language_model\n"
        "    tower = model.audio_tower\n"
        '    g = getattr(mod, "up_proj")\n'
        '    if type(mod).__name__ == "NemotronHTopkRouter":\n'
        '        return name.endswith("experts")\n'
    )
    strings = attributes - groups - UNCHECKED
    found = _hits(planted, "leak.py", classes, strings, attributes - UNCHECKED - AMBIGUOUS_ATTRIBUTES)
    assert sorted(found, key=lambda f: int(f.split(":")[1])) == [
        "leak.py:4: transformers class import 'NemotronH_Omni_Reasoning_V3'",
        "leak.py:7: model module attribute 'language_model'",
        "leak.py:8: model module attribute 'audio_tower'",
        "leak.py:9: model module attribute name 'up_proj'",
        "leak.py:10: transformers class named in a string 'NemotronHTopkRouter'",
        "leak.py:11: model module attribute name 'experts'",
    ]


def test_no_stage_names_the_models_classes_or_modules(model_names):
    """No module outside models/ names a transformers class of the model or one of its
    submodule attributes. Group names (``audio_tower``, ``lm_head``...) are the adapter's
    recipe-facing vocabulary: as strings they may appear, as attribute accesses not."""
    classes, attributes, groups = model_names
    strings = attributes - groups - UNCHECKED
    attrs = attributes - UNCHECKED - AMBIGUOUS_ATTRIBUTES
    found = []
    for path in _stage_files():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel not in ALLOWED_FILES:
            found += _hits(path, rel, classes, strings, attrs)
    assert found == []


def test_stages_call_only_declared_adapter_methods():
    """Every ``adapter.X`` a stage uses is declared on ``ModelAdapter``, and no stage
    probes an adapter with hasattr/getattr."""
    used: dict[str, str] = {}
    probes = []
    for path in _stage_files():
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr not in ("adapter",):
                base = node.value
                owner = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
                if owner == "adapter":
                    used.setdefault(node.attr, f"{rel}:{node.lineno}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("hasattr", "getattr")
                and node.args
            ):
                target = node.args[0]
                owner = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
                if owner == "adapter":
                    probes.append(f"{rel}:{node.lineno}")
    assert {"forward", "module_groups", "expert_linears", "backbone_inputs"} <= set(used)
    undeclared = {a: where for a, where in used.items() if not hasattr(ModelAdapter, a)}
    assert undeclared == {}
    assert probes == []
