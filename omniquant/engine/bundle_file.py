"""``bundle.json``: the bundle's record, written atomically and read with a clear error.

Its own module so that ``bundle`` (which writes bundles) and ``validate`` (which loads them on
a GPU host and records the result) both use it without importing each other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from omniquant.errors import EngineError

BUNDLE_JSON = "bundle.json"
#: The first TensorRT-LLM release that knows the Omni architecture (1.2.1: "Unknown architecture").
TENSORRT_LLM_MIN_VERSION = "1.3.0rc13"


def write_bundle_json(bundle: Path, data: dict[str, Any]) -> None:
    """Write ``bundle.json`` atomically (temporary file, then replace)."""
    tmp = bundle / f".{BUNDLE_JSON}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, bundle / BUNDLE_JSON)


def read_bundle_json(bundle: Path) -> dict[str, Any]:
    """Read ``bundle.json``.

    Raises:
        EngineError: Missing or not JSON.
    """
    path = bundle / BUNDLE_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"{path}: missing; is {bundle} an engine bundle?") from None
    except json.JSONDecodeError as exc:
        raise EngineError(f"{path}: not valid JSON ({exc}); rebuild the bundle") from None
