"""Shared fixtures: tiny checkpoints built in code (never downloaded), GPU markers."""

from __future__ import annotations

import pytest
import torch


def _sm() -> int:
    if not torch.cuda.is_available():
        return 0
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def pytest_addoption(parser):
    parser.addoption(
        "--run-slice",
        action="store_true",
        default=False,
        help="also run the real-width slice tests (3.65 B parameters: ~10 GB RAM and several "
        "minutes each on 2 cores); OMNIQUANT_RUN_SLICE=1 does the same",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "requires_sm(N): needs a CUDA GPU of compute capability >= N (e.g. 89, 100)"
    )
    config.addinivalue_line(
        "markers", "slice: quantizes the real-width slice; opt in with --run-slice"
    )


def pytest_runtest_setup(item):
    """Skip ``@pytest.mark.requires_sm(N)`` tests unless such a GPU is present, and
    ``@pytest.mark.slice`` tests unless asked for (they do not fit the CI budget)."""
    import os

    if item.get_closest_marker("slice") and not (
        item.config.getoption("--run-slice") or os.environ.get("OMNIQUANT_RUN_SLICE") == "1"
    ):
        pytest.skip("real-width slice test: run with --run-slice (~10 GB RAM, minutes)")
    for mark in item.iter_markers("requires_sm"):
        if _sm() < mark.args[0]:
            pytest.skip(f"needs a CUDA GPU with SM >= {mark.args[0]}")


@pytest.fixture
def bad_set(tmp_path):
    """A calibration set with two good lines and three bad media (``media_factory.make_bad_set``)."""
    from media_factory import make_bad_set

    return make_bad_set(tmp_path)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny models: thread start-up dominates, and on a shared 2-core machine oversubscribed
    OpenMP threads make each forward ~100x slower. Restored after the module.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random nemotron_h_omni checkpoint (seed 0), shared by the session. Read-only."""
    from omniquant.demo.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


_QUANTIZED: dict = {}


@pytest.fixture(scope="session")
def quantized(tiny_dir, tmp_path_factory):
    """Factory: ``quantized(recipe)`` -> a checkpoint of the tiny model, built once per recipe."""
    from omniquant.quantize.pipeline import quantize

    def build(recipe: str):
        if recipe not in _QUANTIZED:
            out = tmp_path_factory.mktemp(f"q_{recipe}") / "ckpt"
            # The built-in synthetic set keeps the suite fast; omni-mix is tested on its own.
            _QUANTIZED[recipe] = quantize(tiny_dir, recipe, out, calib="synthetic").out
        return _QUANTIZED[recipe]

    return build


@pytest.fixture(scope="session")
def demo_quantized(tmp_path_factory):
    """Factory: ``demo_quantized(recipe)`` -> a checkpoint of the bundled demo model (2
    synthetic calibration samples; experts that see no token warn), built once per recipe
    for the session (the plan and serving-conformance tests share them)."""
    from omniquant.demo import demo_model_dir
    from omniquant.quantize.pipeline import quantize

    done = {}

    def build(recipe: str):
        if recipe not in done:
            out = tmp_path_factory.mktemp(f"demo_{recipe}") / "ckpt"
            quantize(demo_model_dir(), recipe, out, calib="synthetic",
                     overrides=["calibration.size=2", "calibration.expert_coverage.policy=warn"])  # fmt: skip
            done[recipe] = out
        return done[recipe]

    return build
