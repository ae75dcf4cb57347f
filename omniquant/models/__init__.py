"""Model adapters: one class per model family, registered by ``model_type``.

Stages ask the adapter (``adapter_for(model_dir)``) for everything
architecture-specific: loading, module groups, the per-modality forward, and the
mapping between transformers' module names and the on-disk (hub) tensor names.
"""

from __future__ import annotations

# Importing the module registers the adapter.
from omniquant.models import nemotron_omni  # noqa: F401
from omniquant.models.base import (
    ExpertLinear,
    LoadedModel,
    ModelAdapter,
    MoELayer,
    adapter_for,
    load_model,
    register_adapter,
)

__all__ = [
    "ExpertLinear",
    "LoadedModel",
    "MoELayer",
    "ModelAdapter",
    "adapter_for",
    "load_model",
    "register_adapter",
]
