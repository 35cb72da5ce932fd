"""File helpers shared by conversion, bundles, weight downloads and STOREs (torch-free)."""

from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 20  # checkpoints are ~90 MB: hash them streamed, 1 MiB at a time


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of the file at ``path``, read in :data:`CHUNK`-sized blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()
