"""``omniquant serve``'s app in a thread on a free loopback port (for the serve tests)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

from omniquant.demo import demo_model_dir


@contextmanager
def serving(
    model_kwargs: dict | None = None, path: Path | None = None, model_id: str = "demo", **app_kwargs
):
    """``omniquant serve``'s app (default: the demo model) on a free loopback port, in a thread."""
    import uvicorn

    from omniquant.endpoint.server import ServedModel, bind, create_app

    model = ServedModel(path or demo_model_dir(), model_id, **(model_kwargs or {}))
    app = create_app(model, **app_kwargs)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(600):  # bounded: 30 s
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", app, model
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
