"""What the machine can give this process (``dvtorch.system``), read without torch."""

from __future__ import annotations

from pathlib import Path

from dvtorch import system

GB = 1 << 30


def _root(tmp_path: Path, meminfo_kb: int | None = None, v2: tuple[str, str] | None = None,
          v1: tuple[str, str] | None = None) -> Path:
    """A fake filesystem root with /proc/meminfo and cgroup v2 / v1 memory files."""
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
    assert system.available_bytes(_root(tmp_path, 8 * 1024 * 1024)) == 8 * GB
    assert system.available_bytes(_root(tmp_path / "v2max", 8 * 1024 * 1024,
                                        v2=("max", str(GB)))) == 8 * GB
    # cgroup v1 writes a huge number for "no limit"
    assert system.available_bytes(_root(tmp_path / "v1", 8 * 1024 * 1024,
                                        v1=(str((1 << 63) - 4096), str(GB)))) == 8 * GB


def test_a_container_limit_lowers_what_is_available(tmp_path):
    root = _root(tmp_path / "v2", 64 * 1024 * 1024, v2=(str(6 * GB), str(2 * GB)))
    assert system.available_bytes(root) == 4 * GB
    root = _root(tmp_path / "v1", 64 * 1024 * 1024, v1=(str(3 * GB), str(GB)))
    assert system.available_bytes(root) == 2 * GB
    # over the limit already: nothing left, not a negative number
    root = _root(tmp_path / "full", 64 * 1024 * 1024, v2=(str(GB), str(2 * GB)))
    assert system.available_bytes(root) == 0


def test_unknown_when_nothing_can_be_read(tmp_path):
    assert system.available_bytes(tmp_path) is None


def test_usable_memory_is_a_number_where_nothing_can_be_read(monkeypatch):
    monkeypatch.setattr(system, "available_bytes", lambda: None)
    assert system.usable_memory() > 0
    monkeypatch.setattr(system, "available_bytes", lambda: 3 * GB)
    assert system.usable_memory() == 3 * GB
