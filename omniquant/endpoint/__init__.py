"""OpenAI-compatible endpoints: ``omniquant serve`` and the report's endpoint backend.

Policy: one wire format both ways. ``protocol`` holds the typed request / response
models (vLLM's fields) and turns a task line into chat content parts; on the server,
``messages`` turns parts back into a prompt with media (chat templates, local media),
``serving`` turns requests into jobs and jobs into responses (streaming included),
``engine`` runs the model (one worker thread, chunked prefill, cancellation, a bounded
queue) and ``server`` is the HTTP side. ``client`` talks to any OpenAI-compatible server
(retries, timeouts, an on-disk cache), and ``evaluate`` scores a served model the way
``omniquant.evaluate`` scores a loaded one. Importing this package is cheap: FastAPI,
uvicorn, httpx and torch are imported inside the functions that need them.
"""

from __future__ import annotations

from omniquant.endpoint.protocol import is_endpoint, parse_model_source

__all__ = ["is_endpoint", "parse_model_source"]
