"""File helpers shared by conversion, bundles, weight downloads and STOREs (torch-free)."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

CHUNK = 1 << 20  # checkpoints are ~90 MB: hash them streamed, 1 MiB at a time


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of the file at ``path``, read in :data:`CHUNK`-sized blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data`` already in memory."""
    return hashlib.sha256(data).hexdigest()


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never a torn one
    (a temp file beside it, fsynced, renamed over it), with the mode a plain ``open`` gives.
    """
    path = Path(path)
    if path.is_dir():  # refuse before writing a temp file that could not replace it
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        give_default_mode(tmp)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
