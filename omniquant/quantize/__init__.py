"""The quantize stage: recipe -> plan -> calibration -> export -> audited checkpoint.

``recipe`` (what stays in which precision), ``plan`` (recipe rules resolved against a
model's modules), ``calibrate`` (the omni forward loop), ``export`` (modelopt's exporter
into the hub layout), ``pipeline`` (``quantize()``: the stage end to end), ``planner``,
``predict`` and ``memory`` (what a recipe will produce and need, before any weight is
read), ``heap`` (glibc heap policy around the exporter).

``from omniquant.quantize import quantize`` is the stage's entry point; importing this
package imports neither torch nor modelopt.
"""

from __future__ import annotations

from omniquant.quantize.pipeline import QuantizeResult, quantize

__all__ = ["QuantizeResult", "quantize"]
