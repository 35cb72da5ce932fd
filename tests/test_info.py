"""``dvprobe info STORE``: what a STORE holds and how it was made, read from metadata only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_analysis_support import make_store

import dvtorch
from probing import analysis as pa
from probing.extract import ExtractConfig, extract
from probing.info import format_info, store_info
from probing.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_extract_cpu import synth_examples  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """A sampled extraction with an annotation and a k-means run, as a user leaves it."""
    root = tmp_path_factory.mktemp("info")
    dvtorch.reference_bundle(root / "bundle", seed=0)
    spec = synth_examples(root / "examples", 48, shards=2)
    s = extract(ExtractConfig(root / "bundle", spec, root / "store", layers=["mixed5", "mixed10"],
                              device="cpu", batch_size=8, workers=0, sample=0.5,
                              sample_seed=2), progress=False)
    s.add_obs({"LINE": np.arange(s.n) % 3 == 0})
    pa.kmeans(s, "mixed5", k=2, pca=5, backend="sklearn", run="km2")
    return Store(s.path)


def test_info_says_what_the_store_holds_and_how_it_was_made(store):
    info = store_info(store.path)
    assert info["complete"] and info["n"] == store.n
    assert info["examples"]["shards"] == 2
    assert info["examples"]["sample"] == {"fraction": 0.5, "seed": 2}
    assert [la["name"] for la in info["layers"]] == ["mixed5", "mixed10"]  # as asked
    assert [la["bytes"] for la in info["layers"]] == [store.n * 768 * 4, store.n * 2048 * 4]
    assert info["model"]["found"] and info["model"]["untrained"]
    assert info["obs"]["annotations"] == ["LINE"]
    assert "alt_fraction" in info["obs"]["pileup"] and "p_het" in info["obs"]["model"]
    assert [(r["name"], r["kind"], r["clusters"]) for r in info["runs"]] == [("km2", "kmeans", 2)]
    assert info["extraction"]["engine"] == "cpu"
    text = format_info(info)
    assert text.splitlines()[0] == f"{store.path}: complete STORE, {store.n} examples"
    assert "untrained reference model" in text
    assert f"a 0.5 sample (seed 2); {store.n} kept of 48 records read" in text
    assert "mixed10" in text and "max-pooled from 1x5x2048" in text
    assert "km2: kmeans, mixed5, 2 clusters" in text
    assert "annotations: LINE" in text and "probes:     none" in text


def test_info_reads_no_layer_and_no_obs_row(store, monkeypatch):
    """Instant on a whole-genome STORE: rows are never read, only metadata and schemas."""
    def no_rows(*args, **kwargs):
        raise AssertionError("info read rows")

    monkeypatch.setattr(np, "memmap", no_rows)
    monkeypatch.setattr(np, "fromfile", no_rows)
    monkeypatch.setattr(pd, "read_parquet", no_rows)
    monkeypatch.setattr(Store, "layer", no_rows)
    assert store_info(store.path)["n"] == store.n


def test_info_on_an_interrupted_extraction_says_where_it_resumes(tmp_path):
    partial = make_store(tmp_path / "partial", {"mixed5": np.zeros((10, 4), np.float32)},
                         batch=4, complete=False)
    text = format_info(store_info(partial.path))
    assert f"{partial.path}: PARTIAL STORE, 10 examples committed" in text
    assert "rerun the same extract command, unless one is still running" in text
    assert "extraction: not finished" in text


def test_cli_prints_it_or_json_and_refuses_what_is_not_a_store(store, tmp_path):
    run = [sys.executable, "-c", "import cli; cli.main()", "info"]
    text = subprocess.run([*run, str(store.path)], capture_output=True, text=True, cwd=REPO)
    assert text.returncode == 0 and "complete STORE" in text.stdout
    as_json = subprocess.run([*run, str(store.path), "--json"], capture_output=True, text=True,
                             cwd=REPO)
    assert json.loads(as_json.stdout)["n"] == store.n
    bad = subprocess.run([*run, str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"dvprobe: error: {tmp_path}: not a dvprobe STORE (no store.json)"


def test_a_damaged_store_is_said_to_be_damaged_not_complete(store, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(store.path, bad)
    with open(bad / "layers" / "mixed5.bin", "r+b") as f:
        f.truncate(1000)
    (bad / "layers" / "mixed10.bin").unlink()
    (bad / "annotations.parquet").write_bytes(b"junk")
    (bad / "runs" / "km2" / "run.json").write_text("[1, 2]")
    info = store_info(bad)
    first, *rest = format_info(info).splitlines()
    assert first.endswith(f"complete STORE, {store.n} examples; DAMAGED:")
    assert rest[0] == f"  layers/mixed5.bin holds 1,000 bytes, {store.n * 768 * 4:,} expected " \
                      f"for {store.n} rows"
    assert rest[1] == "  layers/mixed10.bin is missing"
    assert rest[2].startswith("  annotations.parquet is unreadable (")
    assert "  km2: unreadable run.json (a JSON list, not an object)" in rest
    assert store_info(store.path)["damage"] == []


def test_a_model_replaced_at_the_recorded_path_is_not_passed_off_as_the_stores(store, tmp_path):
    import json as _json
    import shutil

    moved = tmp_path / "s"
    shutil.copytree(store.path, moved)
    bundle = tmp_path / "other-model"
    shutil.copytree(store.meta["bundle"], bundle)
    meta = _json.loads((moved / "store.json").read_text())
    meta["bundle"] = str(bundle)
    (moved / "store.json").write_text(_json.dumps(meta))
    assert "untrained reference model" in format_info(store_info(moved))  # the same bundle
    recorded = _json.loads((bundle / "bundle.json").read_text())
    recorded["untrained"] = False  # re-converted / another download into the same directory
    (bundle / "bundle.json").write_text(_json.dumps(recorded))
    text = format_info(store_info(moved))
    assert f"model:      {bundle} has changed since: its bundle.json is not the one" in text
    assert "untrained reference model" not in text


def test_info_lists_the_parts_of_a_store_written_by_tasks_and_how_to_finish_them(tmp_path):
    from test_store import make_parted_store

    from probing.tasks import PartClaim

    x = np.ones((9, 4), np.float32)
    store = make_parted_store(tmp_path / "p", {"l": x}, [4, 3, 2],
                              ["complete", "partial", "missing"])
    info = store_info(store.path)
    assert not info["complete"] and info["n"] == 7
    assert [(p["name"], p["state"], p["n"]) for p in info["parts"]] == [
        ("part-00000-of-00003", "complete", 4), ("part-00001-of-00003", "partial", 3),
        ("part-00002-of-00003", "missing", 0)]
    assert info["layers"][0]["bytes"] == 7 * 4 * 4 and info["damage"] == []
    text = format_info(info)
    assert text.splitlines()[0] == (f"{store.path}: PARTIAL STORE in 3 parts (extract "
                                    "--task): 1 complete, 7 examples committed; it opens "
                                    "when every part is complete")
    assert "part-00001-of-00003  partial           3 examples" in text
    assert (f"finish with: dvprobe extract B E --out {store.path} --task 1 --num-tasks 3 "
            "(and likewise --task 2)") in text
    with PartClaim.take(store.path / "parts" / "part-00001-of-00003.claim", "part 1"):
        text = format_info(store_info(store.path))
    assert "partial           3 examples; pid" in text and "is writing it" in text
    assert "--task 2 --num-tasks 3" in text and "--task 1 --num-tasks" not in text
    (store.path / "parts" / "part-00000-of-00003" / "layers" / "l.bin").write_bytes(b"")
    assert store_info(store.path)["damage"] == [
        "parts/part-00000-of-00003/layers/l.bin holds 0 bytes, 64 expected for 4 rows"]


def test_a_part_claimed_on_another_machine_is_not_said_to_be_written_there(tmp_path):
    """A SLURM task killed on its node leaves its claim: nobody here can tell whether it
    still runs, so info and the refusal say how to clear it, not only 'wait for it'."""
    from test_store import make_parted_store

    from probing.store import StoreError, open_store

    x = np.ones((6, 4), np.float32)
    store = make_parted_store(tmp_path / "p", {"l": x}, [4, 2], ["complete", "missing"])
    claim = store.path / "parts" / "part-00001-of-00002.claim"
    claim.write_text(json.dumps({"host": "another-machine", "hostname": "node7",
                                  "pid": 4242, "start": 5, "since": "2026-12-07 01:00:00"}))
    text = format_info(store_info(store.path))
    assert "is writing it" not in text
    assert f"claimed by pid 4242 on node7 (since 2026-12-07 01:00:00); if that process is " \
           f"gone, delete {claim}" in text
    assert f"finish with: dvprobe extract B E --out {store.path} --task 1 --num-tasks 2" in text
    with pytest.raises(StoreError) as refused:
        open_store(store.path)
    said = str(refused.value)
    assert "wait for it to finish" not in said and f"delete {claim}" in said
    assert "finish it with: dvprobe extract B E" in said


def test_the_small_models_calls_beside_the_examples_are_said_at_extraction_and_by_info(
        tmp_path, caplog):
    """Since 1.8 DeepVariant's small model genotypes easy sites without writing an example:
    a STORE of such examples misses them, and extract and info say so."""
    from probing.tfrecord import write_records

    dvtorch.reference_bundle(tmp_path / "bundle", seed=0)
    spec = synth_examples(tmp_path / "examples", 8, shards=1)
    calls = Path(spec).parent / "make_examples_call_variant_outputs.tfrecord-00000-of-00001.gz"
    write_records(calls, [b"one site the small model called"])
    with caplog.at_level("WARNING"):
        s = extract(ExtractConfig(tmp_path / "bundle", spec, tmp_path / "store",
                                  layers=["mixed5"], device="cpu", batch_size=8, workers=0),
                    progress=False)
    assert "small model: ON" in caplog.text and "--disable_small_model" in caplog.text
    assert s.meta["small_model"]["files"] == [calls.name]
    assert "small model: ON" in format_info(store_info(s.path))
