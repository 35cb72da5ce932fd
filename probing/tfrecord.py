"""TFRecord container I/O without TensorFlow: framing, masked CRC32C, gzip, shard specs.

Record framing (little-endian, repeated until EOF)::

    uint64 length | uint32 masked_crc32c(length bytes) | payload | uint32 masked_crc32c(payload)

DeepVariant's ``make_examples`` gzip-compresses the whole stream (TF "GZIP" option);
readers here detect gzip from the magic bytes, never from the file name, because people
rename files and because TF itself ignores the suffix. CRC-32C comes from the
``google_crc32c`` C extension (hardware accelerated); the pure-Python fallback is orders
of magnitude slower on pileup-sized records, so its absence is reported, not silently
tolerated.

Error policy: every problem a user's file can have raises
:class:`dvtorch.errors.ExampleFormatError` naming the file, the record index and a reason
that contains "CRC", "corrupt" or "truncated". With ``skip_corrupt=True`` a record whose
*payload* CRC fails is skipped and counted (the length was verified, so the reader can step
over it). Damage to the framing itself -- a failed *length* CRC, a record or gzip stream
cut short, corrupt gzip data -- leaves the reader not knowing where the next record starts:
without ``skip_corrupt`` that is an error; with it, the rest of *that file* is skipped as
one counted, reported skip (at the first record it cuts into) and the next file is read.
"""

from __future__ import annotations

import contextlib
import errno
import glob as _glob
import gzip
import logging
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import google_crc32c

from dvtorch.errors import ExampleFormatError
from dvtorch.files import give_default_mode

try:
    # zlib-ng reads the same gzip format with a faster inflate (docs/performance.md).
    # Inflating is most of the example loader's CPU time, which on a small CPU box comes out
    # of the model's share and on a GPU box decides how many loader workers keep it fed.
    from zlib_ng import gzip_ng as _gzip_ng
    from zlib_ng import zlib_ng as _zlib_ng

    _GzipReader: type[gzip.GzipFile] = _gzip_ng.GzipNGFile
    _INFLATE_ERRORS: tuple[type[BaseException], ...] = (gzip.BadGzipFile, zlib.error,
                                                        _zlib_ng.error, OSError)
except ImportError:  # pragma: no cover - a platform without zlib-ng wheels
    _GzipReader = gzip.GzipFile
    _INFLATE_ERRORS = (gzip.BadGzipFile, zlib.error, OSError)

log = logging.getLogger(__name__)

_MASK_DELTA = 0xA282EAD8
_GZIP_MAGIC = b"\x1f\x8b"
_HEADER = struct.Struct("<QI")
_U32 = struct.Struct("<I")
# Chunked reads: large enough that Python overhead per record is negligible for pileups.
_READ_CHUNK = 4 << 20
# Guard against absurd lengths from a corrupt-but-CRC-colliding header (2^-32) or a
# non-TFRecord file: nothing DeepVariant writes comes close to 2 GiB per record.
_MAX_RECORD = 1 << 31

