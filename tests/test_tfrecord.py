"""TFRecord framing, CRCs, gzip handling, atomic writing and shard-spec expansion."""

from __future__ import annotations

import gzip
import random
import re
import struct
import zlib
from pathlib import Path

import google_crc32c
import pytest

from dvtorch.errors import ExampleFormatError
from probing.tfrecord import (
    ReadStats,
    TFRecordWriter,
    count_records,
    expand_spec,
    is_gzip,
    iter_records,
    masked_crc32c,
    shard_name,
    unmask_crc32c,
    write_records,
)

PAYLOADS = [b"alpha", b"", b"x" * 70_000, bytes(range(256)) * 3, b"omega"]


@pytest.fixture(params=["zlib-ng", "stdlib"])
def gzip_reader(request, monkeypatch):
    """Gzip cases run with zlib-ng (when installed) and with the stdlib fallback."""
    import probing.tfrecord as tfr

    if request.param == "stdlib":
        monkeypatch.setattr(tfr, "_GzipReader", gzip.GzipFile)
        monkeypatch.setattr(tfr, "_INFLATE_ERRORS", (gzip.BadGzipFile, zlib.error, OSError))
    elif tfr._GzipReader is gzip.GzipFile:
        pytest.skip("zlib-ng is not installed")
    return request.param


def _offsets(payloads: list[bytes]) -> list[int]:
    """Byte offset of each record in an uncompressed TFRecord file."""
    out, pos = [], 0
    for p in payloads:
        out.append(pos)
        pos += 16 + len(p)
    return out


# ---- CRC -------------------------------------------------------------------------------


def test_masked_crc_matches_definition_and_known_vector():
    # CRC-32C check value of "123456789" is 0xE3069283 (Castagnoli).
    assert google_crc32c.value(b"123456789") == 0xE3069283
    crc = 0xE3069283
    expected = ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
    assert masked_crc32c(b"123456789") == expected
    assert unmask_crc32c(expected) == crc


def test_framing_bytes_are_exact(tmp_path: Path):
    f = tmp_path / "one.tfrecord"
    write_records(f, [b"hello"])
    raw = f.read_bytes()
    length = struct.pack("<Q", 5)
    assert raw[:8] == length
    assert struct.unpack("<I", raw[8:12])[0] == masked_crc32c(length)
    assert raw[12:17] == b"hello"
    assert struct.unpack("<I", raw[17:21])[0] == masked_crc32c(b"hello")
    assert len(raw) == 21


# ---- round trips, gzip detection ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "compress", "gz"),
    [
        ("a.tfrecord", None, False),
        ("a.tfrecord.gz", None, True),
        ("gzip_without_suffix.tfrecord", True, True),
        ("plain_with_gz_suffix.gz", False, False),
    ],
)
@pytest.mark.usefixtures("gzip_reader")
def test_roundtrip_and_gzip_detected_by_magic(tmp_path: Path, name, compress, gz):
    f = tmp_path / name
    assert write_records(f, PAYLOADS, compress=compress) == len(PAYLOADS)
    assert is_gzip(f) is gz
    assert list(iter_records(f)) == list(enumerate(PAYLOADS))
    assert count_records(f) == len(PAYLOADS)


@pytest.mark.usefixtures("gzip_reader")
def test_multi_member_gzip(tmp_path: Path):
    a, b = tmp_path / "a.tfrecord", tmp_path / "b.tfrecord"
    write_records(a, PAYLOADS[:2], compress=False)
    write_records(b, PAYLOADS[2:], compress=False)
    joined = tmp_path / "joined.gz"
    joined.write_bytes(gzip.compress(a.read_bytes()) + gzip.compress(b.read_bytes()))
    assert [p for _, p in iter_records(joined)] == PAYLOADS


def test_start_skips_records_but_keeps_indices(tmp_path: Path):
    f = tmp_path / "s.tfrecord.gz"
    write_records(f, PAYLOADS)
    assert [i for i, _ in iter_records(f, start=3)] == [3, 4]
    assert list(iter_records(f, start=99)) == []


@pytest.mark.usefixtures("gzip_reader")
def test_gzip_with_zero_records_is_valid_and_empty(tmp_path: Path):
    f = tmp_path / "none.tfrecord.gz"
    write_records(f, [])
    assert f.stat().st_size > 0
    assert list(iter_records(f)) == []


# ---- corruption ----------------------------------------------------------------------------


def test_flipped_payload_byte_is_a_crc_error(tmp_path: Path):
    f = tmp_path / "c.tfrecord"
    write_records(f, PAYLOADS)
    raw = bytearray(f.read_bytes())
    raw[_offsets(PAYLOADS)[2] + 12 + 100] ^= 0x01
    f.write_bytes(bytes(raw))
    it = iter_records(f)
    assert [i for i, _ in (next(it), next(it))] == [0, 1]
    with pytest.raises(ExampleFormatError) as ei:
        next(it)
    assert ei.value.record == 2
    assert "CRC" in str(ei.value) and str(f) in str(ei.value)


