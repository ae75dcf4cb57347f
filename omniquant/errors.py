"""The one error hierarchy of omniquant.

Policy: every error a user can cause is an ``OmniquantError`` whose message names the
thing at fault (file, field, module), says what is wrong and how to fix it. The CLI
prints ``str(err)`` without a traceback and exits with ``err.exit_code``. Internal
bugs stay ordinary exceptions so that they keep their tracebacks.
"""

from __future__ import annotations


class OmniquantError(Exception):
    """Base class for errors caused by input, environment or configuration."""

    exit_code = 2


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

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