if google_crc32c.implementation != "c":  # pragma: no cover - depends on the install
    log.warning(
        "google_crc32c is using its pure-Python fallback; reading examples will be very slow. "
        "Reinstall google-crc32c with a wheel for this platform."
    )


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """TFRecord's masked CRC-32C: CRC rotated right by 15 bits plus ``0xa282ead8`` (mod 2^32).

    TensorFlow masks CRCs so that a CRC computed over data that itself contains CRCs does
    not degenerate; the mask must match bit for bit or TF rejects the file.
    """
    crc = google_crc32c.value(bytes(data) if isinstance(data, memoryview) else data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask_crc32c(masked: int) -> int:
    """Inverse of the mask (for diagnostics: shows the raw CRC in error messages)."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


@dataclass
class ReadStats:
    """Counters shared by a read (pass one in to see what ``skip_corrupt`` skipped).

    ``skipped`` lists ``(path, record_index, reason)`` for every skipped record so that a
    run can report exactly which records are missing from its output, not just how many.
    """

    files: int = 0
    records: int = 0
    corrupt_skipped: int = 0
    skipped: list[tuple[str, int, str]] = field(default_factory=list)
    #: log each skip (silent data loss is the worst outcome); False where the caller
    #: reports them itself (extraction, whose loader processes all read every record)
    report: bool = True

    def note_skip(self, path: str, record: int, reason: str) -> None:
        """Record one skipped record (and log it unless the caller reports skips)."""
        self.corrupt_skipped += 1
        self.skipped.append((path, record, reason))
        if self.report:
            report_skip(path, record, reason)


def report_skip(path: str, record: int, reason: str) -> None:
    """The one line that says a record was skipped (wherever skips are reported)."""
    log.warning("skipping corrupt record %s, record %d: %s", path, record, reason)


def is_gzip(path: str | os.PathLike) -> bool:
    """True when the file starts with the gzip magic bytes (suffix is irrelevant)."""
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


class _ChunkReader:
    """Exact-size reads over a stream, pulling large chunks so per-record cost stays flat.

    ``gzip.GzipFile`` already handles multi-member files; this wrapper turns its two
    failure modes (``EOFError`` = stream cut short, ``BadGzipFile``/``zlib.error`` = bit rot)
    into :class:`ExampleFormatError` with the record index the failure hit.

    A failing chunked read returns nothing, although the stream inflates fine up to the
    damage: a shard cut short by a killed make_examples would lose up to a chunk (~25
    pileups) of intact records and name the wrong record. So on such a failure the file is
    inflated again from the start by :func:`_salvage_gzip`, everything intact past what was
    already delivered is served, and the error is raised at the first record it cuts into.
    """

    def __init__(self, raw: BinaryIO, path: str, gz: bool):
        self._raw = raw
        self._path = path
        self._gz = gz
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._delivered = 0  # bytes of the (inflated) stream appended to _buf so far
        self._damage: str | None = None  # why the stream ends early, once salvaged

    def _fill(self, need: int, record: int) -> None:
        """Make at least ``need`` unread bytes available, or stop at EOF."""
        while len(self._buf) - self._pos < need and not self._eof:
            if self._pos:
                del self._buf[: self._pos]
                self._pos = 0
            try:
                chunk = self._raw.read(max(_READ_CHUNK, need - len(self._buf)))
            except EOFError as e:
                self._salvage(record, "truncated gzip stream (file ends before the gzip end "
                                      f"marker: {e})", e)
                break
            except _INFLATE_ERRORS as e:
                what = "gzip" if self._gz else "file"
                self._salvage(record, f"corrupt {what} data: {e}", e)
                break
            if not chunk:
                self._eof = True
            else:
                self._buf += chunk
                self._delivered += len(chunk)
        if self._damage is not None and len(self._buf) - self._pos < need:
            raise ExampleFormatError(self._path, record, self._damage)

    def _salvage(self, record: int, reason: str, error: BaseException) -> None:
        """Serve the intact rest of a damaged gzip stream, then fail with ``reason``."""
        if not self._gz:
            raise ExampleFormatError(self._path, record, reason) from error
        # What the failed read lost is at most one read's worth plus the inflater's own
        # buffer; the cap only matters if zlib-ng and zlib ever disagree about a stream.
        rest, why = _salvage_gzip(self._path, self._delivered, limit=8 * _READ_CHUNK)
        self._buf += rest
        self._delivered += len(rest)
        self._eof = True
        # The re-inflation's own verdict is the precise one (it read the same bytes).
        self._damage = why or reason

    def read(self, n: int, record: int) -> bytes:
        """Up to ``n`` bytes (fewer only at EOF)."""
        self._fill(n, record)
        with memoryview(self._buf) as mv:  # one copy: buffer -> immutable payload
            out = bytes(mv[self._pos : self._pos + n])
        self._pos += len(out)
        return out

    def at_eof(self, record: int) -> bool:
        self._fill(1, record)
        return self._pos >= len(self._buf)


_SALVAGE_PIECE = 1 << 16


def _salvage_gzip(path: str, skip: int, limit: int) -> tuple[bytes, str | None]:
    """Inflate ``path`` from the start as far as it is intact; return the bytes after the
    first ``skip`` (at most ``limit`` of them) and why the stream stops early (None when it
    turned out whole, or the limit was reached first).

    Only for error paths: a pass over the whole file with the stdlib's zlib, in bounded
    memory (the first ``skip`` bytes are dropped as they come). Compressed input goes in
    small pieces and a piece that fails is fed again byte by byte from a saved state, so
    the output stops exactly where the damage starts. Multi-member files are followed.
    """
    kept = bytearray()
    seen = 0

    def take(data: bytes) -> None:
        nonlocal seen
        start = max(0, skip - seen)
        if start < len(data):
            kept.extend(memoryview(data)[start:])
        seen += len(data)

    d = zlib.decompressobj(31)  # always inside a member: its end returns or starts the next
    with open(path, "rb") as fh:
        pending = b""
        while True:
            if len(kept) >= limit:
                return bytes(kept[:limit]), None
            piece = pending or fh.read(_SALVAGE_PIECE)
            pending = b""
            if not piece:
                return bytes(kept), "truncated gzip stream (file ends before the gzip end marker)"
            saved = d.copy()
            try:
                take(d.decompress(piece))
            except zlib.error:
                d = saved
                for i in range(len(piece)):
                    try:
                        take(d.decompress(piece[i : i + 1]))
                    except zlib.error as e:
                        return bytes(kept), f"corrupt gzip data: {e}"
            if d.eof:
                # Another member, zero padding (gzip allows it) or the end; anything else
                # is junk after the last member.
                pending = d.unused_data.lstrip(b"\0")
                while len(pending) < 2 and (more := fh.read(_SALVAGE_PIECE)):
                    pending = (pending + more).lstrip(b"\0")
                if not pending:
                    return bytes(kept), None
                if pending[:2] != _GZIP_MAGIC:
                    return bytes(kept), "corrupt gzip data: trailing bytes after the last member"
                d = zlib.decompressobj(31)


@contextlib.contextmanager
def _open_stream(path: str) -> Iterator[tuple[BinaryIO, bool]]:
    raw = open(path, "rb")  # noqa: SIM115 - closed in finally, possibly via GzipFile
    try:
        gz = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        if gz:
            with _GzipReader(fileobj=raw, mode="rb") as g:
                yield g, True
        else:
            yield raw, False
    finally:
        raw.close()


def iter_records(
    path: str | os.PathLike,
    *,
    skip_corrupt: bool = False,
    start: int = 0,
    stats: ReadStats | None = None,
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(record_index, payload)`` for every record of one TFRecord file.

    ``record_index`` is the record's position in the file (0-based, corrupt records
    included), so indices stay stable whether or not records were skipped. Records before
    ``start`` are still read and CRC-checked (gzip cannot seek) but not yielded; this is how
    an interrupted extraction resumes. Both CRCs are verified for every record.
    """
    spath = str(path)
    try:
        size = os.path.getsize(spath)
    except OSError as e:
        raise ExampleFormatError(spath, None, f"cannot open: {e.strerror or e}") from e
    if size == 0:
        raise ExampleFormatError(
            spath, None, "empty file (0 bytes): not a TFRecord file (truncated or never written)"
        )
    stats = ReadStats() if stats is None else stats
    stats.files += 1

    def skip(record: int, reason: str) -> None:
        if record >= start:  # earlier ones were counted and reported by the run that read them
            stats.note_skip(spath, record, reason)

    with _open_stream(spath) as (stream, gz):
        records = _framed_records(_ChunkReader(stream, spath, gz), spath, gz)
        while True:
            try:
                idx, payload, intact = next(records)
            except StopIteration:
                return
            except ExampleFormatError as e:
                # The framing is lost: nothing after this point can be located.
                if not skip_corrupt:
                    raise
                skip(e.record if e.record is not None else 0,
                     f"{e.reason}; the rest of this file is skipped")
                return
            if not intact:
                reason = f"payload CRC mismatch ({len(payload)}-byte record is corrupt)"
                if not skip_corrupt:
                    raise ExampleFormatError(spath, idx, reason)
                skip(idx, reason)
                continue
            if idx >= start:
                stats.records += 1
                yield idx, payload


def _framed_records(rd: _ChunkReader, spath: str, gz: bool
                    ) -> Iterator[tuple[int, bytes, bool]]:
    """``(record_index, payload, payload CRC ok)`` for every framed record of one stream;
    raises ExampleFormatError where the framing is lost (see the module docstring)."""
    idx = 0
    while not _at_end(rd, idx):
        header = rd.read(12, idx)
        if len(header) < 12:
            raise ExampleFormatError(
                spath,
                idx,
                f"truncated record header ({len(header)} of 12 bytes before end of data)",
            )
        length, len_crc = _HEADER.unpack(header)
        if masked_crc32c(header[:8]) != len_crc:
            # No resync possible: the next record's offset depends on this length.
            raise ExampleFormatError(
                spath,
                idx,
                "length CRC mismatch: record header is corrupt, so the next record "
                "cannot be found" + ("" if gz else " (is this a TFRecord file?)"),
            )
        if length > _MAX_RECORD:
            raise ExampleFormatError(
                spath, idx, f"corrupt record header: implausible length {length}"
            )
        payload = rd.read(length, idx)
        if len(payload) < length:
            raise ExampleFormatError(
                spath,
                idx,
                f"truncated record: {len(payload)} of {length} payload bytes before end of data",
            )
        tail = rd.read(4, idx)
        if len(tail) < 4:
            raise ExampleFormatError(
                spath, idx, "truncated record: payload CRC missing at end of data"
            )
        yield idx, payload, masked_crc32c(payload) == _U32.unpack(tail)[0]
        idx += 1


def _at_end(rd: _ChunkReader, idx: int) -> bool:
    """Whether the stream ends before record ``idx``. Damage found there, after the last
    complete record, is said to be there rather than blamed on a record ``idx`` that does
    not exist (e.g. a gzip trailer whose checksum fails: some record was bit-rotted)."""
    try:
        return rd.at_eof(idx)
    except ExampleFormatError as e:  # raised only when no byte of record idx is left
        where = f"after record {idx - 1}, the last complete one" if idx else "before any record"
        raise ExampleFormatError(e.path, idx, f"{e.reason} ({where})") from e


def count_records(path: str | os.PathLike, *, skip_corrupt: bool = False) -> int:
    """Number of (valid) records in one file; reads the whole file."""
    return sum(1 for _ in iter_records(path, skip_corrupt=skip_corrupt))


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


class TFRecordWriter:
    """Write TFRecords atomically: to a temp file beside the target, renamed on ``close()``.

    Atomic because a crashed writer must never leave a plausible-looking half file behind
    (a truncated shard that happens to end on a record boundary reads as valid). gzip is
    used when the name ends in ``.gz`` unless ``compress`` says otherwise; the gzip header
    carries mtime 0 so identical input gives identical bytes.
    """

    def __init__(self, path: str | os.PathLike, compress: bool | None = None, *, level: int = 6):
        self.path = Path(path)
        if self.path.is_dir():  # refuse before writing a temp file that could not replace it
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(self.path))
        self.compress = self.path.name.endswith(".gz") if compress is None else bool(compress)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        self._tmp = Path(tmp)
        give_default_mode(tmp)
        self._raw: BinaryIO = os.fdopen(fd, "wb")
        self._out: BinaryIO = (
            gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=level, mtime=0)  # type: ignore[assignment]
            if self.compress
            else self._raw
        )
        self.records = 0
        self._closed = False

    def write(self, payload: bytes | bytearray | memoryview) -> None:
        """Append one record."""
        if self._closed:
            raise ValueError(f"TFRecordWriter for {self.path} is closed")
        data = bytes(payload)
        header = struct.pack("<Q", len(data))
        self._out.write(header)
        self._out.write(_U32.pack(masked_crc32c(header)))
        self._out.write(data)
        self._out.write(_U32.pack(masked_crc32c(data)))
        self.records += 1

    def close(self) -> None:
        """Flush, fsync and rename the temp file onto the target."""
        if self._closed:
            return
        self._closed = True
        if self._out is not self._raw:
            self._out.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Discard everything written; the target is left untouched."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            if self._out is not self._raw:
                self._out.close()
        with contextlib.suppress(Exception):
            self._raw.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:  # pragma: no cover - only on leaked writers
        if not getattr(self, "_closed", True):
            self.abort()


