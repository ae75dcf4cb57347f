"""An httpx client for OpenAI-compatible servers: retries, timeouts and an on-disk cache.

Policy:
- Transient failures are retried with exponential backoff (``backoff * 2**attempt``,
  capped at 30 s, ``Retry-After`` honoured): connection errors, timeouts, HTTP 429 and
  5xx. Any other status is final: its OpenAI-style error message is raised as an
  ``EndpointError`` naming the URL. Every loop is bounded by ``retries``.
- Resume: each answered request is written to ``cache_dir`` under a key made of the
  served model (its id and the ``root`` that ``/v1/models`` reports), the sample id and
  a SHA-256 of the request body, as one JSON file written atomically. A report that
  was interrupted after N samples finds their answers there and sends only the rest.
  The base URL is not part of the key, so a restarted server on another port resumes.
- The httpx client is shared by the worker threads (httpx clients are thread-safe);
  its connection pool is sized to the concurrency.
- ``chat_timed`` is the load phase's request (``omniquant.endpoint.load``): one attempt,
  no retry and no cache (a load measurement counts what the server did), timed with a
  monotonic clock; with ``stream`` it reads the server-sent events and stamps the first
  content token (time to first token).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path

from omniquant.endpoint.protocol import ModelSource
from omniquant.errors import EndpointError

TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60] or "model"


class EndpointClient:
    """One served model behind an OpenAI-compatible base URL.

    Args:
        source: The endpoint (``ModelSource`` with ``url``).
        timeout: Seconds per request (connect, read, write).
        retries: Retries of a transient failure before giving up.
        backoff: First backoff in seconds.
        cache_dir: Directory of the resume cache (``None``: no cache).
        concurrency: Connection pool size.
        request_extra: Fields merged into every chat request (e.g.
            ``{"chat_template_kwargs": {"enable_thinking": false}}`` for vLLM).
        transport: An httpx transport (tests pass ``httpx.MockTransport``).
    """

    def __init__(
        self,
        source: ModelSource,
        *,
        timeout: float = 300.0,
        retries: int = 5,
        backoff: float = 0.5,
        cache_dir: Path | None = None,
        concurrency: int = 4,
        request_extra: dict | None = None,
        transport=None,
    ):
        import httpx

        if source.url is None:
            raise ValueError("EndpointClient needs a URL source")
        self.source = source
        self.base_url = source.url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.cache_root = Path(cache_dir) if cache_dir is not None else None
        self.request_extra = dict(request_extra or {})
        self.model_id: str | None = source.model
        self.model_entry: dict = {}
        self.requests_sent = 0
        self.cache_hits = 0
        self._count_lock = threading.Lock()
        pool = max(1, concurrency)
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout), limits=limits, transport=transport
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # ------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        url = f"{self.base_url}{path}"
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            wait = min(MAX_BACKOFF_S, self.backoff * 2**attempt)
            try:
                response = self._http.request(method, url, json=body)
            except httpx.TransportError as err:  # connect, read, timeout, protocol errors
                last = f"{type(err).__name__}: {err}"
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError as err:
                        raise EndpointError(f"{url}: the answer is not JSON ({err}).") from err
                message = _error_message(response)
                if response.status_code not in TRANSIENT_STATUS:
                    raise EndpointError(
                        f"{url}: HTTP {response.status_code}: {message}",
                        status=response.status_code,
                    )
                last = f"HTTP {response.status_code}: {message}"
                retry_after = response.headers.get("retry-after", "")
                if retry_after.replace(".", "", 1).isdigit():
                    wait = min(MAX_BACKOFF_S, float(retry_after))
            if attempt < self.retries:
                time.sleep(wait)
        raise EndpointError(
            f"{url}: no answer after {self.retries + 1} attempts (last: {last}). Is the server "
            "running? Start it, then rerun the same command: answers already received are "
            "cached and not asked again."
        )

    # ------------------------------------------------------------------ API
    def resolve_model(self) -> dict:
        """``GET /models``: pick the served model (the only one, or ``#id``) and return it.

        Raises:
            EndpointError: Server unreachable, no models, several models and no ``#id``,
                or an ``#id`` the server does not serve.
        """
        listing = self._request("GET", "/models")
        data = listing.get("data") or []
        ids = [m.get("id") for m in data]
        if self.model_id is None:
            if len(ids) != 1:
                raise EndpointError(
                    f"{self.base_url}/models lists {len(ids)} models {ids}; choose one with "
                    f"{self.base_url}#MODEL_ID."
                )
            self.model_id = ids[0]
        if self.model_id not in ids:
            raise EndpointError(
                f"{self.base_url}: model {self.model_id!r} is not served (served: {ids})."
            )
        self.model_entry = data[ids.index(self.model_id)]
        return self.model_entry

    @property
    def cache_dir(self) -> Path | None:
        """This model's cache directory (id and root in the name and the hash)."""
        if self.cache_root is None or self.model_id is None:
            return None
        root = str(self.model_entry.get("root") or "")
        return (
            self.cache_root / f"{_slug(self.model_id)}-{_digest(self.model_id + '|' + root)[:12]}"
        )

    def chat(self, body: dict, sample_id: str) -> dict:
        """``POST /chat/completions`` for ``sample_id``, answered from the cache when present."""
        body = {**body, **self.request_extra, "model": self.model_id}
        key = _digest(json.dumps(body, sort_keys=True, separators=(",", ":")))
        file = None
        if self.cache_dir is not None:
            file = self.cache_dir / f"{_digest(sample_id)[:16]}-{key[:32]}.json"
            if file.is_file():
                try:
                    cached = json.loads(file.read_text())
                    with self._count_lock:
                        self.cache_hits += 1
                    return cached
                except json.JSONDecodeError:
                    pass  # a torn write from a killed run: ask again
        answer = self._request("POST", "/chat/completions", body)
        with self._count_lock:
            self.requests_sent += 1
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f".{file.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps(answer))
            os.replace(tmp, file)
        return answer

    def chat_timed(self, body: dict, *, stream: bool) -> TimedAnswer:
        """One ``POST /chat/completions`` of the load phase: no retry, no cache, timed.

        With ``stream`` the request asks for server-sent events with usage
        (``stream_options.include_usage``) and the first content token is stamped.
        Failures are returned in ``TimedAnswer.error``, never raised.
        """
        return _chat_timed(self, body, stream)


class TimedAnswer:
    """One timed chat request of the load phase (``EndpointClient.chat_timed``).

    Attributes:
        start: ``time.perf_counter()`` when the request was sent.
        end: When the answer was complete (or the failure seen).
        first_token: When the first content token arrived (streamed requests), else ``None``.
        prompt_tokens: ``usage.prompt_tokens``, ``None`` when the server reports none.
        completion_tokens: ``usage.completion_tokens``, ``None`` when not reported.
        error: Why the request failed (``None``: it succeeded).
        status: The HTTP status of a refused request.
        param: The ``param`` an OpenAI-style refusal names (``stream`` for a server that
            does not stream).
    """

    __slots__ = ("completion_tokens", "end", "error", "first_token", "param", "prompt_tokens",
                 "start", "status")  # fmt: skip

    def __init__(self, start: float):
        self.start = start
        self.end = start
        self.first_token: float | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.error: str | None = None
        self.status: int | None = None
        self.param: str | None = None

    def take_usage(self, usage: dict | None) -> None:
        if isinstance(usage, dict):
            if usage.get("prompt_tokens") is not None:
                self.prompt_tokens = int(usage["prompt_tokens"])
            if usage.get("completion_tokens") is not None:
                self.completion_tokens = int(usage["completion_tokens"])


def _chat_timed(client: EndpointClient, body: dict, stream: bool) -> TimedAnswer:
    import httpx

    url = f"{client.base_url}/chat/completions"
    body = {**body, **client.request_extra, "model": client.model_id}
    if stream:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    answer = TimedAnswer(time.perf_counter())
    try:
        with client._http.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                response.read()
                answer.status = response.status_code
                answer.error = f"HTTP {response.status_code}: {_error_message(response)}"
                answer.param = _error_param(response)
            elif stream:
                _read_events(response, answer)
            else:
                response.read()
                data = response.json()
                answer.take_usage(data.get("usage"))
    except (httpx.HTTPError, ValueError) as err:  # transport, timeout, bad JSON / events
        answer.error = f"{type(err).__name__}: {err}"
    answer.end = time.perf_counter()
    with client._count_lock:
        client.requests_sent += 1
    return answer


def _read_events(response, answer: TimedAnswer) -> None:
    """Server-sent events of a streamed chat completion: the first content delta's
    arrival, the usage chunk, an ``error`` event."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            err = chunk["error"]
            answer.error = str(err.get("message") if isinstance(err, dict) else err)
            return
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if answer.first_token is None and (delta.get("content") or delta.get("reasoning_content")):
                answer.first_token = time.perf_counter()
        answer.take_usage(chunk.get("usage"))


def _error_param(response) -> str | None:
    try:
        err = response.json().get("error")
    except (ValueError, AttributeError):
        return None
    return err.get("param") if isinstance(err, dict) else None


def _error_message(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message"))
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])
    return str(body)[:300]
