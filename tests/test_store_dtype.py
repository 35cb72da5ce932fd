"""``extract --store-dtype float16 | bfloat16``: pooled rows stored in half precision.

The contract: a half-precision STORE holds exactly the float32 STORE's rows cast by numpy's
``astype`` (ml_dtypes' for bfloat16: round to nearest, ties to even), half the bytes; a
value float16 cannot hold is refused, never stored as inf; ``Store.layer`` gives the stored
dtype while everything that computes (analysis, dask, the AnnData export) reads float32;
the dtype is part of what a resume or a task must match. The loss against float32 (max
relative error, k-means agreement) is measured in bench/bench_store_dtype.py, not here.

Extractions use a small input (10 examples in 2 gzip shards) and one model and engine for
the module: the store dtype changes only how rows are written, not how they are computed.
"""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pandas as pd
import pytest
from test_analysis_support import blobs, make_store
from test_tasks import _config, _examples, _extract, models_built_once

import dvtorch
import probing.extract as ex
from dvtorch.errors import DvprobeError
from probing import analysis as pa
from probing.extract import ExtractConfig, ExtractionInterrupted
from probing.info import format_info, store_info
from probing.store import LayerSpec, StoreError, StoreWriter, cast_rows, open_store

SHARDS = (6, 4)
N = sum(SHARDS)
LAYERS = ["mixed0", "mixed10"]
BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The examples, the model, the float32 STORE every other one is compared with, and
    the same extraction stored as float16 and as bfloat16."""
    root = tmp_path_factory.mktemp("store_dtype")
    d = {"root": root, "spec": _examples(root, SHARDS, seed=3, rows=(12, 8)),
         "bundle": dvtorch.reference_bundle(root / "bundle", seed=0)}
    with models_built_once():
        for name in ("float32", "float16", "bfloat16"):
            d[name] = _extract(d, root / name, store_dtype=name)
        d["f32"] = d["float32"]
        yield d


def _stop_after_first_batch(n: int) -> None:
    raise KeyboardInterrupt


def _interrupted(data, out, **options) -> None:
    """A STORE whose extraction stopped after its first batch (4 of N rows committed)."""
    with pytest.raises(ExtractionInterrupted):
        _extract(data, out, on_batch=_stop_after_first_batch, **options)
    assert open_store(out).n == 4


# ---- the rows -------------------------------------------------------------------------


@pytest.mark.parametrize(("store_dtype", "dtype"), [("float16", np.dtype(np.float16)),
                                                    ("bfloat16", BF16)])
def test_a_half_precision_store_holds_the_float32_rows_cast_by_astype(data, store_dtype,
                                                                      dtype):
    half, f32 = data[store_dtype], data["f32"]
    pd.testing.assert_frame_equal(half.obs, f32.obs)
    for name in LAYERS:
        spec = half.layer_specs[name]
        assert (spec.dtype, spec.pool, spec.dim) == (store_dtype, "max",
                                                     f32.layer_specs[name].dim)
        rows = half.layer(name)
        assert rows.dtype == dtype and rows.shape == (N, spec.dim)
        assert np.asarray(rows).tobytes() == np.asarray(f32.layer(name)).astype(dtype).tobytes()
        size = (half.path / "layers" / f"{name}.bin").stat().st_size
        assert size * 2 == (f32.path / "layers" / f"{name}.bin").stat().st_size
    meta = json.loads((half.path / "store.json").read_text())
    assert meta["inputs"]["store_dtype"] == store_dtype
    assert {v["dtype"] for v in meta["layers"].values()} == {store_dtype}


def test_flattened_maps_stay_float16_and_only_pooled_rows_take_the_store_dtype(data):
    specs = ex._stored_as([LayerSpec("mixed0", 35 * 256, "float16", "flatten"),
                           LayerSpec("mixed10", 2048, "float32", "max")], "bfloat16")
    assert [(s.dtype, s.pool) for s in specs] == [("float16", "flatten"), ("bfloat16", "max")]


def test_float32_is_the_default_and_is_not_recorded_so_older_stores_resume(data, tmp_path):
    """A STORE from before --store-dtype has no store_dtype in its fingerprint: the default
    writes the same fingerprint, so such a STORE resumes, to the same rows."""
    _interrupted(data, tmp_path / "s")
    assert "store_dtype" not in json.loads((tmp_path / "s" / "store.json").read_text())["inputs"]
    resumed = _extract(data, tmp_path / "s", store_dtype="float32")
    for name in LAYERS:
        assert np.asarray(resumed.layer(name)).tobytes() == \
            np.asarray(data["f32"].layer(name)).tobytes()


def test_a_half_precision_store_resumes_to_the_uninterrupted_rows(data, tmp_path):
    _interrupted(data, tmp_path / "s", store_dtype="float16")
    resumed = _extract(data, tmp_path / "s", store_dtype="float16")
    want = np.asarray(data["f32"].layer("mixed10")).astype(np.float16)
    assert np.asarray(resumed.layer("mixed10")).tobytes() == want.tobytes()


@pytest.mark.parametrize(("there", "now"), [("float32", "float16"), ("float16", "bfloat16"),
                                            ("bfloat16", "float32")])
def test_rerunning_with_another_store_dtype_is_refused_naming_the_flag(data, there, now):
    out = data[there].path
    before = {f.name: f.stat().st_mtime_ns for f in (out / "layers").iterdir()}
    said = f'--store-dtype: "{there}" there, "{now}" now'
    with pytest.raises(StoreError, match=re.escape(said) + ".*--overwrite"):
        _extract(data, out, store_dtype=now)
    assert {f.name: f.stat().st_mtime_ns for f in (out / "layers").iterdir()} == before


def test_resuming_a_partial_store_with_another_store_dtype_is_refused(data, tmp_path):
    _interrupted(data, tmp_path / "s")
    with pytest.raises(StoreError, match=re.escape('--store-dtype: "float32" there, '
                                                   '"bfloat16" now')):
        _extract(data, tmp_path / "s", store_dtype="bfloat16")
    assert open_store(tmp_path / "s").n == 4  # untouched


def test_every_task_of_a_parted_store_must_use_the_same_store_dtype(data, tmp_path):
    out = tmp_path / "s"
    _extract(data, out, task=0, num_tasks=2, store_dtype="bfloat16")
    with pytest.raises(StoreError, match=re.escape('--store-dtype: "bfloat16" there, '
                                                   '"float16" now')):
        _extract(data, out, task=1, num_tasks=2, store_dtype="float16")
    _extract(data, out, task=1, num_tasks=2, store_dtype="bfloat16")
    parted = open_store(out)
    rows = parted.layer("mixed0")
    assert rows.dtype == BF16
    assert np.asarray(rows).tobytes() == \
        np.asarray(data["f32"].layer("mixed0")).astype(BF16).tobytes()
    assert parted.layer("mixed0")[[1, 8]].dtype == BF16


def test_the_task_command_keeps_the_store_dtype(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bundle").mkdir()
    argv = ex.command_line(ExtractConfig("bundle", "ex.gz", "out", store_dtype="float16"),
                           task="{task}", num_tasks=2)
    assert argv[argv.index("--store-dtype") + 1] == "float16"
    assert "--store-dtype" not in ex.command_line(ExtractConfig("bundle", "ex.gz", "out"))


def test_an_unknown_store_dtype_is_refused_naming_the_flag(data, tmp_path):
    with pytest.raises(DvprobeError, match=re.escape(
            "--store-dtype must be one of float32, float16, bfloat16, got 'int8'")):
        _config(data, tmp_path / "o", store_dtype="int8")


# ---- range ----------------------------------------------------------------------------


def test_float16_refuses_a_value_beyond_its_range_naming_layer_and_example():
    rows = np.float32([[1.0, 65504.0, 65519.99], [2.0, 70000.0, -1e6]])
    with pytest.raises(StoreError, match=r"layer mixed5: 2 value\(s\) beyond float16's range "
                                         r"would be stored as inf, e\.g\. 70000 \(feature 1 "
                                         r"of example 'chr1:2:A>C:1'\); extract with "
                                         r"--store-dtype bfloat16"):
        cast_rows(rows, "float16", "layer mixed5", ["chr1:1:A>C:1", "chr1:2:A>C:1"])
    assert cast_rows(rows[:1], "float16", "x").tolist() == [[1.0, 65504.0, 65504.0]]
    held = cast_rows(rows, "bfloat16", "x")  # float32's range
    assert held.dtype == BF16 and np.isfinite(held.astype(np.float32)).all()


def test_values_that_are_not_finite_already_are_stored_as_they_are():
    rows = np.float32([[np.inf, -np.inf, np.nan, 0.0]])
    out = cast_rows(rows, "float16", "x")
    assert np.array_equal(out, rows.astype(np.float16), equal_nan=True)


def test_a_batch_with_a_value_out_of_range_is_refused_before_any_row_is_written(tmp_path):
    w = StoreWriter.open(tmp_path / "s", {"inputs": {}},
                         [LayerSpec("a", 2, "float16"), LayerSpec("b", 2, "float16")])
    obs = pd.DataFrame({"key": ["k0", "k1"]})
    w.append(obs, {"a": np.ones((2, 2), np.float32), "b": np.ones((2, 2), np.float32)})
    with pytest.raises(StoreError, match="layer b: 1 value.* e.g. 1e\\+06 .*example 'k3'"):
        w.append(pd.DataFrame({"key": ["k2", "k3"]}),
                 {"a": np.ones((2, 2), np.float32), "b": np.float32([[1, 1], [1, 1e6]])})
    assert w.n_committed == 2
    assert (tmp_path / "s" / "layers" / "a.bin").stat().st_size == 2 * 2 * 2


# ---- reading: float32 wherever it computes ----------------------------------------------


@pytest.fixture(scope="module")
def blob_stores(tmp_path_factory):
    """Well separated blobs stored as float32 and as float16 (same rows otherwise)."""
    root = tmp_path_factory.mktemp("blobs")
    x, y = blobs(300, 24, 4, seed=5)
    f32 = make_store(root / "f32", {"mixed5": x}, {"truth": y})
    w = StoreWriter.open(root / "f16", {"inputs": {"test": "f16"}},
                         [LayerSpec("mixed5", 24, "float16")])
    w.append(f32.obs, {"mixed5": x})
    return x, y, f32, w.finalize()


def test_kmeans_and_pca_run_on_a_float16_store_on_its_rows_read_as_float32(blob_stores):
    x, y, f32, f16 = blob_stores
    assert f16.layer("mixed5").dtype == np.float16
    r = pa.kmeans(f16, "mixed5", k=4, pca=8, seed=0, run="km", backend="sklearn")
    want = pa.kmeans(make_store(f16.path.parent / "widened",
                                {"mixed5": x.astype(np.float16).astype(np.float32)},
                                {"truth": y}),
                     "mixed5", k=4, pca=8, seed=0, run="km", backend="sklearn")
    for fitted in ("feat.mixed5.pca.components", "flat.protos"):
        assert r.arrays[fitted].dtype == np.float32
        np.testing.assert_array_equal(r.arrays[fitted], want.arrays[fitted])
    np.testing.assert_array_equal(r.obs["cluster"], want.obs["cluster"])
    assert pd.crosstab(r.obs["cluster"], y).gt(0).sum(axis=1).eq(1).all()  # blobs recovered


def test_a_dask_layer_is_float32_whatever_the_stored_dtype(data):
    pytest.importorskip("dask.array")
    bf = data["bfloat16"]
    d = bf.layer("mixed10", dask=True)
    assert d.dtype == np.float32
    want = np.asarray(bf.layer("mixed10")).astype(np.float32)
    assert d.compute().tobytes() == want.tobytes()
    assert d[3:7].mean(axis=0).compute().dtype == np.float32


def test_the_anndata_export_of_a_float16_store_has_float32_x_and_obsm(blob_stores, tmp_path):
    pytest.importorskip("anndata")
    x, _, _, f16 = blob_stores
    widened = x.astype(np.float16).astype(np.float32)
    adata = f16.to_anndata("mixed5", runs=[])
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X, widened)
    lazy = f16.to_anndata(runs=[], lazy=True)
    assert lazy.obsm["mixed5"].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(lazy.obsm["mixed5"].compute()), widened)


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16"])
def test_info_shows_how_each_layer_is_stored(data, store_dtype):
    info = store_info(data[store_dtype].path)
    assert {la["name"]: la["dtype"] for la in info["layers"]} == \
        {"mixed0": store_dtype, "mixed10": store_dtype}
    assert info["damage"] == []  # file sizes checked against the stored dtype's
    assert re.search(rf"mixed10 +2048 x {store_dtype}", format_info(info))


def test_the_cli_stores_the_dtype_it_is_given_and_refuses_an_unknown_one(data, tmp_path):
    import typer
    from typer.testing import CliRunner

    from probing import commands_extract

    app = typer.Typer()
    commands_extract.register(app)
    app.command("noop")(lambda: None)  # two commands: keep "extract" as a subcommand
    argv = ["extract", str(data["bundle"]), data["spec"], "--layers", ",".join(LAYERS),
            "--limit", "4", "--workers", "0", "--device", "cpu", "--batch-size", "4",
            "--no-progress"]
    r = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "s"),
                                 "--store-dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    got = open_store(tmp_path / "s").layer("mixed10")
    assert got.dtype == BF16
    assert np.asarray(got).tobytes() == np.asarray(data["bfloat16"].layer("mixed10"))[:4].tobytes()
    r = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "x"), "--store-dtype", "fp16"])
    assert isinstance(r.exception, DvprobeError)
    assert "--store-dtype must be one of float32, float16, bfloat16" in str(r.exception)
    assert not (tmp_path / "x").exists()
