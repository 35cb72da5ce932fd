"""``dvprobe extract ... --procs N`` / ``--gpus``: the tasks as local processes."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_tasks import LAYERS, _examples

import dvtorch
import probing.launch as la
from probing.extract import ExtractConfig, extract
from probing.launch import LaunchConfig, LaunchError, parse_gpus, plan_children, split_cores
from probing.store import open_store

ROOT = Path(__file__).resolve().parents[1]



def test_procs_2_gives_the_store_of_one_process(tmp_path):
    """The one end-to-end run of the launcher: the CLI starts two real task processes."""
    spec = _examples(tmp_path)
    bundle = dvtorch.reference_bundle(tmp_path / "bundle", seed=0)
    one = extract(ExtractConfig(bundle, spec, tmp_path / "one", layers=LAYERS, batch_size=2,
                                workers=0, device="cpu", commit_interval_s=0), progress=False)
    run = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "extract", str(bundle), spec, "--out",
         str(tmp_path / "two"), "--layers", ",".join(LAYERS), "--batch-size", "2",
         "--commit-every", "0", "--procs", "2"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600)
    assert run.returncode == 0, run.stderr
    assert "12 examples in 2 parts" in run.stdout
    two = open_store(tmp_path / "two")
    assert [p.n for p in two.parts] == [5, 7]
    pd.testing.assert_frame_equal(two.obs, one.obs)
    for name in LAYERS:
        assert np.asarray(two.layer(name)).tobytes() == np.asarray(one.layer(name)).tobytes()


def test_a_failed_task_stops_the_others_cleanly_and_names_its_part(tmp_path, monkeypatch):
    """Task 1 fails; task 0 (still running) is sent extraction's Ctrl-C, so it commits
    and exits; the error names the failed part, what it said and how to resume."""
    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    running = ("import pathlib, signal, sys, time\n"
               "def stop(*a):\n"
               f"    pathlib.Path({str(stopped)!r}).write_text('committed'); sys.exit(130)\n"
               "signal.signal(signal.SIGINT, stop)\n"
               f"pathlib.Path({str(ready)!r}).touch()\n"
               "time.sleep(120)\n")
    failing = ("import pathlib, sys, time\n"
               f"while not pathlib.Path({str(ready)!r}).exists(): time.sleep(0.05)\n"
               "print('dvprobe: error: ex.gz, record 3: payload CRC mismatch', "
               "file=sys.stderr)\n"
               "sys.exit(2)\n")
    monkeypatch.setattr(la, "child_argv", lambda config, i, n: [
        sys.executable, "-c", running if i == 0 else failing])
    config = ExtractConfig(tmp_path / "bundle", "ex.gz", tmp_path / "s", device="cpu")
    with pytest.raises(LaunchError) as caught:
        la.launch(LaunchConfig(config, procs=2, poll_s=0.05), progress=False)
    msg = str(caught.value)
    assert "task 1 of 2" in msg and "parts/part-00001-of-00002) failed (exit 2)" in msg
    assert "record 3: payload CRC mismatch" in msg
    assert "tasks 0 were stopped after committing" in msg
    assert "rerun the same command to resume" in msg
    assert stopped.read_text() == "committed"


def test_each_gpu_child_sees_only_its_gpu_and_a_share_of_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(la, "_cpus", lambda: list(range(8)))
    config = ExtractConfig(tmp_path / "b", "ex.gz", tmp_path / "s", layers=["mixed5"])
    children = plan_children(LaunchConfig(config, gpus="0,1,3", env={"PATH": "/bin"}))
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in children] == ["0", "1", "3"]
    assert [c.cores for c in children] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert [c.env["OMP_NUM_THREADS"] for c in children] == ["2", "3", "3"]
    for i, c in enumerate(children):
        argv = " ".join(c.argv)
        assert f"--task {i} --num-tasks 3" in argv and "--device cuda" in argv
        assert argv.startswith(f"{sys.executable} -m cli extract ")


def test_gpus_all_are_the_visible_ones_and_bad_lists_are_refused():
    assert parse_gpus("all", {"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert parse_gpus("0,1,3", {}) == ["0", "1", "3"]
    with pytest.raises(LaunchError, match="names GPU 1 more than once"):
        parse_gpus("1,1", {})
    with pytest.raises(LaunchError, match="GPU indices like 0,1,3"):
        parse_gpus("first", {})


def test_cores_are_split_in_contiguous_groups_and_shared_when_too_few():
    assert split_cores([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert split_cores([0, 1], 3) == [[0], [1], [0]]


@pytest.mark.parametrize(("options", "launch", "said"), [
    ({"task": 0, "num_tasks": 2}, {"procs": 2}, "drop --task"),
    ({}, {"procs": 2, "gpus": "0"}, "give one of --procs N"),
    ({"device": "cpu"}, {"gpus": "0"}, "--gpus runs on GPUs"),
    ({"device": "cuda"}, {"procs": 2}, "for --device cuda use --gpus"),
])
def test_launch_options_that_cannot_work_are_refused(tmp_path, options, launch, said):
    config = ExtractConfig(tmp_path / "b", "ex.gz", tmp_path / "s", **options)
    with pytest.raises(LaunchError, match=said):
        LaunchConfig(config, **launch)


def test_overwrite_never_removes_a_directory_dvprobe_did_not_write(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "store.json").write_text('{"format": "something else"}')
    with pytest.raises(LaunchError, match="not a dvprobe STORE"):
        la._remove_for_overwrite(tmp_path / "s")
    assert (tmp_path / "s" / "store.json").is_file()


def test_cli_interrupted_launch_says_how_to_resume(tmp_path, monkeypatch):
    """Ctrl-C on ``--procs``: the launcher's bar prints nothing, so the command must say
    what is committed and how to resume, with and without progress."""
    import typer
    from typer.testing import CliRunner

    from probing import commands_extract
    from probing.extract import ExtractionInterrupted

    said = "interrupted: 8 examples are committed in the parts of X; run the same command"

    def interrupted(*args, **kwargs):
        raise ExtractionInterrupted(said)

    monkeypatch.setattr(la, "launch", interrupted)
    app = typer.Typer()
    commands_extract.register(app)
    for quiet in (["--no-progress"], []):
        r = CliRunner().invoke(app, ["extract", str(tmp_path / "b"), "ex.gz", "--out",
                                     str(tmp_path / "o"), "--procs", "2", *quiet])
        assert r.exit_code != 0
        assert said in r.output, r.output


def test_a_store_of_another_task_count_is_refused_before_any_task_starts(tmp_path,
                                                                         monkeypatch):
    """Rerunning with another --procs (or another number of GPUs) cannot resume the parts:
    the launcher says so with the commands that can, instead of starting tasks that fail
    and then advising to 'rerun the same command'."""
    spec = _examples(tmp_path)
    bundle = dvtorch.reference_bundle(tmp_path / "bundle", seed=0)
    config = ExtractConfig(bundle, spec, tmp_path / "s", layers=LAYERS, batch_size=4,
                           workers=0, device="cpu", limit=3)
    extract(replace(config, task=0, num_tasks=3), progress=False)
    extract(ExtractConfig(bundle, spec, tmp_path / "one", layers=LAYERS, batch_size=4,
                          workers=0, device="cpu", limit=3), progress=False)
    # a task that did start would fail as "exit 3", which neither refusal matches
    monkeypatch.setattr(la, "child_argv", lambda config, i, n: [
        sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(LaunchError, match=r"split into 3 tasks, not 2: resume it with "
                                          r"--procs 3, .*--task I --num-tasks 3 for I = 0..2"):
        la.launch(LaunchConfig(config, procs=2, poll_s=0.05), progress=False)
    with pytest.raises(LaunchError, match=r"one-task extraction.*--overwrite"):
        la.launch(LaunchConfig(replace(config, out=tmp_path / "one"), procs=2, poll_s=0.05),
                  progress=False)
