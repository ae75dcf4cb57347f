"""The house: imports run one way, down the pipeline, and never in a circle.

Every ``import omniquant...`` in the package (lazy ones inside functions too) is read
with Python's parser and checked against the layers below, lowest first. A package may
import from lower layers only; packages that share a layer (two stages side by side)
do not import each other. The report renders results and loads no model: it may import
only the results types and the foundation. README's "How the code is laid out" is this
table in words.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "omniquant"

LAYERS: list[set[str]] = [
    {"errors"},  # the one error hierarchy
    {"omniquant", "schema", "numerics", "outdir", "devices"},  # foundation
    {"formats"},  # fp8 / nvfp4 / bf16: layout and numerics per format
    {"data", "models"},  # media, manifests, processing; model adapters
    {"demo"},  # tiny builders, the bundled demo model
    {"checkpoint"},  # the on-disk format, verify, audit, inspect, readers
    {"quantize", "evaluate"},  # the two stages that read models
    {"endpoint", "engine"},  # serving over HTTP; TensorRT-LLM bundles
    {"report"},  # results -> json / md / html
    {"experiments"},  # compositions of stages: cliff, compare, sensitivity
    {"cli"},  # parse -> call one stage -> print
    {"__main__"},  # python -m omniquant
]
#: What the report may import: it never loads a model.
REPORT_MAY_IMPORT = {"errors", "schema", "formats", "evaluate", "omniquant"}


def _unit(module: str) -> str:
    """``omniquant.quantize.export`` -> ``quantize``; ``omniquant`` -> ``omniquant``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "omniquant"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(
        ".__init__"
    )


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every omniquant import in ``path`` (``from a.b import c``
    gives ``a.b.c``: it may name a module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "omniquant" or node.module.startswith("omniquant."):
                found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("omniquant")]
    return found


def _edges() -> list[tuple[str, int, str, str]]:
    """``(file, line, from unit, to unit)`` for every import between two units."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _unit(_module_name(path))
        for line, module in _imports(path):
            there = _unit(module)
            if there in {"__version__", "__all__", "OmniquantError"}:  # the package's face
                there = "omniquant"
            if there != here:
                edges.append((str(path.relative_to(PACKAGE.parent)), line, here, there))
    return edges


def _layer_of() -> dict[str, int]:
    return {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def test_every_module_has_a_layer():
    units = {_unit(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units - set(_layer_of()) == set(), "a new top-level module or package: give it a layer"


def test_imports_run_down_the_layers_only():
    layer = _layer_of()
    upward = [
        f"{f}:{line}: {a} (layer {layer[a]}) imports {b} (layer {layer[b]})"
        for f, line, a, b in _edges()
        if b in layer and a in layer and layer[b] >= layer[a]
    ]
    assert upward == []


def test_the_report_imports_no_stage():
    wrong = [
        f"{f}:{line}: report imports {b}"
        for f, line, a, b in _edges()
        if a == "report" and b not in REPORT_MAY_IMPORT
    ]
    assert wrong == []


def test_no_module_imports_itself_back_through_others():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for _, target in _imports(path):
            while target not in modules and "." in target:  # `from pkg.mod import name`
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    # Depth-first search for a back edge.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*trail[trail.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The checks can fail: a planted quantize -> experiments import is reported."""
    fake = tmp_path / "omniquant"
    (fake / "quantize").mkdir(parents=True)
    (fake / "experiments").mkdir()
    (fake / "quantize" / "x.py").write_text("def f():\n    from omniquant.experiments import y\n")
    (fake / "experiments" / "y.py").write_text("from omniquant.quantize import x\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    edges = _edges()
    assert ("omniquant/quantize/x.py", 2, "quantize", "experiments") in edges
    try:
        test_imports_run_down_the_layers_only()
    except AssertionError as err:
        assert "quantize (layer 6) imports experiments (layer 9)" in str(err)
    else:
        raise AssertionError("the upward import was not reported")
    try:
        test_no_module_imports_itself_back_through_others()
    except AssertionError as err:
        assert "omniquant.quantize.x" in str(err)
    else:
        raise AssertionError("the circle was not reported")
