"""Errors a user can cause (bad files, bad options). The CLI prints them as one line and
exits with the error's ``exit_code``: 2, except 3 for a failed parity check, so that a
script can tell "the model does not match its source" from "the command was wrong"."""

from __future__ import annotations


class DvprobeError(Exception):
    """Base class: the message alone must tell the user what was wrong and where."""

    exit_code = 2


class ConversionError(DvprobeError):
    """A model source cannot be converted (missing files, wrong layout, mismatch)."""


class BundleError(DvprobeError):
    """A BUNDLE directory is missing, incomplete or inconsistent."""


class ParityError(DvprobeError):
    """Converted model outputs differ from the source beyond the documented tolerance."""

    exit_code = 3


class ExampleFormatError(DvprobeError):
    """A DeepVariant examples file or record is corrupt or not what the model expects."""

    def __init__(self, path, record: int | None, reason: str):
        self.path = str(path)
        self.record = record
        self.reason = reason
        where = f"{self.path}" + (f", record {record}" if record is not None else "")
        super().__init__(f"{where}: {reason}")
