"""Where the project's shipped data directories are: a source checkout or a wheel.

Policy: ``recipes/``, ``calib_data/`` and ``tasks/`` live at the repository's top level
(next to the ``omniquant`` package), which is where an editable install
(``pip install -e .``) reads them. A wheel carries copies of them under
``omniquant/_shipped/`` (``setup.py``'s ``build_py`` copies them at build time; the
directory never exists in a checkout). Lookup: the wheel's copy when present, else the
checkout's directory. Environment variables (``OMNIQUANT_CALIB_DATA``,
``OMNIQUANT_TASKS``) still override this for calibration and task sets.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # omniquant/
#: Top-level directories a wheel carries under ``omniquant/_shipped/``.
SHIPPED_DIRS = ("recipes", "calib_data", "tasks")
WHEEL_SUBDIR = "_shipped"


def shipped_dir(name: str) -> Path:
    """The directory holding the shipped ``name`` (one of ``SHIPPED_DIRS``).

    Returns the wheel's copy when it exists, else the checkout's top-level directory
    (which may not exist: callers report what is missing).
    """
    if name not in SHIPPED_DIRS:
        raise ValueError(f"{name!r} is not a shipped directory ({', '.join(SHIPPED_DIRS)})")
    packaged = PACKAGE_DIR / WHEEL_SUBDIR / name
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / name
