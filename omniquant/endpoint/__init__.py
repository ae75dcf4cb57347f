"""OpenAI-compatible endpoints: ``omniquant serve`` and the report's endpoint backend.

Policy: one wire format both ways. ``protocol`` turns a task line into chat content
parts (and back, on the server), ``server`` answers ``/v1/models``,
``/v1/chat/completions`` and ``/v1/completions`` over the emulated serving numerics,
``client`` talks to any OpenAI-compatible server (retries, timeouts, an on-disk
cache), and ``evaluate`` scores a served model the way ``omniquant.evaluate`` scores
a loaded one. Importing this package is cheap: FastAPI, uvicorn, httpx and torch are
imported inside the functions that need them.
"""

from __future__ import annotations

from omniquant.endpoint.protocol import is_endpoint, parse_model_source

__all__ = ["is_endpoint", "parse_model_source"]
