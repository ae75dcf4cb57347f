"""The GPU check's first three steps: the versions, the suite's own GPU tests, and a timed
build of modelopt's CUDA extensions (each cheap, each able to save the rest of the run).

- ``check_versions``: transformers and modelopt must be the versions ``constraints.txt``
  pins (the carried wheels; an image copy shadowing them stops the check), every
  requirement of ``pyproject.toml`` must hold, and ``--device cuda`` needs a CUDA torch.
  A torch other than the tested one (the image's CUDA 2.11 against the CPU 2.13 CI runs)
  is printed and recorded, not fatal: it is the point of the check to try it.
- ``suite_gpu_tests``: the suite's CUDA comparisons, run by pytest in a subprocess with a
  JUnit report; on CUDA a skip is a failure, on the CPU (rehearsal) every test must be
  collected and skipped, which proves the test ids still exist.
- ``warm_up_extensions``: modelopt compiles ``modelopt_cuda_ext`` and
  ``modelopt_cuda_ext_fp8`` with nvcc on first use (1-2 minutes) and falls back only after
  spending that time; its prerequisites (a C++ compiler, ``Python.h``, ninja, nvcc) are
  checked first and the compile runs in a subprocess under the step's time limit, filling
  torch's extension cache for the steps after it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.gpu.runner import StopCheck

ROOT = Path(__file__).resolve().parents[2]

#: The suite's tests that compare against modelopt's CUDA kernels.
SUITE_GPU_TESTS = (
    "tests/test_numerics.py::test_activation_matches_modelopt_cuda_fake_quant",
    "tests/test_serving_emulation.py::test_nvfp4_export_matches_cuda_fake_quant",
)
#: Packages whose version must be the pinned one (the carried wheels).
EXACT = ("transformers", "nvidia-modelopt")


def pinned_versions(root: Path = ROOT) -> dict[str, str]:
    """``name==version`` lines of ``constraints.txt``."""
    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, _, ver = line.partition("==")
            pins[name.strip().lower()] = ver.strip()
    return pins


def installed_versions() -> dict[str, str | None]:
    """Versions of what is imported (``__version__``: a shadowing copy shows here)."""
    import modelopt
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "nvidia-modelopt": modelopt.__version__,
        "cuda_available": str(torch.cuda.is_available()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


#: What the check imports: missing, or outside a requirement, it stops the check. Others
#: (PyAV, fastapi, uvicorn: media decoding and the server, imported lazily) are noted.
CRITICAL = {"torch", "transformers", "nvidia-modelopt", "huggingface-hub", "tokenizers", "safetensors",
            "accelerate", "numpy", "pydantic", "pyyaml", "packaging", "requests", "omegaconf", "pulp", "scipy"}  # fmt: skip


def _requirement_problems(root: Path) -> tuple[list[str], list[str]]:
    """(problems, notes): pyproject.toml's requirements and those of transformers and
    modelopt (the carried wheels are installed without their dependencies)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    reqs = [
        (t, "pyproject.toml")
        for t in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    ]
    for dist in ("transformers", "nvidia-modelopt"):
        reqs += [(t, dist) for t in (requires(dist) or [])]
    problems, notes = [], []
    for text, owner in reqs:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        out = problems if name in CRITICAL else notes
        try:
            have = version(req.name)
        except PackageNotFoundError:
            out.append(f"{name} is not installed ({owner} needs {req})")
            continue
        if req.specifier and not req.specifier.contains(have.split("+")[0], prereleases=True):
            out.append(f"{name} {have} does not satisfy {owner}'s {req}")
    return problems, notes


