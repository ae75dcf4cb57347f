"""Every third-party module the installed code imports is declared in pyproject.toml.

A fresh virtual environment is what a user has; CI's Python once carried `requests` (which
nvidia-modelopt 0.47 imports without declaring) and so hid a crash on a user's first command.
This scans omniquant's own imports statically (lazy ones inside functions included) and maps
each top-level module to the distribution that provides it in this environment.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import omniquant

ROOT = Path(__file__).resolve().parents[1]
#: Imported only on a GPU host, from an optional extra (pyproject's [trtllm]).
OPTIONAL = {"tensorrt_llm": "trtllm", "mamba_ssm": None, "causal_conv1d": None,
            "lm_eval": "lm-eval", "lmms_eval": None}  # harnesses: omniquant/endpoint/harness


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}

    extras = {k: names(v) for k, v in project.get("optional-dependencies", {}).items()}
    return names(project["dependencies"]), extras


def _imported_top_level() -> dict[str, str]:
    """Top-level module -> one file importing it, over every omniquant source file."""
    found: dict[str, str] = {}
    for path in Path(omniquant.__file__).parent.rglob("*.py"):
        if "_shipped" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                found.setdefault(mod.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_imported_module_is_declared():
    declared, extras = _declared()
    dists_of = md.packages_distributions()
    missing = []
    for top, where in sorted(_imported_top_level().items()):
        if top in sys.stdlib_module_names or top in ("omniquant", "__future__"):
            continue
        if top in OPTIONAL:
            extra = OPTIONAL[top]
            assert extra is None or any(top.replace("_", "-") in d for d in extras[extra]), top
            continue
        dists = {d.lower().replace("_", "-") for d in dists_of.get(top, [])}
        if not dists & declared:
            missing.append(f"{top} (imported in {where}; provided by {sorted(dists) or '?'})")
    assert not missing, "undeclared imports:\n  " + "\n  ".join(missing)


def test_modelopt_undeclared_requirements_are_declared():
    """Modules nvidia-modelopt imports on the paths omniquant uses but does not declare."""
    declared, _ = _declared()
    requires = {
        re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower()
        for r in (md.requires("nvidia-modelopt") or [])
        if "extra ==" not in r
    }
    assert "requests" not in requires  # if modelopt starts declaring it, drop ours
    assert "requests" in declared