def test_flipped_stored_crc_is_a_crc_error(tmp_path: Path):
    f = tmp_path / "c.tfrecord"
    write_records(f, PAYLOADS[:1])
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0x80  # the stored payload CRC itself
    f.write_bytes(bytes(raw))
    with pytest.raises(ExampleFormatError, match="payload CRC mismatch"):
        list(iter_records(f))


def test_skip_corrupt_counts_and_continues(tmp_path: Path):
    f = tmp_path / "c.tfrecord"
    write_records(f, PAYLOADS)
    raw = bytearray(f.read_bytes())
    for rec in (0, 3):
        raw[_offsets(PAYLOADS)[rec] + 12] ^= 0xFF  # first payload byte
    f.write_bytes(bytes(raw))
    stats = ReadStats()
    got = list(iter_records(f, skip_corrupt=True, stats=stats))
    assert [i for i, _ in got] == [1, 2, 4]
    assert [p for _, p in got] == [PAYLOADS[1], PAYLOADS[2], PAYLOADS[4]]
    assert stats.corrupt_skipped == 2 and stats.records == 3 and stats.files == 1
    assert [(r, "CRC" in why) for _, r, why in stats.skipped] == [(0, True), (3, True)]


def test_corrupt_length_is_an_error_naming_the_record(tmp_path: Path):
    f = tmp_path / "c.tfrecord"
    write_records(f, PAYLOADS)
    raw = bytearray(f.read_bytes())
    raw[_offsets(PAYLOADS)[1]] ^= 0x04  # length field of record 1
    f.write_bytes(bytes(raw))
    it = iter_records(f)
    assert next(it)[0] == 0
    with pytest.raises(ExampleFormatError, match=r"length CRC.*cannot be found") as ei:
        next(it)
    assert ei.value.record == 1


def test_skip_corrupt_skips_the_rest_of_a_file_whose_framing_is_lost(tmp_path: Path):
    """Past a corrupt length nothing can be located: the rest of the file is one counted
    skip at the record it cuts into, and reading goes on with the caller's next file."""
    f = tmp_path / "c.tfrecord"
    write_records(f, PAYLOADS)
    raw = bytearray(f.read_bytes())
    raw[_offsets(PAYLOADS)[2]] ^= 0x04  # length field of record 2
    f.write_bytes(bytes(raw))
    stats = ReadStats()
    got = list(iter_records(f, skip_corrupt=True, stats=stats))
    assert [i for i, _ in got] == [0, 1]
    assert stats.corrupt_skipped == 1
    (path, record, why), = stats.skipped
    assert record == 2 and "length CRC" in why and "rest of this file is skipped" in why


def test_a_skip_before_the_resume_point_is_not_counted_again(tmp_path: Path):
    """A resumed run re-frames the records before its cursor; skips there were counted and
    reported by the run that read them."""
    f = tmp_path / "c.tfrecord"
    write_records(f, PAYLOADS)
    raw = bytearray(f.read_bytes())
    raw[_offsets(PAYLOADS)[1] + 12] ^= 0x01  # payload of record 1
    raw[_offsets(PAYLOADS)[3]] ^= 0x04  # length field of record 3
    f.write_bytes(bytes(raw))
    stats = ReadStats()
    got = list(iter_records(f, skip_corrupt=True, start=2, stats=stats))
    assert [i for i, _ in got] == [2]
    assert [r for _, r, _ in stats.skipped] == [3]
    later = ReadStats()
    assert list(iter_records(f, skip_corrupt=True, start=4, stats=later)) == []
    assert later.skipped == []


@pytest.mark.usefixtures("gzip_reader")
def test_skip_corrupt_keeps_every_intact_record_of_a_truncated_gzip(tmp_path: Path):
    f = tmp_path / "t.tfrecord.gz"
    payloads = [bytes([i]) * 20_000 + bytes(range(256)) * 40 for i in range(6)]
    write_records(f, payloads)
    full = [i for i, _ in iter_records(f)]
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) - 30])  # the trailer and the end of the last record
    stats = ReadStats()
    got = [i for i, _ in iter_records(f, skip_corrupt=True, stats=stats)]
    assert got == full[: len(got)] and len(got) >= 1
    (_, record, why), = stats.skipped
    assert record == len(got) and "truncated" in why


@pytest.mark.parametrize("cut", [5, 12 + 3, 16 + 5 + 12 + 2])
def test_truncated_plain_record(tmp_path: Path, cut):
    f = tmp_path / "t.tfrecord"
    write_records(f, PAYLOADS[:2])
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) - cut])
    with pytest.raises(ExampleFormatError, match="truncated"):
        list(iter_records(f))


