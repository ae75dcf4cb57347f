"""Compositions of stages: ``cliff`` (BF16 -> FP8 -> NVFP4 -> report, the main job),
``compare`` (load, evaluate and sweep a baseline and candidates into typed results; its
``build_report`` writes the report) and ``sensitivity`` (quantize one module group at a
time, passing ``Recipe`` objects, and measure the loss)."""
