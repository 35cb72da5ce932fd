"""dvtorch.files: the one streamed sha256 used by conversion, bundles, downloads and STOREs,
and the mode atomically written files end up with."""

import hashlib
import os
import stat

import pytest

import dvtorch
from dvtorch.files import CHUNK, give_default_mode, sha256_file
from probing.examples import write_example_info
from probing.store import atomic_write_json
from probing.tfrecord import write_records


def test_sha256_file_equals_hashlib_across_chunk_boundaries(tmp_path):
    for size in (0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 7):
        data = bytes((i * 31 + size) % 251 for i in range(size))
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        assert sha256_file(path) == hashlib.sha256(data).hexdigest()
        assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.usefixtures("umask_027")
def test_atomically_written_files_and_dirs_get_the_umask_mode_not_0600(tmp_path):
    """Temp files (0600) and dirs (0700) renamed into place would keep colleagues on a
    shared machine out of STOREs, shards and bundles; they get what open/mkdir give."""
    f = tmp_path / "f"
    f.touch(mode=0o600)
    give_default_mode(f)
    assert _mode(f) == 0o640
    atomic_write_json(tmp_path / "store.json", {"a": 1})
    assert _mode(tmp_path / "store.json") == 0o640
    write_records(tmp_path / "x.tfrecord.gz", [b"abc"])
    assert _mode(tmp_path / "x.tfrecord.gz") == 0o640
    assert _mode(write_example_info(tmp_path / "x.tfrecord.gz", (100, 221, 7),
                                    [1, 2, 3, 4, 5, 6, 19], "1.6.0")) == 0o640
    bundle = dvtorch.reference_bundle(tmp_path / "bundle", seed=0)
    assert _mode(bundle) == 0o750
    assert {_mode(p) for p in bundle.iterdir()} == {0o640}


def test_writing_over_a_directory_is_refused_without_leaving_a_temp_file(tmp_path):
    from probing.tfrecord import TFRecordWriter

    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_write_json(target, {"a": 1})
    with pytest.raises(IsADirectoryError, match="is a directory"):
        TFRecordWriter(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
