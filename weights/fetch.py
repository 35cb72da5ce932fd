"""Download a registered DeepVariant model: resumable, checksummed, atomic.

Design points (each one is a failure seen with ~100 MB downloads over flaky links):

* Every file streams into ``<file>.part``; an interrupted transfer leaves the ``.part`` and
  the next attempt (automatic retry or a later ``fetch``) asks only for the remainder with an
  HTTP ``Range`` header. A server that ignores ``Range`` (200 instead of 206) or answers with a
  different offset makes us restart that file from byte 0 rather than splice wrong bytes.
* sha256 is computed while streaming (the bytes already in a ``.part`` are hashed once before
  resuming), so verification costs no second pass over the file.
* Google's bucket states each object's own MD5 / CRC32C in an ``x-goog-hash`` header (for
  the whole object, also on a ranged GET); every download that gets one is checked against
  it, so a transfer corrupted or cut short on the way is caught even where no digest is
  known (every registry digest is null: none could be read from the bucket when the
  registry was written). A mismatch deletes the download and says to fetch again.
* Known digests (``--sha256`` from the user, then the registry, then the local lock file) are
  enforced; a mismatching download is deleted (a mismatching file already on disk is kept
  until a verified download replaces it). With none known, the digest seen now is recorded
  (checked against the server's hash when it sent one, else trust on first use) and enforced
  on every later download into the same directory.
* Only a complete, verified file is renamed to its final name (``os.replace``), so a final
  name always means "complete"; ``checksums.json`` is rewritten atomically after each file
  with sha256, size, URL and time, for ``dvprobe convert`` to record in the bundle.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import google_crc32c

from dvtorch.files import atomic_write_bytes, sha256_file
from weights.registry import (
    CONFIDENCE_LEVELS,
    MIRROR_ENV,
    ModelEntry,
    WeightsError,
    default_dest,
    get,
)

LOCK_NAME = "checksums.json"
LOCK_FORMAT = "dvprobe-weights-lock"
CHUNK = 1 << 20
USER_AGENT = "dvprobe-weights/0.1 (+https://github.com/google/deepvariant models)"

_CONFIDENCE_HINT = {
    "verified": "its URL was read in an upstream DeepVariant file, so the object should exist "
    "(check the mirror or whether Google moved it)",
    "doc": "its URL is named in DeepVariant's documentation (check the mirror or whether Google "
    "moved it)",
    "derived": "its URL was derived from the layout of other releases and never seen "
    "published, so this release may not ship it",
    "3rd-party": "its URL was only seen in non-Google code and is unconfirmed",
    "unknown": "whether this object exists was never established; this release probably does "
    "not ship it",
}
assert set(_CONFIDENCE_HINT) == set(CONFIDENCE_LEVELS)


class _Digests:
    """sha256 (what the lock file records) and MD5 / CRC32C (what GCS states), one pass."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.crc32c = google_crc32c.Checksum()

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        self.md5.update(chunk)
        self.crc32c.update(chunk)

    def update_from(self, path: Path) -> None:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                self.update(chunk)

    def gcs(self) -> dict[str, str]:
        """MD5 and CRC32C as ``x-goog-hash`` spells them (base64 of the big-endian bytes)."""
        return {"md5": base64.b64encode(self.md5.digest()).decode("ascii"),
                "crc32c": base64.b64encode(self.crc32c.digest()).decode("ascii")}


def server_hashes(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The object's own hashes from a GCS response: ``x-goog-hash: crc32c=…,md5=…`` (several
    headers or one comma-joined; composite objects have no md5). Empty when there are none,
    or when the object is stored gzip-encoded and served decoded: its hashes are then of
    bytes we never see."""
    if headers is None:
        return {}
    stored = (headers.get("x-goog-stored-content-encoding") or "identity").strip().lower()
    served = (headers.get("Content-Encoding") or "identity").strip().lower()
    if stored not in ("", "identity") and stored != served:
        return {}
    values = headers.get_all("x-goog-hash") if hasattr(headers, "get_all") else None
    if values is None:
        values = [headers.get("x-goog-hash") or ""]
    found: dict[str, str] = {}
    for value in values:
        for item in (value or "").split(","):
            key, _, digest = item.strip().partition("=")
            if key.lower() in ("md5", "crc32c") and digest:
                found[key.lower()] = digest.strip()
    return found


def check_server_hashes(url: str, file: str, got: Mapping[str, str],
                        claimed: Mapping[str, str]) -> str | None:
    """Raise :class:`ChecksumError` if a hash the server stated differs from the bytes
    received; return the name of the hash that matched (``"md5"``), None if none was
    stated. (The caller deletes the download first.)"""
    for kind in ("md5", "crc32c"):
        if kind in claimed and claimed[kind] != got[kind]:
            raise ChecksumError(
                f"{url}: {file} arrived damaged: its {kind.upper()} is {got[kind]}, the "
                f"server states {claimed[kind]} for the object (x-goog-hash); the download was "
                "deleted: run the same fetch again (if it repeats, a proxy or the mirror is "
                "altering the file)")
    return next((k for k in ("md5", "crc32c") if k in claimed), None)


class DownloadError(WeightsError):
    """A file could not be downloaded (HTTP error, refused connection, truncated transfer)."""


class ChecksumError(WeightsError):
    """A downloaded file's sha256 differs from the expected one (the file was deleted)."""