def write_records(
    path: str | os.PathLike, payloads: Iterable[bytes], compress: bool | None = None
) -> int:
    """Write all ``payloads`` to ``path`` (atomically); returns the record count."""
    with TFRecordWriter(path, compress=compress) as w:
        for p in payloads:
            w.write(p)
        return w.records


# --------------------------------------------------------------------------------------
# Shard specs
# --------------------------------------------------------------------------------------

# DeepVariant's sharded_file_utils: anything, '@', positive integer, optional '.suffix'.
_SHARD_SPEC = re.compile(r"^(?P<base>.+)@(?P<n>\d+)(?P<suffix>\.[^/@]*)?$")
_SHARD_NAME = re.compile(r"-(?P<i>\d{5,})-of-(?P<n>\d{5,})")
_GLOB_CHARS = re.compile(r"[*?\[]")
# Side files make_examples writes next to shards; a glob like `name-*` must not pick them up.
_SIDE_FILE_SUFFIXES = (".example_info.json", ".run_info.pbtxt")


def shard_name(base: str, index: int, count: int, suffix: str = "") -> str:
    """``base-IIIII-of-NNNNN.suffix`` with zero padding max(5, digits(count)), as DV does."""
    width = max(5, len(str(count)))
    return f"{base}-{index:0{width}d}-of-{count:0{width}d}{suffix}"


