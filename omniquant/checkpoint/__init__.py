"""Exported checkpoints on disk: their layout, the one pre-trust check, audit, inspect.

``verify`` (the check every consumer runs before trusting a checkpoint), ``audit``
(post-export audit), ``inspect`` (what a checkpoint holds), ``readers`` (how vLLM and
TensorRT-LLM would read it).
"""
