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


def _umask() -> int:
    """The process's umask. Read from /proc where Linux offers it (``os.umask`` can only
    be read by setting it, which would briefly change it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def give_default_mode(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Give a temp file or directory the mode a plain ``open`` / ``mkdir`` would have.

    Why: ``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 entries, and atomic writes
    rename them into place, so every STORE file, shard and bundle would be readable by its
    owner only -- on a shared cluster, colleagues could not read a converted model or a
    STORE. This applies the umask as usual (0644 / 0755 under the common 022).
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())
