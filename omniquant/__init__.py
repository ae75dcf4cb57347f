"""omniquant: FP8 / NVFP4 quantization toolkit for omni-modal models.

``import omniquant`` is cheap on purpose: it imports neither modelopt nor
tensorrt_llm and never touches CUDA. Heavy imports live inside the functions
that need them.
"""

from __future__ import annotations

from omniquant.errors import OmniquantError

__version__ = "0.1.0"
__all__ = ["OmniquantError", "__version__"]
