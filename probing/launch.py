"""``dvprobe extract ... --procs N`` / ``--gpus all|0,1,3``: the tasks of one extraction as
local processes, one per GPU or per group of CPU cores.

Why processes, and why tasks: one Python process feeds one GPU at most (the loader, the
host copies and the commit are all in it), and on a CPU, N processes with k cores each
scale better than one process with N*k threads. Each child is an ordinary ``dvprobe
extract ... --task i --num-tasks N`` (:mod:`probing.tasks`), so what the launcher starts is
exactly what a torchrun job or a SLURM array would run, writes its own part, and resumes
alone. The launcher adds only what a single box needs:

* **Devices**: ``--gpus`` gives child ``i`` one GPU through ``CUDA_VISIBLE_DEVICES`` (it
  sees it as ``cuda``); the CPU cores are split between the children (affinity and torch's
  thread count), so N processes do not fight over the same cores.
* **One progress bar**, fed by polling the parts' committed row counts (store.json).
* **One failure stops all, cleanly**: the others get SIGINT, which extraction handles like
  Ctrl-C (it commits what is finished, then exits), and the error names the failed part,
  the end of its output and how to resume. Every part stays resumable: rerunning the same
  command skips the complete parts and resumes the others.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dvtorch.errors import DvprobeError
from probing.extract import ExtractConfig, ExtractionInterrupted, command_line
from probing.store import FORMAT, Store, finish_command
from probing.tasks import part_name

#: seconds a stopped child has to commit and exit before it is killed (killing is safe:
#: it loses at most the batches since its last commit)
STOP_GRACE_S = 120.0
#: lines of a child's output kept to explain its failure
TAIL_LINES = 20


class LaunchError(DvprobeError):
    """A launched task failed, or the launch options cannot work here."""


@dataclass(frozen=True)
class LaunchConfig:
    """``extract`` run as ``procs`` CPU processes or one process per GPU of ``gpus``."""

    extract: ExtractConfig
    procs: int | None = None
    gpus: str | None = None
    poll_s: float = 0.5
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def __post_init__(self) -> None:
        if (self.procs is None) == (self.gpus is None):
            raise LaunchError("give one of --procs N (CPU processes) or --gpus all|0,1,3")
        if self.extract.task is not None:
            raise LaunchError("--procs / --gpus start the tasks themselves: drop --task and "
                              "--num-tasks (or run each task yourself without them)")
        if self.procs is not None and self.procs < 1:
            raise LaunchError(f"--procs must be >= 1, got {self.procs}")
        if self.gpus is not None and self.extract.device == "cpu":
            raise LaunchError("--gpus runs on GPUs: drop --device cpu (or use --procs)")
        if self.procs is not None and self.extract.device not in ("auto", "cpu"):
            raise LaunchError(f"--procs runs CPU processes; for --device "
                              f"{self.extract.device} use --gpus")

    def gpu_ids(self) -> list[str]:
        """The GPUs of ``--gpus``: ``all`` is every GPU this process may use."""
        return parse_gpus(self.gpus, self.env) if self.gpus is not None else []


def parse_gpus(value: str, env: dict[str, str]) -> list[str]:
    """``all`` (the GPUs of ``CUDA_VISIBLE_DEVICES`` when set, else every GPU found) or a
    comma list of GPU indices / UUIDs, each used once."""
    value = value.strip()
    if value.lower() == "all":
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else \
            [str(i) for i in range(_gpu_count())]
        if not ids:
            raise LaunchError("--gpus all: no GPU found (nvidia-smi lists none); use --procs "
                              "to run on the CPU")
        return ids
    ids = [v.strip() for v in value.split(",") if v.strip()]
    if not ids or any(not (v.isdigit() or v.startswith(("GPU-", "MIG-"))) for v in ids):
        raise LaunchError(f"--gpus must be all or GPU indices like 0,1,3, got {value!r}")
    twice = sorted({v for v in ids if ids.count(v) > 1})
    if twice:
        raise LaunchError(f"--gpus names GPU {', '.join(twice)} more than once")
    return ids


def _gpu_count() -> int:
    """GPUs on this machine, from nvidia-smi (no CUDA context in the launcher)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                             timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def split_cores(cores: Sequence[int], n: int) -> list[list[int]]:
    """``cores`` in ``n`` contiguous groups of nearly equal size (every child gets at least
    one core: with more children than cores, cores are shared round robin)."""
    if n > len(cores):
        return [[cores[i % len(cores)]] for i in range(n)]
    return [list(cores[i * len(cores) // n:(i + 1) * len(cores) // n]) for i in range(n)]


@dataclass
class Child:
    """One launched task: its process, the cores it may use, the end of its output."""

    index: int
    count: int
    argv: list[str]
    env: dict[str, str]
    cores: list[int]
    proc: subprocess.Popen | None = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(
        maxlen=TAIL_LINES))
    stopped: bool = False

    @property
    def part(self) -> str:
        return part_name(self.index, self.count)

    def start(self) -> None:
        cores = set(self.cores)

        def pin() -> None:  # in the child, before exec: its cores only
            if hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, cores)

        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace",
                                     preexec_fn=pin)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        """Keep the last lines of the child's stderr (and never let its pipe fill up)."""
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.tail.append(line.rstrip("\n"))

    def stop(self) -> None:
        """Ask the child to commit and exit (SIGINT: extraction's Ctrl-C)."""
        if self.proc is not None and self.proc.poll() is None:
            self.stopped = True
            self.proc.send_signal(signal.SIGINT)


