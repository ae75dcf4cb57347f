"""The bundled demo omni model and the names of its shipped data sets.

Policy: the demo is a small ``nemotron_h_omni`` (every block type of the real model)
trained by ``scripts/train_demo.py`` on the synthetic tasks of
``scripts/make_demo_data.py``; its BF16 weights ship inside the package
(``omniquant/demo/model/``, hub layout), its calibration set under
``calib_data/omni-demo`` and its evaluation tasks under ``tasks/omni-demo``. How it was
trained and the accuracy it reached are in ``omniquant/demo/TRAINING.md``. Importing
this module is cheap (no torch).
"""

from __future__ import annotations

import json
from pathlib import Path

from omniquant.errors import ModelLoadError, arg_ref

#: Name of the shipped calibration set made for the demo model (``calib_data/omni-demo``).
DEMO_CALIB = "omni-demo"
#: Name of the shipped evaluation task set of the demo model (``tasks/omni-demo``).
DEMO_TASKS = "omni-demo"

_MODEL_DIR = Path(__file__).resolve().parent / "model"
_RECORD = Path(__file__).resolve().parent / "accuracy.json"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json")


def demo_model_dir() -> Path:
    """Directory of the bundled demo checkpoint (hub layout, BF16 safetensors, tokenizer).

    Raises:
        ModelLoadError: The checkpoint files are missing (a wheel built without the
            package data, or a checkout where they were deleted); the message says how
            to get them back.
    """
    missing = [name for name in _REQUIRED if not (_MODEL_DIR / name).is_file()]
    if missing:
        raise ModelLoadError(
            f"The bundled demo model is incomplete: {_MODEL_DIR} lacks {', '.join(missing)}. "
            "Reinstall omniquant from a checkout that has omniquant/demo/model/ "
            "(`pip install -e .`), or retrain it with `python scripts/train_demo.py`, or pass "
            f"{arg_ref('model')} DIR."
        )
    return _MODEL_DIR


def demo_training_record() -> dict:
    """What ``scripts/train_demo.py`` recorded for the shipped weights.

    Returns:
        ``accuracy.json``: ``command``, ``seed``, ``steps``, ``train_seconds``,
        ``per_task`` (BF16 accuracy on the ``omni-demo`` task set, measured with
        ``omniquant.evaluate`` after reloading the saved BF16 checkpoint), and every
        ``predictions``/``scores`` entry by sample id.

    Raises:
        ModelLoadError: The record is missing.
    """
    if not _RECORD.is_file():
        raise ModelLoadError(
            f"The bundled demo model has no training record ({_RECORD}); retrain it with "
            "`python scripts/train_demo.py`."
        )
    return json.loads(_RECORD.read_text())
