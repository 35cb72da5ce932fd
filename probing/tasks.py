"""Tasks: one extraction split over N processes, DeepVariant's way (``--task I --num-tasks N``).

DeepVariant scales ``make_examples`` by task sharding, and a cohort pipeline already runs
one process per GPU, per torchrun rank or per SLURM array task. dvprobe follows it: task
``I`` of ``N`` extracts a fixed, contiguous block of the input into its own *part* of one
STORE (``STORE/parts/part-IIIII-of-NNNNN/``), and the parts read back as one STORE in input
order (:func:`probing.store.open_store`), with no merge step. This module decides, without
torch and without talking to the other tasks:

* **Which task am I** (:func:`resolve_task`): ``--task I --num-tasks N``, or ``--task auto``
  from torchrun's ``RANK`` / ``WORLD_SIZE`` or a SLURM array's ``SLURM_ARRAY_TASK_ID`` /
  ``SLURM_ARRAY_TASK_COUNT`` (arrays that do not start at 0 or step by more than 1 too).
* **Which records are mine** (:func:`split_input`): contiguous blocks of whole shards when
  there are at least as many shards as tasks (no record counting, so no extra pass over a
  whole genome's gzip shards), otherwise contiguous ranges of the global record sequence
  (records counted by their TFRecord framing). Blocks are contiguous and in input order, so
  parts 0..N-1 concatenated are the rows of a one-task run. ``--sample`` and ``--regions``
  choose by each record's own bytes (:class:`probing.loader.RecordSample`,
  :class:`probing.regions.Regions`), never by position, so they choose the same records
  whichever task reads them. ``--limit L`` stays global (the first L records of the input)
  and is split by record range.
* **Is the part mine to write** (:class:`PartClaim`): a claim file created atomically
  beside the part, holding host, pid and the process's start time. A second process is
  refused while the first runs; the claim of a process that died on this machine is taken
  over, so a killed task simply reruns.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvtorch.errors import DvprobeError
from dvtorch.files import atomic_write_bytes, give_default_mode, host_id, pid_alive
from probing.tfrecord import ReadStats, iter_records, shard_name

PARTS_DIR = "parts"


class TaskError(DvprobeError):
    """A task option, its environment or its part's claim does not allow the run."""


