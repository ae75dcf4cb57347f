"""Exported checkpoints on disk: their layout, the one pre-trust check, audit, inspect.

``layout`` (the on-disk format: file names, ``omniquant.json``, ``hf_quant_config.json``,
checksums; the one module that writes and reads them), ``verify`` (the check every
consumer runs before trusting a checkpoint), ``audit`` (post-export audit), ``inspect``
(what a checkpoint holds), ``readers`` (how vLLM and TensorRT-LLM would read it).
"""
