"""Start ``omniquant serve`` for a local checkpoint, and stop it: the report's load phase.

Policy:
- The server is the real command (``python -m omniquant.cli serve DIR --port 0``) in a
  child process, so what the load phase measures is the same HTTP server a user runs,
  with its own interpreter and thread pool; never an in-process shortcut.
- Port 0: the server binds a free loopback port and prints ``listening on URL``; the
  URL is read from that line (no port is guessed, so two reports never collide).
- Bounded waits: the start (the line, then ``/health`` answering 200) has a deadline;
  a server that exits or misses it is stopped and an ``EndpointError`` names the
  checkpoint and the tail of the server's log.
- Stopping: SIGTERM, then SIGKILL after a grace period; the context manager always
  stops the process it started, and only that one. The server's output goes to a log
  file (``log``), so a long run never blocks on a full pipe.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from omniquant.errors import EndpointError

START_TIMEOUT_S = 300.0
STOP_GRACE_S = 10.0


def _tail(log: Path, lines: int = 12) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def launched_server(
    path: str | Path,
    model_id: str,
    log: Path,
    *,
    start_timeout: float = START_TIMEOUT_S,
    threads: int | None = None,
    serve_args: Sequence[str] = (),
) -> Iterator[str]:
    """``omniquant serve path`` on a free loopback port for the duration of the block.

    Args:
        path: The checkpoint directory.
        model_id: ``--served-model-name``.
        log: File that receives the server's stdout and stderr.
        start_timeout: Seconds allowed for loading the model and answering ``/health``.
        threads: ``OMP_NUM_THREADS`` of the server (``None``: inherited).
        serve_args: More ``omniquant serve`` arguments (e.g. ``--allowed-local-media-path``).

    Yields:
        The base URL (``http://127.0.0.1:PORT/v1``).

    Raises:
        EndpointError: The server exited or did not answer within ``start_timeout``.
    """
    import httpx

    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "omniquant.cli", "serve", str(path), "--port", "0",
           "--served-model-name", model_id, *serve_args]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    sink = open(log, "w")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=sink, text=True, env=env, bufsize=1
    )
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:  # the URL line, then everything into the log
        for line in proc.stdout:
            sink.write(line)
            sink.flush()
            if not found and line.startswith("listening on "):
                found.append(line.split()[-1])
                ready.set()
        ready.set()

    reader = threading.Thread(target=pump, daemon=True, name="omniquant-serve-log")
    reader.start()
    try:
        deadline = time.monotonic() + start_timeout
        ready.wait(start_timeout)
        if not found:
            raise EndpointError(
                f"omniquant serve {path} did not start within {start_timeout:.0f} s "
                f"(exit code {proc.poll()}); its log {log} ends:\n{_tail(log)}"
            )
        url = found[0]
        with httpx.Client(timeout=5) as http:
            while True:
                try:
                    if http.get(url.removesuffix("/v1") + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise EndpointError(
                        f"omniquant serve {path} printed {url} but /health did not answer "
                        f"(exit code {proc.poll()}); its log {log} ends:\n{_tail(log)}"
                    )
                time.sleep(0.1)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_GRACE_S)
        reader.join(STOP_GRACE_S)
        sink.close()