def check_versions(device: str, installed: dict | None = None, root: Path = ROOT) -> dict:
    """Step 1. Raises ``StopCheck`` naming each mismatch and what to do."""
    got = installed or installed_versions()
    pins = pinned_versions(root)
    problems, notes = [], []
    for name in EXACT:
        if got.get(name) != pins.get(name):
            problems.append(
                f"{name} {got.get(name)} is not the tested {pins.get(name)}: install the wheels "
                "benchmarks/gpu/prepare_wheels.sh carries and put /tmp/site first on PYTHONPATH"
            )
    if installed is None:
        bad, noted = _requirement_problems(root)
        problems += bad
        notes += noted
    if device.startswith("cuda") and not got.get("torch_cuda"):
        problems.append(
            f"--device {device} needs a CUDA build of torch; {got.get('torch')} is not one"
        )
    if device.startswith("cuda") and got.get("cuda_available") != "True":
        problems.append(f"--device {device}: torch sees no GPU")
    if got.get("torch", "").split("+")[0] != pins.get("torch"):
        notes.append(
            f"torch {got.get('torch')} is not the tested {pins.get('torch')} (CPU): this run tries it"
        )
    for line in [f"{k}={v}" for k, v in got.items()] + notes:
        print(f"[gpu_check] version: {line}", flush=True)
    if problems:
        for p in problems:
            print(f"[gpu_check] VERSION MISMATCH: {p}", flush=True)
        raise StopCheck("; ".join(problems))
    return {"versions": got, "tested": {k: pins.get(k) for k in ("torch", *EXACT)}, "notes": notes}


def _junit_cases(path: Path) -> list[dict]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "failed", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "")[:500]
        cases.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})  # fmt: skip
    return cases


def suite_gpu_tests(cuda: bool, timeout_s: float, tests=SUITE_GPU_TESTS, root: Path = ROOT) -> dict:
    """Step 2: the suite's CUDA comparisons in a pytest subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        }
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
               f"--junitxml={xml}", *tests]  # fmt: skip
        proc = subprocess.run(
            cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        tail = (proc.stdout + proc.stderr)[-4000:]
        cases = _junit_cases(xml) if xml.exists() else []
    failed = [c for c in cases if c["outcome"] == "failed"]
    skipped = [c for c in cases if c["outcome"] == "skipped"]
    if not cases:
        raise RuntimeError(f"pytest ran no test of {list(tests)} (exit {proc.returncode}):\n{tail}")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(cases)} GPU tests failed:\n{tail}")
    if cuda and skipped:
        raise RuntimeError(
            f"{len(skipped)} GPU tests skipped on a CUDA host: {skipped[0]['message']}"
        )
    return {"cases": cases, "passed": len(cases) - len(skipped), "skipped": len(skipped),
            "cuda_ran": cuda, "pytest_exit": proc.returncode}  # fmt: skip


def extension_prerequisites() -> dict[str, str | None]:
    """What torch's ``cpp_extension.load`` needs, found or None."""
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001 - reported as missing
        CUDA_HOME = None
    nvcc = shutil.which("nvcc") or (str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else None)
    return {
        "c++": shutil.which("c++") or shutil.which("g++"),
        "Python.h": str(include) if include.exists() else None,
        "ninja": shutil.which("ninja"),
        "nvcc": nvcc if nvcc and Path(nvcc).exists() else None,
    }


_WARMUP = """
import json, time
from modelopt.torch.quantization import extensions as e
out = {}
for name in ("get_cuda_ext", "get_cuda_ext_fp8"):
    t = time.perf_counter()
    getattr(e, name)(raise_if_failed=True)
    out[name] = round(time.perf_counter() - t, 2)
print("WARMUP " + json.dumps(out))
"""


def warm_up_extensions(cuda: bool, timeout_s: float, prerequisites: dict | None = None) -> dict:
    """Step 3: prerequisites first, then the timed compile (CUDA only)."""
    pre = prerequisites if prerequisites is not None else extension_prerequisites()
    missing = [k for k, v in pre.items() if not v and (cuda or k != "nvcc")]
    if not cuda:
        return {"prerequisites": pre, "missing": missing,
                "compile": "not run: no CUDA (modelopt builds its extensions for CUDA only)"}  # fmt: skip
    if missing:
        raise RuntimeError(
            f"modelopt's CUDA extensions cannot be built here: missing {', '.join(missing)}; "
            "its FP8 fake quant falls back to a slower path after trying (1-2 minutes)"
        )
    env = {**os.environ, "MAX_JOBS": str(os.cpu_count() or 4)}
    proc = subprocess.run([sys.executable, "-c", _WARMUP], env=env, capture_output=True, text=True, check=False,
                          timeout=timeout_s)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("WARMUP ")]
    if proc.returncode or not lines:
        raise RuntimeError(
            f"extension build failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
    return {"prerequisites": pre, "compile_seconds": json.loads(lines[-1][7:])}