@pytest.mark.usefixtures("gzip_reader")
def test_truncated_gzip(tmp_path: Path):
    f = tmp_path / "t.tfrecord.gz"
    write_records(f, [bytes(range(256)) * 400 for _ in range(4)])
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ExampleFormatError, match="truncated") as ei:
        list(iter_records(f))
    assert str(f) in str(ei.value)


def _flushed_gzip(path: Path, payloads: list[bytes]) -> list[tuple[int, int]]:
    """A gzip TFRecord file with a full deflate flush after every record; returns each
    record's ``(start, end)`` byte range in the *compressed* file, so a test can cut or
    damage the file inside a chosen record."""
    comp = zlib.compressobj(6, zlib.DEFLATED, 31)
    out, ranges = bytearray(), []
    for p in payloads:
        start = len(out)
        length = struct.pack("<Q", len(p))
        frame = length + struct.pack("<I", masked_crc32c(length)) + p
        out += comp.compress(frame + struct.pack("<I", masked_crc32c(p)))
        out += comp.flush(zlib.Z_FULL_FLUSH)
        ranges.append((start, len(out)))
    out += comp.flush()
    path.write_bytes(bytes(out))
    return ranges


def _pileup_like(n: int, size: int = 60_000) -> list[bytes]:
    """Compressible, distinct payloads (deflate then really codes them, not stores them)."""
    rng = random.Random(7)
    return [bytes(rng.choice(b"ACGT.") for _ in range(size)) for _ in range(n)]


def _read_until_error(path: Path) -> tuple[list[int], ExampleFormatError]:
    got = []
    with pytest.raises(ExampleFormatError) as ei:
        for idx, _ in iter_records(path):
            got.append(idx)
    return got, ei.value


@pytest.mark.usefixtures("gzip_reader")
@pytest.mark.parametrize("cut_in, cut_at", [(3, 0.5), (9, 0.1), (5, 1.0)])
def test_truncated_gzip_yields_every_complete_record_then_names_the_cut_one(
        tmp_path: Path, cut_in, cut_at):
    """A shard cut short (a killed make_examples) still gives every record before the cut,
    and the error names the first record that is missing, not the read chunk it fell in."""
    f = tmp_path / "cut.tfrecord.gz"
    ranges = _flushed_gzip(f, _pileup_like(12))
    start, end = ranges[cut_in]
    cut = start + int((end - start) * cut_at)
    f.write_bytes(f.read_bytes()[:cut])
    complete = cut_in + (cut == end)  # cut exactly at a record's flush point: it is whole
    got, err = _read_until_error(f)
    assert got == list(range(complete))
    assert err.record == complete
    assert "truncated" in str(err) and str(f) in str(err)


