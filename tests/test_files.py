"""dvtorch.files: the one streamed sha256 used by conversion, bundles, downloads and STOREs,
and the mode atomically written files end up with."""

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import dvtorch
from dvtorch.files import CHUNK, give_default_mode, sha256_file, sweep_dead_writers, writer_dir
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


# Makes writer dirs for the names in argv[2:] ("name" or "name:old") in argv[1], prints them,
# then exits or (with WAIT set) waits for stdin to close: a writer killed / still writing.
_WRITER = """
import os, sys
from dvtorch.files import writer_dir
for arg in sys.argv[2:]:
    name, _, kind = arg.partition(":")
    print(writer_dir(sys.argv[1], name, kind or "tmp").name, flush=True)
if os.environ.get("WAIT"):
    sys.stdin.read()
"""


def _writer(parent: Path, *names: str, wait: bool = False) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(parent), *names],
                            cwd=Path(__file__).parents[1], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "WAIT": "1" if wait else ""})
    made = [proc.stdout.readline().strip() for _ in names]
    if not wait:
        proc.wait(timeout=30)
    return proc, made


def test_sweep_removes_only_writer_dirs_of_dead_processes_on_this_machine(tmp_path):
    _, (dead,) = _writer(tmp_path, "bundle")
    live_writer, (live,) = _writer(tmp_path, "bundle", wait=True)
    _, _, _, host, dead_pid, _ = dead.split(".")
    try:
        foreign = [".bundle.x1y2z3ab",  # tempfile's own names, ours or not: unknown writer
                   f".bundle.dvprobe-tmp.other-host.{dead_pid}.abcdefgh",  # pid means nothing
                   # this machine, another PID namespace (a container with the host's name)
                   f".bundle.dvprobe-tmp.{host.rsplit('-', 1)[0]}-1.{dead_pid}.abcdefgh",
                   f".bundle.dvprobe-new.{host}.{dead_pid}.abcdefgh",  # not a kind we make
                   f"bundle.dvprobe-tmp.{host}.{dead_pid}.abcdefgh", "notes"]
        for name in foreign:
            (tmp_path / name).mkdir()
        (tmp_path / (dead + "x")).write_text("a file, not a writer dir")
        assert sweep_dead_writers(tmp_path) == [tmp_path / dead]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [live, *foreign, dead + "x"])
    finally:
        live_writer.communicate("")
    assert sweep_dead_writers(tmp_path) == [tmp_path / live]  # once its writer has ended


def test_a_set_aside_old_version_stays_until_the_name_it_was_replacing_exists_again(tmp_path):
    """A writer killed between moving the old version aside and the new one in leaves the
    only copy in its "old" dir: sweeping it then would lose the bundle."""
    _, (old,) = _writer(tmp_path, "bundle:old")
    assert sweep_dead_writers(tmp_path) == [] and (tmp_path / old).is_dir()
    (tmp_path / "bundle").mkdir()
    assert sweep_dead_writers(tmp_path) == [tmp_path / old]


def test_writer_dir_names_say_what_whose_and_where(tmp_path):
    d = writer_dir(tmp_path, "my.bundle", "old")
    host, pid = d.name.split(".dvprobe-old.")[1].split(".")[:2]
    assert d.is_dir() and d.parent == tmp_path and d.name.startswith(".my.bundle.dvprobe-old.")
    assert int(pid) == os.getpid() and host
    assert sweep_dead_writers(tmp_path) == []  # this process still runs
    with pytest.raises(ValueError, match="kind"):
        writer_dir(tmp_path, "b", "new")


def test_swap_in_dir_replaces_the_old_directory_and_leaves_nothing_beside_it(tmp_path):
    from dvtorch.files import swap_in_dir, writer_dir

    final = tmp_path / "bundle"
    for version in ("one", "two"):
        new = writer_dir(tmp_path, final.name)
        (new / "v").write_text(version)
        swap_in_dir(new, final)
        assert (final / "v").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_swap_in_dir_puts_the_old_directory_back_when_the_new_one_cannot_move_in(
        tmp_path, monkeypatch):
    import os

    from dvtorch import files

    final = tmp_path / "bundle"
    final.mkdir()
    (final / "v").write_text("old")
    new = files.writer_dir(tmp_path, final.name)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == new:
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        files.swap_in_dir(new, final)
    assert (final / "v").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bundle", new.name])


def test_a_bundle_lost_between_the_two_renames_of_a_swap_points_at_its_set_aside_copy(tmp_path):
    from dvtorch.bundle import read_meta
    from dvtorch.errors import BundleError

    bundle = tmp_path / "model"
    old = writer_dir(tmp_path, "model", "old")  # a save killed after moving the old one aside
    (old / "b").mkdir()
    (old / "b" / "bundle.json").write_text("{}")
    with pytest.raises(BundleError, match=rf"left the previous bundle at {old / 'b'} "
                       rf"\(mv {old / 'b'} {bundle}\)"):
        read_meta(bundle)
    with pytest.raises(BundleError, match=r"does not exist or is a file\)$"):
        read_meta(tmp_path / "other")  # nothing set aside for that one
