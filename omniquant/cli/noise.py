"""Third-party chatter out of the user's output: warnings and prints go to a log file.

Policy: while a CLI command runs (unless ``omniquant --verbose``):

- ``print`` output of libraries (modelopt's ANSI-bold "Detected fused MoE experts ...",
  "Inserted N quantizers") goes to the log: ``sys.stdout`` points at the log file, and
  omniquant's own output is written to the stream that was ``sys.stdout`` when the
  command started (``omniquant.cli._stdout``);
- Python warnings (modelopt's version-compatibility ``UserWarning``, transformers'
  deprecations) are written to the log instead of stderr;
- transformers' logger writes to the log; when transformers is first imported during
  the command, ``TRANSFORMERS_VERBOSITY=error`` keeps its warnings off stderr;
- transformers' "Loading weights" progress bar is off (``HF_HUB_DISABLE_PROGRESS_BARS``
  before it is imported, ``disable_progress_bar()`` after), and back on afterwards.

Errors are untouched: exceptions propagate, and the CLI prints them as always.
The log is ``$OMNIQUANT_LOG`` or ``<tmp>/omniquant-<pid>.log``; it is removed when empty.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path


def log_path() -> Path:
    """Where third-party messages of this process go."""
    env = os.environ.get("OMNIQUANT_LOG")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"omniquant-{os.getpid()}.log"


@contextlib.contextmanager
def third_party_to_log():
    """Route library prints, warnings and transformers' logger to ``log_path()``."""
    path = log_path()
    try:
        log = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed below)
    except OSError:  # no writable temp dir: leave the output as it is
        yield None
        return
    tf_logger = logging.getLogger("transformers")
    saved_handlers = list(tf_logger.handlers)
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("[transformers] %(message)s"))
    env_before = os.environ.get("TRANSFORMERS_VERBOSITY")
    if "transformers" not in sys.modules and env_before is None:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    bars_env_before = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    hf_logging = sys.modules.get("transformers.utils.logging")
    bars_were_on = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if hf_logging is None and bars_env_before is None:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    elif bars_were_on:
        hf_logging.disable_progress_bar()
    if saved_handlers:
        tf_logger.handlers = [handler]

    def showwarning(message, category, filename, lineno, file=None, line=None):
        log.write(warnings.formatwarning(message, category, filename, lineno, line))

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.showwarning = showwarning
            yield path
    finally:
        if saved_handlers:
            tf_logger.handlers = saved_handlers
        if env_before is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
        if bars_env_before is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        if bars_were_on:  # (huggingface_hub reads the variable once, at its import)
            hf_logging.enable_progress_bar()
        log.close()
        with contextlib.suppress(OSError):
            if path.stat().st_size == 0:
                path.unlink()
