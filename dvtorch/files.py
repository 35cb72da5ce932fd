"""File helpers shared by conversion, bundles, weight downloads and STOREs (torch-free)."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20  # checkpoints are ~90 MB: hash them streamed, 1 MiB at a time
#: A BUNDLE's metadata file (written by :mod:`dvtorch.bundle`); named here so that code
#: which must not import torch (STORE provenance, ``dvprobe info``) can find it.
BUNDLE_META_FILE = "bundle.json"


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


def bundle_fingerprint(bundle: str | os.PathLike) -> str:
    """sha256 of a BUNDLE's bundle.json ("" when it has none), which identifies the model
    exactly: bundle.json records the weights' sha256 (``dvtorch.load`` refuses weights that
    do not match it), so ~100 MB of weights need not be hashed again."""
    path = Path(bundle) / BUNDLE_META_FILE
    return sha256_file(path) if path.is_file() else ""


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


# ``.NAME.dvprobe-KIND.HOST.PID.RANDOM``: what :func:`writer_dir` creates, and the only names
# :func:`sweep_dead_writers` ever removes. HOST is :func:`host_id` (machine and PID namespace),
# RANDOM is tempfile's ([a-z0-9_]).
_WRITER_DIR = re.compile(r"^\.(?P<name>.+)\.dvprobe-(?P<kind>tmp|old)\.(?P<host>[A-Za-z0-9-]+)"
                         r"\.(?P<pid>[1-9][0-9]*)\.[a-z0-9_]+$")


def host_id() -> str:
    """Where a pid means this process: the machine's name (no dots) and the id of this
    process's PID namespace, as it appears in a :func:`writer_dir` name.

    Why the namespace: containers sharing the host's name (Docker ``--network host``,
    Kubernetes ``hostNetwork``, Apptainer ``--pid``) each number processes afresh, so a
    pid seen from another namespace says nothing about whether its writer still runs; a
    sweep only judges writers of its own namespace.
    """
    name = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "unknown"
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc (macOS): one namespace
        namespace = 0
    return f"{name}-{namespace}"


def writer_dir(parent: str | os.PathLike, name: str, kind: str = "tmp") -> Path:
    """A new private directory in ``parent`` for writing ``name`` atomically (``kind``
    "tmp": the new version being written; "old": the version being replaced, set aside).

    Why the machine and process are in its name: a writer killed with SIGKILL cannot remove
    it, so :func:`sweep_dead_writers` removes it later, once that process is known to be gone.
    """
    if kind not in ("tmp", "old"):
        raise ValueError(f"kind must be 'tmp' or 'old', got {kind!r}")
    return Path(tempfile.mkdtemp(prefix=f".{name}.dvprobe-{kind}.{host_id()}.{os.getpid()}.",
                                 dir=parent))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine may still run (a zombie never will again).

    Errs towards alive: a process of another user, or a pid reused since, counts as alive.
    """
    if pid <= 0:
        raise ValueError(f"not a process id: {pid}")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return True  # no /proc (macOS): signal 0 is all we know
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def _writer_dirs(parent: Path) -> Iterator[tuple[os.DirEntry, re.Match]]:
    """The entries of ``parent`` named as :func:`writer_dir` names them, with the parts."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        m = _WRITER_DIR.match(entry.name)
        if m is not None:
            yield entry, m


def sweep_dead_writers(parent: str | os.PathLike) -> list[Path]:
    """Remove the :func:`writer_dir` leftovers in ``parent`` of writers that were killed.

    Only directories named exactly as :func:`writer_dir` names them, made on this machine
    by a process that no longer runs, are candidates: a live writer (even a concurrent one)
    and anything else are left alone, and on a shared filesystem another machine's pids
    mean nothing here. An "old" directory may hold the only copy of ``name`` (its writer
    died between setting it aside and moving the new version in), so it is only removed
    once ``parent / name`` exists again. Returns what was removed.
    """
    parent = Path(parent)
    host = host_id()
    removed = []
    for entry, m in _writer_dirs(parent):
        if (m["host"] != host or not entry.is_dir(follow_symlinks=False)
                or pid_alive(int(m["pid"]))):
            continue
        if m["kind"] == "old" and not (parent / m["name"]).exists():
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def swap_in_dir(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move directory ``new`` to ``final``, replacing a directory already there.

    The old one is set aside in a :func:`writer_dir` of kind "old" first and removed only
    once ``new`` is in place; if that move fails it is put back. A kill between the two
    renames leaves it set aside, where :func:`sweep_dead_writers` keeps it (the only copy)
    until ``final`` exists again.
    """
    new, final = Path(new), Path(final)
    if not final.exists():
        os.replace(new, final)
        return
    old = writer_dir(final.parent, final.name, "old")
    os.replace(final, old / "b")
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(old / "b", final)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def set_aside_copies(final: str | os.PathLike) -> list[Path]:
    """Copies of ``final`` that a writer killed inside :func:`swap_in_dir` left set aside
    (``.NAME.dvprobe-old.*/b``), newest first: what to tell a user whose ``final`` is gone."""
    final = Path(final)
    found = [Path(entry.path) / "b" for entry, m in _writer_dirs(final.parent)
             if m["kind"] == "old" and m["name"] == final.name
             and (Path(entry.path) / "b").is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
