"""Build hook: copy the top-level shipped data into wheels (see omniquant/data/shipped.py).

Everything else about the package is declared in pyproject.toml.
"""

import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # the one list of shipped dirs; the module imports pathlib only
from omniquant.data.shipped import SHIPPED_DIRS, WHEEL_SUBDIR  # noqa: E402


class BuildPyWithShippedData(build_py):
    """``build_py`` that also copies recipes/, calib_data/ and tasks/ into the package."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads them from the checkout
            return
        for name in SHIPPED_DIRS:
            src = ROOT / name
            if not src.is_dir():
                raise SystemExit(f"setup.py: {src} is missing; build from a full checkout.")
            dst = Path(self.build_lib) / "omniquant" / WHEEL_SUBDIR / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithShippedData})