@dataclass(frozen=True)
class Task:
    """Task ``index`` of ``count`` (0-based, like DeepVariant's ``--task``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise TaskError(f"--num-tasks must be >= 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise TaskError(f"--task must be in 0..{self.count - 1} for --num-tasks "
                            f"{self.count}, got {self.index}")

    @property
    def part(self) -> str:
        """The part directory's name, ``part-IIIII-of-NNNNN`` (DeepVariant's shard names)."""
        return part_name(self.index, self.count)


def part_name(index: int, count: int) -> str:
    return shard_name("part", index, count)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise TaskError(f"--task auto: ${name} is {value!r}, not a whole number") from None


def task_from_env(env: Mapping[str, str] | None = None) -> tuple[Task, str]:
    """The task this process is, from torchrun's or SLURM's environment, and which one
    said so. torchrun first: a torchrun job inside a SLURM allocation is numbered by rank.

    SLURM numbers array tasks by the ids given to ``--array`` (``--array=1-8`` starts at 1,
    ``--array=0-30:10`` steps by 10): the task is the id's place in the array.
    """
    env = os.environ if env is None else env
    rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    if rank is not None and world is not None:
        return Task(rank, world), "torchrun (RANK / WORLD_SIZE)"
    tid, count = _env_int(env, "SLURM_ARRAY_TASK_ID"), _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    if tid is not None and count is not None:
        low = _env_int(env, "SLURM_ARRAY_TASK_MIN") or 0
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") or 1
        index, off = divmod(tid - low, step)
        if off or not 0 <= index < count:
            raise TaskError(
                f"--task auto: SLURM array task id {tid} is not one of {count} evenly spaced "
                f"ids from {low} (step {step}); give the array as a range, e.g. "
                f"--array=0-{count - 1}")
        return Task(index, count), "a SLURM array (SLURM_ARRAY_TASK_ID / _COUNT)"
    raise TaskError("--task auto: neither torchrun's RANK / WORLD_SIZE nor a SLURM array's "
                    "SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT is set; give --task I "
                    "--num-tasks N")


def resolve_task(task: int | str | None, num_tasks: int | None,
                 env: Mapping[str, str] | None = None) -> Task | None:
    """``--task`` / ``--num-tasks`` as a :class:`Task` (None: one process, no parts)."""
    if task is None:
        if num_tasks is not None:
            raise TaskError("--num-tasks needs --task I (or --task auto) to say which task "
                            "this process is")
        return None
    if isinstance(task, str) and task.strip().lower() == "auto":
        found, source = task_from_env(env)
        if num_tasks is not None and num_tasks != found.count:
            raise TaskError(f"--num-tasks {num_tasks} but {source} says {found.count} tasks")
        return found
    try:
        index = int(task)
    except (TypeError, ValueError):
        raise TaskError(f"--task must be a task number or auto, got {task!r}") from None
    if num_tasks is None:
        raise TaskError("--task needs --num-tasks N (how many tasks share the input)")
    return Task(index, int(num_tasks))


# -- which records a task reads ---------------------------------------------------------


@dataclass(frozen=True)
class TaskRange:
    """The records one task reads: from record ``first_record`` of shard ``first_shard`` on,
    through shard ``end_shard - 1``, at most ``records`` of them (None: to that shard's end).

    Shard indices are the input's (so obs ``shard`` is the same as in a one-task run).
    ``how`` is ``shards`` (whole shards) or ``records`` (a range of the record sequence).
    """

    first_shard: int
    first_record: int
    end_shard: int
    records: int | None
    how: str

    def to_json(self) -> dict[str, Any]:
        return {"first_shard": self.first_shard, "first_record": self.first_record,
                "end_shard": self.end_shard, "records": self.records, "how": self.how}


def count_framed(path: str) -> int:
    """Records of one file as extraction's read position counts them: every framed record,
    corrupt ones included, and a place where the framing is lost as one (it is reported as
    one skipped record). Reads the whole file (gzip cannot seek) but parses nothing."""
    stats = ReadStats(report=False)
    n = sum(1 for _ in iter_records(path, skip_corrupt=True, stats=stats))
    return n + len(stats.skipped)


def split_input(files: Sequence[str], task: Task, limit: int | None = None,
                count: Callable[[str], int] = count_framed) -> TaskRange:
    """Task ``task``'s contiguous block of the input (see the module doc for why blocks).

    Whole shards ``[i*S//N, (i+1)*S//N)`` when there are at least as many shards as tasks
    and no ``limit``; otherwise records ``[i*R//N, (i+1)*R//N)`` of the ``R`` records read
    (``min(limit, all)`` with a limit; shards are counted only as far as needed).
    """
    s, n, i = len(files), task.count, task.index
    if limit is None and s >= n:
        lo, hi = i * s // n, (i + 1) * s // n
        return TaskRange(lo, 0, hi, None, "shards")
    sizes: list[int] = []
    for f in files:
        if limit is not None and sum(sizes) >= limit:
            break
        sizes.append(count(str(f)))
    total = sum(sizes) if limit is None else min(limit, sum(sizes))
    lo, hi = i * total // n, (i + 1) * total // n
    shard, record = _locate(sizes, lo)
    end = _locate(sizes, hi - 1)[0] + 1 if hi > lo else shard
    return TaskRange(shard, record, end, hi - lo, "records")


def _locate(sizes: Sequence[int], position: int) -> tuple[int, int]:
    """(shard, record within it) of the record at ``position`` of the whole sequence
    (past the end: one shard beyond the last)."""
    before = 0
    for shard, size in enumerate(sizes):
        if position < before + size:
            return shard, position - before
        before += size
    return len(sizes), 0


# -- claims: one writer per part ----------------------------------------------------------


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, /proc/PID/stat field 22), so a
    pid reused by another process is not taken for the claimant; None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def read_claim(path: str | os.PathLike) -> dict[str, Any] | None:
    """A claim file's record (host, pid, start, since), or None when there is none."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"unreadable": True}
    return data if isinstance(data, dict) else {"unreadable": True}


def claim_state(claim: Mapping[str, Any] | None) -> str:
    """``none``, ``live`` (its process runs), ``dead`` (it ran here and is gone) or
    ``unknown`` (another machine's, or unreadable: only its owner can tell)."""
    if claim is None:
        return "none"
    if claim.get("unreadable") or claim.get("host") != host_id():
        return "unknown"
    pid = claim.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return "unknown"
    if not pid_alive(pid):
        return "dead"
    start = claim.get("start")
    return "live" if start is None or _start_ticks(pid) in (None, start) else "dead"


def describe_claim(claim: Mapping[str, Any]) -> str:
    if claim.get("unreadable"):
        return "an unreadable claim"
    return (f"pid {claim.get('pid')} on {claim.get('hostname', claim.get('host'))} "
            f"(since {claim.get('since', '?')})")


class PartClaim:
    """This process's claim on one part (``with PartClaim.take(path, what): ...``).

    Why a claim file and not a lock: locks (``flock``) are unreliable on the network
    filesystems clusters share, and die silently with the node; a claim file is created
    with ``link`` (atomic on NFS and Lustre too) and says who holds it.
    """

    def __init__(self, path: Path, record: dict[str, Any]):
        self.path, self.record = path, record

    @classmethod
    def take(cls, path: str | os.PathLike, what: str) -> PartClaim:
        """Claim ``path`` for this process; refused (TaskError) while another holds it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"host": host_id(), "hostname": os.uname().nodename, "pid": os.getpid(),
                  "start": _start_ticks(os.getpid()),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        for _ in range(3):
            if _create_exclusive(path, data):
                return cls(path, record)
            held = read_claim(path)
            state = claim_state(held)
            if state == "none":
                continue  # released meanwhile: try again
            if state != "dead":
                raise TaskError(
                    f"{what} is being written by {describe_claim(held or {})}; two "
                    "processes cannot write one part (is the same --task running twice?). "
                    f"If that process is gone (another machine's), delete {path} and rerun")
            _remove_if_same(path, held)
        raise TaskError(f"{what}: could not claim {path} (other processes keep taking it)")

    def release(self) -> None:
        """Remove the claim if it is still this process's."""
        _remove_if_same(self.path, self.record)

    def __enter__(self) -> PartClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists (written whole, then linked in)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    atomic_write_bytes(tmp, data)
    try:
        give_default_mode(tmp)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _remove_if_same(path: Path, record: Mapping[str, Any] | None) -> None:
    """Delete the claim at ``path`` if it still holds ``record`` (not one taken since)."""
    with contextlib.suppress(FileNotFoundError):
        if read_claim(path) == dict(record or {}):
            path.unlink()

