"""Errors the analysis engine raises for things a user can fix (options, data, scale)."""

from __future__ import annotations

from dvtorch.errors import DvprobeError


class AnalysisError(DvprobeError):
    """Bad analysis options, or data that cannot support the requested analysis."""


class BackendError(AnalysisError):
    """The requested compute backend (e.g. cuML) is not usable on this machine."""


class ScaleError(AnalysisError):
    """The requested fit would not fit in memory; the message names the alternative."""