def child_argv(config: ExtractConfig, index: int, count: int) -> list[str]:
    """The command of task ``index``: ``dvprobe extract ... --task index --num-tasks count``
    run by this Python, progress off (the launcher draws the bar)."""
    argv = command_line(config, task=index, num_tasks=count, run_options=True)
    return [sys.executable, "-m", "cli", *argv[1:], "--no-progress"]


def plan_children(lc: LaunchConfig) -> list[Child]:
    """One :class:`Child` per task: its command, environment and cores."""
    c = lc.extract
    gpus = lc.gpu_ids()
    n = len(gpus) if gpus else int(lc.procs or 1)
    config = replace(c, device="cuda") if gpus and c.device == "auto" else c
    groups = split_cores(_cpus(), n)
    children = []
    for i in range(n):
        env = dict(lc.env)
        threads = str(len(groups[i]))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
                   PYTHONPATH=os.pathsep.join(p for p in (_source_root(),
                                                          env.get("PYTHONPATH")) if p))
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        children.append(Child(i, n, child_argv(config, i, n), env, groups[i]))
    return children


def _source_root() -> str:
    """Where ``cli.py`` is, so that a child runs this dvprobe, wherever it is installed."""
    import cli  # noqa: F401  (the package root is where the CLI module lives)

    return str(Path(sys.modules["cli"].__file__).resolve().parent)


def _remove_for_overwrite(out: Path) -> None:
    """``--overwrite``: remove the STORE at ``out`` once, before any task starts (a task
    alone never removes the others' parts). Never a directory dvprobe did not write."""
    meta = out / "store.json"
    if not meta.is_file():
        return
    try:
        is_store = json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        is_store = False
    if not is_store:
        raise LaunchError(f"{out}: not a dvprobe STORE; --overwrite leaves it as it is")
    shutil.rmtree(out)