def _shard_sort_key(p: Path) -> tuple:
    m = _SHARD_NAME.search(p.name)
    if m is None:
        return (str(p.parent), p.name, -1)
    stem = p.name[: m.start()] + "@" + p.name[m.end() :]
    return (str(p.parent), stem, int(m.group("i")))


def _expand_one(part: str) -> list[Path]:
    part = os.path.expanduser(part)
    m = _SHARD_SPEC.match(part)
    if m and not _GLOB_CHARS.search(part):
        n = int(m.group("n"))
        if n <= 0:
            raise ExampleFormatError(part, None, "shard count after '@' must be positive")
        base, suffix = m.group("base"), m.group("suffix") or ""
        files = [Path(shard_name(base, i, n, suffix)) for i in range(n)]
        missing = [i for i, f in enumerate(files) if not f.is_file()]
        if missing:
            shown = ", ".join(str(i) for i in missing[:20]) + (" ..." if len(missing) > 20 else "")
            raise ExampleFormatError(
                part,
                None,
                f"{len(missing)} of {n} shards missing (indices {shown}); "
                f"first missing file: {files[missing[0]]}",
            )
        return files
    if _GLOB_CHARS.search(part):
        hits = [
            Path(h)
            for h in _glob.glob(part)
            if os.path.isfile(h) and not h.endswith(_SIDE_FILE_SUFFIXES)
        ]
        if not hits:
            raise ExampleFormatError(part, None, "glob pattern matches no files")
        return sorted(hits, key=_shard_sort_key)
    p = Path(part)
    if p.is_dir():
        raise ExampleFormatError(
            part, None, "is a directory; give a file, a glob or a sharded spec like name@16.gz"
        )
    if not p.is_file():
        raise ExampleFormatError(part, None, "no such file")
    return [p]


def expand_spec(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Turn a DeepVariant-style examples spec into an ordered list of existing files.

    Accepts a single file (``x.tfrecord-00003-of-00016.gz`` means just that shard), a glob,
    a sharded spec ``name@N.gz`` (every shard must exist; missing ones are listed), or a
    comma-separated list / Python list of those. Within a glob, files are ordered by shard
    index; parts of a list keep the order given (so ``a.gz,b.gz`` reads ``a`` first) and a
    file named twice is read once. This order defines the row order of everything built
    from the examples, so it must be deterministic.
    """
    if isinstance(spec, (str, os.PathLike)):
        parts = [s.strip() for s in os.fspath(spec).split(",")]
    else:
        parts = [os.fspath(s).strip() for s in spec]
    parts = [p for p in parts if p]
    if not parts:
        raise ExampleFormatError(str(spec), None, "empty examples spec")
    out: list[Path] = []
    seen: set[str] = set()
    for part in parts:
        for f in _expand_one(part):
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


__all__ = [
    "ReadStats",
    "TFRecordWriter",
    "count_records",
    "expand_spec",
    "is_gzip",
    "iter_records",
    "masked_crc32c",
    "shard_name",
    "unmask_crc32c",
    "write_records",
]
