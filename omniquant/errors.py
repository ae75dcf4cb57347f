"""The one error hierarchy of omniquant.

Policy: every error a user can cause is an ``OmniquantError`` whose message names the
thing at fault (file, field, argument), says what is wrong and how to fix it. The CLI
prints it without a traceback and exits with ``err.exit_code``. Internal bugs stay
ordinary exceptions so that they keep their tracebacks.

The library speaks of its own arguments; the CLI maps them to its flags. An error names
the argument at fault with ``arg=`` (and the value the caller gave with ``value=``), and
a message that points at another argument writes ``arg_ref("force")``. ``str(err)``
renders argument names as the Python API spells them (``model /x: ...``, ``pass force``);
inside ``argument_style(cli_flag)`` (which ``omniquant.cli.main`` opens around a command)
the same error reads ``--model /x: ...``, ``pass --force``. The style is a context
variable, so an error interpolated into another message while a command runs is rendered
the CLI's way too. A stage that calls another under different names (the report passes
``--candidate`` to the checkpoint reader's ``path``) re-labels with ``with_arg``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar

_REF = re.compile("\ue000([a-z_][a-z0-9_]*)\ue001")


def python_name(name: str) -> str:
    """An argument as the Python API spells it: ``max_memory``."""
    return name


def cli_flag(name: str) -> str:
    """An argument as the CLI spells it: ``--max-memory``."""
    return "--" + name.replace("_", "-")


def cli_style(**labels: str) -> Callable[[str], str]:
    """``cli_flag`` except for the arguments in ``labels`` (a command's positional
    argument, or one whose flag is not its Python name): ``cli_style(path="inspect")``."""
    return lambda name: labels[name] if name in labels else cli_flag(name)


_STYLE: ContextVar[Callable[[str], str]] = ContextVar(
    "omniquant_argument_style", default=python_name
)


@contextlib.contextmanager
def argument_style(style: Callable[[str], str]) -> Iterator[None]:
    """Render argument names in error messages with ``style`` while the context is open."""
    token = _STYLE.set(style)
    try:
        yield
    finally:
        _STYLE.reset(token)


def arg_ref(name: str) -> str:
    """A reference to the argument ``name`` inside an error message, rendered in the
    current style (``force`` for Python callers, ``--force`` on the command line)."""
    return f"\ue000{name}\ue001"


def render_refs(text: str) -> str:
    """``text`` with its argument references rendered in the current style."""
    style = _STYLE.get()
    return _REF.sub(lambda m: style(m.group(1)), text)


class OmniquantError(Exception):
    """Base class for errors caused by input, environment or configuration.

    Args:
        message: What is wrong and how to fix it (may hold ``arg_ref`` references).
        arg: The argument at fault, by its Python name; the message is then about its
            ``value`` and is shown after ``"<arg> <value>: "``.
        value: What the caller passed as ``arg``.
    """

    exit_code = 2

    def __init__(self, message: str = "", *, arg: str | None = None, value: object = None):
        super().__init__(message)
        self.message = message
        self.arg = arg
        self.value = value

    def __str__(self) -> str:
        text = render_refs(self.message)
        if self.arg is None:
            return text
        label = _STYLE.get()(self.arg)  # "" for a positional argument: the value alone
        return f"{label} {self.value}: {text}" if label else f"{self.value}: {text}"

    def with_arg(self, arg: str, error: type[OmniquantError] | None = None) -> OmniquantError:
        """The same error about argument ``arg`` (a caller that passed the value on under
        another name), as ``error`` (default: the same class)."""
        cls = error or type(self)
        new = cls.__new__(cls)
        OmniquantError.__init__(new, self.message, arg=arg, value=self.value)
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k not in new.__dict__})
        return new


class ModelLoadError(OmniquantError):
    """A model directory is missing, unreadable or not a supported architecture."""


class RecipeError(OmniquantError):
    """A recipe file or override is invalid."""


class CalibrationError(OmniquantError):
    """Calibration data is invalid or calibration coverage is insufficient."""


class DataError(CalibrationError):
    """A calibration or task manifest, or a media file it names, is bad."""


class PlanError(OmniquantError):
    """The quantization plan selects modules it must not, or none at all."""


class DeviceError(OmniquantError):
    """A requested device or memory budget does not exist or cannot be used on this host."""


class ExportError(OmniquantError):
    """Writing a checkpoint failed or would overwrite something."""


class AuditError(OmniquantError):
    """An exported checkpoint fails its integrity audit."""

    exit_code = 3


class EngineError(OmniquantError):
    """An engine bundle cannot be built for the requested target."""


class ReportError(OmniquantError):
    """A quality report cannot be produced from the given inputs."""


class EndpointError(ReportError):
    """An OpenAI-compatible server refused a request or could not be reached.

    Attributes:
        status: The final HTTP status (``None`` when no answer came).
    """

    def __init__(self, message: str, status: int | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.status = status
