"""``extract --task I --num-tasks N``: parts that read back as the one-task STORE.

The input is small (12 examples in 3 gzip shards of 5, 5 and 2) so that every split is
covered: fewer tasks than shards, as many, more (record ranges), and more tasks than
records (empty parts). The model, its layer shapes and its engines are made once for the
module: they are the same for every task (an engine is a snapshot of the model's weights),
and making them takes seconds per task on a busy 2-core runner.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dvtorch
import probing.extract as ex
import probing.store as st
from dvtorch.errors import DvprobeError
from probing.channels import WGS_CHANNELS, WGS_SHAPE
from probing.examples import encode_example, write_example_info
from probing.extract import ExtractConfig, extract
from probing.store import RowsView, StoreError, open_store
from probing.tasks import (
    PartClaim,
    Task,
    TaskError,
    read_claim,
    resolve_task,
    split_input,
    task_from_env,
)
from probing.tfrecord import TFRecordWriter, shard_name

SHARDS = (5, 5, 2)
N = sum(SHARDS)
LAYERS = ["mixed0", "mixed10"]
ROOT = Path(__file__).resolve().parents[1]


def _examples(d: Path, sizes=SHARDS, *, seed: int = 7, rows: tuple[int, int] = (10, 7)) -> str:
    """Gzipped WGS-shaped shards of ``sizes`` examples; example ``i`` has ``rows[0] + rows[1]
    * i`` random read rows, so every example differs."""
    rng = np.random.default_rng(seed)
    h, w, c = WGS_SHAPE
    base, i = str(d / "ex.tfrecord"), 0
    for s, size in enumerate(sizes):
        path = shard_name(base, s, len(sizes), ".gz")
        with TFRecordWriter(path, compress=True) as out:
            for _ in range(size):
                img = np.zeros((h, w, c), dtype=np.uint8)
                filled = rows[0] + rows[1] * i
                img[:filled] = rng.integers(1, 255, size=(filled, w, c), dtype=np.uint8)
                out.write(encode_example(img, chrom="chr20", start=1000 + 50 * i,
                                         end=1001 + 50 * i, ref="A", alts=("G",),
                                         alt_allele_indices=(0,), label=i % 3))
                i += 1
        write_example_info(path, WGS_SHAPE, WGS_CHANNELS, "1.6.0")
    return f"{base}@{len(sizes)}.gz"


@contextlib.contextmanager
def models_built_once() -> Iterator[None]:
    """Every extraction inside loads the model, its layer specs and each engine once (a
    module's many small extractions would otherwise rebuild them each time)."""
    engines: dict = {}
    models: dict = {}
    make_engine, load, layer_specs = ex.make_engine, dvtorch.load, ex._layer_specs

    def cached_engine(model, layers, pool, **kw):
        key = (tuple(layers), pool, kw.get("dtype"), kw.get("batch_size"))
        if key not in engines:
            engines[key] = make_engine(model, layers, pool, **kw)
        return engines[key]

    def cached_model(bundle, device="cpu"):
        key = ("model", str(bundle), device)
        if key not in models:
            models[key] = load(bundle, device=device)
        return models[key]

    def cached_specs(model, shape, layers, pool):
        key = ("specs", tuple(layers), pool)
        if key not in models:
            models[key] = layer_specs(model, shape, layers, pool)
        return models[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ex, "make_engine", cached_engine)
        mp.setattr(dvtorch, "load", cached_model)
        mp.setattr(ex, "_layer_specs", cached_specs)
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    d = {"root": root, "spec": _examples(root),
         "bundle": dvtorch.reference_bundle(root / "bundle", seed=0)}
    with models_built_once():
        d["whole"] = _extract(d, root / "whole")
        yield d


def _config(data, out, **options) -> ExtractConfig:
    return ExtractConfig(data["bundle"], data["spec"], out,
                         **{"layers": LAYERS, "batch_size": 4, "workers": 0, "device": "cpu",
                            "commit_interval_s": 0, **options})


def _extract(data, out, on_batch=None, **options):
    return extract(_config(data, out, **options), progress=False, on_batch=on_batch)


def _tasks(data, out, count, **options):
    for i in range(count):
        _extract(data, out, task=i, num_tasks=count, **options)
    return open_store(out)


def _assert_same_rows(a, b) -> None:
    assert a.n == b.n
    pd.testing.assert_frame_equal(a.obs, b.obs)
    for name in b.layers:
        got = np.asarray(a.layer(name))
        assert got.dtype == np.float32
        assert got.tobytes() == np.asarray(b.layer(name)).tobytes()  # bit-equal


# ---- the split ------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_n_tasks_give_the_one_task_store_row_for_row_bit_for_bit(data, tmp_path, count):
    """1-3 tasks split the 3 shards (whole shards), 4 split the 12 records (more tasks
    than shards)."""
    parted = _tasks(data, tmp_path / "s", count)
    assert parted.complete and len(parted.parts) == count
    _assert_same_rows(parted, data["whole"])


def test_a_sample_and_regions_keep_the_same_rows_with_any_number_of_tasks(data, tmp_path):
    choice = {"sample": 0.6, "sample_seed": 3, "regions": ["chr20:1001-1400"]}
    whole = _extract(data, tmp_path / "whole", **choice)
    assert 0 < whole.n < 8
    _assert_same_rows(_tasks(data, tmp_path / "parted", 3, **choice), whole)


def test_a_limit_is_the_first_records_of_the_whole_input_with_tasks_too(data, tmp_path):
    whole = _extract(data, tmp_path / "whole", limit=7)
    _assert_same_rows(_tasks(data, tmp_path / "parted", 2, limit=7), whole)


def test_more_tasks_than_records_leave_empty_parts_that_still_complete(data, tmp_path):
    parted = _tasks(data, tmp_path / "s", 5, limit=3)
    assert [p.n for p in parted.parts] == [0, 1, 0, 1, 1]
    assert all(p.complete for p in parted.parts)
    whole = data["whole"]
    pd.testing.assert_frame_equal(parted.obs, whole.obs.iloc[:3])
    assert np.asarray(parted.layer("mixed10")).tobytes() == \
        np.asarray(whole.layer("mixed10"))[:3].tobytes()


def test_shards_are_split_whole_and_records_only_with_more_tasks_than_shards():
    counted = []

    def count(path):
        counted.append(path)
        return {"a": 4, "b": 4, "c": 2}[path]

    files = ["a", "b", "c"]
    whole = [split_input(files, Task(i, 2), count=count) for i in range(2)]
    assert [(r.first_shard, r.end_shard, r.records, r.how) for r in whole] == [
        (0, 1, None, "shards"), (1, 3, None, "shards")]
    assert counted == []  # whole shards: nothing counted (no pass over a genome's gzip)
    ranges = [split_input(files, Task(i, 4), count=count) for i in range(4)]
    assert [(r.first_shard, r.first_record, r.records) for r in ranges] == [
        (0, 0, 2), (0, 2, 3), (1, 1, 2), (1, 3, 3)]
    limited = split_input(files, Task(1, 2), limit=5, count=count)
    assert (limited.first_shard, limited.first_record, limited.records) == (0, 2, 3)


# ---- which task am I --------------------------------------------------------------------


def test_task_auto_reads_torchrun_then_slurm_arrays_wherever_they_start():
    assert task_from_env({"RANK": "2", "WORLD_SIZE": "4",
                          "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "9"})[0] \
        == Task(2, 4)
    assert task_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8",
                          "SLURM_ARRAY_TASK_MIN": "1"})[0] == Task(2, 8)
    assert task_from_env({"SLURM_ARRAY_TASK_ID": "20", "SLURM_ARRAY_TASK_COUNT": "4",
                          "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "10"})[0] \
        == Task(2, 4)
    with pytest.raises(TaskError, match="neither torchrun's RANK"):
        task_from_env({})
    with pytest.raises(TaskError, match="--num-tasks 3 but torchrun"):
        resolve_task("auto", 3, {"RANK": "0", "WORLD_SIZE": "2"})


@pytest.mark.parametrize(("task", "count", "said"), [
    (4, 4, "--task must be in 0..3 for --num-tasks 4, got 4"),
    (0, 0, "--num-tasks must be >= 1, got 0"),
    (1, None, "--task needs --num-tasks N"),
    (None, 2, "--num-tasks needs --task I"),
    ("first", 2, "--task must be a task number or auto, got 'first'"),
])
def test_bad_task_options_are_refused_when_the_config_is_made(data, tmp_path, task, count,
                                                               said):
    with pytest.raises(TaskError, match=said.replace(".", r"\.")):
        _config(data, tmp_path / "o", task=task, num_tasks=count)


# ---- reading a parted STORE -------------------------------------------------------------


def test_a_missing_or_partial_part_is_named_with_the_command_that_finishes_it(data, tmp_path):
    out = tmp_path / "s"
    _extract(data, out, task=0, num_tasks=3)
    with pytest.raises(StoreError, match=r"part 1 of 3 \(parts/part-00001-of-00003\) is "
                                         r"missing .*1 more part\(s\).*finish it with: "
                                         r"dvprobe extract .*--task 1 --num-tasks 3"):
        open_store(out)

    def crash(n_done):
        if n_done >= 4:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _extract(data, out, task=1, num_tasks=3, on_batch=crash)
    with pytest.raises(StoreError, match=r"part 1 of 3 .* is partial \(4 examples committed\)"):
        open_store(out)
    _extract(data, out, task=1, num_tasks=3)  # the killed part resumes
    _extract(data, out, task=2, num_tasks=3)
    _assert_same_rows(open_store(out), data["whole"])


def test_a_moved_parted_store_names_itself_in_the_command_that_finishes_it(data, tmp_path):
    """Cluster nodes mount one STORE at different paths, and users move STOREs: the hint
    must write into the STORE that was opened, not where its first task ran."""
    _extract(data, tmp_path / "first", task=0, num_tasks=2)
    moved = tmp_path / "moved"
    (tmp_path / "first").rename(moved)
    with pytest.raises(StoreError) as refused:
        open_store(moved)
    command = str(refused.value).split("finish it with: ", 1)[1]
    assert f"--out {moved} " in command and str(tmp_path / "first") not in command
    from probing.info import store_info

    (part,) = [p for p in store_info(moved)["parts"] if p["state"] != "complete"]
    assert f"--out {moved} " in part["command"]


def test_a_task_with_other_inputs_or_task_count_is_refused_naming_the_difference(data,
                                                                                 tmp_path):
    out = tmp_path / "s"
    _extract(data, out, task=0, num_tasks=2, limit=10)
    with pytest.raises(StoreError, match="inputs differ|limit: 10 there, 11 now"):
        _extract(data, out, task=1, num_tasks=2, limit=11)
    with pytest.raises(StoreError, match="tasks: 2 there, 3 now"):
        _extract(data, out, task=1, num_tasks=3, limit=10)
    with pytest.raises(StoreError, match="split into 2 tasks; extract into it with --task"):
        _extract(data, out, limit=10)


def test_a_parted_layer_reads_like_the_one_task_array(data, tmp_path):
    parted = _tasks(data, tmp_path / "s", 3)
    m, want = parted.layer("mixed0"), np.asarray(data["whole"].layer("mixed0"))
    assert isinstance(m, RowsView) and m.shape == want.shape and len(m) == N
    mask = np.arange(N) % 3 == 1
    for key in (4, -1, slice(3, 9), slice(None, None, 4), slice(20, 30),
                np.array([0, 5, 6, 11]), np.array([11, 0, 6, 6]), mask, [2, 9]):
        np.testing.assert_array_equal(m[key], want[key])
    np.testing.assert_array_equal(m[np.array([1, 10]), 5:9], want[np.array([1, 10]), 5:9])
    np.testing.assert_array_equal(m[7, :3], want[7, :3])
    np.testing.assert_array_equal(np.asarray(m, dtype=np.float64), want.astype(np.float64))
    with pytest.raises(IndexError):
        m[N]
    np.testing.assert_array_equal(parted.layer("mixed0", mmap=False), want)


def test_a_dask_layer_reads_by_chunks_that_never_cross_a_part(data, tmp_path, monkeypatch):
    pytest.importorskip("dask.array")
    parted = _tasks(data, tmp_path / "s", 3)
    monkeypatch.setattr(st, "DASK_CHUNK_BYTES", 3 * parted.layer_specs["mixed0"].row_bytes)
    d = parted.layer("mixed0", dask=True)
    assert d.chunks[0] == (3, 2, 3, 2, 2)  # parts of 5, 5 and 2 rows
    np.testing.assert_array_equal(d.compute(), np.asarray(data["whole"].layer("mixed0")))
    single = data["whole"].layer("mixed10", dask=True)
    assert single[2:5].compute().tobytes() == \
        np.asarray(data["whole"].layer("mixed10"))[2:5].tobytes()


def test_annotations_and_runs_live_at_the_top_of_a_parted_store(data, tmp_path):
    parted = _tasks(data, tmp_path / "s", 2)
    parted.add_obs({"odd": np.arange(N) % 2 == 1})
    parted.save_run("r", meta={"kind": "test"},
                    obs=pd.DataFrame({"cluster": np.arange(N) % 4}))
    again = open_store(tmp_path / "s")
    assert again.obs["odd"].tolist() == [i % 2 == 1 for i in range(N)]
    assert again.run_obs(again.load_run("r"))["key"].tolist() == \
        data["whole"].obs["key"].tolist()
    assert (tmp_path / "s" / "annotations.parquet").is_file()


# ---- faults -----------------------------------------------------------------------------


def test_a_second_process_claiming_a_running_task_is_refused(data, tmp_path):
    out = tmp_path / "s"
    claim = out / "parts" / "part-00000-of-00002.claim"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from probing.tasks import PartClaim\n"
         f"c = PartClaim.take({str(claim)!r}, 'x'); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TaskError, match=rf"is being written by pid {holder.pid} on .*"
                                            "two processes cannot write one part"):
            _extract(data, out, task=0, num_tasks=2)
    finally:
        holder.kill()
        holder.wait()
    assert read_claim(claim)["pid"] == holder.pid  # left behind by a killed process ...
    _extract(data, out, task=0, num_tasks=2)        # ... and taken over
    assert read_claim(claim) is None                # released when the part is done


def test_a_claim_of_a_reused_pid_is_not_taken_for_its_claimant(tmp_path):
    claim = tmp_path / "c.claim"
    with PartClaim.take(claim, "part 0"):
        with pytest.raises(TaskError, match="being written by pid"):
            PartClaim.take(claim, "part 0")
        record = read_claim(claim)
        claim.write_text(claim.read_text().replace(f'"start": {record["start"]}',
                                                   f'"start": {record["start"] - 1}'))
        PartClaim.take(claim, "part 0").release()  # the same pid, started at another time
    assert not claim.exists()


def test_disk_full_while_writing_a_part_is_one_line_and_the_part_resumes(data, tmp_path,
                                                                        monkeypatch):
    out = tmp_path / "s"
    write_rows, calls = st.write_rows, []

    def full(path, offset, rows):
        calls.append(path)
        if len(calls) > 2:  # the second commit's first layer
            write_rows(path, offset, rows[: len(rows) // 2])  # a torn write, then ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device")
        write_rows(path, offset, rows)

    monkeypatch.setattr(st, "write_rows", full)
    with pytest.raises(ex.DiskFullError) as caught:
        _extract(data, out, task=1, num_tasks=2)
    msg = str(caught.value)
    assert "\n" not in msg and "part-00001-of-00002: disk full while writing" in msg
    assert "bytes free there" in msg and "rerun the same command to resume" in msg
    monkeypatch.setattr(st, "write_rows", write_rows)
    part = open_store(out / "parts" / "part-00001-of-00002")
    assert not part.complete and part.n == 4  # the first commit is kept
    _extract(data, out, task=1, num_tasks=2)
    _extract(data, out, task=0, num_tasks=2)
    _assert_same_rows(open_store(out), data["whole"])


def test_extract_refuses_a_task_count_the_top_level_does_not_hold(data, tmp_path):
    out = tmp_path / "s"
    (out / "junk").mkdir(parents=True)
    with pytest.raises(StoreError, match="exists and is not a STORE"):
        _extract(data, out, task=0, num_tasks=2)
    with pytest.raises(DvprobeError, match="one-task extraction"):
        _extract(data, data["root"] / "whole", task=0, num_tasks=2)


def test_under_torchrun_auto_is_the_gpu_of_the_local_rank(data, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "6")
    config = _config(data, tmp_path / "o", device="auto", task=6, num_tasks=8)
    assert ex._rank_device(torch.device("cuda"), config) == torch.device("cuda", 2)
    single = _config(data, tmp_path / "o", device="auto")
    assert ex._rank_device(torch.device("cuda"), single) == torch.device("cuda")


def test_the_command_that_makes_a_task_holds_absolute_paths_and_the_choices(tmp_path,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bundle").mkdir()
    c = ExtractConfig("bundle", "ex.tfrecord@3.gz", "out", layers=["mixed5"], sample=0.5,
                      regions=["chr20"], limit=9)
    argv = ex.command_line(c, task="{task}", num_tasks=4)
    assert argv == ["dvprobe", "extract", str(tmp_path / "bundle"),
                    str(tmp_path / "ex.tfrecord@3.gz"), "--out", str(tmp_path / "out"),
                    "--layers", "mixed5", "--pool", "max", "--dtype", "fp32", "--limit", "9",
                    "--sample", "0.5", "--sample-seed", "0", "--regions", "chr20",
                    "--task", "{task}", "--num-tasks", "4"]
    release = ExtractConfig("deepvariant-1.10.0-wgs", "ex.gz", "out")
    assert ex.command_line(release)[2] == "deepvariant-1.10.0-wgs"
