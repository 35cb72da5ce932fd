"""Memory estimates that decide whether extraction may run whole batches per thread."""

from __future__ import annotations

from pathlib import Path

import pytest

from dvtorch import memory

GB = 1 << 30


def _root(tmp_path: Path, meminfo_kb: int | None = None, v2: tuple[str, str] | None = None,
          v1: tuple[str, str] | None = None) -> Path:
    if meminfo_kb is not None:
        (tmp_path / "proc").mkdir(parents=True)
        (tmp_path / "proc/meminfo").write_text(
            f"MemTotal:       99999999 kB\nMemFree:          123 kB\n"
            f"MemAvailable:   {meminfo_kb} kB\n")
    if v2 is not None:
        d = tmp_path / "sys/fs/cgroup"
        d.mkdir(parents=True)
        (d / "memory.max").write_text(v2[0] + "\n")
        (d / "memory.current").write_text(v2[1] + "\n")
    if v1 is not None:
        d = tmp_path / "sys/fs/cgroup/memory"
        d.mkdir(parents=True)
        (d / "memory.limit_in_bytes").write_text(v1[0] + "\n")
        (d / "memory.usage_in_bytes").write_text(v1[1] + "\n")
    return tmp_path


def test_available_is_memavailable_without_a_cgroup_limit(tmp_path):
    assert memory.available_bytes(_root(tmp_path, 8 * 1024 * 1024)) == 8 * GB
    assert memory.available_bytes(_root(tmp_path / "v2max", 8 * 1024 * 1024,
                                        v2=("max", str(GB)))) == 8 * GB
    # cgroup v1 writes a huge number for "no limit"
    assert memory.available_bytes(_root(tmp_path / "v1", 8 * 1024 * 1024,
                                        v1=(str((1 << 63) - 4096), str(GB)))) == 8 * GB


def test_a_container_limit_lowers_what_is_available(tmp_path):
    root = _root(tmp_path / "v2", 64 * 1024 * 1024, v2=(str(6 * GB), str(2 * GB)))
    assert memory.available_bytes(root) == 4 * GB
    root = _root(tmp_path / "v1", 64 * 1024 * 1024, v1=(str(3 * GB), str(GB)))
    assert memory.available_bytes(root) == 2 * GB
    # over the limit already: nothing left, not a negative number
    root = _root(tmp_path / "full", 64 * 1024 * 1024, v2=(str(GB), str(2 * GB)))
    assert memory.available_bytes(root) == 0


def test_unknown_when_nothing_can_be_read(tmp_path):
    assert memory.available_bytes(tmp_path) is None


def test_per_example_estimate_covers_the_measured_peak():
    # measured peak growth per example (100 x 221 pileups, one thread): 4.3-5.2 MB fp32
    fp32 = memory.activation_bytes_per_example((100, 221, 7), 4)
    assert 5.2e6 <= fp32 <= 7e6
    assert memory.activation_bytes_per_example((100, 221, 7), 2) == fp32 // 2
    # proportional to the pileup's area, not its channels
    assert memory.activation_bytes_per_example((100, 442, 9), 4) == 2 * fp32


@pytest.mark.parametrize(("depth", "batch", "available", "fits"), [
    (2, 64, 24 * GB, True),       # this machine: ~0.7 GB of 24
    (16, 64, 64 * GB, True),      # ~5.8 GB of a 64 GB box
    (8, 64, 10 * GB, False),      # ~2.9 GB > a quarter of a 10 GB laptop's free memory
    (8, 16, 10 * GB, True),       # a smaller batch fits
    (2, 64, None, False),         # unknown: keep one batch's worth
    (1, 64, None, True),
])
def test_whole_batches_fit_in_a_quarter_of_what_is_available(depth, batch, available, fits):
    ok, need = memory.whole_batches_fit(depth, batch, (100, 221, 7), 4, available)
    assert ok is fits
    assert need == depth * batch * memory.activation_bytes_per_example((100, 221, 7), 4)


@pytest.mark.parametrize(("depth", "available"), [(2, 2 * GB), (8, 10 * GB), (16, 64 * GB)])
def test_the_largest_batch_that_fits_is_the_fit_rules_boundary(depth, available):
    shape = (100, 221, 7)
    largest = memory.largest_batch_that_fits(depth, shape, 4, available)
    assert largest >= 1
    assert memory.whole_batches_fit(depth, largest, shape, 4, available)[0]
    assert not memory.whole_batches_fit(depth, largest + 1, shape, 4, available)[0]
    assert memory.largest_batch_that_fits(depth, shape, 4, None) == 0
