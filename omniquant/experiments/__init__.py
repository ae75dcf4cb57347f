"""Compositions of stages: ``cliff`` (BF16 -> FP8 -> NVFP4 -> report, the main job) and
``sensitivity`` (quantize one module group at a time and measure the loss)."""