def launch(lc: LaunchConfig, *, progress: bool = True) -> Store:
    """Run every task of ``lc`` as a local process; the complete STORE when all succeed."""
    out = Path(lc.extract.out)
    if lc.extract.overwrite:
        _remove_for_overwrite(out)
        lc = replace(lc, extract=replace(lc.extract, overwrite=False))
    children = plan_children(lc)
    _check_resumable(out, len(children), lc)
    bar = _bar(lc, len(children)) if progress else None
    try:
        for child in children:
            child.start()
        failed = _supervise(children, out, bar, lc.poll_s)
    except KeyboardInterrupt:
        _stop_all(children)
        n = sum(p.n for p in _states(out))
        raise ExtractionInterrupted(
            f"interrupted: {n} examples are committed in the parts of {out}; run the same "
            "command again to resume every part from there") from None
    finally:
        if bar is not None:
            bar.close()
    if failed is not None:
        raise LaunchError(_failure(failed, children, out))
    return Store(out)


def _check_resumable(out: Path, n: int, lc: LaunchConfig) -> None:
    """Refuse, before any task starts, a STORE at ``out`` that ``n`` tasks cannot resume:
    one written in another number of parts, or in one. Every task would fail on it, and
    "rerun the same command" would fail again; say what can finish it instead."""
    try:
        old = json.loads((out / "store.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # nothing there yet (or unreadable: the tasks say what is wrong)
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        return
    count = (old.get("parts") or {}).get("count")
    if count is None:
        raise LaunchError(f"{out} holds a one-task extraction; --procs / --gpus write a "
                          "STORE in parts: choose another --out, or pass --overwrite to "
                          "replace it")
    if count != n:
        same = (f"--procs {count}" if lc.procs is not None
                else f"--gpus naming {count} GPUs")
        raise LaunchError(
            f"{out} holds an extraction split into {count} tasks, not {n}: resume it with "
            f"{same}, or run its tasks one by one ({finish_command(old, 'I', out)} for "
            f"I = 0..{count - 1}), or pass --overwrite to replace it")


def _bar(lc: LaunchConfig, n: int) -> Any:
    from tqdm.auto import tqdm

    c = lc.extract
    exact = c.sample is None and c.regions is None
    return tqdm(total=c.limit if exact else None, unit="ex", dynamic_ncols=True,
                desc=f"extract x{n}", file=sys.stderr, smoothing=0.1)


def _states(out: Path) -> list:
    try:
        return Store(out, partial_parts=True).parts
    except DvprobeError:
        return []  # no top-level store.json yet: the tasks are still starting


def _supervise(children: list[Child], out: Path, bar: Any, poll_s: float) -> Child | None:
    """Wait for every child, updating the bar; on the first failure stop the others and
    return the failed child."""
    shown = 0
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _terminated)  # scancel / kill: stop the children cleanly
    try:
        while True:
            if bar is not None:
                done = sum(p.n for p in _states(out))
                bar.update(done - shown)
                shown = done
            failed = next((c for c in children if c.proc.poll() not in (None, 0)), None)
            if failed is not None:
                _stop_all(children)
                return failed
            if all(c.proc.poll() == 0 for c in children):
                return None
            time.sleep(poll_s)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stop_all(children: list[Child], grace_s: float = STOP_GRACE_S) -> None:
    """SIGINT every running child, wait for it to commit and exit; kill it after grace_s."""
    for c in children:
        c.stop()
    deadline = time.monotonic() + grace_s
    for c in children:
        if c.proc is None:
            continue
        try:
            c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()


def _failure(failed: Child, children: list[Child], out: Path) -> str:
    """One message: which part failed and why (its last line), what became of the others,
    how to resume."""
    said = next((line for line in reversed(failed.tail) if line.strip()), "no output")
    stopped = [c.index for c in children if c.stopped]
    return (f"task {failed.index} of {failed.count} ({out}/parts/{failed.part}) failed "
            f"(exit {failed.proc.returncode}): {said.strip()}"
            + (f"; tasks {', '.join(map(str, stopped))} were stopped after committing"
               if stopped else "")
            + "; every part keeps what it committed: fix the cause and rerun the same "
              "command to resume")


__all__ = ["LaunchConfig", "LaunchError", "launch", "parse_gpus", "split_cores",
           "child_argv", "plan_children"]

