"""probing.loader: its worker processes do not outlive the process that reads from them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from probing.examples import encode_example
from probing.tfrecord import write_records

SHAPE = (5, 8, 7)
ROOT = Path(__file__).parents[1]

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="parent-death signals are Linux-only")


def _write_examples(path: Path, n: int = 6) -> Path:
    """``n`` tiny make_examples records (no TensorFlow needed)."""
    rng = np.random.default_rng(0)
    write_records(path, (
        encode_example(rng.integers(0, 256, SHAPE, dtype=np.uint8), chrom="chr20",
                       start=100 + i, end=101 + i, ref="A", alts=("G",), alt_allele_indices=(0,))
        for i in range(n)))
    return path


def _alive(pid: int) -> bool:
    """Running, i.e. neither gone nor a zombie (in a container, nothing may reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# Reads one batch through a one-worker loader, prints the worker's pid, then waits to be
# killed with the worker still running (its prefetch queue is not full).
_READER = f"""
import multiprocessing, sys, time
from probing.loader import ExampleBatches, make_loader
dataset = ExampleBatches([sys.argv[1]], batch_size=1, shape={SHAPE}, channels=None)
batches = iter(make_loader(dataset, workers=1, pin_memory=False))
next(batches)
print(*[p.pid for p in multiprocessing.active_children()], flush=True)
time.sleep(120)
"""


@linux_only
def test_loader_worker_dies_within_two_seconds_of_a_kill_9_of_its_parent(tmp_path):
    examples = _write_examples(tmp_path / "ex.tfrecord.gz")
    parent = subprocess.Popen([sys.executable, "-c", _READER, str(examples)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, start_new_session=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers: list[int] = []
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 1 and _alive(workers[0])
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 2.0
        while _alive(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(workers[0]), "the loader worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@linux_only
def test_a_worker_whose_parent_died_before_it_asked_for_the_signal_ends_itself():
    # The kernel only signals a parent's death that happens after the request: the worker
    # must notice that it was already orphaned (here: its recorded parent is another pid).
    code = (
        "import multiprocessing, os\n"
        "from probing import loader\n"
        "class Gone:\n"
        "    pid = os.getppid() + 1\n"
        "multiprocessing.parent_process = lambda: Gone\n"
        "loader.die_with_parent(0)\n"
        "print('still running')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert "still running" not in done.stdout