class DiskWriteError(WeightsError):
    """The destination cannot be written (permissions, disk full, a file where a dir should be)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def parse_sha256_overrides(items: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """Parse CLI ``FILE=HEX`` pairs into ``{file: hex}`` (hex lower-cased, length-checked)."""
    out: dict[str, str] = {}
    for item in items or ():
        file, sep, digest = item.partition("=")
        digest = digest.strip().lower()
        if not sep or not file or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise WeightsError(
                f"--sha256 {item!r}: expected FILE=HEX with 64 hex digits, e.g. "
                "saved_model.pb=3f5c…"
            )
        out[file.strip()] = digest
    return out


def read_lock(dest: Path) -> dict:
    """The lock file of a download directory, or an empty skeleton when there is none."""
    path = Path(dest) / LOCK_NAME
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"{path}: unreadable lock file ({exc}); delete it to re-record checksums"
        ) from None
    if doc.get("format") != LOCK_FORMAT or not isinstance(doc.get("files"), dict):
        raise WeightsError(f"{path}: not a dvprobe weights lock file (format != {LOCK_FORMAT})")
    return doc


def _write_json_atomic(path: Path, doc: dict) -> None:
    try:
        atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))
    except OSError as exc:
        raise DiskWriteError(f"cannot write {path}: {exc.strerror or exc}") from None


def _ensure_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiskWriteError(
            f"cannot create download directory {path}: {exc.strerror or exc}"
        ) from None


class _Interrupted(Exception):
    """The transfer stopped early; the ``.part`` keeps what arrived (retry resumes)."""


def _open(url: str, offset: int, timeout: float, entry: ModelEntry):
    """Issue the GET (ranged when resuming); translate failures into user-facing errors."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:
            return exc  # caller inspects Content-Range (the .part may already be complete)
        if exc.code in (404, 403):
            # GCS answers 403 (not 404) for a missing object when listing is not public
            raise DownloadError(
                f"HTTP {exc.code} {exc.reason}: {url} — registry entry {entry.name} has "
                f"confidence '{entry.confidence}': {_CONFIDENCE_HINT[entry.confidence]}"
            ) from None
        if 500 <= exc.code < 600:
            raise _Interrupted(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"HTTP {exc.code} {exc.reason}: {url}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            raise DownloadError(
                f"{url}: connection refused; is the server/mirror up? (mirror via --mirror or "
                f"${MIRROR_ENV})"
            ) from None
        if isinstance(reason, socket.gaierror):
            raise DownloadError(f"{url}: cannot resolve host ({reason}); offline?") from None
        if isinstance(reason, (TimeoutError, ConnectionError)):
            raise _Interrupted(f"{type(reason).__name__}: {reason}") from None
        if isinstance(reason, FileNotFoundError):  # a file:// (local directory) mirror
            raise DownloadError(
                f"{url}: not in the mirror (it must keep the bucket's models/DeepVariant/... "
                f"layout) — registry entry {entry.name} has confidence '{entry.confidence}': "
                f"{_CONFIDENCE_HINT[entry.confidence]}"
            ) from None
        raise DownloadError(f"{url}: {reason}") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise _Interrupted(f"{type(exc).__name__}: {exc}") from None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` or ``bytes */TOTAL`` → (start, total); Nones if absent."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _download_once(
    url: str, part: Path, entry: ModelEntry, label: str, progress: bool, timeout: float
) -> tuple[_Digests, int, dict[str, str]]:
    """One attempt at completing ``part``; returns (digests, size, the server's own hashes
    of the object) when it is complete.

    Raises :class:`_Interrupted` if the stream stops early (bytes so far stay in ``part``).
    """
    from tqdm.auto import tqdm

    offset = part.stat().st_size if part.exists() else 0
    resp = _open(url, offset, timeout, entry)
    with contextlib.closing(resp):
        status = resp.status if hasattr(resp, "status") else resp.code
        if status == 416:
            _, total = _content_range(resp.headers.get("Content-Range"))
            if total is not None and total == offset:  # finished earlier, never renamed
                h = _Digests()
                h.update_from(part)
                return h, offset, server_hashes(resp.headers)
            part.unlink(missing_ok=True)  # .part longer than the file: stale, start over
            raise _Interrupted("server refused the resume offset (HTTP 416); restarting")
        h = _Digests()
        claimed = server_hashes(resp.headers)
        mode = "wb"
        if offset and status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:  # unexpected window: do not splice, start over
                part.unlink(missing_ok=True)
                raise _Interrupted(f"server resumed at byte {start}, not {offset}; restarting")
            h.update_from(part)  # hash what we already have, once
            mode = "ab"
        else:  # 200: full body (fresh download, or server ignored Range → restart cleanly)
            offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
        done = offset
        try:
            fh = open(part, mode)  # noqa: SIM115  (entered below; open errors need their own message)
        except OSError as exc:
            raise DiskWriteError(f"cannot write {part}: {exc.strerror or exc}") from None
        with (
            fh,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                disable=not progress,
                file=sys.stderr,
                leave=False,
            ) as bar,
        ):
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (http.client.IncompleteRead, TimeoutError, ConnectionError) as exc:
                    partial = getattr(exc, "partial", b"") or b""
                    if partial:
                        fh.write(partial)
                        h.update(partial)
                        done += len(partial)
                    raise _Interrupted(
                        f"transfer interrupted after {done} bytes ({exc!r})"
                    ) from None
                if not chunk:
                    break
                try:
                    fh.write(chunk)
                except OSError as exc:
                    raise DiskWriteError(f"cannot write {part}: {exc.strerror or exc}") from None
                h.update(chunk)
                done += len(chunk)
                bar.update(len(chunk))
            try:
                fh.flush()
                os.fsync(fh.fileno())
            except OSError as exc:
                raise DiskWriteError(f"cannot write {part}: {exc.strerror or exc}") from None
    if total is not None and done != total:
        raise _Interrupted(f"transfer ended at {done} of {total} bytes")
    return h, done, claimed


def _mirror_url(mirror: str | None) -> str | None:
    """A mirror as a URL: a local directory (``/data/dv-mirror``) becomes ``file://``; a
    bare host path (``storage.example.org/dv``) is refused rather than guessed at."""
    if mirror is None or "://" in mirror:
        return mirror
    local = Path(mirror).expanduser()
    if local.is_dir():
        return local.resolve().as_uri()
    raise WeightsError(f"--mirror {mirror!r}: not a URL (https://..., file://...) and not a "
                       "local directory")


def _download_with_retries(url: str, part: Path, entry: ModelEntry, file: str,
                           progress: bool, timeout: float, retries: int
                           ) -> tuple[_Digests, int, dict[str, str]]:
    """``_download_once``, resumed up to ``retries`` times after a dropped connection."""
    attempts = 0
    while True:
        try:
            return _download_once(url, part, entry, file, progress, timeout)
        except _Interrupted as exc:
            attempts += 1
            if attempts > retries:
                have = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f"{url}: {exc}; gave up after {attempts} attempt(s). {have} bytes kept "
                    f"in {part}; run the same fetch again to resume"
                ) from None


def fetch(
    name_or_entry: str | ModelEntry,
    dest: str | Path | None = None,
    *,
    base_url: str | None = None,
    progress: bool = True,
    sha256: Mapping[str, str] | None = None,
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """Download every file of a registered model into ``dest`` and return ``dest``.

    ``dest`` defaults to ``<cache_root()>/<name>/`` (``$DVPROBE_CACHE``, else
    ``~/.cache/dvprobe/weights``). ``base_url`` (else ``$DVPROBE_WEIGHTS_MIRROR``) replaces the
    ``https://storage.googleapis.com/deepvariant/`` root, keeping ``models/DeepVariant/…``.
    ``sha256`` maps file names (as in ``entry.files``) to expected digests and wins over the
    registry and the lock file. ``retries`` automatic resumptions per file after a dropped
    connection; a failed call leaves ``.part`` files that the next call resumes.

    Files already present and matching their recorded digest are not downloaded again. For a
    checkpoint, pass ``entry.convert_source(dest)`` (the prefix) to ``dvprobe convert``.
    """
    entry = get(name_or_entry) if isinstance(name_or_entry, str) else name_or_entry
    dest = Path(dest).expanduser() if dest is not None else default_dest(entry)
    mirror = _mirror_url(base_url or os.environ.get(MIRROR_ENV) or None)
    user = dict(sha256 or {})
    unknown = sorted(set(user) - set(entry.files))
    if unknown:
        raise WeightsError(
            f"--sha256 for {', '.join(unknown)}: not a file of {entry.name} "
            f"(files: {', '.join(entry.files)})"
        )
    _ensure_dir(dest)
    lock = read_lock(dest)
    if lock and lock.get("name") not in (None, entry.name):
        raise WeightsError(
            f"{dest / LOCK_NAME}: this directory holds {lock['name']}, not {entry.name}; "
            "choose another --dest"
        )
    recorded: dict[str, dict] = dict(lock.get("files", {}))
    doc = {
        "format": LOCK_FORMAT,
        "name": entry.name,
        "deepvariant_version": entry.version,
        "model_type": entry.model_type,
        "model_format": entry.format,
        "confidence": entry.confidence,
        "convert_source": str(entry.convert_source(dest)),
        "files": recorded,
    }

    for file in entry.files:
        recorded[file] = _fetch_file(entry, file, dest, mirror, user.get(file),
                                     recorded.get(file, {}), progress, timeout, retries)
        _write_json_atomic(dest / LOCK_NAME, doc)
    return dest


def _expected_sha256(user: str | None, registry: str | None, prev: dict
                     ) -> tuple[str | None, str | None]:
    """The digest a file must have and where it comes from: the user's, else the
    registry's, else the one the lock file recorded at the first download."""
    for cand, origin in ((user, "user"), (registry, "registry"),
                         (prev.get("sha256"),
                          f"{LOCK_NAME} (first download {prev.get('fetched', '?')})")):
        if cand:
            return cand.lower(), origin
    return None, None


def _fetch_file(entry: ModelEntry, file: str, dest: Path, mirror: str | None,
                user_sha256: str | None, prev: dict, progress: bool, timeout: float,
                retries: int) -> dict:
    """The lock record of one file of ``entry``: the file on disk when it matches its
    expected digest, else a download verified against it (and the server's hashes)."""
    url = entry.url(file, mirror)
    final = dest / file
    expected, origin = _expected_sha256(user_sha256, entry.sha256.get(file), prev)
    kept = ""  # a file on disk that does not match: kept until a verified one replaces it
    if final.is_file():
        digest = sha256_file(final)
        if expected is None or digest == expected:
            return {
                "sha256": digest,
                "size": final.stat().st_size,
                "url": prev.get("url", url),
                "fetched": prev.get("fetched", _now()),
                "verified_against": origin or "trust-on-first-use",
            }
        # Present but not matching: corrupted, replaced, or the expected digest is a typo.
        # Deleting it here lost hand-copied files whenever the download then failed.
        kept = (f"; {final} on disk (sha256 {digest}) does not match {expected} and was left "
                "as it is")
        print(f"[dvprobe] {final}: sha256 {digest} does not match {expected} (from "
              f"{origin}); downloading it again", file=sys.stderr)
    return _download_verified(entry, file, url, dest, expected, origin, kept, progress,
                              timeout, retries)


def _download_verified(entry: ModelEntry, file: str, url: str, dest: Path,
                       expected: str | None, origin: str | None, kept: str, progress: bool,
                       timeout: float, retries: int) -> dict:
    """Download ``url`` to ``dest / file`` (through ``.part``, resumable), refuse it unless
    it matches ``expected`` and the server's own hashes, and return its lock record."""
    final = dest / file
    part = final.with_name(final.name + ".part")
    _ensure_dir(final.parent)
    try:
        digests, size, claimed = _download_with_retries(url, part, entry, file, progress,
                                                        timeout, retries)
    except DownloadError as exc:
        if kept:
            raise DownloadError(f"{exc}{kept}") from None
        raise
    digest, got = digests.sha256.hexdigest(), digests.gcs()
    try:
        matched = check_server_hashes(url, file, got, claimed)
    except ChecksumError as exc:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{exc}{kept}") from None

    if expected is not None and digest != expected:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"{url}: sha256 mismatch for {file}: got {digest}, expected {expected} "
            f"(from {origin}); the downloaded file was deleted{kept}"
            + (
                f". If upstream legitimately changed, delete {dest / LOCK_NAME} to accept "
                "the new file"
                if origin and origin.startswith(LOCK_NAME)
                else ""
            )
        )
    try:
        os.replace(part, final)
    except OSError as exc:
        raise DiskWriteError(f"cannot move {part} to {final}: {exc.strerror or exc}") from None
    record = {
        "sha256": digest,
        "size": size,
        "url": url,
        "fetched": _now(),
        "verified_against": origin or (f"server {matched} (x-goog-hash)" if matched
                                       else "trust-on-first-use"),
    }
    if matched:
        record["server_hash"] = dict(claimed)  # only md5 / crc32c are parsed
    return record


def is_fetched(entry: ModelEntry, dest: str | Path | None = None) -> bool:
    """Whether ``dest`` (default cache dir) holds every file with a recorded checksum.

    Cheap (no hashing): for listings. ``fetch`` re-verifies digests before trusting a file.
    """
    dest = Path(dest) if dest is not None else default_dest(entry)
    try:
        files = read_lock(dest).get("files", {})
    except WeightsError:
        return False
    return all(f in files and (dest / f).is_file() for f in entry.files)
