"""A wheel built from this checkout carries what ``omniquant cliff`` needs off a checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import json, omniquant
from omniquant.quantize.recipe import builtin_recipes
from omniquant.data.sets import shipped_calib_sets, resolve_calib_set
from omniquant.evaluate.tasks import shipped_task_sets, validate_task_set
from omniquant.demo import DEMO_CALIB, DEMO_TASKS, demo_model_dir
print(json.dumps({
    "package": omniquant.__file__,
    "recipes": {k: str(v) for k, v in builtin_recipes().items()},
    "calib": shipped_calib_sets(),
    "calib_dir": str(resolve_calib_set(DEMO_CALIB)),
    "tasks": shipped_task_sets(),
    "demo_tasks": len(validate_task_set(DEMO_TASKS)),
    "demo_model": str(demo_model_dir()),
}))
"""


# builds and installs a wheel (~20 s)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory):
    # Offline build (no isolation): needs the build backend pyproject.toml names.
    pytest.importorskip(
        "setuptools", minversion="70.1", reason="building a wheel needs setuptools>=70.1"
    )
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp / "dist"), str(REPO)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp / "dist").glob("omniquant-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp / "site")  # a pure-Python wheel installs as its unpacked tree
    return wheel, tmp / "site"


def test_wheel_carries_the_shipped_sets(wheel_install):
    wheel, _ = wheel_install
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in ("recipes", "calib_data", "tasks"):
        shipped = {str(p.relative_to(REPO)) for p in (REPO / rel).rglob("*") if p.is_file()} - {
            p for p in names if "__pycache__" in p
        }
        missing = {p for p in shipped if f"omniquant/_shipped/{p}" not in names}
        assert not missing, f"wheel lacks {sorted(missing)[:5]}"
    assert "omniquant/demo/model/model.safetensors" in names
    assert "omniquant/report/templates/report.html.j2" in names  # report.html's page


def test_installed_wheel_finds_recipes_sets_and_demo_without_a_checkout(wheel_install, tmp_path):
    _, site = wheel_install
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIQUANT_")}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=tmp_path, env=env,
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(site)
    assert set(found["recipes"]) >= {"fp8_omni", "nvfp4_omni", "nvfp4_aggressive"}
    assert all(Path(p).is_relative_to(site) for p in found["recipes"].values())
    assert "omni-demo" in found["calib"] and "omni-demo" in found["tasks"]
    assert Path(found["calib_dir"]).is_relative_to(site)
    assert found["demo_tasks"] == 144
    assert Path(found["demo_model"]).is_relative_to(site)