@pytest.mark.usefixtures("gzip_reader")
def test_damaged_deflate_data_yields_the_records_before_the_damage(tmp_path: Path):
    f = tmp_path / "rot.tfrecord.gz"
    ranges = _flushed_gzip(f, _pileup_like(12))
    raw = bytearray(f.read_bytes())
    start, end = ranges[7]
    raw[(start + end) // 2] ^= 0x5A
    f.write_bytes(bytes(raw))
    got, err = _read_until_error(f)
    assert got == list(range(7))
    assert err.record == 7
    assert re.search("(?i)corrupt|CRC", str(err))


def test_salvage_inflates_members_padding_and_stops_at_damage(tmp_path: Path):
    """The error-path re-inflation: follows members and zero padding like gzip, names junk
    and truncation, drops the bytes already served and honours its memory cap."""
    from probing.tfrecord import _salvage_gzip

    parts = _pileup_like(3, 20_000)
    members = [gzip.compress(p) for p in parts]

    def salvage(name: str, raw: bytes, skip: int = 0, limit: int = 1 << 30):
        f = tmp_path / name
        f.write_bytes(raw)
        return _salvage_gzip(str(f), skip, limit)

    assert salvage("multi", b"".join(members)) == (b"".join(parts), None)
    padded = members[0] + b"\0" * 100 + members[1] + b"\0" * 3
    assert salvage("padded", padded) == (parts[0] + parts[1], None)
    out, why = salvage("junk", members[0] + b"xyz")
    assert out == parts[0] and "trailing bytes" in why
    out, why = salvage("cut", members[0] + members[1][: len(members[1]) // 2])
    assert out.startswith(parts[0]) and parts[1].startswith(out[len(parts[0]):])
    assert len(out) > len(parts[0]) and "truncated" in why
    assert salvage("skip", b"".join(members), skip=25_000) == (b"".join(parts)[25_000:], None)
    assert salvage("cap", b"".join(members), limit=1000) == (parts[0][:1000], None)


@pytest.mark.usefixtures("gzip_reader")
def test_gzip_trailer_damage_is_corrupt(tmp_path: Path):
    f = tmp_path / "t.tfrecord.gz"
    write_records(f, PAYLOADS)
    raw = bytearray(f.read_bytes())
    raw[-6] ^= 0xFF  # inside the gzip CRC32 trailer
    f.write_bytes(bytes(raw))
    with pytest.raises(ExampleFormatError, match="(?i)corrupt|CRC"):
        list(iter_records(f))


def test_empty_and_missing_files(tmp_path: Path):
    f = tmp_path / "empty.tfrecord.gz"
    f.write_bytes(b"")
    with pytest.raises(ExampleFormatError, match="empty"):
        list(iter_records(f))
    with pytest.raises(ExampleFormatError, match="cannot open"):
        list(iter_records(tmp_path / "nope.gz"))


def test_not_a_tfrecord_file(tmp_path: Path):
    f = tmp_path / "notes.txt"
    f.write_text("this is a text file, not TFRecords\n" * 3)
    with pytest.raises(ExampleFormatError, match="CRC"):
        list(iter_records(f))


# ---- writer ----------------------------------------------------------------------------


def test_writer_is_atomic(tmp_path: Path):
    f = tmp_path / "out.tfrecord.gz"
    with pytest.raises(RuntimeError), TFRecordWriter(f) as w:
        w.write(b"partial")
        raise RuntimeError("boom")
    assert not f.exists()
    assert list(tmp_path.iterdir()) == []
    with TFRecordWriter(f) as w:
        w.write(b"x")
        assert not f.exists()  # only visible after close
    assert f.exists() and [p for _, p in iter_records(f)] == [b"x"]
    with pytest.raises(ValueError, match="closed"):
        w.write(b"y")


def test_writer_output_is_deterministic(tmp_path: Path):
    a, b = tmp_path / "a.gz", tmp_path / "b.gz"
    write_records(a, PAYLOADS)
    write_records(b, PAYLOADS)
    assert a.read_bytes() == b.read_bytes()


# ---- shard specs -----------------------------------------------------------------------


def _touch_shards(d: Path, base: str, n: int, suffix: str = ".gz", skip=()) -> list[Path]:
    out = []
    for i in range(n):
        p = d / shard_name(base, i, n, suffix)
        if i not in skip:
            write_records(p, [str(i).encode()])
        out.append(p)
    return out


def test_shard_name_padding():
    assert shard_name("x.tfrecord", 3, 16, ".gz") == "x.tfrecord-00003-of-00016.gz"
    assert shard_name("x", 7, 123456) == "x-000007-of-123456"


def test_expand_sharded_spec(tmp_path: Path):
    shards = _touch_shards(tmp_path, "ex.tfrecord", 12)
    got = expand_spec(f"{tmp_path}/ex.tfrecord@12.gz")
    assert got == shards
    # An explicit shard name means just that file.
    assert expand_spec(str(shards[3])) == [shards[3]]


def test_expand_sharded_spec_lists_missing(tmp_path: Path):
    _touch_shards(tmp_path, "ex.tfrecord", 16, skip=(3, 11))
    with pytest.raises(ExampleFormatError, match=r"2 of 16 shards missing \(indices 3, 11\)") as ei:
        expand_spec(f"{tmp_path}/ex.tfrecord@16.gz")
    assert "ex.tfrecord-00003-of-00016.gz" in str(ei.value)
    with pytest.raises(ExampleFormatError, match="positive"):
        expand_spec(f"{tmp_path}/ex.tfrecord@0.gz")


def test_expand_glob_sorted_by_index_and_skips_side_files(tmp_path: Path):
    shards = _touch_shards(tmp_path, "ex.tfrecord", 3)
    (tmp_path / (shards[0].name + ".example_info.json")).write_text("{}")
    got = expand_spec(f"{tmp_path}/ex.tfrecord-*")
    assert got == shards
    with pytest.raises(ExampleFormatError, match="matches no files"):
        expand_spec(f"{tmp_path}/nothing-*.gz")


def test_expand_comma_list_keeps_order_and_dedupes(tmp_path: Path):
    a = _touch_shards(tmp_path, "a", 2)
    b = tmp_path / "b.tfrecord.gz"
    write_records(b, [b"b"])
    got = expand_spec(f"{b}, {tmp_path}/a@2.gz,{a[0]}")
    assert got == [b, a[0], a[1]]
    assert expand_spec([b, a[1]]) == [b, a[1]]


def test_expand_errors(tmp_path: Path):
    with pytest.raises(ExampleFormatError, match="no such file"):
        expand_spec(tmp_path / "missing.gz")
    with pytest.raises(ExampleFormatError, match="directory"):
        expand_spec(tmp_path)
    with pytest.raises(ExampleFormatError, match="empty"):
        expand_spec(" , ")
